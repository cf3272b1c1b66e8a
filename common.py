"""
What the scripts and libraries share: one clear line instead of a traceback, printing once per job, moving
small objects between processes, a file's CRC-32s, a folder swapped in with no gap, and the lock that keeps a second run (train.py, prepare.py)
off a folder in use. It sits below every other file of the repository (it imports none of them, and torch only
inside the functions that need it: prepare.py uses it without torch), so any of them may import it.
"""

import atexit
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor


def print0(*args):
    """print on rank 0 only (RANK as torchrun sets it; a plain `python` run is rank 0)."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, flush=True)


def fail(message, this_rank_only=False, prog=None):
    """End the run with one clear line on stderr and exit status 1, never a traceback. What every rank
    meets alike (settings, files) rank 0 alone prints; this_rank_only: only this rank can know. prog: a script
    name to start the line with ("prepare.py: error: ..."), as argparse does. Under torchrun the line also goes
    to the error file it names: torchrun ends its own report (a traceback of the launcher, then each failed
    rank) with that file's message as the failure's "traceback", so the line comes last."""
    line = f"{prog}: error: {message}" if prog else f"error: {message}"
    if this_rank_only or int(os.environ.get('RANK', 0)) == 0:
        print(line, file=sys.stderr, flush=True)
    if os.environ.get('TORCHELASTIC_ERROR_FILE'):
        with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:
            json.dump({'message': {'message': line, 'extraInfo': {
                'py_callstack': line, 'timestamp': str(int(time.time()))}}}, f)
    sys.exit(1)


def from_rank0(obj):
    """Rank 0's obj on every rank. What rank 0 alone looks at (the lock, the free space, the files it writes) every
    rank then acts on alike, so that a failure ends them all, with one line."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj):
    """Every rank's obj, in rank order, on every rank."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def human(n):
    """A size in bytes as people read it: 1.2 MB (powers of 1000, as df -H)."""
    for unit in ('bytes', 'kB', 'MB', 'GB'):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == 'bytes' else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# -----------------------------------------------------------------------------
# a file's CRC-32s (checkpoints.py's manifests, prepare.py's meta.json): CRC-32 finds accidental damage
# (truncation, a flipped bit), not tampering; see checkpoints.py for the measured speeds

PIECE = 64 << 20  # bytes per CRC-32: the unit of work of the threads that checksum one file
READ = 4 << 20  # bytes read at a time into a thread's buffer
THREADS = min(8, os.cpu_count() or 1)


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


# -----------------------------------------------------------------------------
# one run per out_dir: train.py holds it from start to end (rank 0), so a second run on it is one line, not a
# silent interleaving of two runs' checkpoints and metrics

_lock = None  # (file descriptor, lock file, out_dir if this run created it) while this process holds out_dir


def swap_folder(new, path, aside):
    """new takes path's place with no moment where neither is whole: path (where it exists) is renamed to
    aside, then new renamed to path; SIGTERM and Ctrl-C wait for the two renames. The caller deletes aside
    afterwards; a run killed (SIGKILL) between the renames leaves aside for the next run to put back."""
    held = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        if os.path.exists(path):
            os.rename(path, aside)
        os.rename(new, path)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


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
