"""
What the scripts and libraries share: one clear line instead of a traceback, printing once per job, and
moving small objects between processes. It sits below every other file of the repository (it imports none
of them, and torch only inside the functions that need it), so any of them may import it.
"""

import json
import os
import sys
import time


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
