"""
Checkpoints that prove themselves, for every script that reads one (train.py, export.py, sample.py), with the
standard library alone.

train.py writes a sharded checkpoint as out_dir/ckpt-NNNNNN.tmp/ and renames it to ckpt-NNNNNN/ once whole. Its
manifest.json, written last, gives each file's size and CRC-32s (one per PIECE bytes) as computed by the process
that wrote the file (DCP's shards by their rank; .metadata and train.json by rank 0), and a CRC-32 of itself.
verify() checks a checkpoint against it before anything is read from it: a truncated or overwritten file is then
one clear line that names it, not a traceback from deep inside torch, a NaN loss, or a silently different model.
ckpt.pt (one file, for sample.py) carries the CRC-32 of its tensors' bytes instead: see state_crc.

CRC-32 finds accidental damage (truncation, a flipped bit, a block of someone else's bytes), not tampering, which
is all that is asked here; it is the fastest of the standard library's checks. Measured on one core of an AMD
EPYC over 256 MB in 16 MB chunks: zlib.crc32 3.3 GB/s (zlib 1.2.13), adler32 2.8, sha256 1.45, blake2b 0.67. A
CRC per 64 MB piece lets threads share a big file (zlib and preadv release the GIL), as they share the save.
"""
import atexit
import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
import zlib

from concurrent.futures import ThreadPoolExecutor

MANIFEST = 'manifest.json'
PIECE = 64 << 20  # bytes per CRC-32: the unit of work of the threads that checksum one file
READ = 4 << 20  # bytes read at a time into a thread's buffer
THREADS = min(8, os.cpu_count() or 1)


def checkpoint_dirs(out_dir):
    """The sharded checkpoints in out_dir (ckpt-NNNNNN/, not a save cut short: ckpt-NNNNNN.tmp/), oldest first."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    dirs = [os.path.join(out_dir, n) for n in names if re.fullmatch(r'ckpt-\d+', n)]
    return sorted((d for d in dirs if os.path.isdir(d)), key=step_of)


def step_of(path):
    return int(os.path.basename(os.path.normpath(path)).rsplit('-', 1)[1])


def is_checkpoint(path):
    """A sharded checkpoint of ours: a directory with DCP's .metadata and train.py's train.json."""
    return os.path.isfile(os.path.join(path, 'train.json')) and os.path.isfile(os.path.join(path, '.metadata'))


def file_crc(path):
    """[size in bytes, [CRC-32 of each PIECE]] of a file, the pieces read by THREADS threads."""
    def piece(offset):
        view, crc = memoryview(bytearray(READ)), 0
        end = min(offset + PIECE, size)
        while offset < end:
            n = os.preadv(fd, [view[:min(READ, end - offset)]], offset)
            if n == 0:  # shorter than it was a moment ago: the CRC then cannot match
                break
            crc, offset = zlib.crc32(view[:n], crc), offset + n
        return crc
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with ThreadPoolExecutor(THREADS) as pool:
            return [size, list(pool.map(piece, range(0, max(size, 1), PIECE)))]
    finally:
        os.close(fd)


def state_crc(state):
    """CRC-32 of a state dict's names and tensors' bytes, in sorted order: ckpt.pt's check on itself."""
    import torch  # only here: the rest of this file reads files
    crc = 0
    for key in sorted(state):
        crc = zlib.crc32(key.encode(), crc)
        t = state[key].detach().cpu().contiguous().reshape(-1)
        if t.numel():
            crc = zlib.crc32(t.view(torch.uint8).numpy(), crc)
    return crc


def _self_crc(files):
    return zlib.crc32(json.dumps(files, sort_keys=True).encode())


def write_manifest(path, files):
    """path/manifest.json: files {name: file_crc} and a CRC-32 of that table, written and synced to disk."""
    with open(os.path.join(path, MANIFEST), 'w') as f:
        json.dump({'files': files, 'crc32': _self_crc(files)}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path):
    """{name: file_crc} of a checkpoint's files, or None for a checkpoint written before checkpoints had
    manifests (it has .metadata and train.json but no manifest.json). Raises ValueError saying what is wrong."""
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        missing = [f for f in ('.metadata', 'train.json') if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ValueError(f"{', '.join(missing + [MANIFEST])} are missing")
        return None
    try:
        with open(file) as f:
            manifest = json.load(f)
        files = manifest['files']
        if not isinstance(files, dict) or manifest['crc32'] != _self_crc(files):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{MANIFEST} is damaged (it does not match its own checksum)") from None
    return files


def check_files(path, files, names=None):
    """The first problem with the named files (all by default) against the manifest's files, or None."""
    for f in sorted(files) if names is None else names:
        size, crc = files[f]
        try:
            have = os.path.getsize(os.path.join(path, f))
        except OSError:
            return f"{f} is missing"
        if have != size:
            how = 'truncated' if have < size else 'grown'
            return f"{f} has {have:,} bytes, not the {size:,} it was written with ({how})"
        if file_crc(os.path.join(path, f))[1] != crc:
            return f"{f} does not match its checksum: its bytes changed after it was written"
    return None


def verify(path):
    """(problem or None, verified): a checkpoint checked whole in this process. verified is False (and problem
    None) for a checkpoint from before manifests, which can only be read and hoped for. A problem names the file
    (".metadata is missing"), not the checkpoint: say that with it."""
    try:
        files = read_manifest(path)
    except ValueError as e:
        return str(e), False
    if files is None:
        return None, False
    return check_files(path, files), True


# -----------------------------------------------------------------------------
# one run per out_dir: train.py holds it from start to end (rank 0), so a second run on it is one line, not a
# silent interleaving of two runs' checkpoints and metrics

_lock = None  # (file descriptor, lock file, out_dir if this run created it) while this process holds out_dir


def lock_out_dir(out_dir):
    """Hold out_dir for this run's whole life (rank 0 alone): an exclusive flock on out_dir/train.lock, whose
    content names the holder (host, pid, start time) for the line a second run gets. The kernel releases a flock
    when its holder dies, however it dies, so a lock file left by a killed run of this host is taken over, with
    a note. Returns (problem, note), each one line or None.
    out_dir shared by nodes: NFS (v4, or v3 with lockd) turns flock into a whole-file lock that every client sees,
    and Lustre does when mounted with -o flock, so two runs on any nodes exclude each other (NFS v4 drops a dead
    node's locks when its lease lapses, about 90 s). Where the filesystem has no locks (flock fails: Lustre's -o
    noflock) the file alone decides, a check rather than a lock: a live process of this host named in it holds
    out_dir. A lock file left by a run of another host is never taken over, since from here it cannot be told
    whether that run lives (with Lustre's -o localflock or NFS's local_lock it may): the line says to delete the
    file once that run has ended."""
    global _lock
    created = not os.path.isdir(out_dir)
    path = os.path.join(out_dir, 'train.lock')
    try:
        os.makedirs(out_dir, exist_ok=True)
        while True:  # again if the holder removed the file between our open and our flock (release_out_dir)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                kernel = True
            except BlockingIOError:  # a live run holds it
                holder = _read_lock(fd)
                os.close(fd)
                return (f"{out_dir} is in use by another run ({_describe(holder)}): wait for it to end, or choose "
                        f"another out_dir"), None
            except OSError:  # a filesystem without locks
                kernel = False
            if os.path.exists(path) and os.path.samestat(os.stat(path), os.fstat(fd)):
                break
            os.close(fd)
        holder, note = _read_lock(fd), None
        if holder:
            here = holder.get('host') == socket.gethostname()
            alive = here and not kernel and _alive(holder)
            if alive or not here:
                os.close(fd)
                what = "wait for it to end" if alive else f"if that run has ended, delete {path}"
                return (f"{out_dir} is in use by another run ({_describe(holder)}): {what}, or choose another "
                        f"out_dir"), None
            note = f"note: {path} was left by a run that has ended ({_describe(holder)}); this run takes it over"
        me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                  pid_start=_process_start(os.getpid()), command=' '.join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
        os.fsync(fd)
    except OSError as e:
        return f"cannot write in out_dir={out_dir}: {e.strerror or e}", None
    _lock = (fd, path, out_dir if created else None)
    atexit.register(release_out_dir)
    return None, note


def release_out_dir():
    """Give out_dir back: remove the lock file (before closing it: see lock_out_dir's loop), and out_dir too if
    this run created it and wrote nothing else there."""
    global _lock
    if _lock is None:
        return
    fd, path, created = _lock
    _lock = None
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(created)


def _read_lock(fd):
    try:
        return json.loads(os.pread(fd, 1 << 16, 0) or b'{}')
    except ValueError:  # cut short as it was written: its writer died then
        return {}


def _describe(holder):
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _process_start(pid):
    """When a process started (clock ticks since boot, /proc/PID/stat field 22): a pid reused by another process
    does not pass for the one a lock file names. None where there is no /proc."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(holder):
    """Whether the process of this host that a lock file names still runs."""
    try:
        os.kill(holder['pid'], 0)
    except PermissionError:  # another user's
        pass
    except (OSError, KeyError, TypeError, ValueError, OverflowError):
        return False
    return holder.get('pid_start') in (None, _process_start(holder['pid']))
