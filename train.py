"""
Train an MPT (model.py) on the token files prepare.py writes, from one CPU process to many GPU nodes,
with PyTorch alone: FSDP2 shards the model, torch.distributed.checkpoint (DCP) saves sharded
checkpoints, and Lion, written below, optimizes.

One process (CPU, or one GPU):
    python train.py config/shakespeare_char_cpu.py
    python train.py config/mpt_125m.py --batch_size=8 --compile=False
One node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py config/mpt_1b.py
Several nodes: the same command on every node, all pointing at one rendezvous host and port
(torchrun numbers the processes; out_dir must be on a filesystem that every node sees):
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29500 \
        --rdzv_id=mpt-1b train.py config/mpt_1b.py
and with --dp_replicate=4 (HSDP) each node shards one copy of the model and the nodes only all-reduce gradients.
Continue from the newest checkpoint in out_dir, on any number of processes that divides the batch:
    torchrun ... train.py config/mpt_1b.py --init_from=resume
Fine-tune a Hugging Face MPT: --init_from=path/to/mpt-7b (a save_pretrained directory); with --lora_rank, LoRA
(lora.py). Each process reads only its own shards of it.
Preemption: on SIGTERM the run finishes its step, saves a checkpoint and exits 0. The scheduler's grace
period must cover a step and a save; torchrun, itself sent SIGTERM, gives its workers 30 seconds.

NCCL connects the processes on CUDA, gloo on CPU; a plain `python train.py` is a group of one, so the
same code (FSDP2, DCP) runs everywhere. Settings are the variables below; config files (Python) and
--key=value override them (configurator.py), and every MPTConfig field is a setting too.

out_dir gets: ckpt-000500/ (a sharded checkpoint: weights, Lion state and train.json with the step,
data position and settings; the newest keep_checkpoints are kept), ckpt.pt (one file for sample.py:
full fp32 weights and MPTConfig, at the best val loss so far; sampling_ckpt), metrics.jsonl (a JSON object per line).
"""

import contextlib
import errno
import functools
import glob
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, fields, replace

from configurator import configure, device_problem, help_if_asked, out_of_range, settings_in

help_if_asked(__file__)  # --help: the settings below, read from this file before torch's slow import

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from checkpoints import (check_files, checkpoint_dirs, file_crc, is_checkpoint, lock_out_dir, read_manifest,
                         release_out_dir, state_crc, step_of, write_manifest)
from lora import (LINEAR_NAMES, add_lora, base_fingerprint, check_base, describe_lora, init_lora, is_adapter, is_nf4,
                  linear_shapes, load_nf4, memory_plan, nf4_problem, quantize, to_nf4)
from model import MPT, MPTConfig, check_attention, config_from_hf, hf_tensor_files, read_hf_tensor

# -----------------------------------------------------------------------------
# settings; the defaults are config/mpt_125m.py's model and schedule, on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 1000  # evaluate val loss and save a checkpoint every this many steps, and at the end
eval_iters = 100  # micro-batches of val data per evaluation, over all processes; 0: no evaluation
log_interval = 10  # console and metrics.jsonl every this many steps
keep_checkpoints = 3  # the newest sharded checkpoints kept in out_dir
sampling_ckpt = True  # also ckpt.pt (best val loss) for sample.py; gathers the fp32 model on rank 0: False if big
init_from = 'scratch'  # 'scratch', 'resume' (out_dir's newest checkpoint), a Hugging Face MPT, or run/ckpt-N (a stage)
resume_step = -1  # init_from='resume' continues ckpt-<resume_step>, -1: the newest; later ones go to superseded/
eval_only = False  # evaluate init_from's weights once (at every eval length) and exit: no training, nothing saved
eval_seq_lens = []  # also evaluate at these sequence lengths, e.g. [2048, 4096, 8192]: ALiBi extrapolates
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = 'mpt'
wandb_run_name = 'mpt'
# data: data_dir/train.bin and val.bin (raw uint16, from prepare.py or nanoGPT), or llm.c shards
data_dir = 'data/openwebtext'
train_files = ''  # a glob of llm.c / modded-nanogpt shards instead, e.g. 'fineweb10B/fineweb_train_*.bin'
val_files = ''  # likewise, e.g. 'fineweb10B/fineweb_val_*.bin'
batch_size = 16  # micro-batch: sequences per process in one forward/backward
gradient_accumulation_steps = 16  # micro-batches per step over all processes; each process does its share
# model: every MPTConfig field (vocab_size, d_model, n_heads, n_layers, max_seq_len, attn_impl, resid_pdrop,
# ...) is a setting of the same name, with model.py's default, so config files set the model like the rest
globals().update({f.name: f.default for f in fields(MPTConfig)})
# init_device: 'cpu': every rank builds the whole model from the seed and keeps its shard (the same weights on any
# number of processes); 'meta': each rank initializes only its own shards on its device (no rank ever holds the
# whole model; the weights then depend on the world size)
init_device = 'auto'  # 'cpu', 'meta', or 'auto': meta above 1B params
# Lion: decoupled weight decay on weights with >= 2 dims (embedding, linear layers), see lion_step
learning_rate = 2e-4  # the peak, after warmup
max_iters = 4800  # optimizer steps in all
weight_decay = 2e-4  # at the peak lr each step multiplies weights by (1 - weight_decay)
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip the global gradient norm to this; 0: no clipping
# learning rate: linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 100
lr_decay_iters = 4800
min_lr = 2e-5
# LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023): fine-tune a Hugging Face MPT (init_from) with its
# weights frozen and a trainable low-rank update beside each targeted linear layer, see lora.py
lora_rank = 0  # 0: full fine-tuning, every weight trains; > 0: only the adapters, of this rank, train
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = ['Wqkv', 'out_proj', 'up_proj', 'down_proj']  # the linear layers (by name) that get adapters
quantize_base = ''  # 'nf4': QLoRA, frozen linear layers in 4-bit NormalFloat (torchao); '': they stay in the compute dtype
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # with torchrun each process takes cuda:LOCAL_RANK
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # bf16 matmuls on fp32 master weights, or fp32
compile = True  # torch.compile each block
activation_checkpointing = False  # recompute each block in the backward instead of keeping its activations
seed = 1337  # weights, data order and dropout all follow from it
dp_replicate = 1  # HSDP over many nodes: the processes form dp_replicate groups (e.g. one per node), each holding
# the model sharded among its own processes; all-gathers stay inside a group, gradients are all-reduced across the
# groups. 1: one group of all processes (FSDP). torchtitan's data_parallel_replicate_degree
peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0: model.PEAK_FLOPS's figure for this GPU
_defaults = settings_in(globals())


def setting_problems(s, world_size=1):
    """The settings' problems, one line each, found before any work: a bad value met deep inside a run (a
    modulo by zero at the first step, a negative learning rate that trains on) costs the run or silently ruins it.
    (LoRA's settings, dtype and quantize_base are checked where the run sets them up.)"""
    problems = out_of_range(s, __file__, whole=dict(
        batch_size=1, gradient_accumulation_steps=1, eval_interval=1, log_interval=1, keep_checkpoints=1,
        max_iters=0, eval_iters=0, warmup_iters=0, lr_decay_iters=0, resume_step=-1, vocab_size=1, d_model=1, n_heads=1,
        n_layers=1, expansion_ratio=1, max_seq_len=1, kv_n_heads=1, alibi_bias_max=0, seed=0),
        at_least=dict(learning_rate=0, min_lr=0, weight_decay=0, grad_clip=0, peak_flops=0),
        positive=('clip_qkv', 'softmax_scale', 'layer_norm_epsilon'),
        fraction=('beta1', 'beta2', 'attn_pdrop', 'resid_pdrop', 'emb_pdrop'),
        choices=dict(init_device=('auto', 'cpu', 'meta')))
    problems += [p for p in [device_problem(s['device'])] if p]
    if isinstance(s['gradient_accumulation_steps'], int) and s['gradient_accumulation_steps'] % world_size:
        problems.append(f"gradient_accumulation_steps={s['gradient_accumulation_steps']} (micro-batches per step over "
                        f"all processes) does not divide among {world_size} processes: make it a multiple of {world_size}")
    if is_checkpoint(s['init_from']):  # a stage keeps its checkpoint's architecture: a different one asked for is an error
        try:
            with open(os.path.join(s['init_from'], 'train.json')) as f:
                model = json.load(f)['model']
        except (OSError, ValueError, KeyError) as e:
            return problems + [f"init_from={s['init_from']}: its train.json is unreadable ({e})"]
        ignored = [f"{k}={s[k]!r} (the checkpoint's is {model[k]!r})" for k in _ARCH_FIELDS
                   if s[k] != _defaults[k] and s[k] != model[k]]
        if ignored:
            problems.append(f"init_from={s['init_from']} starts a stage, which keeps the checkpoint's architecture: "
                            f"{', '.join(ignored)} would be ignored; drop {'it' if len(ignored) == 1 else 'them'} "
                            f"(a stage may change max_seq_len, alibi_bias_max, dropout, attn_impl)")
    return problems


# -----------------------------------------------------------------------------
# processes

def default_settings():
    """The settings above and their defaults, for scripts that take the same ones (bench.py)."""
    return dict(_defaults)


def print0(*args):
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, flush=True)


def fail(message, this_rank_only=False):
    """End the run with one clear line on stderr and exit status 1, never a traceback. What every rank
    meets alike (settings, files) rank 0 alone prints; this_rank_only: only this rank can know. Under torchrun
    the line also goes to the error file it names: torchrun ends its own report (a traceback of the launcher,
    then each failed rank) with that file's message as the failure's "traceback", so the line comes last."""
    if this_rank_only or int(os.environ.get('RANK', 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if os.environ.get('TORCHELASTIC_ERROR_FILE'):
        with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:
            json.dump({'message': {'message': f"error: {message}", 'extraInfo': {
                'py_callstack': f"error: {message}", 'timestamp': str(int(time.time()))}}}, f)
    sys.exit(1)


def init_distributed(device, dp_replicate=1):
    """Join the process group that torchrun describes in the environment, or make a group of one for
    a plain `python train.py`. Returns (rank, world_size, device, mesh): the mesh FSDP shards over, 1-D, or with
    dp_replicate > 1 2-D (replicate, shard) for HSDP: consecutive ranks (a node's, as torchrun numbers them)
    shard the model among themselves, and each such group holds a replica."""
    torchrun = 'RANK' in os.environ
    device = torch.device(device)
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']) if torchrun else device.index or 0)
        torch.cuda.set_device(device)
    group = dict(device_id=device) if device.type == 'cuda' else {}
    if not torchrun:
        group.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', **group)
    world_size = dist.get_world_size()
    if not (isinstance(dp_replicate, int) and dp_replicate >= 1 and world_size % dp_replicate == 0):
        fail(f"dp_replicate={dp_replicate!r}: the {world_size} processes must split into dp_replicate equal groups "
             f"(e.g. the number of nodes); 1 shards over all of them")
    mesh = init_device_mesh(device.type, (world_size,)) if dp_replicate == 1 else \
        init_device_mesh(device.type, (dp_replicate, world_size // dp_replicate), mesh_dim_names=('replicate', 'shard'))
    return dist.get_rank(), dist.get_world_size(), device, mesh


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


def check_tokenizer(meta, meta_path, base):
    """Fine-tuning a Hugging Face model (base: its directory) on data tokenized otherwise trains it on ids that
    mean other tokens to it, and nothing would say so. (problem, warning), each one line or None: the data's
    meta.json (prepare.py) must record the base's own tokenizer: a tokenizer.json of the same content, giving the
    same vocabulary size and end-of-text id as prepare.py --tokenizer=base would."""
    redo = f"re-run `python prepare.py ... --tokenizer={base}` for this data"
    if not os.path.isfile(os.path.join(base, 'tokenizer.json')):
        return None, (f"warning: {base} has no tokenizer.json, so the data's tokenizer cannot be checked against the "
                      f"model's")
    if not meta:
        return None, (f"warning: {meta_path} does not exist, so the data's tokenizer cannot be checked against the "
                      f"model's: unless the data was prepared with --tokenizer={base}, {redo}")
    if not meta.get('tokenizer'):
        return None, (f"warning: {meta_path} records no tokenizer (an older prepare.py wrote it), so it cannot be "
                      f"checked against the model's: unless the data was prepared with --tokenizer={base}, {redo}")
    if meta['tokenizer'] in ('gpt2', 'char'):
        return (f"{meta_path}: the data was tokenized with {meta['tokenizer']}, not with {base}'s own tokenizer, so "
                f"its token ids mean other tokens to the model: {redo}"), None
    from prepare import hf_tokenizer  # what prepare.py records for --tokenizer=base: its file, vocabulary, end-of-text
    file, vocab_size, eot = hf_tokenizer(base)
    theirs = meta.get('tokenizer_file') or meta['tokenizer']
    theirs = os.path.join(theirs, 'tokenizer.json') if os.path.isdir(theirs) else theirs
    try:
        with open(theirs) as a, open(file) as b:
            same = json.load(a) == json.load(b)  # the content, whatever the formatting
    except (OSError, ValueError):
        same = None  # gone since: only the numbers below can be compared
    differ = [f"{what} {meta.get(key)} vs {value}" for what, key, value in (('vocab_size', 'vocab_size', vocab_size),
                                                                          ('end-of-text id', 'eot_token', eot))
              if meta.get(key) != value]
    if same is False or differ:
        return (f"{meta_path}: the data was tokenized with {theirs}, not with {base}'s own tokenizer "
                f"({', '.join(differ) or 'their tokenizer.json files differ'}): {redo}"), None
    if same is None:
        return None, (f"warning: {meta_path} says the data was tokenized with {theirs}, which is gone, so only its "
                      f"vocabulary size and end-of-text id could be checked against {base}'s tokenizer")
    return None, None


# -----------------------------------------------------------------------------
# model

def checkpoint_block(block):
    """Activation checkpointing: keep only the block's input and recompute its inside in the backward.
    It wraps forward in place, so parameter names, and so checkpoints, stay the same."""
    block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def setup_model(config, mesh, dtype='bfloat16', activation_checkpointing=False, compile=False, seed=1337,
                init_weights=True, lora=None):
    """The MPT of config, sharded with FSDP2 over mesh (see init_distributed): each block, then the root
    (embedding, final norm). The weights that train stay fp32 shards (the master weights); with dtype='bfloat16'
    FSDP all-gathers them as bf16 for the matmuls and reduce-scatters the gradients in fp32; one process in fp32
    gets the plain module (no FSDP: nothing to shard or cast). config.init_device:
    see the settings. init_weights=False leaves a meta-built model's shards uninitialized, for weights loaded
    next (load_hf_weights, load_checkpoint). lora: add_lora's settings (rank, alpha, dropout, targets,
    quantize_base), or None; a LoRA model's frozen base is kept in the compute dtype (bf16 or fp32: it never
    changes, so it needs no fp32 master), NF4 with quantize_base, its values loaded next (load_hf_weights)."""
    if config.init_device == 'auto':  # counting parameters on the meta device costs nothing
        big = MPT(replace(config, init_device='meta')).num_params() > 1e9
        config = replace(config, init_device='meta' if big else 'cpu')
    torch.manual_seed(seed)
    model = MPT(config)
    if lora:
        add_lora(model, **lora, base_dtype=getattr(torch, dtype), device=mesh.device_type)
    for block in model.transformer.blocks:
        if compile:  # only forward: FSDP's hooks around it stay eager
            block.forward = torch.compile(block.forward)
        if activation_checkpointing:  # after compile: a checkpoint around the attention kernel's graph
            checkpoint_block(block)   # break would keep torch.compile from compiling anything inside it
    if mesh.size() == 1 and dtype == 'float32':
        # One process computing in fp32: the parameters are their own masters and there is nothing to shard,
        # gather or reduce, so FSDP would only add its hooks and DTensor's dispatch (measured: 12 ms of a
        # 97 ms step at shakespeare_char_cpu's size). The plain module trains to the same numbers, and its
        # checkpoints (DCP, whole tensors) load on any number of processes, as sharded ones do on one
        if config.init_device == 'meta':
            model.to_empty(device=mesh.device_type)
            if init_weights:
                torch.manual_seed(seed)  # as the sharded path below seeds rank 0
                model.init_weights()
        else:
            model.to(mesh.device_type)
        if lora:
            init_lora(model, seed)
        return model
    if dtype == 'bfloat16':
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()  # no casts: pure fp32
    # Not sharded: NF4 weights not split among processes (FSDP's world-of-one shortcut copies a single all-gather
    # input, and an NF4 tensor has three (torch 2.13); split, FSDP2 shards them through torchao's hooks); and a
    # LoRA run's frozen embedding and final norm: FSDP's root would hold them whole from the forward to the end of
    # the backward anyway (the embedding is the output head too), so sharding them would only add an all-gather
    # and its buffers each step
    ignored = {p for p in model.parameters() if is_nf4(p)} if mesh.size(mesh.ndim - 1) == 1 else set()
    if lora:
        ignored |= set(model.transformer.wte.parameters()) | set(model.transformer.norm_f.parameters())
    # reshard_after_forward stays True on one process too: keeping the gathered bf16 weights to the backward
    # would skip a copy per block but hold every block's gathered copy (bench/memory.py lora1: 2.07x -> 1.80x)
    for block in model.transformer.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)  # also moves a CPU-built model's shards
    if config.init_device == 'meta':
        model.to_empty(device=mesh.device_type)
    if config.init_device == 'meta' and init_weights:
        # on CUDA, DTensor's RNG draws each shard as its part of one full tensor; on CPU, where DTensor
        # warns that it cannot, a seed per rank at least keeps the shards from being copies of one another
        torch.manual_seed(seed + mesh.get_rank())
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'DTensor random operators')
            model.init_weights()
    if lora:
        init_lora(model, seed)
    return model


def shard_rows(p):
    """(start, stop, group): the rows [start, stop) of p's whole tensor that this rank's shard of it holds, and
    the processes among which its rows are split. FSDP2 splits dim 0 as torch.chunk does, over the mesh dimension
    that shards (HSDP replicates over the other); a tensor that is not split: all its rows, group None."""
    if not isinstance(p, DTensor):
        return 0, p.shape[0], None
    dim = next(i for i, placement in enumerate(p.placements) if placement.is_shard())
    n, rank, chunk = p.shape[0], p.device_mesh.get_local_rank(dim), -(-p.shape[0] // p.device_mesh.size(dim))
    return min(rank * chunk, n), min(rank * chunk + chunk, n), p.device_mesh.get_group(dim)


def load_hf_weights(model, path):
    """The weights of a Hugging Face checkpoint: each rank reads only the rows of its own shards, each tensor
    converted as it is read into its parameter's dtype (fp32 masters, a frozen base's compute dtype), so that
    no process holds the whole model; an NF4 weight is quantized from its rows (lora.quantize: code for code the
    whole weight's quantization). A LoRA model's adapters are not in it: they keep what init_lora gave them."""
    files = hf_tensor_files(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                continue
            if name not in files:
                raise ValueError(f"{path}: no tensor {name} in its weight files: not an MPT of this shape")
            start, stop, group = shard_rows(p)
            local = _local(p)
            rows = read_hf_tensor(path, files[name], name, (start, stop), torch.float32 if is_nf4(p) else local.dtype)
            if tuple(rows.shape) != (stop - start, *p.shape[1:]):
                raise ValueError(f"{path}: {name}'s rows {start}..{stop} are {tuple(rows.shape)}, not those of the "
                                 f"{tuple(p.shape)} its config.json gives")
            if 'lm_head.weight' in files and name == 'transformer.wte.weight':  # MPT ties them
                if not torch.equal(read_hf_tensor(path, files['lm_head.weight'], 'lm_head.weight', (start, stop),
                                                  rows.dtype), rows):
                    raise ValueError(f"{path}: lm_head.weight differs from transformer.wte.weight; MPT ties them")
            if is_nf4(p):
                world = 1 if group is None else dist.get_world_size(group)

                def gather(scales):  # every shard's NF4 block scales, in order
                    everyone = [torch.empty_like(scales) for _ in range(world)]
                    dist.all_gather(everyone, scales, group=group)
                    return torch.cat(everyone)
                load_nf4(p, quantize(rows.to(local.device), gather if world > 1 else None))
            else:
                local.copy_(rows)


# -----------------------------------------------------------------------------
# optimizer: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"). Its state is one
# fp32 momentum per parameter, kept as {parameter name: tensor} so that DCP saves and reshards it like the
# weights; no torch.optim.Optimizer is needed for that.

def lion_state(model):
    """A momentum for each parameter that trains (with LoRA only the adapters)."""
    return {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def lion_step(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, peak_lr, ok=None):
    """One Lion update of lists of tensors, in place:
        c = beta1 * m + (1 - beta1) * g;  p <- p - lr * sign(c);  m <- beta2 * m + (1 - beta2) * g
    Weight decay is MPT's DecoupledLionW's: p <- p * (1 - weight_decay * lr / peak_lr), before the
    update, on weights with >= 2 dims only (not LayerNorm gains). Decoupled from lr's scale this way,
    weight_decay is the shrink per step at the peak and follows the schedule down, as in llm-foundry, so
    MPT's hyperparameters carry over. Every operation is elementwise, so FSDP's local shards (or whole
    tensors) are updated exactly as the full tensors would be.
    ok: a 0-dim bool tensor on the device, or None (True). Where it is False the step changes nothing,
    bit for bit: gradients are zeroed (they may be NaN: NaN * 0 is NaN, so they are overwritten, not
    scaled), lr becomes 0 and beta2 1. Deciding on the device means the host never waits to know."""
    if ok is not None:
        for g in grads:
            g.masked_fill_(~ok, 0.0)
        lr = ok * lr  # 0-dim tensors from here on: scalars the device holds
        beta2, one_minus_beta2 = torch.where(ok, beta2, 1.0), 1 - beta2  # zero gradients: m * 1 + 0 = m
    else:
        one_minus_beta2 = 1 - beta2
    if weight_decay and peak_lr:
        torch._foreach_mul_([p for p in params if p.ndim >= 2], 1 - weight_decay * lr / peak_lr)
    # the update goes through pieces of at most LION_PIECE values, so that its temporaries are a piece's, not
    # another copy of the model (each tensor is contiguous: FSDP's shards, and their gradients)
    P, G, M = ([piece for t in ts for piece in t.view(-1).split(LION_PIECE)] for ts in (params, grads, exp_avgs))
    for a, b in chunks(P, LION_PIECE):
        update = torch._foreach_mul(M[a:b], beta1)
        torch._foreach_add_(update, G[a:b], alpha=1 - beta1)
        torch._foreach_sign_(update)
        torch._foreach_mul_(update, -lr)  # exact: the update is -1, 0 or 1
        torch._foreach_add_(P[a:b], update)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=one_minus_beta2)


LION_PIECE = 1 << 24  # values per piece of Lion's update (64 MB of fp32 temporaries)


def chunks(tensors, size):
    """(start, stop) of consecutive runs of tensors holding at most size values each (a larger tensor alone)."""
    start, n = 0, 0
    for i, t in enumerate(tensors):
        if i > start and n + t.numel() > size:
            yield start, i
            start, n = i, 0
        n += t.numel()
    if tensors:
        yield start, len(tensors)


def get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


# On a CPU the device is the host, so reading the verdict on a step costs nothing there, while masking every
# gradient (lion_step's ok) costs a pass over them; True takes the device's path anyway (the tests check both)
DEVICE_DECIDES = False


def train_step(model, exp_avgs, batches, lr, peak_lr, weight_decay, beta1, beta2, grad_clip, stop=0.0,
               healthy=None, loss_tokens=None, seeds=None):
    """One optimizer step on this rank's micro-batches [(x, y[, sequence_id]), ...]. Gradients are reduce-scattered
    (averaged over ranks) only after the last micro-batch, clipped by their global norm, then Lion
    updates each rank's shards, unless the mean loss or the gradient norm is not finite (or healthy, a
    0-dim bool tensor, is False): then nothing changes (lion_step's ok). stop: this rank's request to end
    the run (SIGTERM), summed over the ranks. Returns one device tensor (mean loss over all ranks, grad
    norm before clipping, ok, stop requests): nothing here waits for the device, so the caller can read
    it a step later, while the device works on the next one.
    loss_tokens: with loss masks (targets -1 where the loss does not count, as prompts), the number of
    counted targets in the whole step, over all ranks (the host knows it from the masks): the loss is then
    their mean, each counted token weighing the same whichever micro-batch holds it, and a micro-batch with
    none adds nothing (a mean over it would be 0/0)."""
    loss_sum, world = 0.0, dist.get_world_size()
    for i, (x, y, *sequence_id) in enumerate(batches):
        if isinstance(model, FSDPModule):  # not a world of one's plain module (setup_model)
            model.set_requires_gradient_sync(i == len(batches) - 1)
        if seeds is not None:  # dropout's masks: one seed per micro-batch
            torch.manual_seed(seeds[i])
        if loss_tokens is None:
            _, loss = model(x, y, *sequence_id)
        else:  # a sum, scaled so that the mean over micro-batches and ranks below is the token mean
            _, loss = model(x, y, *sequence_id, reduction='sum')
            loss = loss * (len(batches) * world / max(loss_tokens, 1))
        (loss / len(batches)).backward()
        loss_sum = loss_sum + loss.detach()
    # on DTensor gradients the norm is of the whole model: each rank's part, all-reduced
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    # one all-reduce for the global mean loss and the stop requests; every rank then decides alike
    packet = torch.stack([torch.as_tensor(loss_sum, dtype=torch.float32, device=norm.device),
                          torch.tensor(float(stop), device=norm.device)])
    if world > 1:
        dist.all_reduce(packet)
    loss = packet[0] / (len(batches) * world)
    # an inf gradient with a finite loss matters as much: clipping turns it into NaN, and Lion's
    # sign(NaN) would spread NaN through the weights and their momentum
    ok = torch.isfinite(loss) & torch.isfinite(norm)
    ok = ok & healthy if healthy is not None else ok
    named = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
    update = ([_local(p) for _, p in named], [_local(p.grad) for _, p in named],
              [_local(exp_avgs[name]) for name, _ in named], lr, beta1, beta2, weight_decay, peak_lr)
    if ok.device.type == 'cpu' and not DEVICE_DECIDES:  # the host holds the verdict: skip a bad step outright
        if ok:
            lion_step(*update)
    else:  # decided on the device, so that the host never waits for it (lion_step's ok)
        lion_step(*update, ok=ok)
    model.zero_grad(set_to_none=True)
    return torch.stack([loss, norm.float(), ok.float(), packet[1]])


@torch.no_grad()
def evaluate(model, split, batches, seq_len, vocab_size, device, eot_token=None):
    """Mean loss over a fixed list of micro-batches (window ids), batch j on rank j % world_size. Every
    rank runs the same number of forwards (each all-gathers weights), padding with batches weighted 0.
    With loss masks, the mean over the counted targets."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model.eval()
    total = torch.zeros(2, device=device)
    for k in range(-(-len(batches) // world)):
        j = k * world + rank
        ids = batches[min(j, len(batches) - 1)]
        x, y, *sequence_id = to_device(read_windows(split, ids, seq_len, vocab_size), device,
                                       read_masks(split, ids, seq_len), eot_token)
        if split[3] is not None:  # a sum over the counted targets, and their count
            _, loss_sum = model(x, y, *sequence_id, reduction='sum')
            total += torch.stack([loss_sum, (y != -1).sum().float()]) * (j < len(batches))
            continue
        _, loss = model(x, y, *sequence_id)
        total += torch.stack([loss.float(), torch.ones((), device=device)]) * (j < len(batches))
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------
# checkpoints: out_dir/ckpt-NNNNNN/ is written as ckpt-NNNNNN.tmp/ and renamed when complete, so a crash
# during a save leaves the previous checkpoint as the newest; its manifest.json (checkpoints.py: each file's size
# and CRC-32) lets a resume verify it before loading. A run holds its out_dir for its whole life (lock_out_dir).

_SHAPE_FIELDS = ('vocab_size', 'd_model', 'n_heads', 'n_layers', 'expansion_ratio', 'kv_n_heads', 'qk_ln')
# what a stage (init_from=ckpt-NNNNNN) keeps of the checkpoint's model; max_seq_len, alibi_bias_max, dropout
# and attn_impl are the new run's settings (MPT-7B-StoryWriter's 65k stage raised alibi_bias_max 8 -> 16)
_ARCH_FIELDS = _SHAPE_FIELDS + ('clip_qkv', 'softmax_scale', 'logit_scale', 'layer_norm_epsilon')
# what a resume keeps besides: the windows of the saved data position, and the ALiBi slopes trained with
_RUN_FIELDS = ('max_seq_len', 'alibi_bias_max')


# a checkpoint holds what trains: the whole model, or a LoRA run's adapters (its frozen base is re-read from the
# Hugging Face directory it started from, train.json's 'base', and checked against its fingerprint)
TRAINED = StateDictOptions(ignore_frozen_params=True)


def from_rank0(obj):
    """Rank 0's obj on every rank. What rank 0 alone looks at (the lock, the free space, the files it writes) every
    rank then acts on alike, so that a failure ends them all, with one line."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj):
    """Every rank's obj, in rank order, on every rank."""
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
            for old in checkpoint_dirs(out_dir)[:-max(keep, 1)] + glob.glob(os.path.join(out_dir, 'ckpt-*.tmp')):
                shutil.rmtree(old)  # older checkpoints, and saves that a crash cut short
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
# the run

if __name__ == '__main__':
    try:
        settings = configure(globals(), sys.argv[1:], verbose=int(os.environ.get('RANK', 0)) == 0)
    except SystemExit as e:  # a bad argument: one line, from rank 0 only
        if not isinstance(e.code, str):
            raise
        fail(e.code.removeprefix('error: '))
    problems = setting_problems(globals(), int(os.environ.get('WORLD_SIZE', 1)))
    if problems:
        fail('\nerror: '.join(problems))
    preempted = []  # SIGTERM (a preempted job) or Ctrl-C: the loop finishes its step, saves, and exits 0

    def stop_soon(signum, frame):
        preempted.append(signum)
        if signum == signal.SIGINT:  # a second Ctrl-C ends the process at once, even inside a long C++ call
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if int(os.environ.get('RANK', 0)) == 0:  # os.write: print is not safe in a signal handler
                os.write(2, b"\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again aborts at once, "
                            b"without saving)\n")
    signal.signal(signal.SIGTERM, stop_soon)
    signal.signal(signal.SIGINT, stop_soon)
    if dtype not in ('bfloat16', 'float32'):
        fail(f"dtype={dtype!r}: use 'bfloat16' (bf16 matmuls, fp32 master weights) or 'float32'")
    if resume_step != -1 and init_from != 'resume':
        fail(f"resume_step={resume_step} picks the checkpoint that init_from='resume' continues: add "
             f"--init_from=resume")
    rank, world_size, device, mesh = init_distributed(device, dp_replicate)
    shards = mesh.size(mesh.ndim - 1)  # the processes that split one copy of the model
    master = rank == 0
    # one run per out_dir, from here to the end (lock_out_dir); what out_dir holds is looked at only once it is ours
    problem, note = from_rank0(lock_out_dir(out_dir) if master else None)
    if problem:
        fail(problem)
    if note:
        print0(note)
    if init_from == 'resume':
        if not checkpoint_dirs(out_dir):
            fail(f"init_from='resume' but {out_dir} holds no checkpoint (ckpt-NNNNNN/)")
    elif checkpoint_dirs(out_dir) and not eval_only:
        fail(f"{out_dir} already holds checkpoints from another run: continue it with --init_from=resume, "
             f"or choose another out_dir")
    global_batch = batch_size * gradient_accumulation_steps  # sequences per step, for any world size
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # the model: the settings' shape, or a Hugging Face checkpoint's; a resumed run must keep its checkpoint's
    model_args = {f.name: globals()[f.name] for f in fields(MPTConfig)}
    saved = stage_from = None
    verified = False  # the checkpoint resumed was checked against its manifest
    if not (isinstance(lora_rank, int) and lora_rank >= 0):
        fail(f"lora_rank={lora_rank!r}: 0 (full fine-tuning) or the adapters' rank, e.g. 16")
    if not (isinstance(lora_alpha, (int, float)) and lora_alpha > 0):
        fail(f"lora_alpha={lora_alpha!r}: a positive number (the adapters' output is scaled by lora_alpha / lora_rank)")
    if not (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1):
        fail(f"lora_dropout={lora_dropout!r}: a probability in [0, 1), e.g. 0.05")
    lora = dict(rank=lora_rank, alpha=float(lora_alpha), dropout=float(lora_dropout), targets=list(lora_targets),
                quantize_base=quantize_base) if lora_rank else None
    if quantize_base not in ('', 'nf4'):
        fail(f"quantize_base={quantize_base!r}: use 'nf4' (QLoRA) or '' (no quantization)")
    if quantize_base and not lora:
        fail("quantize_base='nf4' keeps a LoRA run's frozen base in 4 bits: set lora_rank > 0 too (a full "
             "fine-tune trains every weight, and 4-bit weights cannot train)")
    unknown = [t for t in lora_targets if t not in LINEAR_NAMES]
    if lora and (unknown or not lora_targets):
        fail(f"lora_targets={lora_targets}: {', '.join(map(str, unknown)) or 'an empty list'} matches no linear "
             f"layer of MPT; its linear layers are {', '.join(LINEAR_NAMES)}")
    if quantize_base and to_nf4() is None:
        fail("quantize_base='nf4' needs torchao (its NF4 tensors): pip install torchao")
    if lora and init_from == 'scratch':
        fail(f"lora_rank={lora_rank} trains adapters on a pretrained model: set init_from to a Hugging Face MPT "
             f"directory (e.g. a downloaded mpt-7b)")
    if init_from == 'resume':
        resume_dir, saved, verified = choose_resume(out_dir, resume_step)
        model_args['init_device'] = 'meta'  # the weights are about to be loaded
        if saved.get('base') or os.path.isdir(saved.get('started_from', 'scratch')):
            # started from a Hugging Face model: the shape came from its config.json, not from the settings
            model_args.update({k: saved['model'][k] for k in _ARCH_FIELDS})
        for k in _RUN_FIELDS:  # not given: the run's own (given otherwise: an error below)
            if globals()[k] == _defaults[k]:
                globals()[k] = model_args[k] = saved['model'][k]
        if saved.get('lora') != lora:
            fail(f"the checkpoint in {out_dir} was trained with {describe_lora(saved.get('lora'))}, not "
                 f"{describe_lora(lora)}: resume with the settings it was trained with")
    elif is_checkpoint(init_from):  # a stage: the architecture is the checkpoint's, the rest today's settings
        problem = verify_checkpoint(init_from)[0]
        if problem:
            fail(f"init_from={init_from}: this checkpoint is damaged: {problem}")
        try:
            with open(os.path.join(init_from, 'train.json')) as f:
                stage_from = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"init_from={init_from}: its train.json is unreadable ({e})")
        if stage_from.get('lora') or lora:
            fail(f"init_from={init_from}: " + ("a LoRA run's checkpoint holds only its adapters" if stage_from.get('lora')
                 else "LoRA trains on a Hugging Face model's frozen weights") + ": export the checkpoint with "
                 f"`python export.py --out_dir={os.path.dirname(os.path.abspath(init_from))} --hf_dir=DIR` and "
                 f"start from DIR")
        model_args.update({k: stage_from['model'][k] for k in _ARCH_FIELDS}, init_device='meta')
    elif init_from != 'scratch':
        if not os.path.isfile(os.path.join(init_from, 'config.json')):
            fail(f"init_from={init_from!r}: use 'scratch', 'resume', a Hugging Face MPT directory (with config.json) "
                 f"or a checkpoint of ours (out_dir/ckpt-NNNNNN, with train.json)")
        with open(os.path.join(init_from, 'config.json')) as f:
            hf = json.load(f)
        try:
            # a setting given explicitly wins over the checkpoint's: MPT-7B-StoryWriter was MPT-7B fine-tuned
            # with alibi_bias_max 8 -> 16
            given = {k: globals()[k] for k in ('alibi_bias_max',) if globals()[k] != _defaults[k]}
            model_args.update(config_from_hf(hf), max_seq_len=max_seq_len, init_device='meta', **given)
        except (ValueError, KeyError) as e:
            fail(f"{init_from}: {e}")
    try:
        config = MPTConfig(**model_args)
        check_attention(config, device, getattr(torch, dtype))
    except ValueError as e:
        fail(str(e))
    changed = [f"{k} {saved['model'][k]} -> {getattr(config, k)}" for k in _SHAPE_FIELDS + _RUN_FIELDS
               if saved and saved['model'][k] != getattr(config, k)]
    if changed:
        fail(f"the model differs from the checkpoint's in {out_dir} ({', '.join(changed)}): resume with the "
             f"settings it was trained with, or start a new out_dir (a new stage: "
             f"--init_from={resume_dir})")
    if saved and saved['seed'] != seed:  # the data order and dropout follow the seed: keep the run's
        fail(f"the checkpoint in {out_dir} was trained with seed={saved['seed']}, not {seed}: resume with "
             f"--seed={saved['seed']}")
    # where the run started (carried over by resumes), and a LoRA run's frozen base
    started_from = saved.get('started_from') if saved else \
        os.path.abspath(init_from) if init_from != 'scratch' else init_from
    base = None
    if lora:
        for name, shape in linear_shapes(config).items():
            problem = nf4_problem(name, shape, shards) if quantize_base else None
            if problem:
                fail(f"quantize_base='nf4': {problem}; QLoRA needs every linear layer to tile that way")
        try:
            base = saved['base'] if saved else base_fingerprint(init_from)
            check_base(base)
        except (OSError, ValueError) as e:
            fail(f"{e}" if isinstance(e, (ValueError, FileNotFoundError)) else f"the LoRA run's base model cannot be "
                 f"read ({e}): a LoRA checkpoint holds only the adapters, so the base must stay where the run "
                 f"started from it")

    # data
    meta_path = os.path.join(data_dir, 'meta.json')
    meta = {}
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"{meta_path} is unreadable ({e}): re-run prepare.py, or delete it if the .bin files are yours")
    if meta.get('loss_mask') and not os.path.exists(os.path.join(data_dir, 'train.mask')) and not train_files:
        fail(f"{meta_path} says the data is prompt/response with loss masks, but {data_dir}/train.mask is "
             f"missing: re-run prepare.py")
    if os.path.isfile(os.path.join(started_from, 'config.json')):  # a Hugging Face model's tokenizer, or refused
        problem, warning = check_tokenizer(meta, meta_path, started_from)
        if problem:
            fail(problem)
        if warning and master:
            print(warning, file=sys.stderr, flush=True)
    eot_token = meta.get('eot_token') if config.attn_uses_sequence_id else None  # packed documents end with it
    if config.attn_uses_sequence_id and eot_token is None:
        fail(f"attn_uses_sequence_id=True tells documents apart by their end-of-text token, but {meta_path} "
             f"{'names none (eot_token)' if meta else 'does not exist'}: prepare the data with prepare.py, or set "
             f"attn_uses_sequence_id=False")
    if meta.get('vocab_size', 0) > config.vocab_size:
        fail(f"{meta_path} says vocab_size={meta['vocab_size']} but the model has vocab_size={config.vocab_size}: "
             f"set --vocab_size={meta['vocab_size']} (or larger)")
    data = {}
    for split, pattern in (('train', train_files), ('val', val_files)):
        if split == 'val' and eval_iters == 0:
            continue
        if not pattern:
            pattern = os.path.join(data_dir, f'{split}.bin')
            if not os.path.exists(pattern):
                fail(f"{pattern} not found: run `python prepare.py <dataset>` (it writes data/<dataset>/train.bin, "
                     f"val.bin and meta.json) and set data_dir to its folder, or set {split}_files to a glob of shards")
        data[split], data[f'{split}_pattern'] = load_split(pattern, config.vocab_size, max_seq_len), pattern
    if eval_only and not eval_iters:
        fail("eval_only=True needs eval_iters > 0")
    # a fixed set of val windows per eval length, the same for every evaluation and world size: at max_seq_len
    # eval_iters micro-batches of batch_size; at other lengths as many tokens, in micro-batches of about as many
    evals = {}  # seq_len: (split, micro-batches of window ids)
    for L in sorted({max_seq_len, *eval_seq_lens}) if eval_iters else []:
        if not isinstance(L, int) or L < 1:
            fail(f"eval_seq_lens={eval_seq_lens}: use positive whole numbers of tokens, e.g. [2048, 4096]")
        if L > min(len(a) for a in data['val'][1]) - 1:
            fail(f"eval_seq_lens: {L} tokens is longer than a val file ({data['val_pattern']}) holds: "
                 f"evaluate at shorter lengths, or prepare a longer val split")
        split = data['val'] if L == max_seq_len else load_split(data['val_pattern'], config.vocab_size, L)
        per_batch = max(1, batch_size * max_seq_len // L)
        val_ids = sample_windows(0, int(split[2][-1]), 0, max(1, eval_iters * batch_size * max_seq_len // L))
        evals[L] = (split, [val_ids[i:i + per_batch] for i in range(0, len(val_ids), per_batch)])

    # model and optimizer state
    model = setup_model(config, mesh, dtype, activation_checkpointing, compile, seed,
                        init_weights=init_from == 'scratch', lora=lora)  # else loaded next
    # without dropout no step draws a random number, so none needs seeding
    has_dropout = max(config.attn_pdrop, config.resid_pdrop, config.emb_pdrop, lora['dropout'] if lora else 0) > 0
    hf_weights = None  # a Hugging Face MPT: a LoRA run's base (also on resume: its checkpoints hold only the
    if lora:           # adapters), or where a full fine-tune starts
        hf_weights = base['path']
    elif init_from not in ('scratch', 'resume') and stage_from is None:
        hf_weights = init_from
    if hf_weights:
        try:
            load_hf_weights(model, hf_weights)
        except (OSError, ValueError) as e:
            fail(str(e))
    exp_avgs = lion_state(model)
    iter_num, position, best_val_loss = 0, 0, math.inf
    if lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f"LoRA rank {lora_rank} (alpha {lora_alpha:g}) on {', '.join(lora_targets)}: {trainable:,} trainable "
               f"parameters of {model.num_params():,}; base {base['path']}"
               + (", NF4-quantized" if quantize_base else f", frozen {'bf16' if dtype == 'bfloat16' else 'fp32'}"))
        print0(memory_plan(config, lora, batch_size, max_seq_len, activation_checkpointing, dtype, shards))
    if saved:
        saved = load_checkpoint(resume_dir, model, exp_avgs)
        iter_num, position, best_val_loss = saved['iter_num'], saved['data_position'], saved['best_val_loss']
        print0(f"resuming {resume_dir} on {world_size} process(es): step {iter_num}")
    elif stage_from is not None:
        load_weights(init_from, model)
        print0(f"starting from the weights of {init_from} (step {stage_from['iter_num']} of that run); Lion's "
               f"state, the step count, the data order and the schedule start afresh")
    print0(f"{model.num_params():,} parameters, init_device={model.config.init_device}; {world_size} process(es) "
           f"on {device.type}; {global_batch} sequences x {max_seq_len} tokens per step; "
           f"{len(data['train'][0])} train file(s), {int(data['train'][2][-1]):,} windows")
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    if saved and not eval_only:  # a resume: each step once in metrics.jsonl; what came after it set aside
        problem = aside = None
        if master:
            try:
                aside = set_aside(out_dir, iter_num)
                trim_metrics(metrics_path, iter_num, aside)
            except OSError as e:
                problem = f"cannot move files in {out_dir} for the resume ({e}); no checkpoint was removed"
        problem = from_rank0(problem)
        if problem:
            fail(problem)
        if aside:
            print0(f"moved what {out_dir} held after step {iter_num} (checkpoints, metrics) into {aside}")
    metrics = open(metrics_path, 'a' if saved or eval_only else 'w') if master else None
    last_good = resume_dir if verified else None  # the newest checkpoint known to be good: verified, or saved here
    if wandb_log and master:
        try:
            import wandb
        except ImportError:
            fail("wandb_log=True needs wandb: pip install wandb (or --wandb_log=False)")
        wandb.init(project=wandb_project, name=wandb_run_name, config=settings)

    def leave():
        """The end of a run: every rank leaves together, and without Python's finalization. On gloo a rank
        that had finished everything, process group destroyed, was seen to abort while the interpreter tore
        down ("terminate called without an active exception", no Python frame left: C++ threads and work
        objects that torch.distributed leaves behind), in about 1 two-process CPU run of 10 to 20. All is
        written by now: checkpoints synchronously, metrics.jsonl flushed line by line."""
        dist.barrier()
        dist.destroy_process_group()
        if master:
            metrics.close()
            if wandb_log:
                wandb.finish()
            release_out_dir()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def log(record):
        if master:
            try:
                metrics.write(json.dumps(record) + '\n')
                metrics.flush()
            except OSError as e:
                fail(f"cannot write {metrics_path}: {e.strerror or e}", this_rank_only=True)
            if wandb_log:
                wandb.log(record, step=record['iter'])

    def step_batches(position):
        """This rank's micro-batches of the step at position, and with loss masks the number of targets the
        loss counts in the whole step (every rank's windows: each rank reads all the step's masks)."""
        split = data['train']
        ids = sample_windows(seed, int(split[2][-1]), position, global_batch)
        batches = [to_device(read_windows(split, w, max_seq_len, config.vocab_size), device,
                             read_masks(split, w, max_seq_len), eot_token) for w in rank_windows(ids, rank, world_size, batch_size)]
        loss_tokens = None if split[3] is None else int(read_masks(split, ids, max_seq_len)[:, 1:].sum())
        return batches, loss_tokens

    def checkpoint_info():  # train.json: what a resume needs besides the tensors. The RNG state is the seed
        # and the step: each step reseeds from them, so the data order and dropout continue as they would have
        return dict(iter_num=iter_num, data_position=position, best_val_loss=best_val_loss, seed=seed,
                    world_size=world_size, model=asdict(config), settings=settings, started_from=started_from,
                    lora=lora, base=base)

    def run_evals(**extra):
        """Val loss at every eval length: printed, logged, and returned at max_seq_len (what ckpt.pt follows)."""
        losses = {L: evaluate(model, split, batches, L, config.vocab_size, device, eot_token)
                  for L, (split, batches) in evals.items()}
        print0(f"iter {iter_num}: val loss {losses[max_seq_len]:.4f}")
        record = {'iter': iter_num, 'val_loss': losses[max_seq_len], **extra}
        if len(losses) > 1:
            print0("  seq_len  val loss\n" + "\n".join(f"  {L:7d}  {v:8.4f}" + ("  (trained)" if L == max_seq_len else "")
                                                       for L, v in losses.items()))
            record['val_loss_by_seq_len'] = {str(L): v for L, v in losses.items()}
        log(record)
        return losses[max_seq_len]

    if eval_only:
        iter_num = stage_from['iter_num'] if stage_from else iter_num  # the step those weights were saved at
        run_evals(eval_only=True, init_from=init_from)
        leave()

    # The loop: iter_num counts the steps queued; the weights after them are what evaluation sees. The host
    # never waits for the step it just queued: it reads the step before's (loss, grad norm, ok, stop) only
    # after queueing the next, so the device always has work. Evaluations and saves read what is pending
    # first, so a non-finite step (skipped on the device: see train_step) stops the run before anything
    # after it is saved.
    start_iter, last_saved = iter_num, iter_num if saved else -1
    healthy = torch.ones((), dtype=torch.bool, device=device)  # False from the first non-finite step on
    pending = None  # (iter, lr, the device tensor train_step returned, when it was queued), not read yet
    step_time, steps_timed = 0.0, 0  # since the last log line; evaluation and saving are not counted

    def settle(end=None):
        """Read the pending step: stop on a non-finite one, log it. Returns whether a rank was asked to stop.
        end: when the next step was queued; a step's time is queue to queue (on a busy device that is the
        device's time: the host waits in this read), or queue to now for the last step before a pause."""
        global step_time, steps_timed
        if pending is None:
            return False
        it, lr, packet, queued = pending
        loss, norm, ok, stop = packet.tolist()  # waits for that step, not for the one queued after it
        step_time, steps_timed = step_time + (end or time.time()) - queued, steps_timed + 1
        if not ok:
            what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
            fail(f"iter {it}: {what}; the step was skipped and the run stops without saving. " + (
                f"{last_good} is the last good one: resume it with a lower learning_rate (or grad_clip)" if last_good
                else f"No checkpoint is known to be good: {resume_dir} was written before checkpoints carried "
                     f"checksums, and none was saved since; try it with a lower learning_rate (or grad_clip)" if saved
                else "Nothing was saved: start again with a lower learning_rate (or grad_clip)"))
        if it % log_interval == 0:
            dt = step_time / steps_timed
            tokens_per_sec = global_batch * max_seq_len / dt
            mfu = model.estimate_mfu(tokens_per_sec / world_size, max_seq_len, peak_flops or None)
            if mfu is not None and lora:  # a frozen base computes no weight gradients: 4N FLOPs a token, not 6N
                mfu *= 2 / 3
            peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == 'cuda' else None
            record = dict(iter=it, loss=loss, lr=lr, grad_norm=norm, tokens_per_sec=tokens_per_sec, mfu=mfu,
                          peak_mem_gb=peak_mem, ms_per_iter=dt * 1000)
            print0(f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, grad norm {norm:.3f}, "
                   f"{tokens_per_sec:,.0f} tok/s, {dt * 1000:.1f} ms/iter"
                   + (f", mfu {mfu:.1%}" if mfu is not None else '')
                   + (f", peak mem {peak_mem:.1f} GB" if peak_mem is not None else ''))
            log(record)
            step_time, steps_timed = 0.0, 0
        return stop > 0

    batches, loss_tokens = step_batches(position)
    stop = False
    while True:
        last = iter_num >= max_iters
        if (iter_num % eval_interval == 0 or last or stop) and iter_num != last_saved:
            stop = settle() or stop  # every step before this evaluation is finite
            pending = None
            val_loss = run_evals() if eval_iters and not stop else None
            improved = val_loss is None or val_loss < best_val_loss
            best_val_loss = val_loss if val_loss is not None and improved else best_val_loss
            if iter_num > start_iter:  # not the random init, nor the checkpoint just resumed
                path = last_good = save_checkpoint(out_dir, model, exp_avgs, checkpoint_info(), keep_checkpoints)
                last_saved = iter_num
                if improved and not stop and sampling_ckpt:  # ckpt.pt keeps the best val loss: small data overfits
                    save_for_sampling(os.path.join(out_dir, 'ckpt.pt'), model,
                                      dict(iter_num=iter_num, val_loss=val_loss, settings=settings, meta=meta,
                                           lora=lora, base=base))
                if stop:
                    print0(f"{'Ctrl-C' if signal.SIGINT in preempted else 'SIGTERM'}: saved {path}; continue with "
                           f"--init_from=resume")
        if last or stop:
            break

        # dropout (if any) draws, for each micro-batch, from a generator seeded by (seed, step, the micro-batch's
        # place in the global batch): a resumed run, on any number of processes, draws the same masks
        per_rank = gradient_accumulation_steps // world_size
        seeds = [int(np.random.SeedSequence([seed, iter_num, rank * per_rank + i]).generate_state(1)[0])
                 for i in range(per_rank)] if has_dropout else None
        lr = get_lr(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters)
        t0 = time.time()
        packet = train_step(model, exp_avgs, batches, lr, learning_rate, weight_decay, beta1, beta2, grad_clip,
                            stop=len(preempted), healthy=healthy, loss_tokens=loss_tokens, seeds=seeds)
        healthy = packet[2] > 0
        position += global_batch
        batches, loss_tokens = step_batches(position)  # read while the device still works on this step
        stop = settle(end=t0)  # the step before this one
        pending = (iter_num, lr, packet, t0)
        iter_num += 1
    if last:  # the summary: what was trained and saved, and how to sample it
        ckpt = os.path.join(out_dir, 'ckpt.pt')
        if os.path.exists(ckpt):
            saved_to = (f"{ckpt} holds the {'best' if math.isfinite(best_val_loss) else 'last'} weights: "
                        f"python sample.py --out_dir={shlex.quote(out_dir)}")
        elif iter_num > start_iter and not sampling_ckpt:
            saved_to = (f"{last_good} is the newest checkpoint (sampling_ckpt=False: no ckpt.pt): python export.py "
                        f"--out_dir={shlex.quote(out_dir)} --hf_dir=DIR, then python sample.py --init_from=DIR")
        elif iter_num > start_iter:
            saved_to = f"no ckpt.pt: no evaluation after step {start_iter} improved on its val loss"
        else:
            saved_to = f"nothing new saved: the run was already at max_iters={max_iters}"
        print0(f"done: {iter_num:,} steps, {iter_num * global_batch * max_seq_len:,} tokens, " +
               (f"best val loss {best_val_loss:.4f}" if math.isfinite(best_val_loss) else "no val loss (eval_iters=0)") +
               f"; {saved_to}")
    leave()
