"""
LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) for model.py's MPT:

    y = x W^T + dropout(x) A^T B^T * alpha / rank

with W frozen (from a Hugging Face MPT: init_from) and only A (rank x in) and B (out x rank) trained. QLoRA keeps
the frozen W of the linear layers in 4 bits (torchao's NF4) and dequantizes it inside each matmul. The adapters
are parameters of the model like any other, so FSDP2 shards them, DCP saves them and Lion updates them as it
would the whole model; a frozen weight stays in the dtype it computes in (no fp32 master: it never changes).

train.py adds the adapters (add_lora, init_lora), quantizes each process's rows of the base (quantize) and
prints the memory plan; sample.py and export.py merge a run's adapters into its base weight by weight
(merged_weights), re-reading the base from the Hugging Face directory the run started from (check_base).
"""

import json
import logging
import math
import os
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from hf import hf_tensor_files, param_rows, read_hf_tensor

LINEAR_NAMES = ('Wqkv', 'out_proj', 'up_proj', 'down_proj')  # MPT's (and Hugging Face MPT's) linear layers
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's: 64 weights share a scale, 256 scales share an fp32 factor


class LoRALinear(nn.Module):
    """A frozen linear layer (its `weight` keeps its name, so the base's checkpoints load as before) plus
    PEFT's LoRA adapter: lora_A starts Kaiming-uniform and lora_B zero, so training starts at the base
    model exactly. An NF4 weight (torchao) dequantizes itself inside F.linear."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.weight = linear.weight
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=linear.weight.device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=linear.weight.device))
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling


def is_adapter(name):
    return name.endswith(('.lora_A', '.lora_B'))


def is_nf4(t):
    return type(t.to_local() if isinstance(t, DTensor) else t).__name__ == 'NF4Tensor'


class _TorchaoNoise(logging.Filter):
    """Importing torchao logs that its CUDA kernels (_C_mxfp8.so, ...) do not load on this machine and that it
    registers enums the deprecated way; NF4 needs neither."""
    def filter(self, record):
        message = record.getMessage()
        return not (message.startswith('Failed to load') and '_C' in message) and 'is an Enum subclass' not in message


def to_nf4():
    """torchao's NF4 quantizer (its home moved from torchao.dtypes.nf4tensor to torchao.quantization), or
    None when torchao is not installed."""
    noise = _TorchaoNoise()
    loggers = [logging.getLogger(name) for name in ('torchao', 'torch.utils._pytree')]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        try:
            from torchao.quantization import to_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4
    except ImportError:
        return None
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
    return to_nf4


def nf4_problem(name, shape, shards=1):
    """Why a weight of this shape cannot be NF4 split over `shards` processes (QLoRA's blocks must tile it, and
    each process must hold whole blocks of 64 x 256 weights), or None."""
    numel, block = math.prod(shape), NF4_BLOCK * NF4_SCALER_BLOCK
    if numel % block:
        return (f"{name} {tuple(shape)} has {numel:,} weights, not a multiple of the {NF4_BLOCK} x "
                f"{NF4_SCALER_BLOCK} = {block:,} of NF4's blocks")
    if shape[0] % shards or numel // block % shards:
        return f"{name} {tuple(shape)} does not split evenly over {shards} processes in NF4's blocks"
    return None


def lora_problems(s):
    """The problems of train.py's LoRA settings (s: its settings), one line each, for its setting_problems."""
    rank, alpha, dropout, targets, quantize_base = (s[k] for k in (
        'lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets', 'quantize_base'))
    problems = []
    if not (isinstance(rank, int) and rank >= 0):
        problems.append(f"lora_rank={rank!r}: 0 (full fine-tuning) or the adapters' rank, e.g. 16")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        problems.append(f"lora_alpha={alpha!r}: a positive number (the adapters' output is scaled by lora_alpha / "
                        f"lora_rank)")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        problems.append(f"lora_dropout={dropout!r}: a probability in [0, 1), e.g. 0.05")
    if quantize_base not in ('', 'nf4'):
        problems.append(f"quantize_base={quantize_base!r}: use 'nf4' (QLoRA) or '' (no quantization)")
    if problems:  # what follows would only repeat them
        return problems
    if quantize_base and not rank:
        problems.append("quantize_base='nf4' keeps a LoRA run's frozen base in 4 bits: set lora_rank > 0 too (a full "
                        "fine-tune trains every weight, and 4-bit weights cannot train)")
    elif quantize_base and to_nf4() is None:
        problems.append("quantize_base='nf4' needs torchao (its NF4 tensors): pip install torchao")
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if rank and (unknown or not targets):
        problems.append(f"lora_targets={targets}: {', '.join(map(str, unknown)) or 'an empty list'} matches no "
                        f"linear layer of MPT; its linear layers are {', '.join(LINEAR_NAMES)}")
    return problems


def add_lora(model, rank, alpha, dropout, targets, quantize_base='', base_dtype=torch.float32, device='cpu'):
    """Freeze every weight of model, in base_dtype (the compute dtype: a frozen weight needs no fp32 master);
    give each linear layer named in targets a LoRALinear adapter (fp32: it trains). With quantize_base='nf4'
    every linear layer of the blocks (targeted or not) becomes NF4, of its weights as they are now; on the meta
    device (as train.py builds a model it then loads) that is only the shape, and the codes come with load_nf4.
    device: where the model will live. Returns the names of the adapted layers."""
    quantize = to_nf4() if quantize_base else None
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for block in model.transformer.blocks:
        for parent in (block.attn, block.ffn):
            for name in LINEAR_NAMES:
                linear = getattr(parent, name, None)
                if linear is None:
                    continue
                if quantize is not None:  # from fp32, as quantize does it
                    q = quantize(linear.weight.detach().float(), NF4_BLOCK, NF4_SCALER_BLOCK)
                    if q.is_meta:  # the scales' mean and the 16-value code book are not split by FSDP but passed
                        # along by reference: they get storage on the device now, for load_nf4 to fill in place
                        q.scaler_mean, q.nf4 = torch.zeros((), device=device), torch.zeros(16, device=device)
                    linear.weight = nn.Parameter(q, requires_grad=False)
                if name in targets:
                    setattr(parent, name, LoRALinear(linear, rank, alpha, dropout))
                    adapted.append(name)
    for name, p in model.named_parameters():
        if not is_adapter(name) and not is_nf4(p):
            p.data = p.data.to(base_dtype)
    return adapted


@torch.no_grad()
def quantize(rows, gather=None):
    """NF4 of some rows of a weight (fp32; a process's FSDP shard, whole blocks of 64 x 256 weights), code for
    code what torchao's to_nf4 of the whole weight holds for those rows. Each block of 64 weights has its scale
    (absmax) and 4-bit codes from its own weights, each 256 scales their 8-bit codes and an fp32 factor from
    those 256, so a shard is quantized on its own, but for one number: the mean of the scales, which QLoRA
    subtracts before quantizing them, is the whole weight's. gather(scales) returns the scales of every shard, in
    order (train.py: an all-gather among the processes that share the weight; None: rows is the whole weight):
    the mean is taken over them as to_nf4 takes it over its own, and this shard's scales are quantized again
    with it. Written out here, not torchao's, because torchao takes the mean over the tensor it is given."""
    q = to_nf4()(rows, NF4_BLOCK, NF4_SCALER_BLOCK)
    if gather is None:
        return q
    scales = rows.reshape(-1, NF4_BLOCK).abs().amax(dim=1)  # (n / 64,): this shard's block scales
    mean = gather(scales).mean()
    centered = (scales - mean).view(-1, NF4_SCALER_BLOCK)  # (n / 16384, 256)
    factor = 256 / (2 * centered.abs().amax(dim=1))  # maps each 256 scales onto [-128, 128]
    q.quantized_scalers = (centered * factor[:, None]).round().clamp(-128, 127).flatten().to(torch.int8)
    q.quantization_factor, q.scaler_mean = factor, mean
    return q


@torch.no_grad()
def load_nf4(param, q):
    """Put q (quantize) into an NF4 parameter that FSDP has sharded (or that stays whole on one process) and
    to_empty has given storage: its codes, scales, factors, scales' mean and code book, in place (to_local and
    FSDP's own views of a shard are other NF4Tensor objects that share them)."""
    local = param.to_local() if isinstance(param, DTensor) else param
    for name in ('quantized_data', 'quantized_scalers', 'quantization_factor', 'scaler_mean', 'nf4'):
        getattr(local, name).copy_(getattr(q, name))


@torch.no_grad()
def load_nf4_weights(model, path):
    """A QLoRA model's NF4 weights from a Hugging Face checkpoint (hf.load_hf_weights loads the rest): each rank
    reads the fp32 rows of its own shards and quantizes them (quantize: code for code the whole weight's)."""
    files = hf_tensor_files(path)
    for name, p in model.named_parameters():
        if is_nf4(p):
            rows, group = param_rows(path, files, name, p, torch.float32)
            world = 1 if group is None else dist.get_world_size(group)

            def gather(scales):  # every shard's NF4 block scales, in order
                everyone = [torch.empty_like(scales) for _ in range(world)]
                dist.all_gather(everyone, scales, group=group)
                return torch.cat(everyone)
            local = p.to_local() if isinstance(p, DTensor) else p
            load_nf4(p, quantize(rows.to(local.device), gather if world > 1 else None))


@torch.no_grad()
def init_lora(model, seed):
    """A Kaiming-uniform (PEFT's init), B zero. Each A is drawn whole from a generator seeded by the seed and
    the layer's name and then sharded, so the adapters start the same for any world size and init_device."""
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        full = torch.zeros(p.shape)
        if name.endswith('lora_A'):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0]))
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
        if isinstance(p, DTensor):
            p.to_local().copy_(distribute_tensor(full.to(p.device), p.device_mesh, p.placements).to_local())
        else:
            p.copy_(full)


def describe_lora(lora):
    if not lora:
        return "full fine-tuning (lora_rank=0)"
    return (f"lora_rank={lora['rank']}, lora_alpha={lora['alpha']:g}, lora_dropout={lora['dropout']:g}, "
            f"lora_targets={lora['targets']}, quantize_base={lora['quantize_base']!r}")


def linear_shapes(config):
    """{name: (out, in)} of one block's linear layers."""
    d, kv, hidden = config.d_model, config.kv_n_heads * config.head_dim, config.expansion_ratio * config.d_model
    return {'Wqkv': (d + 2 * kv, d), 'out_proj': (d, d), 'up_proj': (hidden, d), 'down_proj': (d, hidden)}


def memory_plan(config, lora, batch_size, seq_len, activation_checkpointing, dtype, shards):
    """One process's memory for a LoRA/QLoRA run, estimated from the shapes (GB = 1e9 bytes): the frozen
    base in the compute dtype, its linear weights split over the `shards` processes that shard a copy of the model
    (NF4: 4 bits a weight, an 8-bit scale per 64 and an fp32 factor per 256 scales), its embedding and final norm
    whole on each (train.py's setup_model), the adapters with their gradients and Lion momentum (fp32 each),
    the activations of one micro-batch, and the blocks FSDP has all-gathered (this one and the one prefetched).
    Activations follow Korthikanti et al. (2022), about 17 values a token per d_model per layer with flash
    attention; with activation checkpointing only each block's input is kept, plus one block's inside while it
    is recomputed; the logits cost three copies (compute dtype, fp32, gradient)."""
    shapes = linear_shapes(config)
    d, L, V = config.d_model, config.n_layers, config.vocab_size
    act = 2 if dtype == 'bfloat16' else 4  # bytes per activation value, and per frozen weight
    linear = L * sum(math.prod(s) for s in shapes.values())
    other = V * d + (2 * L + 1) * d
    adapters = L * sum(lora['rank'] * sum(shapes[t]) for t in lora['targets'])
    nf4_bytes = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALER_BLOCK)
    base = linear * (nf4_bytes if lora['quantize_base'] else act) / shards + other * act
    trained = adapters * 12 / shards
    tokens = batch_size * seq_len
    per_block = tokens * d * 17 * act
    acts = (L * tokens * d * act + per_block if activation_checkpointing else L * per_block) + tokens * V * (act + 8)
    block = sum(math.prod(s) for s in shapes.values())
    gathered = 2 * block * (nf4_bytes if lora['quantize_base'] else act) + (
        max(math.prod(s) for s in shapes.values()) * (4 + act) if lora['quantize_base'] else 0)  # + a dequantized weight
    total = base + trained + acts + gathered
    gb = lambda n: f"{n / 1e9:.2f} GB"
    kind = 'bf16' if dtype == 'bfloat16' else 'fp32'
    return (f"memory plan per process (estimate): base {gb(base)} ({linear / 1e9:.2f}B linear weights "
            f"{'NF4' if lora['quantize_base'] else kind}, {other / 1e6:.1f}M {kind}), adapters + Lion {gb(trained)} "
            f"({adapters / 1e6:.2f}M parameters x 12 bytes: weight, gradient, momentum), activations {gb(acts)} "
            f"(micro-batch {batch_size} x {seq_len}{', checkpointed' if activation_checkpointing else ''}), "
            f"gathered blocks {gb(gathered)}; total {gb(total)}")


# -----------------------------------------------------------------------------
# the base of a LoRA run: train.json records its directory and a fingerprint, and a run's checkpoints hold only
# the adapters, so resuming, sampling and exporting re-read it from there

FINGERPRINT_PIECES, FINGERPRINT_PIECE = 16, 1 << 20  # bytes of each weight file read for its fingerprint


def sampled_crc(file, size):
    """CRC-32 of FINGERPRINT_PIECES pieces of FINGERPRINT_PIECE bytes spread evenly over a file, its first (a
    safetensors header) and last included: weights changed in place, at the same size, change it (unless the
    change misses every piece), at 16 MB a file read (MPT-30B's 60 GB in 7 files: 112 MB)."""
    crc, step = 0, max(size - FINGERPRINT_PIECE, 0) / max(FINGERPRINT_PIECES - 1, 1)
    with open(file, 'rb') as f:
        for k in range(FINGERPRINT_PIECES):
            f.seek(int(k * step))
            crc = zlib.crc32(f.read(FINGERPRINT_PIECE), crc)
    return crc


def base_fingerprint(path):
    """What identifies a Hugging Face model directory cheaply: its config.json, and each weight file's size and
    sampled_crc."""
    path = os.path.abspath(path)
    files = sorted(f for f in os.listdir(path) if f.endswith(('.safetensors', '.bin', '.index.json')))
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    sizes = {f: os.path.getsize(os.path.join(path, f)) for f in files}
    return dict(path=path, config=config, files={f: [n, sampled_crc(os.path.join(path, f), n)] for f, n in sizes.items()})


def check_base(base):
    """Raise FileNotFoundError / ValueError (one clear line) unless base['path'] still holds the weights the run
    started from (train.json's 'base': the path and its fingerprint)."""
    try:
        now = base_fingerprint(base['path'])
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"the LoRA run's base model {base['path']} cannot be read ({e}): its checkpoints "
                                f"hold only the adapters, so the base must stay where the run started from "
                                f"it") from None
    if base.get('files') and all(isinstance(v, int) for v in base['files'].values()):  # from before the CRCs
        now = {**now, 'files': {f: v[0] for f, v in now['files'].items()}}
    if now != base:
        raise ValueError(f"the LoRA run's base model {base['path']} has changed since the run started (config.json "
                         f"or weight files differ): the adapters were trained on the weights it held then")


def merged_weights(adapters, lora, base):
    """weight(name): one weight of a LoRA run's model as it trained, fp32, read when asked for: the base's (from
    base['path'], checked first by check_base), round-tripped through NF4 if quantize_base (whole-tensor
    quantization: what training's per-shard quantize gives, code for code), plus (alpha / rank) B @ A where there
    is an adapter. adapters: {layer.lora_A: tensor, layer.lora_B: tensor}. One weight of the base at a time is in
    memory, so exporting and merging need no more than that besides what they keep."""
    check_base(base)
    files = hf_tensor_files(base['path'])
    quantize_nf4 = to_nf4() if lora['quantize_base'] else None
    if lora['quantize_base'] and quantize_nf4 is None:
        raise ValueError("this QLoRA run's base is NF4-quantized as torchao does it, which needs torchao: "
                         "pip install torchao")

    def weight(name):
        if name not in files:
            raise ValueError(f"{base['path']}: no tensor {name} in its weight files")
        t = read_hf_tensor(base['path'], files[name], name, dtype=torch.float32)
        layer = name.removesuffix('.weight')
        if quantize_nf4 is not None and layer.endswith(LINEAR_NAMES):
            t = quantize_nf4(t, NF4_BLOCK, NF4_SCALER_BLOCK).get_original_weight().float()
        if layer + '.lora_A' in adapters:
            A, B = adapters[layer + '.lora_A'].float(), adapters[layer + '.lora_B'].float()
            t += (B @ A) * (lora['alpha'] / lora['rank'])
        return t
    return weight
