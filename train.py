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
and with --dp_replicate=4 (HSDP) each node shards one copy of the model and the nodes only all-reduce gradients;
with --context_parallel=8 each sequence is split over a node's 8 GPUs (context.py: long contexts).
Continue from the newest checkpoint in out_dir, on any number of processes that divides the batch:
    torchrun ... train.py config/mpt_1b.py --init_from=resume
Fine-tune a Hugging Face MPT: --init_from=path/to/mpt-7b (a save_pretrained directory); with --lora_rank, LoRA
(lora.py). Each process reads only its own shards of it.
Preemption: on SIGTERM the run finishes its step (an evaluation stops at once), saves a checkpoint and exits 0;
the grace period must cover a step and a save (torchrun, itself signalled, waits 30 s for it, then exits 1).

NCCL connects the processes on CUDA, gloo on CPU; a plain `python train.py` is a group of one, so the
same code (FSDP2, DCP) runs everywhere. Settings are the variables below; config files (Python) and
--key=value override them (configurator.py), and every MPTConfig field is a setting too.

out_dir gets: ckpt-000500/ (a sharded checkpoint: weights, Lion state and train.json with the step,
data position and settings; the newest keep_checkpoints are kept), ckpt.pt (one file for sample.py:
full fp32 weights and MPTConfig, at the best val loss so far; sampling_ckpt), metrics.jsonl (a JSON object per line).
"""

import functools
import importlib.util
import json
import math
import os
import shlex
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
import torch.utils.checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from checkpoints import (ARCH_FIELDS, RUN_FIELDS, SHAPE_FIELDS, choose_resume, is_checkpoint, load_checkpoint,
                         load_weights, resume_metrics, save_checkpoint, save_for_sampling, take_out_dir,
                         verify_checkpoint)
import context
from common import fail, from_rank0, print0, release_out_dir
from data import open_data, rank_windows, read_masks, read_windows, sample_windows, to_device
from hf import load_hf_weights as load_hf_rows
from lora import (add_lora, base_fingerprint, check_base, describe_lora, init_lora, is_adapter, is_nf4, linear_shapes,
                  load_nf4_weights, lora_problems, memory_plan, nf4_problem)
from model import MPT, MPTConfig, check_attention, config_from_hf

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
eval_tasks = []  # zero-shot task files (.jsonl, see eval.py) scored with each evaluation, e.g. ['hellaswag_val.jsonl']
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = 'mpt'
wandb_run_name = 'mpt'
# data: data_dir/train.bin and val.bin (raw uint16, from prepare.py or nanoGPT), or llm.c shards
data_dir = 'data/openwebtext'
data_changed = ''  # 'ok': resume on train data other than the checkpoint's (a deliberate new stage of data)
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
peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0: model.PEAK_FLOPS's figure for this GPU
# HSDP over many nodes: the processes form dp_replicate groups (e.g. one per node), each holding the model sharded
# among its own processes; all-gathers stay inside a group, gradients are all-reduced across the groups
dp_replicate = 1  # the groups, each with a sharded copy; 1: FSDP over all (torchtitan's dp_replicate_degree)
# long contexts: each sequence split over context_parallel = N consecutive processes (a node's), 2 of its 2N chunks
# each (zigzag), attention a ring (context.py); sequence lengths must be multiples of 2N; FSDP shards over them too
context_parallel = 1
_defaults = settings_in(globals())


def setting_problems(s, world_size=1):
    """Every setting's problems, one line each, found before any work: a bad value met deep inside a run (a
    modulo by zero at the first step, a negative learning rate that trains on) costs the run or silently ruins it.
    LoRA's come from lora.py (lora_problems)."""
    problems = out_of_range(s, __file__, whole=dict(
        batch_size=1, gradient_accumulation_steps=1, eval_interval=1, log_interval=1, keep_checkpoints=1,
        max_iters=0, eval_iters=0, warmup_iters=0, lr_decay_iters=0, resume_step=-1, vocab_size=1, d_model=1, n_heads=1,
        n_layers=1, expansion_ratio=1, max_seq_len=1, kv_n_heads=1, alibi_bias_max=0, seed=0, context_parallel=1),
        at_least=dict(learning_rate=0, min_lr=0, weight_decay=0, grad_clip=0, peak_flops=0),
        positive=('clip_qkv', 'softmax_scale', 'layer_norm_epsilon'),
        fraction=('beta1', 'beta2', 'attn_pdrop', 'resid_pdrop', 'emb_pdrop'),
        choices=dict(init_device=('auto', 'cpu', 'meta'), data_changed=('', 'ok')))
    problems += [p for p in [device_problem(s['device'])] if p] + lora_problems(s) + context.context_problems(s, world_size)
    if s['dtype'] not in ('bfloat16', 'float32'):
        problems.append(f"dtype={s['dtype']!r}: use 'bfloat16' (bf16 matmuls, fp32 master weights) or 'float32'")
    if s['resume_step'] != -1 and s['init_from'] != 'resume':
        problems.append(f"resume_step={s['resume_step']} picks the checkpoint that init_from='resume' continues: add "
                        f"--init_from=resume")
    if s['wandb_log'] and importlib.util.find_spec('wandb') is None:
        problems.append("wandb_log=True needs wandb: pip install wandb (or --wandb_log=False)")
    if s['eval_only'] and not s['eval_iters']:
        problems.append("eval_only=True needs eval_iters > 0")
    if not all(isinstance(L, int) and L >= 1 for L in s['eval_seq_lens']):
        problems.append(f"eval_seq_lens={s['eval_seq_lens']}: use positive whole numbers of tokens, e.g. [2048, 4096]")
    cp = s['context_parallel'] if isinstance(s['context_parallel'], int) and s['context_parallel'] >= 1 else 1
    readers, groups = max(world_size // cp, 1), f"groups of context_parallel={cp} " if cp > 1 else ''  # reading rows
    if isinstance(s['gradient_accumulation_steps'], int) and s['gradient_accumulation_steps'] % readers:
        problems.append(f"gradient_accumulation_steps={s['gradient_accumulation_steps']} (micro-batches per step over "
                        f"all processes) does not divide among {readers} {groups}processes: make it a multiple of {readers}")
    if is_checkpoint(s['init_from']):  # a stage keeps its checkpoint's architecture: a different one asked for is an error
        try:
            with open(os.path.join(s['init_from'], 'train.json')) as f:
                model = json.load(f)['model']
        except (OSError, ValueError, KeyError) as e:
            return problems + [f"init_from={s['init_from']}: its train.json is unreadable ({e})"]
        ignored = [f"{k}={s[k]!r} (the checkpoint's is {model[k]!r})" for k in ARCH_FIELDS
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


def load_hf_weights(model, path):
    """A Hugging Face MPT's weights into model, each process reading only the rows of its own shards (hf.py);
    a QLoRA model's NF4 weights quantized from theirs (lora.py); LoRA's adapters keep what init_lora gave them."""
    load_hf_rows(model, path, skip=lambda name, p: is_adapter(name) or is_nf4(p))
    load_nf4_weights(model, path)


# -----------------------------------------------------------------------------
# where the run starts from: scratch, a resume of out_dir's checkpoint, a stage (another run's checkpoint), or
# a Hugging Face model (fully fine-tuned, or a LoRA run's frozen base)

def start_point(s, shards):
    """(config, lora, base, started_from, resume, stage, hf_dir) for the run the settings s describe:
    the model's config (the settings', a Hugging Face config.json's, or a checkpoint's architecture); add_lora's
    settings or None; a LoRA run's base (its directory and fingerprint); where the run started (carried over by
    resumes); resume: (checkpoint dir, its train.json, verified) or None; stage: the stage checkpoint's train.json
    or None; hf_dir: the Hugging Face directory whose weights to load, or None. A resume takes its run's
    max_seq_len and alibi_bias_max into s when they are not given. Every problem is one line."""
    init_from, out_dir = s['init_from'], s['out_dir']
    model_args = {f.name: s[f.name] for f in fields(MPTConfig)}
    lora = dict(rank=s['lora_rank'], alpha=float(s['lora_alpha']), dropout=float(s['lora_dropout']),
                targets=list(s['lora_targets']), quantize_base=s['quantize_base']) if s['lora_rank'] else None
    resume = stage = saved = None
    if lora and init_from == 'scratch':
        fail(f"lora_rank={s['lora_rank']} trains adapters on a pretrained model: set init_from to a Hugging Face MPT "
             f"directory (e.g. a downloaded mpt-7b)")
    if init_from == 'resume':
        resume = choose_resume(out_dir, s['resume_step'])
        saved = resume[1]
        model_args['init_device'] = 'meta'  # the weights are about to be loaded
        if saved.get('base') or os.path.isdir(saved.get('started_from', 'scratch')):
            # started from a Hugging Face model: the shape came from its config.json, not from the settings
            model_args.update({k: saved['model'][k] for k in ARCH_FIELDS})
        for k in RUN_FIELDS:  # not given: the run's own (given otherwise: an error below)
            if s[k] == _defaults[k]:
                s[k] = model_args[k] = saved['model'][k]
        if saved.get('lora') != lora:
            fail(f"the checkpoint in {out_dir} was trained with {describe_lora(saved.get('lora'))}, not "
                 f"{describe_lora(lora)}: resume with the settings it was trained with")
    elif is_checkpoint(init_from):  # a stage: the architecture is the checkpoint's, the rest today's settings
        problem = verify_checkpoint(init_from)[0]
        if problem:
            fail(f"init_from={init_from}: this checkpoint is damaged: {problem}")
        try:
            with open(os.path.join(init_from, 'train.json')) as f:
                stage = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"init_from={init_from}: its train.json is unreadable ({e})")
        if stage.get('lora') or lora:
            fail(f"init_from={init_from}: " + ("a LoRA run's checkpoint holds only its adapters" if stage.get('lora')
                 else "LoRA trains on a Hugging Face model's frozen weights") + ": export the checkpoint with "
                 f"`python export.py --out_dir={os.path.dirname(os.path.abspath(init_from))} --hf_dir=DIR` and "
                 f"start from DIR")
        model_args.update({k: stage['model'][k] for k in ARCH_FIELDS}, init_device='meta')
    elif init_from != 'scratch':
        if not os.path.isfile(os.path.join(init_from, 'config.json')):
            fail(f"init_from={init_from!r}: use 'scratch', 'resume', a Hugging Face MPT directory (with config.json) "
                 f"or a checkpoint of ours (out_dir/ckpt-NNNNNN, with train.json)")
        try:
            with open(os.path.join(init_from, 'config.json')) as f:
                hf = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"{os.path.join(init_from, 'config.json')} is unreadable ({e}): download it again")
        try:
            # a setting given explicitly wins over the checkpoint's: MPT-7B-StoryWriter was MPT-7B fine-tuned
            # with alibi_bias_max 8 -> 16
            given = {k: s[k] for k in ('alibi_bias_max',) if s[k] != _defaults[k]}
            model_args.update(config_from_hf(hf), max_seq_len=s['max_seq_len'], init_device='meta', **given)
        except (ValueError, KeyError) as e:
            fail(f"{init_from}: {e}")
    try:
        config = MPTConfig(**model_args)
        check_attention(config, s['device'], getattr(torch, s['dtype']))
    except ValueError as e:
        fail(str(e))
    changed = [f"{k} {saved['model'][k]} -> {getattr(config, k)}" for k in SHAPE_FIELDS + RUN_FIELDS
               if saved and saved['model'][k] != getattr(config, k)]
    if changed:
        fail(f"the model differs from the checkpoint's in {out_dir} ({', '.join(changed)}): resume with the "
             f"settings it was trained with, or start a new out_dir (a new stage: --init_from={resume[0]})")
    if saved and saved['seed'] != s['seed']:  # the data order and dropout follow the seed: keep the run's
        fail(f"the checkpoint in {out_dir} was trained with seed={saved['seed']}, not {s['seed']}: resume with "
             f"--seed={saved['seed']}")
    started_from = saved.get('started_from') if saved else \
        os.path.abspath(init_from) if init_from != 'scratch' else init_from
    base = None
    if lora:
        for name, shape in linear_shapes(config).items():
            problem = nf4_problem(name, shape, shards) if s['quantize_base'] else None
            if problem:
                fail(f"quantize_base='nf4': {problem}; QLoRA needs every linear layer to tile that way")
        try:
            base = saved['base'] if saved else base_fingerprint(init_from)
            check_base(base)
        except (OSError, ValueError) as e:
            fail(f"{e}" if isinstance(e, (ValueError, FileNotFoundError)) else f"the LoRA run's base model cannot be "
                 f"read ({e}): a LoRA checkpoint holds only the adapters, so the base must stay where the run "
                 f"started from it")
    # a Hugging Face MPT: a LoRA run's base (also on resume: its checkpoints hold only the adapters), or where a
    # full fine-tune starts
    hf_dir = base['path'] if lora else init_from if init_from not in ('scratch', 'resume') and stage is None else None
    return config, lora, base, started_from, resume, stage, hf_dir


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
def evaluate(model, split, batches, seq_len, vocab_size, device, eot_token=None, stopping=lambda: False, cp=1):
    """Mean loss over a fixed list of micro-batches (window ids), batch j on rank j % world_size (cp > 1: on cp group
    j % (world_size / cp), each process its chunks). Every rank runs the same number of forwards (each all-gathers
    weights), padding with batches weighted 0. With loss masks, the mean over the counted targets. stopping():
    whether this rank was asked to stop (SIGTERM); the ranks agree on it before each forward, then all return None."""
    rank, world = dist.get_rank() // cp, dist.get_world_size() // cp  # the row readers
    model.eval()
    total = torch.zeros(2, device=device)
    for k in range(-(-len(batches) // world)):
        asked = stopping()
        if dist.get_world_size() > 1:  # one small all-reduce per forward, in evaluation only
            flag = torch.tensor(float(asked), device=device)
            dist.all_reduce(flag)
            asked = flag.item() > 0
        if asked:
            model.train()
            return None
        j = k * world + rank
        ids = batches[min(j, len(batches) - 1)]
        x, y, *sequence_id = context.local_chunks(to_device(read_windows(split, ids, seq_len, vocab_size), device,
                                                 read_masks(split, ids, seq_len), eot_token), cp)
        if split[3] is not None:  # a sum over the counted targets, and their count
            _, loss_sum = model(x, y, *sequence_id, reduction='sum')
            total += torch.stack([loss_sum, (y != -1).sum().float()]) * (j < len(batches))
            continue
        _, loss = model(x, y, *sequence_id)
        total += torch.stack([loss.float(), torch.ones((), device=device)]) * (j < len(batches))
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def leave(metrics=None, wandb=None):
    """The end of a run: every rank leaves together, without Python's finalization (on gloo a finished rank was seen
    to abort in the interpreter's teardown, "terminate called without an active exception", from C++ threads that
    torch.distributed leaves behind, in 1 two-process CPU run of 10 to 20). All is written: checkpoints, metrics."""
    dist.barrier()
    dist.destroy_process_group()
    if metrics:
        metrics.close()
    if wandb:
        wandb.finish()
    release_out_dir()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def summary(out_dir, iter_num, start_iter, tokens, best_val_loss, last_good):
    """The run's last line: what was trained and saved, and how to sample it."""
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
    return (f"done: {iter_num:,} steps, {tokens:,} tokens, " + (f"best val loss {best_val_loss:.4f}" if
            math.isfinite(best_val_loss) else "no val loss (eval_iters=0)") + f"; {saved_to}")


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
    rank, world_size, device, mesh = init_distributed(device, dp_replicate)
    shards, master = mesh.size(mesh.ndim - 1), rank == 0  # shards: the processes that split one copy of the model
    take_out_dir(out_dir, init_from, eval_only)  # one run per out_dir, from here to the end
    global_batch = batch_size * gradient_accumulation_steps  # sequences per step, for any world size
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config, lora, base, started_from, resume, stage, hf_dir = start_point(globals(), shards)
    data, meta, eot_token, evals = open_data(
        data_dir, train_files, val_files, config, batch_size, eval_iters, eval_seq_lens, started_from,
        resume and resume[1].get('data'), data_changed)  # a resume refuses other data, unless data_changed='ok'

    # the model and Lion's state: from the seed, or loaded
    model = setup_model(config, mesh, dtype, activation_checkpointing, compile, seed,
                        init_weights=init_from == 'scratch', lora=lora)  # else loaded next
    context.enable(model, context_parallel, batch_size, max_seq_len, shards, activation_checkpointing, dtype)  # cp > 1
    if hf_dir:
        try:
            load_hf_weights(model, hf_dir)
        except (OSError, ValueError) as e:
            fail(str(e))
    exp_avgs = lion_state(model)
    iter_num, position, best_val_loss = 0, 0, math.inf
    if eval_tasks:  # read and encoded once, here: a bad file fails now, not at the first evaluation
        import eval as zero_shot
        tasks = zero_shot.run_tasks(eval_tasks, model, meta, max_seq_len)
    if lora:
        print0(f"LoRA rank {lora_rank} (alpha {lora_alpha:g}) on {', '.join(lora_targets)}: "
               f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters of "
               f"{model.num_params():,}; base {base['path']}"
               + (", NF4-quantized" if quantize_base else f", frozen {'bf16' if dtype == 'bfloat16' else 'fp32'}"))
        print0(memory_plan(config, lora, batch_size, max_seq_len, activation_checkpointing, dtype, shards))
    if resume:
        saved = load_checkpoint(resume[0], model, exp_avgs)
        iter_num, position, best_val_loss = saved['iter_num'], saved['data_position'], saved['best_val_loss']
        print0(f"resuming {resume[0]} on {world_size} process(es): step {iter_num}")
        if not eval_only:
            resume_metrics(out_dir, iter_num)
    elif stage:
        load_weights(init_from, model)
        print0(f"starting from the weights of {init_from} (step {stage['iter_num']} of that run); Lion's "
               f"state, the step count, the data order and the schedule start afresh")
    print0(f"{model.num_params():,} parameters, init_device={model.config.init_device}; {world_size} process(es) "
           f"on {device.type}; {global_batch} sequences x {max_seq_len} tokens per step; "
           f"{len(data['train'][0])} train file(s), {int(data['train'][2][-1]):,} windows")
    # without dropout no step draws a random number, so none needs seeding
    has_dropout = max(config.attn_pdrop, config.resid_pdrop, config.emb_pdrop, lora['dropout'] if lora else 0) > 0
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    metrics = open(metrics_path, 'a' if resume or eval_only else 'w') if master else None
    last_good = resume[0] if resume and resume[2] else None  # the newest checkpoint known good: verified, or saved here
    wandb = None
    if wandb_log and master:  # (setting_problems checked that wandb is installed)
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=settings)

    def log(record):
        if master:
            try:
                metrics.write(json.dumps(record) + '\n')
                metrics.flush()
            except OSError as e:
                fail(f"cannot write {metrics_path}: {e.strerror or e}", this_rank_only=True)
            if wandb:
                wandb.log(record, step=record['iter'])

    def step_batches(position):
        """This rank's micro-batches of the step at position, and with loss masks the number of targets the
        loss counts in the whole step (every rank's windows: each rank reads all the step's masks)."""
        split = data['train']
        ids = sample_windows(seed, int(split[2][-1]), position, global_batch)
        mine = rank_windows(ids, rank // context_parallel, world_size // context_parallel, batch_size)  # cp: shared
        batches = [context.local_chunks(to_device(read_windows(split, w, max_seq_len, config.vocab_size), device,
                                                  read_masks(split, w, max_seq_len), eot_token), context_parallel) for w in mine]
        loss_tokens = None if split[3] is None else int(read_masks(split, ids, max_seq_len)[:, 1:].sum())
        return batches, loss_tokens

    def run_evals(**extra):
        """Val loss at every eval length: printed, logged, and returned at max_seq_len (what ckpt.pt follows)."""
        losses = {}
        for L, (split, batches) in evals.items():  # None: a signal stopped it (evaluate), the run saves and ends
            losses[L] = evaluate(model, split, batches, L, config.vocab_size, device, eot_token, lambda: bool(preempted),
                                 context_parallel)
            if losses[L] is None:
                return None
        print0(f"iter {iter_num}: val loss {losses[max_seq_len]:.4f}")
        record = {'iter': iter_num, 'val_loss': losses[max_seq_len], **extra}
        if len(losses) > 1:
            print0("  seq_len  val loss\n" + "\n".join(f"  {L:7d}  {v:8.4f}" + ("  (trained)" if L == max_seq_len else "")
                                                       for L, v in losses.items()))
            record['val_loss_by_seq_len'] = {str(L): v for L, v in losses.items()}
        if eval_tasks:  # eval.py's scores, of the model as it is now
            with context.off(model):  # each process scores whole items of its own
                record['tasks'] = zero_shot.evaluate_tasks(model, tasks, device, rank, world_size)
            print0('  ' + ', '.join(f"{name}: acc {r['acc']:.4f}" + (f", acc_norm {r['acc_norm']:.4f}" if 'acc_norm'
                                    in r else '') for name, r in record['tasks'].items()))
        log(record)
        return losses[max_seq_len]

    if eval_only:
        iter_num = stage['iter_num'] if stage else iter_num  # the step those weights were saved at
        run_evals(eval_only=True, init_from=init_from)
        leave(metrics, wandb)

    # The loop: iter_num counts the steps queued; the weights after them are what evaluation sees. The host never
    # waits for the step it just queued: it reads the step before's (loss, grad norm, ok, stop) only after queueing
    # the next (settle, below), so the device always has work. Evaluations and saves settle first, so a non-finite
    # step (skipped on the device: see train_step) stops the run before anything after it is saved.
    start_iter, last_saved = iter_num, iter_num if resume else -1
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
                else f"No checkpoint is known to be good: {resume[0]} was written before checkpoints carried "
                     f"checksums, and none was saved since; try it with a lower learning_rate (or grad_clip)" if resume
                else "Nothing was saved: start again with a lower learning_rate (or grad_clip)"))
        if it % log_interval == 0:
            dt = step_time / steps_timed
            tokens_per_sec = global_batch * max_seq_len / dt
            mfu = model.estimate_mfu(tokens_per_sec / world_size, max_seq_len, peak_flops or None)
            if mfu is not None and lora:  # a frozen base computes no weight gradients: 4N FLOPs a token, not 6N
                mfu *= 2 / 3
            peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == 'cuda' else None
            print0(f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, grad norm {norm:.3f}, "
                   f"{tokens_per_sec:,.0f} tok/s, {dt * 1000:.1f} ms/iter"
                   + (f", mfu {mfu:.1%}" if mfu is not None else '')
                   + (f", peak mem {peak_mem:.1f} GB" if peak_mem is not None else ''))
            log(dict(iter=it, loss=loss, lr=lr, grad_norm=norm, tokens_per_sec=tokens_per_sec, mfu=mfu,
                     peak_mem_gb=peak_mem, ms_per_iter=dt * 1000))
            step_time, steps_timed = 0.0, 0
        return stop > 0

    batches, loss_tokens = step_batches(position)
    stop = False
    while True:
        last = iter_num >= max_iters
        if (iter_num % eval_interval == 0 or last or stop) and iter_num != last_saved:
            stop = settle() or stop  # every step before this evaluation is finite
            problem = from_rank0(data['problem']())  # the CRC-32s of the token files, read in a thread
            if problem:
                fail(problem)
            pending = None
            val_loss = run_evals() if eval_iters and not stop else None
            stop = stop or bool(eval_iters and val_loss is None)  # a signal stopped the evaluation: save, end
            improved = val_loss is None or val_loss < best_val_loss
            best_val_loss = val_loss if val_loss is not None and improved else best_val_loss
            if iter_num > start_iter:  # not the random init, nor the checkpoint just resumed
                info = dict(iter_num=iter_num, data_position=position, best_val_loss=best_val_loss, seed=seed,
                            world_size=world_size, model=asdict(config), settings=settings,
                            started_from=started_from, lora=lora, base=base, data=data['identity'])  # train.json
                path = last_good = save_checkpoint(out_dir, model, exp_avgs, info, keep_checkpoints)
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
        # place in the global batch): a resumed run, on any number of processes, draws the same masks; the RNG
        # state a checkpoint needs is then only the seed and the step
        per_rank = gradient_accumulation_steps // (world_size // context_parallel)
        seeds = [int(np.random.SeedSequence([seed, iter_num, rank // context_parallel * per_rank + i]).generate_state(1)[0])
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
    if last:
        print0(summary(out_dir, iter_num, start_iter, iter_num * global_batch * max_seq_len, best_val_loss, last_good))
    leave(metrics, wandb)
