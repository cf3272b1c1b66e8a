"""
All of checkpointing: saving, verifying, choosing what to resume, setting aside, loading; train.py calls it,
export.py and sample.py read what it wrote.

Sharded checkpoints (DCP, torch.distributed.checkpoint) hold the weights that train and Lion's state; each rank
writes and reads only its shards, so a checkpoint saved on one number of processes loads on any other. train.py
writes a sharded checkpoint as out_dir/ckpt-NNNNNN.tmp/ and renames it to ckpt-NNNNNN/ once whole. Its
manifest.json, written last, gives each file's size and CRC-32s (one per common.PIECE bytes) as computed by the process
that wrote the file (DCP's shards by their rank; .metadata and train.json by rank 0), and a CRC-32 of itself.
verify() checks a checkpoint against it before anything is read from it: a truncated or overwritten file is then
one clear line that names it, not a traceback from deep inside torch, a NaN loss, or a silently different model.
ckpt.pt (one file, for sample.py) carries the CRC-32 of its tensors' bytes instead: see state_crc.

CRC-32 finds accidental damage (truncation, a flipped bit, a block of someone else's bytes), not tampering, which
is all that is asked here; it is the fastest of the standard library's checks. Measured on one core of an AMD
EPYC over 256 MB in 16 MB chunks: zlib.crc32 3.3 GB/s (zlib 1.2.13), adler32 2.8, sha256 1.45, blake2b 0.67. A
CRC per 64 MB piece lets threads share a big file (zlib and preadv release the GIL), as they share the save.
"""
import contextlib
import errno
import glob
import json
import os
import re
import shutil
import time
import zlib
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from common import fail, file_crc, from_rank0, gather, human, lock_out_dir, print0

MANIFEST = 'manifest.json'


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



def state_crc(state):
    """CRC-32 of a state dict's names and tensors' bytes, in sorted order: ckpt.pt's check on itself."""
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
# what a checkpoint keeps: out_dir/ckpt-NNNNNN/ is written as ckpt-NNNNNN.tmp/ and renamed when complete, so a
# crash during a save leaves the previous checkpoint as the newest. A run holds its out_dir for its whole life
# (common.lock_out_dir).

SHAPE_FIELDS = ('vocab_size', 'd_model', 'n_heads', 'n_layers', 'expansion_ratio', 'kv_n_heads', 'qk_ln')
# what a stage (init_from=ckpt-NNNNNN) keeps of the checkpoint's model; max_seq_len, alibi_bias_max, dropout
# and attn_impl are the new run's settings (MPT-7B-StoryWriter's 65k stage raised alibi_bias_max 8 -> 16)
ARCH_FIELDS = SHAPE_FIELDS + ('clip_qkv', 'softmax_scale', 'logit_scale', 'layer_norm_epsilon')
# what a resume keeps besides: the windows of the saved data position, and the ALiBi slopes trained with
RUN_FIELDS = ('max_seq_len', 'alibi_bias_max')


# a checkpoint holds what trains: the whole model, or a LoRA run's adapters (its frozen base is re-read from the
# Hugging Face directory it started from, train.json's 'base', and checked against its fingerprint)
TRAINED = StateDictOptions(ignore_frozen_params=True)


def verify_checkpoint(path):
    """(problem or None, the manifest's files or None for a checkpoint from before manifests, seconds): a
    checkpoint checked against its manifest by all ranks together, each reading its share of the files (the
    largest first, dealt round), so that a big checkpoint is read once, in parallel. Every rank gets the same."""
    t0 = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        files = read_manifest(path)
        problem = files and check_files(path, files, sorted(files, key=lambda f: (-files[f][0], f))[rank::world])
    except ValueError as e:
        files, problem = None, str(e)
    problems = [p for p in gather(problem) if p]
    return (problems[0] if problems else None), files, time.time() - t0


def choose_resume(out_dir, step):
    """(directory, train.json, verified) of the checkpoint init_from='resume' continues: out_dir's at step (-1: the
    newest), verified against its manifest before anything is read from it. A damaged or incomplete one is one line
    that says what is wrong and names the newest complete checkpoint before it."""
    dirs = checkpoint_dirs(out_dir)
    steps = [step_of(d) for d in dirs]
    if step != -1 and step not in steps:
        fail(f"resume_step={step}: {out_dir} holds checkpoints at steps {', '.join(map(str, steps))}")
    path = dirs[-1] if step == -1 else dirs[steps.index(step)]
    problem, files, seconds = verify_checkpoint(path)
    if problem:
        good = next((d for d in reversed(dirs) if step_of(d) < step_of(path) and not verify_checkpoint(d)[0]), None)
        fail(f"{path} cannot be resumed: {problem}. " + (
            f"The newest complete checkpoint is {good}: resume it with --init_from=resume "
            f"--resume_step={step_of(good)} (the checkpoints after it are then moved into {out_dir}/superseded/)"
            if good else
            f"No checkpoint before it in {out_dir} is complete either"))
    try:
        with open(os.path.join(path, 'train.json')) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # only a checkpoint from before manifests gets here unchecked
        fail(f"{path}/train.json is unreadable ({e}): resume an older checkpoint with --resume_step=N")
    if files is None:
        print0(f"warning: {path} was written before checkpoints carried checksums: it is loaded unverified")
    else:
        print0(f"verified {path}: {len(files)} files, {human(sum(s for s, _ in files.values()))}, "
               f"checksums read in {seconds:.2f} s")
    return path, saved, files is not None


def set_aside(out_dir, step):
    """For a resume from an older checkpoint (resume_step): the checkpoints after step, and a ckpt.pt saved after
    it, move into out_dir/superseded/<time>/, so that the resumed run neither mixes with them nor prunes them
    (nothing is deleted). metrics.jsonl's rows after step go there too. Returns that folder, or None."""
    later = [d for d in checkpoint_dirs(out_dir) if step_of(d) > step]
    sampling = os.path.join(out_dir, 'ckpt.pt')
    try:  # mmap: only the small pickle is read, not the weights
        if torch.load(sampling, map_location='cpu', mmap=True, weights_only=True).get('iter_num', 0) > step:
            later.append(sampling)
    except Exception:  # absent or unreadable: leave it
        pass
    if not later:
        return None
    aside = os.path.join(out_dir, 'superseded', time.strftime('%Y%m%d-%H%M%S'))
    os.makedirs(aside, exist_ok=True)
    for path in later:
        os.rename(path, os.path.join(aside, os.path.basename(path)))
    return aside


def trim_metrics(path, step, aside=None):
    """metrics.jsonl as of the checkpoint at step, which a resume continues: each step once. The rows of later
    steps (a killed run's, about to be redone) are dropped, or moved to aside/metrics.jsonl; the evaluation at step
    stays (it came before the save), and so does what has no step. A line cut short by a kill is dropped."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return
    keep, later, torn = [], [], 0
    for line in lines:
        try:
            row = json.loads(line)
            it = row.get('iter') if isinstance(row, dict) else None
        except ValueError:
            torn += 1
            continue
        past = it is not None and (it > step or it == step and 'val_loss' not in row)
        (later if past else keep).append(line)
    if aside and later:
        with open(os.path.join(aside, 'metrics.jsonl'), 'w') as f:
            f.write(''.join(line + '\n' for line in later))
    with open(path + '.tmp', 'w') as f:
        f.write(''.join(line + '\n' for line in keep))
    os.replace(path + '.tmp', path)
    if torn:
        print0(f"note: {path}: {torn} unreadable line(s) dropped (a write cut short)")


def _failure(e):
    """(one line, ran out of space) of an exception from a save. DCP gathers each rank's into a CheckpointException;
    torch's zip writer turns a full disk into "enforce fail ... unexpected pos", naming no errno."""
    errors = [exc for exc, _ in e.failures.values()] if isinstance(e, dcp.CheckpointException) else [e]
    full = False
    for exc in errors:
        while exc is not None:
            full |= isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            exc = exc.__cause__ or exc.__context__
    first = errors[0] if errors else e
    return f"{type(first).__name__}: {str(first).strip().splitlines()[0] if str(first).strip() else ''}", full


def _save_failed(out_dir, partial, what, need, error, full):
    """The line for a save that failed, after removing what it wrote (partial, a folder or a file). A disk with
    under 1 MB left is full whatever the error said, and the save needed more than it held: what was written
    and what was left."""
    free = shutil.disk_usage(out_dir).free
    written = _dir_bytes(partial) if os.path.isdir(partial) else \
        os.path.getsize(partial) if os.path.exists(partial) else 0
    if free < 1e6:
        full, need = True, max(need, written + free)
    if os.path.isdir(partial):
        shutil.rmtree(partial, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(partial)
    dirs = checkpoint_dirs(out_dir)
    kept = f"{dirs[-1]} and the checkpoints before it are intact" if dirs else "there is no earlier checkpoint"
    then = "continue with --init_from=resume" if dirs else "start the run again"
    if full:
        return (f"disk full while writing {what}: {out_dir} has {human(shutil.disk_usage(out_dir).free)} free with "
                f"the partial save removed, and it needs more than {human(need)}; {kept}: free some space, then {then}")
    return f"writing {what} failed ({error}); the partial save was removed, {kept}"


def _room(out_dir, what, need, dirs):
    """The line for too little free space to write need bytes, or None."""
    free = shutil.disk_usage(out_dir).free
    if free >= need:
        return None
    kept = f"{dirs[-1]} and the checkpoints before it are intact" if dirs else "there is no earlier checkpoint"
    then = "continue with --init_from=resume" if dirs else "start the run again"
    return (f"disk full: {out_dir} has {human(free)} free, and {what} needs about {human(need)}: nothing was written, "
            f"{kept}; free some space, then {then}")


def _dir_bytes(path):
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def save_checkpoint(out_dir, model, exp_avgs, info, keep):
    """Every rank writes its shards and checksums them; rank 0 adds train.json (info) and manifest.json (each
    file's size and CRC-32), commits by renaming, prunes. First the free space is checked against the last
    checkpoint's size (or this one's tensors); a save that fails anyway (a disk filling up) is removed and the
    run ends with one line. Either way the checkpoints before it stay as they were."""
    t0 = time.time()
    rank = dist.get_rank()
    path = os.path.join(out_dir, f"ckpt-{info['iter_num']:06d}")
    state = {'model': get_model_state_dict(model, options=TRAINED), 'lion': exp_avgs}
    need = sum(t.numel() * t.element_size() for group in state.values() for t in group.values())  # DTensors whole
    problem = None
    if rank == 0:
        shutil.rmtree(path + '.tmp', ignore_errors=True)  # cut short by a crash
        dirs = checkpoint_dirs(out_dir)
        need = max(need, _dir_bytes(dirs[-1]) if dirs else 0)
        problem = _room(out_dir, f"checkpoint {os.path.basename(path)}", need, dirs)
    problem = from_rank0(problem)
    if problem:
        fail(problem)
    files, error, seconds = {}, None, 0.0
    try:
        dcp.save(state, checkpoint_id=path + '.tmp')
        t1 = time.time()  # DCP names each rank's files __RANK_N.distcp; rank 0 also wrote .metadata
        mine = [f for f in os.listdir(path + '.tmp') if f.startswith(f'__{rank}_')] + ['.metadata'] * (rank == 0)
        files = {f: list(file_crc(os.path.join(path + '.tmp', f))) for f in mine}
        seconds = time.time() - t1
    except (Exception, dcp.CheckpointException) as e:
        error = _failure(e)
    results = gather((files, error, seconds))
    if rank == 0:
        error = next((e for _, e, _ in results if e), None)
        if error is None:
            try:
                files = {f: v for r in results for f, v in r[0].items()}
                with open(os.path.join(path + '.tmp', 'train.json'), 'w') as f:
                    json.dump(info, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                files['train.json'] = list(file_crc(os.path.join(path + '.tmp', 'train.json')))
                write_manifest(path + '.tmp', files)
                shutil.rmtree(path, ignore_errors=True)
                os.rename(path + '.tmp', path)  # the commit
                fd = os.open(out_dir, os.O_RDONLY)  # the rename itself on disk
                os.fsync(fd)
                os.close(fd)
            except OSError as e:
                error = _failure(e)
        if error:
            problem = _save_failed(out_dir, path + '.tmp', f"checkpoint {os.path.basename(path)}", need, *error)
        else:
            for old in checkpoint_dirs(out_dir)[:-max(keep, 1)]:
                shutil.rmtree(old)  # older checkpoints
            for old in glob.glob(os.path.join(out_dir, 'ckpt-*.tmp')):  # saves that a crash cut short
                shutil.rmtree(old)
                print(f"note: removed {old}, a save that a killed run had cut short", flush=True)
    problem = from_rank0(problem)
    if problem:
        fail(problem)
    print0(f"saved {path}: {human(sum(s for s, _ in files.values()))} in {time.time() - t0:.2f} s, checksums "
           f"{max(r[2] for r in results):.2f} s of it")
    return path


def load_checkpoint(path, model, exp_avgs):
    """Load weights and Lion state in place; each rank reads the parts of its own shards, whatever the world
    size that saved them. Returns train.json. The caller has verified the checkpoint (choose_resume)."""
    state = {'model': get_model_state_dict(model, options=TRAINED), 'lion': exp_avgs}
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, dcp.CheckpointException) as e:  # a checkpoint from before manifests, damaged
        fail(f"{path} cannot be loaded ({_failure(e)[0]}): resume an older checkpoint with --resume_step=N")
    # strict=False: the frozen weights are not in it; dcp.load above has already failed on any missing key
    set_model_state_dict(model, state['model'], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    with open(os.path.join(path, 'train.json')) as f:
        return json.load(f)


def load_weights(path, model):
    """Only the weights of a checkpoint, for a new run that starts from them (a context-length stage, say).
    Lion's momentum is not carried over: it follows the old schedule's gradients, and the new stage warms up
    again from zero, as llm-foundry's load_weights_only does."""
    state = {'model': get_model_state_dict(model)}
    try:
        dcp.load(state, checkpoint_id=path)  # reads just the 'model' entries
    except (Exception, dcp.CheckpointException) as e:
        fail(f"{path} cannot be loaded ({_failure(e)[0]})")
    set_model_state_dict(model, state['model'])


def save_for_sampling(path, model, extra):
    """out_dir/ckpt.pt, one file that sample.py reads with plain torch.load: full fp32 weights (gathered on
    rank 0's CPU) and the MPTConfig, written to a temporary name and renamed. A LoRA run's holds only the
    adapters ('adapters'; extra says 'lora' and 'base'): sample.py merges them into the base. 'crc32' is the
    tensors' checkpoints.state_crc, for a reader to check them against. A full disk is one line, as for
    save_checkpoint, with the previous ckpt.pt intact."""
    lora = any(not p.requires_grad for p in model.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    state = get_model_state_dict(model, options=options)
    problem = None
    if dist.get_rank() == 0:
        config = asdict(replace(model.config, init_device='cpu'))
        need = sum(t.numel() * t.element_size() for t in state.values())
        problem = _room(os.path.dirname(path) or '.', path, need, checkpoint_dirs(os.path.dirname(path) or '.'))
        if problem is None:
            try:
                with open(path + '.tmp', 'wb') as f:  # a file object: a full disk is then an OSError with errno
                    torch.save({'adapters' if lora else 'model': state, 'config': config, 'crc32': state_crc(state),
                                **extra}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(path + '.tmp', path)
            except (OSError, RuntimeError) as e:
                problem = _save_failed(os.path.dirname(path) or '.', path + '.tmp', path, need, *_failure(e))
    problem = from_rank0(problem)
    if problem:
        fail(problem)


# -----------------------------------------------------------------------------
# the run's out_dir

def take_out_dir(out_dir, init_from, eval_only):
    """Hold out_dir for this run (common.lock_out_dir, rank 0 alone; every rank gets its verdict), then check
    what it holds against how the run starts: a resume needs a checkpoint there, a new run an out_dir without
    another run's checkpoints. What out_dir holds is looked at only once it is ours."""
    problem, note = from_rank0(lock_out_dir(out_dir) if dist.get_rank() == 0 else None)
    if problem:
        fail(problem)
    if note:
        print0(note)
    if init_from == 'resume' and not checkpoint_dirs(out_dir):
        fail(f"init_from='resume' but {out_dir} holds no checkpoint (ckpt-NNNNNN/)")
    if init_from != 'resume' and checkpoint_dirs(out_dir) and not eval_only:
        fail(f"{out_dir} already holds checkpoints from another run: continue it with --init_from=resume, "
             f"or choose another out_dir")


def resume_metrics(out_dir, step):
    """A resume from step: each step once in metrics.jsonl; what out_dir holds from after it is set aside."""
    problem = aside = None
    if dist.get_rank() == 0:
        try:
            aside = set_aside(out_dir, step)
            trim_metrics(os.path.join(out_dir, 'metrics.jsonl'), step, aside)
        except OSError as e:
            problem = f"cannot move files in {out_dir} for the resume ({e}); no checkpoint was removed"
    problem = from_rank0(problem)
    if problem:
        fail(problem)
    if aside:
        print0(f"moved what {out_dir} held after step {step} (checkpoints, metrics) into {aside}")
