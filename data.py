"""
The training data: token files (raw uint16 from prepare.py or nanoGPT, or llm.c shards) read through memory
maps, never whole, cut into windows that train.py draws in a seeded order; loss masks beside them (prompt/
response data) and packed documents' ids (attn_uses_sequence_id). open_data checks a data_dir and returns what a
run reads from it.
"""

import functools
import glob
import json
import os
import sys
import threading

import numpy as np
import torch

from common import fail, file_crc

# -----------------------------------------------------------------------------
# data: a split is a list of token files, each cut into windows of seq_len + 1 tokens that overlap by one
# (window k of a file is tokens [k*T, k*T + T + 1): inputs and their next-token targets), so that every
# token is a target once per epoch

_SHARD_MAGIC = 20240520  # llm.c's header: 256 int32 (magic, version, token count, 0...), then the tokens


def open_tokens(path, vocab_size, seq_len):
    """A read-only np.memmap of the tokens in one file, which is never read into memory whole. The format
    is told by the first bytes: an llm.c shard starts with the magic; anything else is raw uint16."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype='<i4', count=min(size // 4, 256))
    if len(header) >= 3 and header[0] == _SHARD_MAGIC:
        version, n = int(header[1]), int(header[2])
        if version not in (1, 2):
            fail(f"{path}: llm.c shard version {version}; only 1 (uint16 tokens) and 2 (uint32) exist")
        dtype = np.dtype('<u2' if version == 1 else '<u4')
        if size != 1024 + n * dtype.itemsize:
            fail(f"{path}: the shard header says {n:,} tokens, {1024 + n * dtype.itemsize:,} bytes with the "
                 f"header, but the file has {size:,} bytes: it is truncated or not an llm.c shard")
        offset = 1024
    else:
        if size % 2:
            fail(f"{path}: {size:,} bytes is not a whole number of uint16 tokens: token files are raw "
                 f"uint16 (prepare.py, nanoGPT) or llm.c shards (header magic {_SHARD_MAGIC})")
        dtype, n, offset = np.dtype('<u2'), size // 2, 0
    if n < seq_len + 1:
        fail(f"{path}: {n:,} tokens, fewer than the max_seq_len + 1 = {seq_len + 1} of one training sequence")
    tokens = np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=(n,))
    sample = np.asarray(tokens[:1 << 20])
    # raw uint16 carries no type; ids written as int32 or int64 show up as a 0 in every odd place
    if offset == 0 and n >= 64 and (sample[1::2] == 0).mean() > 0.9 and (sample[0::2] == 0).mean() < 0.5:
        fail(f"{path}: every other uint16 is 0, as when token ids are written as int32/int64: write them "
             f"as uint16 (np.array(ids, dtype=np.uint16).tofile(path)), as prepare.py does")
    if sample.max() >= vocab_size:
        fail(f"{path}: token id {sample.max()} is >= vocab_size={vocab_size}: set --vocab_size to the "
             f"tokenizer's (meta.json's vocab_size), or re-run prepare.py for this model's tokenizer")
    return tokens


def open_mask(path, n):
    """The loss mask beside a token file X.bin (prepare.py's prompt/response data): X.mask, one uint8 per
    token, 1 where the token is a target the loss counts. None if there is none."""
    mask_path = os.path.splitext(path)[0] + '.mask'
    if not os.path.exists(mask_path):
        return None
    if os.path.getsize(mask_path) != n:
        fail(f"{mask_path}: {os.path.getsize(mask_path):,} bytes for the {n:,} tokens of {path}: a loss mask has "
             f"one byte per token; re-run prepare.py")
    return np.memmap(mask_path, dtype=np.uint8, mode='r', shape=(n,))


def load_split(pattern, vocab_size, seq_len):
    """(paths, token arrays, first window of each file and the total at the end, loss masks or None) for a
    path or glob."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        fail(f"no token file matches {pattern}")
    arrays = [open_tokens(p, vocab_size, seq_len) for p in paths]
    first = np.cumsum([0] + [(len(a) - 1) // seq_len for a in arrays])
    masks = [open_mask(p, len(a)) for p, a in zip(paths, arrays)]
    if any(m is None for m in masks) and any(m is not None for m in masks):
        fail(f"{pattern}: some token files have a loss mask (.mask beside the .bin) and some do not: one "
             f"dataset is prompt/response data or plain text, not both")
    return paths, arrays, first, masks if masks[0] is not None else None


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed, epoch, n_windows):
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def sample_windows(seed, n_windows, position, count):
    """The window ids at positions [position, position + count) of the endless training order: epoch e is
    a seeded permutation of all n_windows windows. A checkpoint stores the position (windows drawn so
    far); the order does not depend on the world size or on anything else."""
    pos = np.arange(position, position + count)
    ids = np.empty(count, dtype=np.int64)
    for epoch in np.unique(pos // n_windows):
        here = pos // n_windows == epoch
        ids[here] = epoch_permutation(seed, int(epoch), n_windows)[pos[here] % n_windows]
    return ids


def rank_windows(ids, rank, world_size, batch_size):
    """This rank's micro-batches of a step's window ids: rank r takes the r-th contiguous slice, so the
    ranks' windows are disjoint and together make the global batch, for any world size."""
    per_rank = len(ids) // world_size
    mine = ids[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def window_starts(split, ids, seq_len):
    """(file index, first token) of each window id: window ids count on across a split's files."""
    first = split[2]
    files = np.searchsorted(first, ids, side='right') - 1
    return files, (ids - first[files]) * seq_len


def read_windows(split, ids, seq_len, vocab_size):
    """(len(ids), seq_len + 1) int64 tokens of the given windows, checked against the vocabulary here on
    the host: on a GPU a bad id would be a device-side assert with no file to blame."""
    paths, arrays = split[:2]
    files, starts = window_starts(split, ids, seq_len)
    rows = np.stack([arrays[f][s:s + seq_len + 1] for f, s in zip(files, starts)]).astype(np.int64)
    bad = rows.max(axis=1) >= vocab_size
    if bad.any():
        k = int(np.argmax(bad))
        fail(f"{paths[files[k]]}: token id {rows[k].max()} (in tokens {starts[k]:,}..{starts[k] + seq_len:,}) "
             f"is >= vocab_size={vocab_size}: set --vocab_size to the tokenizer's, or re-run prepare.py",
             this_rank_only=True)
    return rows


def read_masks(split, ids, seq_len):
    """(len(ids), seq_len + 1) loss masks of the given windows (as read_windows' tokens), or None when the
    split has none."""
    masks = split[3]
    if masks is None:
        return None
    files, starts = window_starts(split, ids, seq_len)
    return np.stack([masks[f][s:s + seq_len + 1] for f, s in zip(files, starts)])


def document_ids(tokens, eot_token):
    """(B, T) ids of the packed documents that tokens (B, T) belong to, for attn_uses_sequence_id: a document
    ends with its end-of-text token (prepare.py's layout), so a token's id counts the end-of-texts before it.
    (llm.c's shards put the end-of-text before each document instead: it then closes the previous one.)"""
    ends = tokens == eot_token
    return np.cumsum(ends, axis=1) - ends


def to_device(rows, device, masks=None, eot_token=None):
    """Inputs and targets on the device, and with eot_token the inputs' document ids (x, y[, sequence_id]);
    from pinned memory the copies are asynchronous. With loss masks, targets the mask leaves out (prompt
    tokens) become -1, which the loss ignores."""
    x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
    if masks is not None:
        y[torch.from_numpy(masks[:, 1:] == 0)] = -1
    out = (x, y) if eot_token is None else (x, y, torch.from_numpy(document_ids(rows[:, :-1], eot_token)))
    if device.type == 'cuda':
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in out)
    return out

# -----------------------------------------------------------------------------
# a run's data

def read_meta(data_dir):
    """data_dir/meta.json (prepare.py's: tokenizer, vocab_size, eot_token, loss_mask), or {} if there is none."""
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(meta_path):
        return {}
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{meta_path} is unreadable ({e}): re-run prepare.py, or delete it if the .bin files are yours")


def check_files(data_dir, meta, meta_path):
    """The token files of data_dir against meta.json: their sizes now (a second prepare.py into the same folder
    leaves a train.bin of another length), their CRC-32s in a thread. Returns a function that waits for that
    thread and returns its problem (one line) or None."""
    recorded, problem = meta.get('files') or {}, {}
    redo = f"re-run prepare.py for {data_dir} (another prepare.py into the same folder?)"
    for split in ('train', 'val'):  # a meta.json from before files were recorded: its token counts
        if f'{split}.bin' not in recorded and meta.get(f'{split}_tokens') is not None:
            recorded[f'{split}.bin'] = [meta[f'{split}_tokens'] * 2, None]
    for name, (size, _) in sorted(recorded.items()):
        path = os.path.join(data_dir, name)
        if os.path.exists(path) and os.path.getsize(path) != size:
            fail(f"{path} has {os.path.getsize(path):,} bytes, but {meta_path} records {size:,}: it changed after "
                 f"prepare.py wrote it; {redo}")

    def check():
        for name, (_, crcs) in sorted(recorded.items()):
            path = os.path.join(data_dir, name)
            try:
                if crcs is not None and os.path.exists(path) and file_crc(path)[1] != crcs:
                    problem['line'] = (f"{path} does not match the CRC-32 {meta_path} records: its bytes changed "
                                       f"after prepare.py wrote it; {redo}")
                    return
            except RuntimeError:  # the run is ending (fail() met something else first): file_crc's pool is closed
                return
    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    return lambda: thread.join() or problem.get('line')


def open_data(data_dir, train_files, val_files, config, batch_size, eval_iters, eval_seq_lens, started_from,
              trained_on=None, data_changed=''):
    """(splits, meta, eot_token, evals) of a run, every problem one line before any work: splits {'train': split,
    'val': split, 'val_pattern': ..., 'identity': what a checkpoint records of the train files, 'problem': a
    function that returns their CRC-32s' problem or None (check_files)} (load_split), the data's meta.json, the
    end-of-text id that separates packed documents (None unless attn_uses_sequence_id), and evals {seq_len:
    (split, micro-batches of window ids)}: a fixed set of val windows per eval length, the same for every
    evaluation and world size (at max_seq_len eval_iters micro-batches of batch_size; at other lengths as many
    tokens, in micro-batches of about as many). started_from: a Hugging Face model's directory, whose tokenizer
    the data must have been made with. trained_on: the identity a resumed checkpoint recorded, refused when the
    data is other now unless data_changed='ok'."""
    meta_path, meta = os.path.join(data_dir, 'meta.json'), read_meta(data_dir)
    if meta.get('loss_mask') and not os.path.exists(os.path.join(data_dir, 'train.mask')) and not train_files:
        fail(f"{meta_path} says the data is prompt/response with loss masks, but {data_dir}/train.mask is "
             f"missing: re-run prepare.py")
    if os.path.isfile(os.path.join(started_from, 'config.json')):  # a Hugging Face model's tokenizer, or refused
        from hf import check_tokenizer
        problem, warning = check_tokenizer(meta, meta_path, started_from)
        if problem:
            fail(problem)
        if warning and int(os.environ.get('RANK', 0)) == 0:
            print(warning, file=sys.stderr, flush=True)
    eot_token = meta.get('eot_token') if config.attn_uses_sequence_id else None  # packed documents end with it
    if config.attn_uses_sequence_id and eot_token is None:
        fail(f"attn_uses_sequence_id=True tells documents apart by their end-of-text token, but {meta_path} "
             f"{'names none (eot_token)' if meta else 'does not exist'}: prepare the data with prepare.py, or set "
             f"attn_uses_sequence_id=False")
    if meta.get('vocab_size', 0) > config.vocab_size:
        fail(f"{meta_path} says vocab_size={meta['vocab_size']} but the model has vocab_size={config.vocab_size}: "
             f"set --vocab_size={meta['vocab_size']} (or larger)")
    data, seq_len = {}, config.max_seq_len
    for split, pattern in (('train', train_files), ('val', val_files)):
        if split == 'val' and eval_iters == 0:
            continue
        if not pattern:
            pattern = os.path.join(data_dir, f'{split}.bin')
            if not os.path.exists(pattern):
                fail(f"{pattern} not found: run `python prepare.py <dataset>` (it writes data/<dataset>/train.bin, "
                     f"val.bin and meta.json) and set data_dir to its folder, or set {split}_files to a glob of shards")
        data[split], data[f'{split}_pattern'] = load_split(pattern, config.vocab_size, seq_len), pattern
    data['problem'] = check_files(data_dir, meta, meta_path) if not train_files else lambda: None
    recorded = meta.get('files') or {}
    data['identity'] = {os.path.basename(p): recorded.get(os.path.basename(p), [os.path.getsize(p), None])
                        for p in data['train'][0]}  # names, sizes and CRC-32s: another dataset is other
    if trained_on is not None and trained_on != data['identity'] and data_changed != 'ok':
        fail(f"the train data is not what the checkpoint trained on ({data['train_pattern']}: "
             f"{_describe(data['identity'])} now, {_describe(trained_on)} then), so the data order would not go on as "
             f"it would have: point data_dir at that data, or, for a deliberate new stage of data, add "
             f"--data_changed=ok")
    evals = {}
    for L in sorted({seq_len, *eval_seq_lens}) if eval_iters else []:
        if L > min(len(a) for a in data['val'][1]) - 1:
            fail(f"eval_seq_lens: {L} tokens is longer than a val file ({data['val_pattern']}) holds: "
                 f"evaluate at shorter lengths, or prepare a longer val split")
        split = data['val'] if L == seq_len else load_split(data['val_pattern'], config.vocab_size, L)
        per_batch = max(1, batch_size * seq_len // L)
        val_ids = sample_windows(0, int(split[2][-1]), 0, max(1, eval_iters * batch_size * seq_len // L))
        evals[L] = (split, [val_ids[i:i + per_batch] for i in range(0, len(val_ids), per_batch)])
    return data, meta, eot_token, evals


def _describe(identity):
    return ', '.join(f"{name} {size:,} bytes" for name, (size, _) in sorted(identity.items()))
