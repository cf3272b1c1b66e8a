"""
The MPT language model in one file, nanoGPT style.

MPT (MosaicML's Pretrained Transformer) is a GPT with three differences:
1) no positional embeddings: attention scores get an ALiBi bias slope_h * (j - i) instead,
2) no biases in any linear layer or LayerNorm,
3) the output head is tied to the token embedding.
Weight names follow MPT's own, so checkpoints move 1:1 to and from Hugging Face's MptForCausalLM
(see MPT.from_hf / MPT.save_hf).

Attention has interchangeable implementations, picked by MPTConfig.attn_impl in `attention()`:
'torch' (plain PyTorch, the reference), 'triton' (our flash-attention kernel with ALiBi computed
in-kernel, further down this file) and 'flash' (the flash-attn package).
"""

import contextlib
import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import triton
import triton.language as tl
from torch.nn import functional as F
from triton.tools.tensor_descriptor import TensorDescriptor  # Triton >= 3.4


ATTN_IMPLS = ('torch', 'triton', 'flash')

# Triton reads TRITON_INTERPRET when @triton.jit runs (for tl.zeros & co. at `import triton`), not at launch:
# CPU runs need it set before triton is first imported. Snapshot it with the kernels' own decoration.
_INTERPRET = bool(triton.knobs.runtime.interpret)


@dataclass
class MPTConfig:
    # field names follow MPT's config (and Hugging Face's MptConfig)
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    expansion_ratio: int = 4  # MLP hidden size = expansion_ratio * d_model
    max_seq_len: int = 2048  # training context; ALiBi lets generation run past it
    alibi_bias_max: int = 8  # slopes are 2^(-alibi_bias_max * k / n), k = 1..n
    clip_qkv: float | None = None  # clamp q, k, v to [-clip_qkv, clip_qkv] (MPT-30B-style stability)
    qk_ln: bool = False  # LayerNorm on q and k before attention
    softmax_scale: float | None = None  # None -> 1/sqrt(head_dim)
    kv_n_heads: int | None = None  # None -> n_heads; fewer gives grouped-query attention
    logit_scale: float | str | None = None  # multiply logits by this; 'inv_sqrt_d_model' -> 1/sqrt(d_model)
    attn_pdrop: float = 0.0  # dropout on attention probabilities ('torch' attention only)
    resid_pdrop: float = 0.0  # dropout on each block's attention and MLP outputs
    emb_pdrop: float = 0.0  # dropout on token embeddings
    layer_norm_epsilon: float = 1e-5
    init_device: str = 'cpu'  # 'meta' builds the model without memory (FSDP then initializes shards)
    attn_impl: str = 'triton'  # 'triton' (CPU: falls back to 'torch') | 'torch' | 'flash', see attention()
    # 'triton' only: True gives bitwise-repeatable attention gradients (dQ in its own kernel, a fixed summation
    # order; a slower backward). False (the default, as flash-attn's) sums dQ with fp32 atomics, whose order
    # varies between runs: the gradients then differ from run to run in the last bits (fp32 rounding).
    attn_deterministic: bool = False
    # packed documents: MPT.forward's sequence_id (B, T) document ids keep each token's attention inside its
    # own document (llm-foundry's and transformers' name); False ignores sequence_id
    attn_uses_sequence_id: bool = False

    def __post_init__(self):
        if self.kv_n_heads is None:
            self.kv_n_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}: "
                             f"change one of them (head_dim = d_model / n_heads)")
        if self.n_heads % self.kv_n_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by kv_n_heads={self.kv_n_heads}: "
                             f"each key/value head serves a whole group of query heads")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl={self.attn_impl!r}: use one of {', '.join(ATTN_IMPLS)}")
        if isinstance(self.logit_scale, str) and self.logit_scale != 'inv_sqrt_d_model':
            raise ValueError(f"logit_scale={self.logit_scale!r}: use a number, None or 'inv_sqrt_d_model'")

    @property
    def head_dim(self):
        return self.d_model // self.n_heads


def config_from_hf(hf):
    """MPTConfig fields from a Hugging Face / llm-foundry MPT config.json; refuses what MPT here lacks."""
    if hf.get('model_type') != 'mpt':
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}, not 'mpt'")
    attn = hf.get('attn_config') or {}
    ffn = hf.get('ffn_config') or {}
    problems = [what for what, bad in [
        ("learned positional embeddings instead of ALiBi (attn_config.alibi=false)", attn.get('alibi', True) is False),
        ("biases (no_bias=false)", hf.get('no_bias', True) is False),
        ("prefix-LM attention", attn.get('prefix_lm', False)),
        (f"ffn_type={ffn.get('ffn_type')!r}", ffn.get('ffn_type', 'mptmlp') != 'mptmlp'),
        (f"norm_type={hf.get('norm_type')!r}", 'layernorm' not in hf.get('norm_type', 'layernorm')),
    ] if bad]
    if problems:
        raise ValueError(f"this MPT checkpoint uses {'; '.join(problems)}, which model.py does not implement")
    kv_n_heads = {'multiquery_attention': 1, 'grouped_query_attention': attn.get('kv_n_heads')}.get(
        attn.get('attn_type'), hf['n_heads'])
    return dict(vocab_size=hf['vocab_size'], d_model=hf['d_model'], n_heads=hf['n_heads'],
                n_layers=hf['n_layers'], expansion_ratio=ffn.get('expansion_ratio', hf.get('expansion_ratio', 4)),
                max_seq_len=hf.get('max_seq_len', 2048), alibi_bias_max=attn.get('alibi_bias_max', 8),
                clip_qkv=attn.get('clip_qkv'), qk_ln=attn.get('qk_ln', False),
                softmax_scale=attn.get('softmax_scale'), kv_n_heads=kv_n_heads,
                logit_scale=hf.get('logit_scale'), layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-5))


def alibi_slopes(n_heads, alibi_bias_max=8):
    """ALiBi slopes as the released MPT checkpoints compute them: (n_heads,) float32.
    For n a power of two the slopes are 2^(-alibi_bias_max * k / n), k = 1..n. Otherwise they are
    taken from the next power of two, odd positions first, then even (the ALiBi paper's interleaving)."""
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float32) * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2, m)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


# -----------------------------------------------------------------------------
# attention implementations: q (B, H, Tq, D), k and v (B, H_kv, Tk, D) -> (B, H, Tq, D)
# Queries are the last Tq positions of the Tk keys (bottom-right aligned), so the same code serves
# training (Tq == Tk) and generation with a KV cache (Tq < Tk).

def torch_attention(q, k, v, slopes=None, causal=True, softmax_scale=None, dropout_p=0.0, key_start=None,
                    sequence_id=None):
    """The reference: SDPA with ALiBi (and the masks) given as an additive float mask.
    key_start (B,): keys before it are padding (left-padded prompts in generate) and are masked.
    sequence_id (B, Tk): document ids of the keys (queries: the last Tq); a query sees only keys with
    its own id (a block-diagonal mask for packed documents)."""
    Tq, Tk = q.size(-2), k.size(-2)
    i = torch.arange(Tk - Tq, Tk, device=q.device).view(-1, 1)  # absolute query positions
    j = torch.arange(Tk, device=q.device).view(1, -1)
    # 4-D, with its batch dim: CPU SDPA takes its fused kernel for a (1, H, Tq, Tk) mask, but falls back to
    # the unfused "math" path for a 3-D one
    bias = torch.zeros(1, 1, Tq, Tk, device=q.device)
    if slopes is not None:
        bias = slopes.view(1, -1, 1, 1).float() * (j - i)  # (1, H, Tq, Tk)
    masked = (j > i) if causal else torch.zeros(Tq, Tk, dtype=torch.bool, device=q.device)
    if key_start is not None:
        masked = masked | (j < key_start.view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
    if sequence_id is not None:
        masked = masked | (sequence_id[:, Tk - Tq:, None] != sequence_id[:, None, :])[:, None]  # (B, 1, Tq, Tk)
    # a query with no key at all (Tq > Tk, or a padding query) outputs 0; its row stays unmasked
    # for SDPA, since softmax over a row of -inf gives NaN, also in the backward
    empty = masked.all(dim=-1, keepdim=True)
    bias = bias.masked_fill(masked & ~empty, float('-inf'))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p,
                                       scale=softmax_scale, enable_gqa=k.size(1) != q.size(1))
    return y.masked_fill(empty, 0.0)


def flash_package_attention(q, k, v, slopes=None, causal=True, softmax_scale=None, dropout_p=0.0):
    """The flash-attn package (CUDA only). Its layout is (B, T, H, D) and it aligns the causal mask
    bottom-right like ours; it computes the ALiBi bias as -slope * |i - j|, equal to ours wherever
    the causal mask lets a score through."""
    from flash_attn import flash_attn_func  # attention_problem checks it is installed
    if not causal and slopes is not None:
        raise ValueError("attn_impl='flash' computes ALiBi as -slope*|i-j|, which differs from MPT's "
                         "slope*(j-i) without the causal mask: use attn_impl='triton' or 'torch'")
    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                        softmax_scale=softmax_scale, causal=causal,
                        alibi_slopes=None if slopes is None else slopes.float())
    return y.transpose(1, 2)


_notes_shown = set()


def notice(message):
    """Print a note once per process, on stderr (stdout may carry generated text), on rank 0 only."""
    if message not in _notes_shown and int(os.environ.get('RANK', 0)) == 0:
        print(f"note: {message}", file=sys.stderr)
    _notes_shown.add(message)


def attention_problem(impl, device, dtype, head_dim, dropout_p=0.0, sequence_id=False):
    """What attn_impl `impl` cannot run, as one line, or None. Every attention guard is here, once:
    check_attention asks it of the settings before any work, attention() of each call."""
    on_cuda = torch.device(device).type == 'cuda'
    if impl == 'triton':
        if dropout_p > 0 and (on_cuda or _INTERPRET):
            return "attn_pdrop > 0 needs attn_impl='torch': the Triton kernel has no dropout"
        if on_cuda:  # (on a CPU it falls back to 'torch'; under TRITON_INTERPRET=1 flash_attn_alibi checks)
            return flash_problem(device, dtype, head_dim)  # the kernel's own limits, beside it further down
    if impl == 'flash':
        if sequence_id:
            return ("attn_uses_sequence_id=True needs attn_impl='triton' or 'torch': the 'flash' path does not "
                    "take document ids (flash-attn's variable-length API is not wired up)")
        if not on_cuda:
            return "attn_impl='flash' (the flash-attn package) runs on CUDA only: use attn_impl='torch'"
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return ("attn_impl='flash' needs the flash-attn package: pip install flash-attn --no-build-isolation "
                    "(or use attn_impl='triton')")
    return None


def check_attention(config, device, dtype):
    """What the chosen attention cannot run, as one clear ValueError before any work starts: inside the
    forward the same problems would surface mid-step. Scripts call this first."""
    problem = attention_problem(config.attn_impl, device, dtype, config.head_dim, config.attn_pdrop,
                                config.attn_uses_sequence_id)
    if problem:
        raise ValueError(problem)


def attention(q, k, v, slopes, config, causal=True, dropout_p=0.0, key_start=None, sequence_id=None):
    """The one place where config.attn_impl picks an implementation."""
    impl = config.attn_impl
    if impl == 'triton' and not q.is_cuda and not _INTERPRET:
        notice("attn_impl='triton' needs a CUDA device; using attn_impl='torch' on CPU")
        impl = 'torch'
    if key_start is not None and impl != 'torch':
        notice(f"prompts of unequal length need a padding mask, which only attn_impl='torch' takes: "
               f"generate uses it instead of attn_impl={impl!r}")
        impl = 'torch'
    if impl != 'torch' and (problem := attention_problem(impl, q.device, q.dtype, q.size(-1), dropout_p,
                                                         sequence_id is not None)):
        raise ValueError(problem)
    if impl == 'triton':
        return flash_attn_alibi(q, k, v, slopes, causal, config.softmax_scale, config.attn_deterministic,
                                sequence_id)
    if impl == 'flash':
        return flash_package_attention(q, k, v, slopes, causal, config.softmax_scale, dropout_p)
    return torch_attention(q, k, v, slopes, causal, config.softmax_scale, dropout_p, key_start, sequence_id)


# -----------------------------------------------------------------------------
# the model

def LayerNorm(dim, eps):
    return nn.LayerNorm(dim, eps=eps, bias=False)  # MPT: no biases anywhere


class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        kv_dim = config.kv_n_heads * config.head_dim
        # q, k and v in one matmul; rows [0, d_model) are q, then k, then v (MPT's order)
        self.Wqkv = nn.Linear(config.d_model, config.d_model + 2 * kv_dim, bias=False)
        if config.qk_ln:
            self.q_ln = LayerNorm(config.d_model, config.layer_norm_epsilon)
            self.k_ln = LayerNorm(kv_dim, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.out_proj._is_residual = True
        self.ring = None  # context parallelism: context.enable() puts its ring attention here

    def forward(self, x, slopes, kv_cache=None, sequence_id=None):
        B, T, C = x.size()
        cfg = self.config
        qkv = self.Wqkv(x)
        if cfg.clip_qkv is not None:
            qkv = qkv.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv)
        q, k, v = qkv.split([C, cfg.kv_n_heads * cfg.head_dim, cfg.kv_n_heads * cfg.head_dim], dim=2)
        if cfg.qk_ln:
            q, k = self.q_ln(q), self.k_ln(k)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, cfg.kv_n_heads, cfg.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, cfg.kv_n_heads, cfg.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        key_start = None
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, n_kv, T_past + T, hs)
            key_start = kv_cache.key_start
        dropout_p = cfg.attn_pdrop if self.training else 0.0
        if self.ring is not None and kv_cache is None:  # this rank's zigzag chunks of each sequence
            y = self.ring(q, k, v, slopes, sequence_id)  # (B, nh, T, hs)
        else:
            y = attention(q, k, v, slopes, cfg, dropout_p=dropout_p, key_start=key_start,
                          sequence_id=sequence_id)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.expansion_ratio * config.d_model, bias=False)
        self.down_proj = nn.Linear(config.expansion_ratio * config.d_model, config.d_model, bias=False)
        self.down_proj._is_residual = True

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))  # exact (erf) GELU, as MPT


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.norm_1 = LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.norm_2 = LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = MLP(config)
        self.resid_drop = nn.Dropout(config.resid_pdrop)

    def forward(self, x, slopes, kv_cache=None, sequence_id=None):
        x = x + self.resid_drop(self.attn(self.norm_1(x), slopes, kv_cache, sequence_id))
        x = x + self.resid_drop(self.ffn(self.norm_2(x)))
        return x


# -----------------------------------------------------------------------------
# what MPT's methods use: generate's KV cache, sampler and memory check; estimate_mfu's peak FLOP/s

class KVCache:
    """One layer's keys and values, preallocated for a whole generation: (B, n_kv, max_len, hs)."""

    def __init__(self, batch_size, max_len, config, dtype, device, key_start=None):
        shape = (batch_size, config.kv_n_heads, max_len, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.len = 0
        self.key_start = key_start  # (B,) where each row's tokens start (left padding), or None

    def update(self, k, v):
        """Append (B, n_kv, T, hs) keys and values; return all of them so far."""
        T = k.size(2)
        self.k[:, :, self.len:self.len + T] = k
        self.v[:, :, self.len:self.len + T] = v
        self.len += T
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) token ids: greedy at temperature 0, else sampled within top_k / top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the likelier ones before it already hold top_p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float('-inf')))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_memory(nbytes, device, what):
    """A clear error before allocating more than the device has free (CUDA, or Linux RAM)."""
    device = torch.device(device)
    if device.type == 'cuda':
        free = torch.cuda.mem_get_info(device)[0]
    else:  # Linux's estimate of what can be allocated without swapping (MemFree omits the page cache)
        try:
            with open('/proc/meminfo') as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
        except (OSError, StopIteration):
            return
    if nbytes > free:
        raise ValueError(f"{what} needs {nbytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free on "
                         f"{device}: generate fewer samples at once or lower max_len")


# peak dense bf16 tensor-core FLOP/s, from the vendors' datasheets; first match in the device name wins
PEAK_FLOPS = [
    ('GH200', 989e12), ('H200', 989e12), ('H100 NVL', 835e12), ('H100 PCIe', 756e12), ('H100', 989e12),
    ('B200', 2250e12), ('A100', 312e12), ('A10', 125e12), ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12),
    ('V100', 125e12),  # fp16: V100 has no bf16
]


def peak_flops_per_device(device=None):
    """The peak bf16 FLOP/s of a CUDA device from PEAK_FLOPS, or None (CPU, unknown GPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != 'cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


class MPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        with torch.device(config.init_device):
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                emb_drop=nn.Dropout(config.emb_pdrop),
                blocks=nn.ModuleList([Block(config) for _ in range(config.n_layers)]),
                norm_f=LayerNorm(config.d_model, config.layer_norm_epsilon),
            ))
        self._slopes = None  # see alibi()
        if config.init_device != 'meta':
            self.init_weights()

    def alibi(self, device):
        """The ALiBi slopes, (n_heads,) fp32 on device. A plain attribute rather than a buffer, so that
        model.to(bfloat16) cannot round them (2^(-k/8), for 64 heads, is not exact in bf16)."""
        if self._slopes is None or self._slopes.device != device:
            self._slopes = alibi_slopes(self.config.n_heads, self.config.alibi_bias_max).to(device)
        return self._slopes

    def init_weights(self):
        """MPT's default initialization: Kaiming-normal with fan_in (std = sqrt(2 / fan_in)) on every
        linear layer and on the embedding; the output projections that feed the residual stream
        (attn.out_proj, ffn.down_proj) are further divided by sqrt(2 * n_layers); LayerNorm weights 1.
        Also works on a model materialized from the meta device, and on FSDP-sharded parameters."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.kaiming_normal_(module.weight, mode='fan_in', nonlinearity='relu')
                    if getattr(module, '_is_residual', False):
                        module.weight.div_(math.sqrt(2 * self.config.n_layers))
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)

    def num_params(self):
        """Number of parameters; the output head is the token embedding, so it counts once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, sequence_id=None, kv_cache=None, reduction='mean'):
        """idx (B, T) token ids -> (logits, loss). With targets (B, T) (-1 = ignore) the logits of every
        position and the cross-entropy: the mean over the counted targets, or with reduction='sum' their sum
        (0, not NaN, when none counts); without targets, only the last position's logits (B, 1, V).
        sequence_id (B, T) integer document ids, non-decreasing along each row (packed documents): with
        config.attn_uses_sequence_id a token attends only to its own document's tokens; without, giving it is
        an error (llm-foundry ignores it, and attention would then silently cross documents)."""
        if not idx.is_cuda and idx.numel():
            # checked on CPU only, where it costs nothing; on CUDA a bad id is a device-side assert,
            # so train.py and sample.py check their tokens on the host before they reach the GPU
            lo, hi, V = int(idx.min()), int(idx.max()), self.config.vocab_size
            if lo < 0 or hi >= V:
                raise ValueError(f"token id {hi if hi >= V else lo} is outside the vocabulary [0, {V}): "
                                 f"the data was made with another tokenizer, or vocab_size is too small")
        if targets is not None and tuple(targets.shape) != tuple(idx.shape):
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if sequence_id is not None and not self.config.attn_uses_sequence_id:
            raise ValueError("sequence_id given, but the model attends across documents (attn_uses_sequence_id=False): "
                             "set attn_uses_sequence_id=True in MPTConfig to keep documents apart, or pass no sequence_id")
        if sequence_id is not None:
            if tuple(sequence_id.shape) != tuple(idx.shape):
                raise ValueError(f"sequence_id must have idx's shape {tuple(idx.shape)}, "
                                 f"got {tuple(sequence_id.shape)}")
            if kv_cache is not None:
                raise ValueError("sequence_id and kv_cache together are not supported: generate one document")
        x = self.transformer.emb_drop(self.transformer.wte(idx))  # (B, T, C)
        slopes = self.alibi(x.device)
        for i, block in enumerate(self.transformer.blocks):
            x = block(x, slopes, None if kv_cache is None else kv_cache[i], sequence_id)
        x = self.transformer.norm_f(x)
        if targets is None:
            x = x[:, [-1], :]  # inference: only the last position's logits are needed
        logits = F.linear(x, self.transformer.wte.weight)  # tied output head, (B, T, V)
        if self.config.logit_scale is not None:
            scale = self.config.logit_scale
            logits = logits * (1 / math.sqrt(self.config.d_model) if scale == 'inv_sqrt_d_model' else scale)
        loss = None
        if targets is not None:
            # fp32 cross-entropy: bf16 logits would round the loss (and its gradient) visibly
            # (reshape: targets may be a slice of a larger batch, not contiguous)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=reduction)
        return logits, loss

    # -------------------------------------------------------------------------
    # generation with a KV cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
                 max_len=None, generator=None, stream=None, vocab=None):
        """Continue prompts by up to max_new_tokens tokens. The prompts run through the model once
        (prefill, filling a preallocated KV cache), then each step feeds only the newest token.
        idx: a (B, T) tensor, or a list of prompts (lists or 1-D tensors) of different lengths.
        temperature 0 is greedy; top_k / top_p sample only among the k likeliest tokens / the smallest
        set of tokens holding probability top_p. A row that emits eos_token then repeats it, and
        generation stops once every row has. max_len bounds prompt + new tokens (default the training
        max_seq_len; ALiBi has no position table, so it may be set beyond). stream(tokens) is called
        with each step's (B,) new tokens. vocab: only ids below it are drawn (a tokenizer's size: MPT pads its
        vocabulary past the tokenizer's, and a padding id decodes to nothing). Returns (B, T + n) for a tensor,
        else a list of 1-D tensors."""
        cfg, device = self.config, self.transformer.wte.weight.device
        prompts = [torch.as_tensor(p, dtype=torch.long).flatten().cpu() for p in idx]
        lengths = [len(p) for p in prompts]
        B, T = len(prompts), max(lengths, default=0)
        max_len = max_len or cfg.max_seq_len
        if B == 0 or min(lengths) == 0:
            raise ValueError("generate needs at least one prompt, and no empty prompt")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: use temperature >= 0 "
                             f"(0 = greedy), top_k >= 1 or None, 0 < top_p <= 1 or None")
        if T + max_new_tokens > max_len:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_len={max_len}: "
                             f"shorten the prompt, lower max_new_tokens, or raise max_len (the model trained on "
                             f"{cfg.max_seq_len}; ALiBi extrapolates past it, with some loss of quality)")
        bad = next((int(t) for p in prompts for t in p if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {cfg.vocab_size}): "
                             f"wrong tokenizer for this checkpoint?")
        # left padding: all rows end at the same column, so each step appends one column. ALiBi sees
        # only distances j - i, so a row's tokens need not start at position 0; the padding is masked
        batch = torch.zeros(B, T, dtype=torch.long)
        for r, p in enumerate(prompts):
            batch[r, T - len(p):] = p
        key_start = None if min(lengths) == T else torch.tensor([T - n for n in lengths], device=device)
        dtype = self.transformer.wte.weight.dtype
        nbytes = 2 * cfg.n_layers * B * cfg.kv_n_heads * max_len * cfg.head_dim * dtype.itemsize
        check_memory(nbytes, device, f"the KV cache ({B} x {max_len} tokens x {cfg.n_layers} layers)")
        kv_cache = [KVCache(B, max_len, cfg, dtype, device, key_start) for _ in range(cfg.n_layers)]

        tokens, out = batch.to(device), [batch.to(device)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits, _ = self(tokens, kv_cache=kv_cache)  # (B, 1, V)
            tokens = sample_next(logits[:, -1, :vocab].float(), temperature, top_k, top_p, generator)  # (B,)
            if eos_token is not None:
                tokens = tokens.masked_fill(done, eos_token)
                done |= tokens == eos_token
            out.append(tokens[:, None])
            if stream is not None:
                stream(tokens)
            if eos_token is not None and done.all():
                break
            tokens = tokens[:, None]
        out = torch.cat(out, dim=1)  # (B, T + n)
        if isinstance(idx, torch.Tensor):
            return out
        rows = []
        for row, n in zip(out, lengths):  # drop the padding; cut after the first eos_token
            row = row[T - n:]
            ends = (row[n:] == eos_token).nonzero() if eos_token is not None else []
            rows.append(row[:n + int(ends[0]) + 1] if len(ends) else row)
        return rows

    # -------------------------------------------------------------------------
    # FLOPs and MFU

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, the PaLM convention (as nanoGPT and llm-foundry): 6N for the
        matmuls' forward and backward, N counting the tied embedding once (it is the output head's
        matmul), plus 12 * n_layers * d_model * seq_len for attention scores and values, counted as if
        unmasked (the causal mask halves the real work; the convention ignores that)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layers * cfg.d_model * seq_len

    def estimate_mfu(self, tokens_per_sec, seq_len, peak_flops=None):
        """Model FLOPs utilization: achieved FLOP/s over the device's peak, per device. tokens_per_sec
        is per device. Returns None when the peak is unknown (CPU, an unlisted GPU) and not given."""
        peak = peak_flops or peak_flops_per_device()
        return None if peak is None else self.flops_per_token(seq_len) * tokens_per_sec / peak

    # -------------------------------------------------------------------------
    # Hugging Face interop: weight names are identical, so this is only config translation

    @classmethod
    def from_hf(cls, path, **overrides):
        """Load a local directory written by transformers' MptForCausalLM.save_pretrained (or a
        downloaded MPT-7B/MPT-30B): config.json + safetensors or .bin weights, sharded or not.
        overrides set MPTConfig fields (attn_impl, ...). Weights keep the checkpoint's dtype."""
        path = Path(path)
        if not (path / 'config.json').is_file():
            raise FileNotFoundError(f"{path}/config.json not found: from_hf wants a directory written by "
                                    f"save_pretrained (or a downloaded MPT checkpoint)")
        try:
            hf = json.loads((path / 'config.json').read_text())
        except ValueError as e:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({e}): download it again") from None
        config = MPTConfig(**{**config_from_hf(hf), **overrides})
        # the whole model in memory, as nanoGPT's from_pretrained; hf.py reads each process's rows of a big one
        from safetensors.torch import load_file  # safetensors: in requirements.txt; imported only here
        for name in ('model.safetensors', 'pytorch_model.bin'):
            index = path / f'{name}.index.json'
            try:
                files = sorted(set(json.loads(index.read_text())['weight_map'].values())) if index.is_file() else \
                    [name] if (path / name).is_file() else []
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index} is damaged ({type(e).__name__}: {e}): download it again") from None
            if files:
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")
        state = {}
        for file in files:
            if not (path / file).is_file():
                raise FileNotFoundError(f"{path / file} is missing ({name}.index.json names it): download it again")
            try:
                state.update(load_file(path / file) if file.endswith('.safetensors') else
                             torch.load(path / file, map_location='cpu', weights_only=True))
            except Exception as e:  # truncated, another format: safetensors' and torch's own errors name no file
                raise ValueError(f"{path / file} cannot be read ({type(e).__name__}: {str(e).strip()[:200]}): it is "
                                 f"truncated or damaged; download it again") from None
        return cls.from_state_dict(config, state, source=str(path))

    @classmethod
    def from_state_dict(cls, config, state, source='checkpoint'):
        """A model holding the tensors of `state` (MPT names) without first allocating and randomly
        initializing its own: it is built on the meta device and the tensors are assigned."""
        init_device, config.init_device = config.init_device, 'meta'
        model = cls(config)
        config.init_device = init_device
        tied = state.pop('lm_head.weight', None)
        if tied is not None and not torch.equal(tied, state.get('transformer.wte.weight', tied)):
            raise ValueError(f"{source}: lm_head.weight differs from transformer.wte.weight; MPT ties them")
        missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not match the MPT layout of its config: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = [f"{k} {tuple(v.shape)} (config says {expected[k]})" for k, v in state.items()
                 if tuple(v.shape) != expected[k]]
        if wrong:
            raise ValueError(f"{source}: weight shapes do not match its config: {', '.join(wrong[:3])}")
        model.load_state_dict(state, assign=True)
        return model

    def hf_config(self):
        """This model's config as transformers' MptConfig takes it (what save_hf writes to config.json)."""
        cfg = self.config
        unsupported = [name for name, bad in [
            ('kv_n_heads < n_heads', cfg.kv_n_heads != cfg.n_heads), ('qk_ln', cfg.qk_ln),
            ('logit_scale', cfg.logit_scale is not None), ('expansion_ratio != 4', cfg.expansion_ratio != 4)] if bad]
        if unsupported:
            raise ValueError(f"transformers' MptForCausalLM does not implement {', '.join(unsupported)}; "
                             f"it would load this model but compute other logits, so this is refused")
        return {
            'architectures': ['MptForCausalLM'], 'model_type': 'mpt', 'd_model': cfg.d_model,
            'n_heads': cfg.n_heads, 'n_layers': cfg.n_layers, 'expansion_ratio': cfg.expansion_ratio,
            'max_seq_len': cfg.max_seq_len, 'vocab_size': cfg.vocab_size, 'resid_pdrop': cfg.resid_pdrop,
            'emb_pdrop': cfg.emb_pdrop, 'layer_norm_epsilon': cfg.layer_norm_epsilon, 'learned_pos_emb': False,
            'no_bias': True, 'norm_type': 'low_precision_layernorm', 'logit_scale': None,
            'tie_word_embeddings': True, 'use_cache': False,
            'torch_dtype': str(self.transformer.wte.weight.dtype).removeprefix('torch.'),
            'attn_config': {'alibi': True, 'alibi_bias_max': cfg.alibi_bias_max, 'attn_impl': 'torch',
                            # an int when whole: transformers 5 validates attn_pdrop as int
                            'attn_pdrop': int(cfg.attn_pdrop) if cfg.attn_pdrop == int(cfg.attn_pdrop)
                            else cfg.attn_pdrop, 'attn_type': 'multihead_attention',
                            'clip_qkv': cfg.clip_qkv, 'softmax_scale': cfg.softmax_scale, 'qk_ln': False,
                            'prefix_lm': False, 'attn_uses_sequence_id': cfg.attn_uses_sequence_id},
        }

    def save_hf(self, path):
        """Write a directory that transformers' MptForCausalLM.from_pretrained loads with no network
        (config.json + model.safetensors, the whole model in one file) and that gives the same logits.
        export.py writes a big model weight by weight, in shards (hf.save_hf_weights)."""
        config = self.hf_config()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
        from safetensors.torch import save_file  # safetensors: in requirements.txt; imported only here
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  path / 'model.safetensors', metadata={'format': 'pt'})


# -----------------------------------------------------------------------------
# Flash attention with ALiBi computed in-kernel, in Triton (attn_impl='triton')
#
# Same math as torch_attention: for query row i and key j
#     score = (q_i . k_j) * scale + slope_h * (j - i_abs),   i_abs = i + (Tk - Tq)
# with the causal mask aligned bottom-right (j > i_abs is masked), so prefill and KV-cache decode
# (Tq < Tk) work. GQA is handled by indexing (query head h reads kv head h // (H // H_kv)), never by
# expanding K/V. Softmax runs in base 2 (exp2 with log2(e) folded into the scale and the slopes),
# accumulates in fp32, and keeps only a log-sum-exp (LSE) per row for the backward, as FlashAttention-2.
# Written here rather than taken from flash-attn because that package is CUDA C++ built per GPU and
# torch version; this kernel is Python that compiles wherever Triton runs.
#
# Kernels: _attn_fwd (one program per (batch, head, query block)); the backward runs _bwd_preprocess
# (delta = rowsum(dO * O)), then _attn_bwd_dkdv, one program per (batch, kv head, key block) walking
# query tiles, which also accumulates dQ with fp32 atomics (5 GEMMs, as FlashAttention-2/3); with
# deterministic=True it leaves dQ to _attn_bwd_dq instead (7 GEMMs, a fixed summation order). The forward
# and dK/dV kernels also come software-pipelined for sm_90 (PIPELINE, see "Variants" below), as extra
# autotune configs. `python bench.py --mode=sass` shows what each config compiles to, without a GPU.
# Grids are 1-D (CUDA caps grid axes 1 and 2 at 65,535; axis 0 takes 2^31 - 1 programs), and every
# block's offset from its tensor's base is computed in int64 (see _tile).

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E)
# Under the interpreter the kernels take the pointer path unless a test sets this to run the sm_90 path
# (host-side tensor descriptors) on the CPU.
INTERPRET_TMA = False
# Row strides at or above this are copied to contiguous memory first: offsets inside a block stay int32
# (block rows * row stride < 2^31), only each block's start is int64.
_MAX_ROW_STRIDE = 2 ** 24

# Autotuning, keyed on head dim, causal, a power-of-two bucket of Tq (not Tk: while decoding with a KV
# cache Tk grows by one each step and would retune at every power of two), and the kernel variant.
# Entries are (config, archs, largest padded head dim BLOCK_D, decode, only): sm_80 (mma.sync) holds the
# invariant dot operand in registers while sm_90 (wgmma) reads it from shared memory, so the register
# budget differs per arch. decode=True entries serve only Tq <= 16 (one new token per step: a 64-row
# tile, the smallest wgmma M, is mostly padding but decode is bound by reading K/V, not by the MMAs),
# False only longer Tq, None both; `only` names launch constants an entry requires, e.g. HAS_SEQ=True
# (with sequence ids) or TMA=True (not the pointer fallback).
# tests/test_attention.py compiles every entry with the Triton the GPU machines run and the installed
# one and fails on register spills, ptxas' "wgmma serialized" advisory, shared memory over the limit,
# sm_90 kernels without wgmma, sm_90 wgmma with N < 64, and an sm_90 forward without TMA loads.
# Under the interpreter a single small config keeps the tests fast while lengths like 100 and 257 still
# span several blocks in both dimensions.
FWD_KEY = ["HEAD_DIM", "CAUSAL", "HAS_SEQ", "tq_bucket", "TMA", "SHIFTED"]
DKDV_KEY = ["HEAD_DIM", "CAUSAL", "HAS_SEQ", "tq_bucket", "FUSE_DQ", "TMA", "DQ_TMA", "SHIFTED"]
DQ_KEY = ["HEAD_DIM", "CAUSAL", "HAS_SEQ", "tq_bucket", "SHIFTED"]
DECODE_MAX_TQ = 16


def _tune(block_m, block_n, num_warps, num_stages, archs=(80, 90), max_block_d=128, decode=None, only=None,
          pre_hook=None, **variant):
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, **variant}, num_warps=num_warps,
                           num_stages=num_stages, pre_hook=pre_hook)
    return config, archs, max_block_d, decode, only or {}


def _set_block_shapes(nargs):
    # host-side tensor descriptors (sm_90 forward) carry their block shape, which depends on the config
    if isinstance(nargs["Q"], TensorDescriptor):
        block_d = nargs["BLOCK_D"]
        nargs["Q"].block_shape = nargs["O"].block_shape = [1, 1, nargs["BLOCK_M"], block_d]
        nargs["K"].block_shape = nargs["V"].block_shape = [1, 1, nargs["BLOCK_N"], block_d]


def _dkdv_pre_hook(nargs):
    # Before every launch of the dK/dV kernel (autotuning launches it several times): zero the fp32 dQ
    # accumulator, and give the descriptors (sm_90) their block shapes, BLOCK_M rows on the query side
    # and BLOCK_N on the key side.
    dq = nargs["DQ"]
    (dq.base if isinstance(dq, TensorDescriptor) else dq).zero_()
    if isinstance(nargs["K"], TensorDescriptor):
        for name in ("Q", "DO", "DQ", "K", "V", "DK", "DV"):
            if isinstance(nargs[name], TensorDescriptor):
                rows = nargs["BLOCK_M"] if name in ("Q", "DO", "DQ") else nargs["BLOCK_N"]
                nargs[name].block_shape = [1, 1, rows, nargs["BLOCK_D"]]
        nargs["LSE"].block_shape = nargs["DELTA"].block_shape = [1, 1, nargs["BLOCK_M"]]


# Variants: the same math scheduled differently. Each table below lists the first form and the newer ones
# as separate configs, and on a GPU the autotuner keeps whichever is fastest there (deterministic=True runs
# a table's first entry). PIPELINE: the forward overlaps the softmax of one key block with q k^T of the
# next (_fwd_pipelined); the dK/dV kernel holds K and V for the whole loop and needs two wgmma waits per
# query tile (_dkdv_pipelined). They are built for the sm_90 TMA path at head dims up to 128 without
# sequence ids (with those, or on the pointer fallback, they spill) and, for dK/dV, with fused dQ.
FWD_VARIANTS = [dict(PIPELINE=False), dict(PIPELINE=True)]
DKDV_VARIANTS = [dict(PIPELINE=False), dict(PIPELINE=True)]
_PIPELINED = dict(HAS_SEQ=False, TMA=True)  # where the pipelined variants serve

if _INTERPRET:  # the tests run each variant in turn (tests/test_attention.py's `variant` fixture)
    FWD_TUNING = [_tune(32, 16, 4, 1, pre_hook=_set_block_shapes, **FWD_VARIANTS[0])]
    DKDV_TUNING = [_tune(16, 32, 4, 1, pre_hook=_dkdv_pre_hook, **DKDV_VARIANTS[0])]
    DQ_TUNING = [_tune(32, 16, 4, 1)]
else:  # BLOCK_M x BLOCK_N = queries x keys in every kernel
    _fwd = functools.partial(_tune, pre_hook=_set_block_shapes, PIPELINE=False)
    _bwd = functools.partial(_tune, pre_hook=_dkdv_pre_hook, **DKDV_VARIANTS[0])
    # decode (Tq <= 16): sm_90 a 64-row tile with 128 keys per step, sm_80 the 64x64 tile (smaller ones spill
    # with Triton 3.6 at D = 112). sm_90's pointer fallback (head dims not a multiple of 8, misaligned views)
    # takes the tiles that do not spill there: 128x64, and 64x64 for decode.
    _tma = dict(TMA=True)
    FWD_TUNING = [_fwd(128, 128, 8, 3, archs=(90,), decode=False, only=_tma),
                  _fwd(128, 64, 8, 3, archs=(90,), decode=False),
                  _fwd(64, 128, 4, 3, archs=(90,), decode=True, only=_tma),
                  _fwd(64, 64, 4, 3, archs=(90,), decode=True, only=dict(TMA=False)),
                  _fwd(128, 64, 8, 2, archs=(80,), max_block_d=64, decode=False),
                  _fwd(64, 64, 4, 3, archs=(80,), only=dict(HAS_SEQ=False)),
                  _fwd(64, 32, 4, 3, archs=(80,), only=dict(HAS_SEQ=True)),
                  # 2 stages: the look-ahead's K tile is a third in flight (3 overflow shared memory)
                  _fwd(128, 128, 8, 2, archs=(90,), decode=False, only=_PIPELINED, **FWD_VARIANTS[1])]
    # sm_90 at D > 64, the first form: K and V are re-read every iteration (see _dkdv_inner) and 2 stages of
    # them overflow shared memory, hence 1 stage. With Triton 3.6 it spills 36-40 bytes at D = 128 (the
    # pipelined variant, last, does not); tests/test_attention.py names every spill it allows.
    DKDV_TUNING = [_bwd(64, 128, 8, 1, archs=(90,)), _bwd(64, 64, 4, 2, archs=(90,), max_block_d=64),
                   _bwd(32, 64, 8, 2, archs=(80,)), _bwd(32, 128, 8, 2, archs=(80,), max_block_d=64),
                   _bwd(64, 128, 8, 2, archs=(90,), only=dict(_PIPELINED, FUSE_DQ=True), **DKDV_VARIANTS[1])]
    DQ_TUNING = [_tune(128, 64, 8, 2, archs=(90,), only=dict(HAS_SEQ=False)),
                 _tune(128, 64, 8, 1, archs=(90,), only=dict(HAS_SEQ=True)),
                 _tune(64, 64, 4, 2, archs=(90,), max_block_d=64),
                 _tune(128, 32, 8, 2, archs=(80,)), _tune(128, 64, 8, 3, max_block_d=64)]


@functools.lru_cache
def _arch(device):
    if device.type != "cuda":  # the interpreter (deterministic runs prune there too): its table serves any
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _autotune(tuning, key, **kwargs):
    def prune(configs, named_args, **meta):
        arch = _arch(named_args["DOC_START"].device)
        decode = named_args["tq_bucket"] <= DECODE_MAX_TQ
        return [c for c, (_, archs, max_d, dec, only) in zip(configs, tuning)
                if arch in archs and meta["BLOCK_D"] <= max_d and dec in (None, decode)
                and all(meta[k] == v for k, v in only.items())]
    return triton.autotune([c for c, *_ in tuning], key=key, prune_configs_by={"early_config_prune": prune}, **kwargs)


# ALiBi frames. The bias slope2*(j - i_abs) splits into a per-key part and a per-row part, and the row
# part is constant along a softmax row, so it cancels. Each program therefore scores in a shifted frame
#     s = qk*scale2 + kb[j],  kb[j] = slope2*(j - c),  c = a per-program constant near the diagonal,
# i.e. s = true score + slope2*(i_abs - c): one FMA per score, and small magnitudes near the diagonal
# (where the softmax mass is) so fp32 keeps its precision at long T. The LSE crosses between programs in
# frames of LSE_FRAME rows: row i's is stored as true lse + slope2*(i_abs - c_i), c_i = Tk - Tq + (i rounded
# down to a multiple of LSE_FRAME). Every kernel's row block lies inside one such frame (BLOCK_M divides
# LSE_FRAME), so moving a block's LSE between its frame and a program's is one number per block (the
# forward adds slope2*(c - c_i); a backward program with constant c' adds slope2*(c_i - c')).
LSE_FRAME = tl.constexpr(128)


@triton.jit
def _tile(X, start, n_rows, stride, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    # Pointers and mask for rows [start, start + BLOCK) of one (batch, head) slice X with row stride
    # `stride`. start * stride is int64: with the model's fused qkv rows it passes 2^31 elements at long T.
    # Inside the block int32 is enough (rows * stride < 2^31: the wrapper copies larger row strides).
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    ptrs = X + tl.cast(start, tl.int64) * stride + (rows[:, None] * stride + cols[None, :])
    mask = (start + rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    return ptrs, mask


@triton.jit
def _block_ids(n_blocks, n_bh, group, LONGEST: tl.constexpr):
    # The 1-D grid holds (batch x head) x blocks. By default the blocks of one head are adjacent, so that
    # the programs running together share that head's K/V in L2. With a causal mask the programs' lengths
    # differ (a query block's keys, a key block's queries), and LONGEST launches the longest ones first,
    # across heads and batch, so that the last wave holds short programs: 'last' (query blocks: the last
    # one sees the most keys) or 'first' (key blocks). It does so within groups of `group` (batch x head)
    # rows, which the host sizes so that a group's K/V fit in L2 (FlashAttention-3's LPT schedule).
    pid = tl.program_id(0)
    if LONGEST == "":
        bh, blk = pid // n_blocks, pid % n_blocks
    else:
        g = pid // (group * n_blocks)
        rows = tl.minimum(group, n_bh - g * group)  # the last group may be smaller
        r = pid - g * group * n_blocks
        bh, blk = g * group + r % rows, r // rows
        if LONGEST == "last":
            blk = n_blocks - 1 - blk
    return bh, blk


@triton.jit
def _row_keys(offs_m, off_shift, Tk, DOC_START, DOC_END, CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr):
    # The keys each query row sees, [first_key, row_end): causal, those up to its i_abs; with sequence ids
    # only those of its own document, [DOC_START, DOC_END) of its position (computed on the host).
    i_abs = offs_m + off_shift
    if CAUSAL:
        row_end = tl.minimum(i_abs + 1, Tk)
    else:
        row_end = tl.zeros_like(offs_m) + Tk
    if HAS_SEQ:  # Tq <= Tk here, so i_abs >= 0; rows past Tq take the last row's document
        pos = tl.minimum(i_abs, Tk - 1)
        first_key = tl.load(DOC_START + pos)
        if not CAUSAL:
            row_end = tl.load(DOC_END + pos)
    else:
        first_key = tl.zeros_like(offs_m)
    return first_key, row_end


@triton.jit
def _key_blocks(first_key, row_end, start_m, off_shift, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr):
    # Key blocks a query block [start_m, start_m + BLOCK_M) visits: [lo, mid) start before some row's
    # document (masked; only with sequence ids), [mid, full_end) are visible to every row (no mask),
    # [max(full_end, mid), hi) straddle the diagonal, a document's end or the end of the keys (masked).
    # Blocks before lo (earlier documents) and from hi on are skipped.
    if HAS_SEQ:
        lo = tl.min(first_key, 0) // BLOCK_N * BLOCK_N
        mid = tl.cdiv(tl.max(first_key, 0), BLOCK_N) * BLOCK_N
        full_end = tl.min(row_end, 0)
        hi = tl.max(row_end, 0)
    else:  # the same bounds in closed form, without reductions over the rows (registers)
        lo, mid = 0, 0
        if CAUSAL:
            full_end = tl.minimum(start_m + off_shift + 1, Tk)  # keys <= the first row's i_abs
            hi = tl.minimum(start_m + BLOCK_M + off_shift, Tk)  # one past the last row's i_abs
        else:
            full_end, hi = Tk, Tk
    return lo, mid, tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N, tl.maximum(hi, 0)


@triton.jit
def _rows(X, b, h, start, stride_h, stride_row, n_rows, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
          HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    # rows [start, start + ROWS) of head h: by TMA (sm_90; X a descriptor over (B, H, T, D), which zero-fills
    # rows past the end and columns past HEAD_DIM), or through pointers (X at batch b's slice), masked
    if TMA:
        x = X.load([b, h, start, 0]).reshape(ROWS, BLOCK_D)
    else:
        ptrs, mask = _tile(X + h.to(tl.int64) * stride_h, start, n_rows, stride_row, ROWS, BLOCK_D, HEAD_DIM)
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x  # (ROWS, BLOCK_D)


@triton.jit
def _row_stat(X, b, h, start_m, stride_lb, stride_lh, Tq, fill, BLOCK_M: tl.constexpr, TMA: tl.constexpr):
    # LSE or delta of query rows [start_m, start_m + BLOCK_M) of head h: by TMA (X a descriptor over the
    # (B, H, Tq) statistics; rows past Tq read as 0, see _attn_backward), or through pointers, `fill` past Tq
    if TMA:
        x = X.load([b, h, start_m]).reshape(BLOCK_M)
    else:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        x = tl.load(X + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m, mask=offs_m < Tq,
                    other=fill)
    return x  # (BLOCK_M,)


@triton.jit
def _scores(qk, qk_scale, kb, start_n, first_key, row_end, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
            HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr):
    # Scores of one key block in the program's ALiBi frame, from qk = q k^T, minus blk (see _softmax_step):
    # qk * scale + kb[j], one FFMA each; kb = slope2 * (j - start_n) is the same for every block.
    if HAS_ALIBI:
        s = qk * qk_scale + kb[None, :]  # (BLOCK_M, BLOCK_N), log2 units
    else:
        s = qk * qk_scale
    if MASKED:  # blocks on the diagonal, a document boundary or the end of the keys only
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = offs_n[None, :] < row_end[:, None]
        if HAS_SEQ:
            visible = visible & (offs_n[None, :] >= first_key[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _softmax_step(s, blk, m_i, l_i, acc):
    # One key block of the online softmax. The block's ALiBi offset in the program's frame, blk =
    # slope2 * (start_n - c), is one number per block: it goes into the row max, not into every score.
    # Returns P (unnormalized), the new running max and sum, and acc rescaled to the new max.
    m_new = tl.maximum(m_i, tl.max(s, 1) + blk)  # (BLOCK_M,)
    p = tl.exp2(s - (m_new - blk)[:, None])  # (BLOCK_M, BLOCK_N)
    alpha = tl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, b, hk, stride_kn, stride_vn, lo, hi, Tk, first_key, row_end, c, qk_scale,
               slope2, kb, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
               TMA: tl.constexpr):
    # key blocks [lo, hi), one after the other: q k^T, softmax, P v. Without TMA (the pointer tiles take
    # registers) loop invariants such as kb are recomputed in the loop rather than held.
    for start_n in tl.range(lo, hi, BLOCK_N, disable_licm=not TMA):
        k = _rows(K, b, hk, start_n, 0, stride_kn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        if not TMA:
            kb = slope2 * tl.arange(0, BLOCK_N).to(tl.float32)
        s = _scores(qk, qk_scale, kb, start_n, first_key, row_end, BLOCK_N, MASKED, HAS_ALIBI, HAS_SEQ)
        p, m_i, l_i, acc = _softmax_step(s, slope2 * (start_n - c).to(tl.float32), m_i, l_i, acc)
        v = _rows(V, b, hk, start_n, 0, stride_vn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D)
    return acc, l_i, m_i


@triton.jit
def _fwd_pipelined(acc, l_i, m_i, q, K, V, b, hk, stride_kn, stride_vn, lo, hi, Tk, c, qk_scale, slope2, kb,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    # Unmasked key blocks [lo, hi), at least two, software-pipelined as in FlashAttention-3: while the
    # softmax of block j runs, the tensor cores compute q k^T of block j + 1. An iteration issues P v of
    # block j - 1 and waits for it (which also completes block j's q k^T, issued an iteration earlier),
    # turns q k^T into scores (freeing its registers for the next one), issues q k^T of block j + 1, whose
    # result is only read in the next iteration (so the compiler leaves it in flight), and then runs the
    # softmax of block j. The first and last blocks are peeled off.
    k = _rows(K, b, hk, lo, 0, stride_kn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
    s = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), qk_scale, kb, lo, 0, 0, BLOCK_N, False,
                HAS_ALIBI, False)
    p, m_i, l_i, acc = _softmax_step(s, slope2 * (lo - c).to(tl.float32), m_i, l_i, acc)
    k = _rows(K, b, hk, lo + BLOCK_N, 0, stride_kn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    for start_n in range(lo + BLOCK_N, hi - BLOCK_N, BLOCK_N):  # block j = start_n; qk is its q k^T
        v = _rows(V, b, hk, start_n - BLOCK_N, 0, stride_vn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)  # block j - 1
        s = _scores(qk, qk_scale, kb, start_n, 0, 0, BLOCK_N, False, HAS_ALIBI, False)
        k = _rows(K, b, hk, start_n + BLOCK_N, 0, stride_kn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # block j + 1, in flight during:
        p, m_i, l_i, acc = _softmax_step(s, slope2 * (start_n - c).to(tl.float32), m_i, l_i, acc)
    last = hi - BLOCK_N
    v = _rows(V, b, hk, last - BLOCK_N, 0, stride_vn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    s = _scores(qk, qk_scale, kb, last, 0, 0, BLOCK_N, False, HAS_ALIBI, False)
    p, m_i, l_i, acc = _softmax_step(s, slope2 * (last - c).to(tl.float32), m_i, l_i, acc)
    v = _rows(V, b, hk, last, 0, stride_vn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_i


@_autotune(FWD_TUNING, FWD_KEY)
@triton.jit(do_not_specialize=["Tk", "off_shift"])  # decoding: Tk grows every step; specialized, it would recompile
def _attn_fwd(Q, K, V, O, LSE, SLOPES, DOC_START, DOC_END, qk_scale,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
              B, H, G, Tq, Tk, off_shift, tq_bucket, group,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr, SHIFTED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIPELINE: tl.constexpr):
    # Q, K, V, O are pointers, or with TMA host-side tensor descriptors over the (B, H, T, D) views.
    # i_abs = i + off_shift is query row i's position among the keys: Tk - Tq (the queries are the last Tq keys:
    # training, prefill, decode), or with SHIFTED any offset (context.py's chunk pairs). Only SHIFTED takes the
    # argument: computed here, the other kernels' registers stay as they were (the dK/dV pointer path spills more
    # bytes when off_shift arrives as an argument)
    if not SHIFTED:
        off_shift = Tk - Tq
    tl.static_assert(LSE_FRAME % BLOCK_M == 0)
    bh, pid_m = _block_ids(tl.cdiv(Tq, BLOCK_M), B * H, group, "last" if CAUSAL else "")
    b, h = bh // H, bh % H
    hk = h // G  # GQA: query head h reads kv head h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if TMA:
        q = Q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        q_ptrs, q_mask = _tile(Q, start_m, Tq, stride_qm, BLOCK_M, BLOCK_D, HEAD_DIM)
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)

    slope2 = tl.load(SLOPES + h) * 1.4426950408889634 if HAS_ALIBI else 0.0
    c = start_m + off_shift  # frame constant: i_abs of the block's first row
    kb = slope2 * tl.arange(0, BLOCK_N).to(tl.float32)  # ALiBi's per-key term inside a block, see _softmax_step
    # m_i starts finite (not -inf) so rows with no visible key (causal, Tq > Tk) get exp2(-inf - m) = 0
    # rather than NaN from -inf - (-inf); their l_i stays 0 and they are written as zeros below.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first_key, row_end = _row_keys(offs_m, off_shift, Tk, DOC_START + b.to(tl.int64) * Tk,
                                   DOC_END + b.to(tl.int64) * Tk, CAUSAL, HAS_SEQ)
    lo, mid, full_end, hi = _key_blocks(first_key, row_end, start_m, off_shift, Tk, BLOCK_M, BLOCK_N, CAUSAL,
                                        HAS_SEQ)
    if HAS_SEQ:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, b, hk, stride_kn, stride_vn, lo, tl.minimum(mid, hi), Tk,
                                   first_key, row_end, c, qk_scale, slope2, kb, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                                   HAS_ALIBI, HAS_SEQ, DOT_PREC, TMA)
    if PIPELINE:  # two unmasked blocks or more: pipelined; fewer: the masked loop below takes them too
        if full_end - mid >= 2 * BLOCK_N:
            acc, l_i, m_i = _fwd_pipelined(acc, l_i, m_i, q, K, V, b, hk, stride_kn, stride_vn, mid, full_end, Tk, c,
                                           qk_scale, slope2, kb, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_ALIBI, DOT_PREC, TMA)
        else:
            full_end = mid
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, b, hk, stride_kn, stride_vn, mid, full_end, Tk,
                                   first_key, row_end, c, qk_scale, slope2, kb, HEAD_DIM, BLOCK_D, BLOCK_N, False,
                                   HAS_ALIBI, HAS_SEQ, DOT_PREC, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, b, hk, stride_kn, stride_vn, tl.maximum(full_end, mid), hi,
                               Tk, first_key, row_end, c, qk_scale, slope2, kb, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                               HAS_ALIBI, HAS_SEQ, DOT_PREC, TMA)

    empty = l_i == 0.0  # fully-masked rows: output 0, LSE +inf (so the backward's exp2(s - lse) is 0)
    l_i = tl.where(empty, 1.0, l_i)
    o = (acc / l_i[:, None]).to(q.dtype)
    if TMA:
        O.store([b, h, start_m, 0], o.reshape(1, 1, BLOCK_M, BLOCK_D))  # rows past Tq are clipped
    else:
        O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        o_ptrs, o_mask = _tile(O, start_m, Tq, stride_om, BLOCK_M, BLOCK_D, HEAD_DIM)
        tl.store(o_ptrs, o, mask=o_mask)
    lse = m_i + tl.log2(l_i) + slope2 * (start_m % LSE_FRAME).to(tl.float32)  # to the rows' frame, see above
    tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m, tl.where(empty, float("inf"), lse),
             mask=offs_m < Tq)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb,
                    stride_lh, H, Tq,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the softmax-backward term shared by every key
    bh, pid_m = _block_ids(tl.cdiv(Tq, BLOCK_M), 0, 0, "")
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    o_ptrs, mask = _tile(O + b * stride_ob + h * stride_oh, start_m, Tq, stride_om, BLOCK_M, BLOCK_D, HEAD_DIM)
    do_ptrs, _ = _tile(DO + b * stride_dob + h * stride_doh, start_m, Tq, stride_dom, BLOCK_M, BLOCK_D, HEAD_DIM)
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + b * stride_lb + h * stride_lh + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _next_tile(h, start_m, lo, hi_m, BLOCK_M: tl.constexpr):
    # the query tile after (h, start_m) in the loops below: the next block of rows [lo, hi_m), else the next head's
    wrap = start_m + BLOCK_M >= hi_m
    return tl.where(wrap, h + 1, h), tl.where(wrap, lo, start_m + BLOCK_M)


@triton.jit
def _probs_t(s_t, lse, qk_scale, SLOPES, h, start_m, start_n, off_shift, BLOCK_N: tl.constexpr,
             HAS_ALIBI: tl.constexpr):
    # P^T of a (key block, query tile) from its raw scores s_t = K Q^T (BLOCK_N, BLOCK_M), in base 2. The
    # dK/dV program's frame is c' = start_n: kb = slope2 * (j - start_n), and the tile's lse moved to match
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + h) * 1.4426950408889634
        s_t = s_t * qk_scale + (slope2 * tl.arange(0, BLOCK_N).to(tl.float32))[:, None]
        lse += slope2 * (start_m // LSE_FRAME * LSE_FRAME + off_shift - start_n).to(tl.float32)
    else:
        s_t = s_t * qk_scale
    return tl.exp2(s_t - lse[None, :])


@triton.jit
def _dq_reduce(DQ, dq, b, h, start_m, stride_dqh, stride_dqm, Tq, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, DQ_TMA: tl.constexpr):
    # one key block's share of dQ = scale * dS K, rows [start_m, start_m + BLOCK_M) of head h, summed into the
    # fp32 DQ over key blocks
    if DQ_TMA:  # a TMA reduce-add (rows past Tq are clipped): no pointer tile in registers
        DQ.atomic_add([b, h, start_m, 0], dq.reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        dq_ptrs, dq_mask = _tile(DQ + h.to(tl.int64) * stride_dqh, start_m, Tq, stride_dqm, BLOCK_M, BLOCK_D,
                                 HEAD_DIM)
        tl.atomic_add(dq_ptrs, dq, mask=dq_mask, sem="relaxed")


@triton.jit
def _dkdv_inner(dk, dv, k, v, K, V, hk, Q, DO, DQ, LSE, DELTA, SLOPES, DOC_START, DOC_END, b,
                stride_qh, stride_qm, stride_doh, stride_dom, stride_lb, stride_lh,
                stride_dqh, stride_dqm, Tq, Tk, h0, n_heads, lo, n_blocks, start_n, off_shift, qk_scale, sm_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr,
                DOT_PREC: tl.constexpr, FUSE_DQ: tl.constexpr, TMA: tl.constexpr, DQ_TMA: tl.constexpr,
                PIPELINE: tl.constexpr):
    # Query blocks [lo, lo + n_blocks * BLOCK_M) of query heads h0 .. h0 + n_heads - 1, as one flat loop: a
    # nested loop over heads lets the compiler hoist both stages' invariants above it, costing registers.
    # Works transposed, (keys, queries), so that dV += P^T dO and dK += dS^T Q need no transposes; the
    # score GEMMs K Q^T and V dO^T then have N = BLOCK_M (>= 64 on sm_90, for full-width wgmma).
    # PIPELINE: k and v come from the caller (held in shared memory), and dQ^T = K^T dS^T is computed
    # instead of dS K, reading both operands from shared memory (see _dkdv_pipelined).
    offs_n = start_n + tl.arange(0, BLOCK_N)
    h, start_m = h0, lo
    # Loop invariants (smem descriptors, pointer tiles) are recomputed rather than held where K and V are
    # held: that saves registers there (measured: 344 -> 44 spilled bytes on the sm_90 pointer fallback, Triton
    # 3.6), but not with sm_80's 32-row tiles (Triton 3.9 then spills 108 bytes at D = 64)
    for it in tl.range(0, n_heads * n_blocks, disable_licm=PIPELINE or (not TMA and BLOCK_M >= 64)):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if TMA:  # rows past Tq are zero-filled
            if PIPELINE:
                k_it, v_it = k, v
            else:
                # K and V tiles again every iteration (from L2, straight into shared memory), rather than held
                # in registers across the loop: wgmma then reads them from shared memory, and the registers go
                # to the dK and dV accumulators (2 x BLOCK_N x BLOCK_D fp32), which otherwise spill at D = 128
                k_it = K.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
                v_it = V.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k_it, v_it = k, v
        q = _rows(Q, b, h, start_m, stride_qh, stride_qm, Tq, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
        do = _rows(DO, b, h, start_m, stride_doh, stride_dom, Tq, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
        # rows past Tq: P = 0 (lse = +inf), or with TMA Q = dO = 0 there: no row mask is needed below
        lse = _row_stat(LSE, b, h, start_m, stride_lb, stride_lh, Tq, float("inf"), BLOCK_M, TMA)
        delta = _row_stat(DELTA, b, h, start_m, stride_lb, stride_lh, Tq, 0.0, BLOCK_M, TMA)
        s_t = tl.dot(k_it, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        p_t = _probs_t(s_t, lse, qk_scale, SLOPES, h, start_m, start_n, off_shift, BLOCK_N, HAS_ALIBI)
        if MASKED:  # causal diagonal blocks, or (not causal) the last key block when it is ragged
            if HAS_SEQ:  # every block, see _attn_bwd_dkdv
                first_key, row_end = _row_keys(offs_m, off_shift, Tk, DOC_START, DOC_END, CAUSAL, HAS_SEQ)
                p_t = tl.where((offs_n[:, None] >= first_key[None, :]) & (offs_n[:, None] < row_end[None, :]),
                               p_t, 0.0)
            elif CAUSAL:
                p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + off_shift, p_t, 0.0)
            else:
                p_t = tl.where(offs_n[:, None] < Tk, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
        dp_t = tl.dot(v_it, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # dL/d(score), natural units
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
        if FUSE_DQ:  # this key block's share of dQ = scale * dS K, summed over key blocks by fp32 atomics
            if PIPELINE:
                dq = tl.trans(tl.dot(tl.trans(k_it), ds_t, input_precision=DOT_PREC))  # (BLOCK_M, BLOCK_D)
            else:
                dq = tl.dot(tl.trans(ds_t), k_it, input_precision=DOT_PREC)
            _dq_reduce(DQ, dq * sm_scale, b, h, start_m, stride_dqh, stride_dqm, Tq, BLOCK_M, BLOCK_D, HEAD_DIM,
                       DQ_TMA)
        h, start_m = _next_tile(h, start_m, lo, lo + n_blocks * BLOCK_M, BLOCK_M)
    return dk, dv


@triton.jit
def _dkdv_pipelined(dk, dv, k, v, Q, DO, DQ, LSE, DELTA, SLOPES, b, stride_qh, stride_qm, stride_doh, stride_dom,
                    stride_lb, stride_lh, stride_dqh, stride_dqm, Tq, h0, n_heads, lo, n_blocks, start_n, off_shift,
                    qk_scale, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr, FUSE_DQ: tl.constexpr,
                    TMA: tl.constexpr, DQ_TMA: tl.constexpr):
    # The unmasked query tiles of _dkdv_inner, for two wgmma waits per tile. K and V are loaded once by the
    # caller (the compiler keeps them in shared memory, where wgmma reads them), the next tiles' Q, dO, LSE
    # and delta are in flight (num_stages = 2), and the GEMMs go: K Q^T (waited on), dV += P^T dO (an
    # accumulator chain, not waited on), the NEXT tile's dP^T = V dO^T (read only in the next iteration, so
    # not waited on either), dK += dS^T Q (chain) and dQ^T = K^T dS^T, whose wait, the second, covers them
    # all. dQ^T rather than dS K: both operands then come from shared memory, which saves the registers of
    # a transposed dS (the in-flight dP^T needs them). The first tile's dP^T is computed before the loop;
    # the last iteration's look-ahead repeats its own tile (one GEMM of waste per program). The compiler
    # defers the dQ reduce-add's wait until its shared-memory buffer is written again. Loop invariants are
    # recomputed rather than hoisted (disable_licm): held across the loop, they cost registers.
    n = n_heads * n_blocks
    hi_m = lo + n_blocks * BLOCK_M
    do = _rows(DO, b, h0, lo, stride_doh, stride_dom, Tq, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M), the first tile's
    h, start_m = h0, lo
    for it in tl.range(0, n, disable_licm=True):
        h_n, m_n = _next_tile(h, start_m, lo, hi_m, BLOCK_M)
        if it == n - 1:  # no next tile: look ahead at this one again
            h_n, m_n = h, start_m
        q = _rows(Q, b, h, start_m, stride_qh, stride_qm, Tq, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
        do = _rows(DO, b, h, start_m, stride_doh, stride_dom, Tq, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
        lse = _row_stat(LSE, b, h, start_m, stride_lb, stride_lh, Tq, float("inf"), BLOCK_M, TMA)  # as _dkdv_inner
        delta = _row_stat(DELTA, b, h, start_m, stride_lb, stride_lh, Tq, 0.0, BLOCK_M, TMA)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        p_t = _probs_t(s_t, lse, qk_scale, SLOPES, h, start_m, start_n, off_shift, BLOCK_N, HAS_ALIBI)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # dL/d(score), natural units
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
        do_n = _rows(DO, b, h_n, m_n, stride_doh, stride_dom, Tq, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
        dp_t = tl.dot(v, tl.trans(do_n), input_precision=DOT_PREC)  # the next tile's
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
        if FUSE_DQ:
            dq = tl.trans(tl.dot(tl.trans(k), ds_t, input_precision=DOT_PREC))  # (BLOCK_M, BLOCK_D)
            _dq_reduce(DQ, dq * sm_scale, b, h, start_m, stride_dqh, stride_dqm, Tq, BLOCK_M, BLOCK_D, HEAD_DIM,
                       DQ_TMA)
        h, start_m = h_n, m_n
    return dk, dv


@_autotune(DKDV_TUNING, DKDV_KEY)
@triton.jit(do_not_specialize=["off_shift"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, SLOPES, DOC_START, DOC_END, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_dkb, stride_dkh, stride_dkn,
                   stride_dqb, stride_dqh, stride_dqm, B, H, G, Tq, Tk, off_shift, tq_bucket, group,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr, FUSE_DQ: tl.constexpr, TMA: tl.constexpr,
                   DQ_TMA: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PIPELINE: tl.constexpr):
    # One program per (batch, kv head, key block), covering the G query heads that share the kv head:
    # every dK/dV row has a single owner, so GQA needs no atomics for them. DK and DV share strides.
    # With TMA (sm_90) the tensors are host-side descriptors: no pointer tiles to hold in registers.
    if not SHIFTED:  # (as in _attn_fwd)
        off_shift = Tk - Tq
    tl.static_assert(LSE_FRAME % BLOCK_M == 0)
    bhk, pid_n = _block_ids(tl.cdiv(Tk, BLOCK_N), B * (H // G), group, "first" if CAUSAL else "")
    b, hk = bhk // (H // G), bhk % (H // G)
    start_n = pid_n * BLOCK_N
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    k, v = 0, 0  # with TMA and not PIPELINE, loaded inside the loop (_dkdv_inner)
    if not TMA:
        K += b64 * stride_kb
        V += b64 * stride_vb
        Q += b64 * stride_qb
        DO += b64 * stride_dob
    if PIPELINE or not TMA:  # (BLOCK_N, BLOCK_D) each, for the whole program
        k = _rows(K, b, hk, start_n, stride_kh, stride_kn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        v = _rows(V, b, hk, start_n, stride_vh, stride_vn, Tk, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
    if not DQ_TMA:
        DQ += b.to(tl.int64) * stride_dqb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query rows with i_abs < start_n see none of these keys (skipped); rows before `mid` have i_abs below
    # the block's last key (masked stage); all later rows see every key of the block (no mask). Without
    # the causal mask only a ragged last key block needs a mask (keys past Tk would reach dQ).
    # With sequence ids only the rows of the documents these keys belong to are visited (the rest see
    # none of them), all with the mask (a simplification: blocks inside one document would not need it).
    DOC_START += b.to(tl.int64) * Tk
    DOC_END += b.to(tl.int64) * Tk
    n_full = 1
    if CAUSAL:
        lo = tl.maximum(start_n - off_shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - off_shift, 0), Tq), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = tl.where(start_n + BLOCK_N > Tk, tl.cdiv(Tq, BLOCK_M) * BLOCK_M, 0)
    if HAS_SEQ:  # rows of later documents than the block's last key's see none of it
        rows_end = tl.load(DOC_END + tl.minimum(start_n + BLOCK_N, Tk) - 1) - off_shift
        if not CAUSAL:  # nor rows of earlier documents than its first key's
            lo = tl.maximum(tl.load(DOC_START + start_n) - off_shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.minimum(tl.maximum(rows_end, 0), Tq), BLOCK_M) * BLOCK_M
        n_full = 0
    # the unmasked blocks first: with the masked ones first, ptxas (Triton 3.6) spills more (40-56 bytes)
    n_rest = n_full * tl.cdiv(tl.maximum(Tq - mid, 0), BLOCK_M)  # unmasked query blocks, per head
    if PIPELINE:
        if n_rest > 0:
            dk, dv = _dkdv_pipelined(dk, dv, k, v, Q, DO, DQ, LSE, DELTA, SLOPES, b, stride_qh, stride_qm,
                                     stride_doh, stride_dom, stride_lb, stride_lh, stride_dqh, stride_dqm, Tq, hk * G,
                                     G, mid, n_rest, start_n, off_shift, qk_scale, sm_scale, HEAD_DIM, BLOCK_D,
                                     BLOCK_M, BLOCK_N, HAS_ALIBI, DOT_PREC, FUSE_DQ, TMA, DQ_TMA)
    else:
        dk, dv = _dkdv_inner(dk, dv, k, v, K, V, hk, Q, DO, DQ, LSE, DELTA, SLOPES, DOC_START, DOC_END, b,
                             stride_qh, stride_qm, stride_doh, stride_dom, stride_lb, stride_lh, stride_dqh,
                             stride_dqm, Tq, Tk, hk * G, G, mid, n_rest, start_n, off_shift, qk_scale, sm_scale,
                             HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_ALIBI, HAS_SEQ, DOT_PREC,
                             FUSE_DQ, TMA, DQ_TMA, False)
    dk, dv = _dkdv_inner(dk, dv, k, v, K, V, hk, Q, DO, DQ, LSE, DELTA, SLOPES, DOC_START, DOC_END, b,
                         stride_qh, stride_qm, stride_doh, stride_dom, stride_lb, stride_lh,
                         stride_dqh, stride_dqm, Tq, Tk, hk * G, G, lo, (mid - lo) // BLOCK_M, start_n, off_shift,
                         qk_scale, sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_ALIBI, HAS_SEQ,
                         DOT_PREC, FUSE_DQ, TMA, DQ_TMA, PIPELINE)
    if TMA:  # rows past Tk are clipped
        dk = (dk * sm_scale).to(DK.dtype)  # d(score)/dk = scale * q
        dv = dv.to(DV.dtype)
        DK.store([b, hk, start_n, 0], dk.reshape(1, 1, BLOCK_N, BLOCK_D))
        DV.store([b, hk, start_n, 0], dv.reshape(1, 1, BLOCK_N, BLOCK_D))
    else:
        dk_ptrs, kv_mask = _tile(DK + b64 * stride_dkb + hk64 * stride_dkh, start_n, Tk, stride_dkn, BLOCK_N,
                                 BLOCK_D, HEAD_DIM)
        dv_ptrs, _ = _tile(DV + b64 * stride_dkb + hk64 * stride_dkh, start_n, Tk, stride_dkn, BLOCK_N, BLOCK_D,
                           HEAD_DIM)
        tl.store(dk_ptrs, (dk * sm_scale).to(k.dtype), mask=kv_mask)  # d(score)/dk = scale * q
        tl.store(dv_ptrs, dv.to(v.dtype), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, lo, hi, Tk, first_key, row_end, c, qk_scale,
              slope2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs, kv_mask = _tile(K, start_n, Tk, stride_kn, BLOCK_N, BLOCK_D, HEAD_DIM)
        v_ptrs, _ = _tile(V, start_n, Tk, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        if HAS_ALIBI:
            s += (slope2 * (offs_n - c).to(tl.float32))[None, :]
        if MASKED:  # keys past Tk are masked here too: they would feed dQ through ds * k
            visible = offs_n[None, :] < row_end[:, None]
            if HAS_SEQ:
                visible = visible & (offs_n[None, :] >= first_key[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D)
    return dq


@_autotune(DQ_TUNING, DQ_KEY)
@triton.jit(do_not_specialize=["off_shift"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, SLOPES, DOC_START, DOC_END, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_dqb, stride_dqh, stride_dqm,
                 B, H, G, Tq, Tk, off_shift, tq_bucket, group,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    # deterministic=True only: one program per (batch, query head, query block), walking the same key
    # blocks as the forward, so each dQ element is summed in one fixed order
    if not SHIFTED:  # (as in _attn_fwd)
        off_shift = Tk - Tq
    tl.static_assert(LSE_FRAME % BLOCK_M == 0)
    bh, pid_m = _block_ids(tl.cdiv(Tq, BLOCK_M), B * H, group, "last" if CAUSAL else "")
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_ptrs, io_mask = _tile(Q + b * stride_qb + h * stride_qh, start_m, Tq, stride_qm, BLOCK_M, BLOCK_D, HEAD_DIM)
    do_ptrs, _ = _tile(DO + b * stride_dob + h * stride_doh, start_m, Tq, stride_dom, BLOCK_M, BLOCK_D, HEAD_DIM)
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(do_ptrs, mask=io_mask, other=0.0)
    lse = _row_stat(LSE, b, h, start_m, stride_lb, stride_lh, Tq, float("inf"), BLOCK_M, False)  # (BLOCK_M,)
    delta = _row_stat(DELTA, b, h, start_m, stride_lb, stride_lh, Tq, 0.0, BLOCK_M, False)
    slope2 = tl.load(SLOPES + h) * 1.4426950408889634 if HAS_ALIBI else 0.0
    c = start_m + off_shift  # same frame as the forward program for this block
    lse += slope2 * (start_m // LSE_FRAME * LSE_FRAME - start_m).to(tl.float32)  # from the rows' frame
    K += b * stride_kb + (h // G) * stride_kh
    V += b * stride_vb + (h // G) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first_key, row_end = _row_keys(offs_m, off_shift, Tk, DOC_START + b * Tk, DOC_END + b * Tk, CAUSAL, HAS_SEQ)
    lo, mid, full_end, hi = _key_blocks(first_key, row_end, start_m, off_shift, Tk, BLOCK_M, BLOCK_N, CAUSAL,
                                        HAS_SEQ)
    if HAS_SEQ:
        dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, lo, tl.minimum(mid, hi), Tk, first_key,
                       row_end, c, qk_scale, slope2, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_ALIBI, HAS_SEQ, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, mid, full_end, Tk, first_key, row_end, c,
                   qk_scale, slope2, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_ALIBI, HAS_SEQ, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, tl.maximum(full_end, mid), hi, Tk, first_key,
                   row_end, c, qk_scale, slope2, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_ALIBI, HAS_SEQ, DOT_PREC)
    dq_ptrs, _ = _tile(DQ + b * stride_dqb + h * stride_dqh, start_m, Tq, stride_dqm, BLOCK_M, BLOCK_D, HEAD_DIM)
    tl.store(dq_ptrs, (dq * sm_scale).to(q.dtype), mask=io_mask)


def _bucket(t):
    # autotune key for Tq: powers of two (prefill lengths vary; decode is always 1, so it tunes once)
    return min(triton.next_power_of_2(t), 16384)


def flash_problem(device, dtype, head_dim):
    """What this kernel cannot take, as one line, or None (model.attention_problem asks it too)."""
    if not 1 <= head_dim <= 128:
        return (f"head dim {head_dim}: attn_impl='triton' takes head dims up to 128 (head_dim = d_model / "
                f"n_heads): use more heads, or attn_impl='torch'")
    if torch.device(device).type == 'cuda':
        if dtype not in (torch.float16, torch.bfloat16):
            return (f"attn_impl='triton' computes in bfloat16 or float16 on CUDA, not {dtype} (its dtype): "
                    f"use dtype='bfloat16', or attn_impl='torch' for float32")
    elif _INTERPRET:  # the interpreter's tl.dot multiplies the raw bits of bf16 values: no bf16 there
        if dtype not in (torch.float16, torch.float32):
            return f"the dtype must be float16 or float32 under TRITON_INTERPRET=1, not {dtype}"
    else:
        return (f"needs CUDA tensors (got {torch.device(device).type}); use attn_impl='torch', or set "
                f"TRITON_INTERPRET=1 before importing this module to run the kernels on the CPU")
    return None


def _check_inputs(q, k, v, alibi_slopes):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attn_alibi: q, k, v must be 4-D (B, H, T, D)")
    if k.shape != v.shape:
        raise ValueError(f"flash_attn_alibi: k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, _, D), (Bk, H_kv, _, Dk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"flash_attn_alibi: batch sizes differ: q has {B}, k/v have {Bk}")
    if D != Dk:
        raise ValueError(f"flash_attn_alibi: q and k/v head dims differ ({D} vs {Dk})")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"flash_attn_alibi: n_heads ({H}) must be a multiple of n_kv_heads ({H_kv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attn_alibi: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError("flash_attn_alibi: q, k, v must be on the same device")
    if problem := flash_problem(q.device, q.dtype, D):
        raise ValueError(f"flash_attn_alibi: {problem}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (H,):
        raise ValueError(f"flash_attn_alibi: alibi_slopes must have shape (n_heads,) = ({H},), "
                         f"got {tuple(alibi_slopes.shape)}")


def _check_sequence_id(sequence_id, q, k):
    (B, _, Tq, _), Tk = q.shape, k.shape[2]
    if tuple(sequence_id.shape) != (B, Tk):
        raise ValueError(f"flash_attn_alibi: sequence_id must have shape (batch, keys) = ({B}, {Tk}), "
                         f"got {tuple(sequence_id.shape)}")
    if sequence_id.dtype.is_floating_point or sequence_id.dtype == torch.bool:
        raise ValueError(f"flash_attn_alibi: sequence_id must be an integer tensor, got {sequence_id.dtype}")
    if Tq > Tk:
        raise ValueError(f"flash_attn_alibi: with sequence_id the queries are the last Tq of the Tk keys: "
                         f"Tq = {Tq} > Tk = {Tk}")
    # checked where it costs nothing (a CPU tensor, not while tracing); on CUDA it would be a device sync
    if sequence_id.device.type == 'cpu' and not torch.compiler.is_compiling() and Tk > 1 and \
            bool((sequence_id[:, 1:] < sequence_id[:, :-1]).any()):
        raise ValueError("flash_attn_alibi: sequence_id must be non-decreasing along each row (packed "
                         "documents, one id per document)")


def _kernel_layout(x):
    # the kernels index with strides: any layout works if the last dim is contiguous and rows are not too far
    # apart (see _MAX_ROW_STRIDE); the model's fused qkv views need no copy
    return x if x.stride(-1) == 1 and x.stride(-2) < _MAX_ROW_STRIDE else x.contiguous()


def _use_tma(q, *tensors):
    # sm_90's forward loads and stores tiles with TMA through host-side tensor descriptors, which need
    # 16-byte aligned bases and strides; anything else (and sm_80) takes the pointer path
    if _INTERPRET:
        use = INTERPRET_TMA
    else:
        use = _arch(q.device) >= 90
    return use and all(x.numel() > 0 and x.data_ptr() % 16 == 0 and x.stride(-1) == 1
                       and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1]) for x in (q, *tensors))


def _descriptor(x, block_d):
    # (B, H, T, D) view; block shapes are set per autotune config (_set_block_shapes)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, 16, block_d])


def _doc_bounds(sequence_id, like):
    """(B, Tk) non-decreasing document ids -> where each position's document starts and ends, (B, Tk) int32
    each, or two placeholders (never read) without ids."""
    if sequence_id is None:
        return like, like
    ids = sequence_id.to(device=like.device).contiguous()
    return (torch.searchsorted(ids, ids, out_int32=True), torch.searchsorted(ids, ids, right=True, out_int32=True))


def _lpt_group(x, row_elements):
    # (batch x head) rows per group of the causal longest-first schedule (_block_ids): as many as keep the
    # tensors the programs of a row share (row_elements elements of x's dtype) in half the L2 cache
    if not x.is_cuda:
        return 3  # the interpreter: odd, so that the tests' few heads also make a smaller last group
    return max(1, _l2_bytes(x.device) // 2 // (row_elements * x.element_size()))


@functools.lru_cache
def _l2_bytes(device):
    return torch.cuda.get_device_properties(device).L2_cache_size


def _stats_empty(B, H, T, like):
    # (B, H, T) fp32 per-row statistics (LSE, delta), rows padded to a multiple of 4 elements: 16-byte
    # strides, as TMA descriptors over them need
    return like.new_empty(B, H, (T + 3) // 4 * 4, dtype=torch.float32)[:, :, :T]


def _empty_bhtd(B, H, T, D, like):
    # (B, T, H, D) memory seen as (B, H, T, D): the model's y.transpose(1, 2).reshape(B, T, C) is then free,
    # and so are the views back to the fused qkv gradient
    return torch.empty(B, T, H, D, device=like.device, dtype=like.dtype).transpose(1, 2)


def _meta(D, causal, slopes, dtype, sequence_id=None, shifted=False):
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=bool(causal),
                HAS_ALIBI=slopes is not None, HAS_SEQ=sequence_id is not None,
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32", SHIFTED=shifted)


def _launch(kernel, grid, *args, fixed=False, **meta):
    """kernel[grid](*args, **meta). fixed=True skips the autotuner: its pick goes by timing, which differs
    from process to process, and the rounding depends on the tile sizes, so deterministic=True runs the
    first entry of the kernel's table that its pruning keeps, in every process alike."""
    if not fixed:
        return kernel[grid](*args, **meta)
    nargs = dict(zip(kernel.arg_names, args))
    config = kernel.early_config_prune(kernel.configs, nargs, **meta)[0]
    if config.pre_hook:
        config.pre_hook({**nargs, **meta, **config.all_kwargs()})
    return kernel.fn[grid](*args, **meta, **config.all_kwargs())


def _attn_forward(q, k, v, slopes, causal, sm_scale, sequence_id=None, deterministic=False, off_shift=None):
    """(o, lse) with lse in the kernel's frames (LSE_FRAME). off_shift: query row i sits at key position
    i + off_shift; None aligns the queries with the last Tq keys (Tk - Tq). Context parallelism (context.py)
    gives a (query chunk, key chunk) pair's offset here, and the merged LSE and delta to _attn_backward."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    meta = _meta(D, causal, slopes, q.dtype, sequence_id, shifted=off_shift is not None)
    off_shift = Tk - Tq if off_shift is None else off_shift
    o = _empty_bhtd(B, H, Tq, D, q)
    lse = _stats_empty(B, H, Tq, q)  # base-2, true ALiBi frame
    tma = _use_tma(q, k, v, o)
    tiles = [_descriptor(x, meta["BLOCK_D"]) for x in (q, k, v, o)] if tma else [q, k, v, o]
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]) * B * H,)
    _launch(_attn_fwd, grid, *tiles, lse, slopes if slopes is not None else q, *_doc_bounds(sequence_id, lse),
            sm_scale * LOG2E, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *lse.stride()[:2],
            B, H, H // H_kv, Tq, Tk, off_shift, _bucket(Tq), _lpt_group(q, 2 * Tk * D // (H // H_kv)), fixed=deterministic,
            TMA=tma, **meta)
    return o, lse


def _attn_backward(do, q, k, v, o, lse, slopes, causal, sm_scale, deterministic, sequence_id=None, off_shift=None,
                   delta=None, fp32_dq=False):
    """(dq, dk, dv). delta: rowsum(dO * O) with lse's strides, when the caller has it (context.py's pairs, whose
    o is the merged output); else computed here from o. fp32_dq: dq as the fp32 atomics summed it (context.py
    adds the pairs' in fp32), not in q's dtype."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    meta = _meta(D, causal, slopes, q.dtype, sequence_id, shifted=off_shift is not None)
    off_shift = Tk - Tq if off_shift is None else off_shift
    if delta is None:
        delta = _stats_empty(B, H, Tq, q)  # lse's strides
        pre_block = 32 if _INTERPRET else 128
        _bwd_preprocess[(triton.cdiv(Tq, pre_block) * B * H,)](o, do, delta, *o.stride()[:3], *do.stride()[:3],
                                                               *delta.stride()[:2], H, Tq, HEAD_DIM=D,
                                                               BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_block)
    docs = _doc_bounds(sequence_id, lse)
    dk, dv = _empty_bhtd(B, H_kv, Tk, D, q), _empty_bhtd(B, H_kv, Tk, D, q)
    # dQ: fp32 atomics in the dK/dV kernel (zeroed here), or the separate dQ kernel when deterministic
    dq_acc = lse.new_zeros(1) if deterministic else _empty_bhtd(B, H, Tq, D, lse)  # zeroed by _dkdv_pre_hook
    args = (slopes if slopes is not None else q, *docs, sm_scale * LOG2E, sm_scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *lse.stride()[:2])
    tail = (B, H, H // H_kv, Tq, Tk, off_shift, _bucket(Tq))
    dq_strides = (0, 0, 0) if deterministic else dq_acc.stride()[:3]
    tiles = [q, k, v, do, dk, dv]
    tma = _use_tma(*tiles)
    # dQ by TMA reduce-add where the dK/dV kernel uses TMA, except under the interpreter, which has no
    # descriptor reductions (as of Triton 3.9): there the pointer atomics stand in
    dq_tma = tma and not deterministic and not _INTERPRET and _use_tma(dq_acc)
    q_, k_, v_, do_, dk_, dv_ = [_descriptor(x, meta["BLOCK_D"]) for x in tiles] if tma else tiles
    dq_ = _descriptor(dq_acc, meta["BLOCK_D"]) if dq_tma else dq_acc
    # LSE and delta by TMA too, rows past Tq zero-filled: harmless, since Q and dO are zero-filled there
    # (P stays finite, dS = P (dP - delta) = 0 exactly, and those rows of dQ are never written)
    lse_, delta_ = [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, 16]) for x in (lse, delta)] \
        if tma else (lse, delta)
    grid = lambda META: (triton.cdiv(Tk, META["BLOCK_N"]) * B * H_kv,)
    _launch(_attn_bwd_dkdv, grid, q_, k_, v_, do_, lse_, delta_, dk_, dv_, dq_, *args, *dk.stride()[:3], *dq_strides,
            *tail, _lpt_group(q, 2 * Tq * D * (H // H_kv)), fixed=deterministic, FUSE_DQ=not deterministic,
            TMA=tma, DQ_TMA=dq_tma, **meta)
    if not deterministic:
        return (dq_acc if fp32_dq else dq_acc.to(q.dtype)), dk, dv  # keeps the (B, T, H, D) memory layout
    dq = _empty_bhtd(B, H, Tq, D, q)
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]) * B * H,)
    _launch(_attn_bwd_dq, grid, q, k, v, do, lse, delta, dq, *args, *dq.stride()[:3], *tail,
            _lpt_group(q, 2 * Tk * D // (H // H_kv)), fixed=True, **meta)
    return dq, dk, dv


# torch.compile: the kernels are custom ops (opaque to the compiler, which sees their fake versions: the
# output shapes and strides), with a registered autograd formula, so a compiled block is one graph.
# The ops take q, k, v with the last dim contiguous (flash_attn_alibi sees to it).

def _on_device(q):
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()  # launch on q's GPU


@torch.library.custom_op("mpt::flash_attn_alibi_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: Optional[torch.Tensor], causal: bool,
               sm_scale: float, deterministic: bool, sequence_id: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic: fixed tiles here too (the backward reads this output and LSE); an input also so that
    # autograd can keep it for the backward
    q, k, v = (_kernel_layout(x) for x in (q, k, v))
    with _on_device(q):
        return _attn_forward(q, k, v, slopes, causal, sm_scale, sequence_id, deterministic)


@_flash_fwd.register_fake
def _(q, k, v, slopes, causal, sm_scale, deterministic, sequence_id):
    B, H, Tq, D = q.shape
    return _empty_bhtd(B, H, Tq, D, q), _stats_empty(B, H, Tq, q)


@torch.library.custom_op("mpt::flash_attn_alibi_bwd", mutates_args=())
def _flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, slopes: Optional[torch.Tensor], causal: bool, sm_scale: float,
               deterministic: bool, sequence_id: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v = (_kernel_layout(x) for x in (do, q, k, v))
    with _on_device(q):
        return _attn_backward(do, q, k, v, o, lse, slopes, causal, sm_scale, deterministic, sequence_id)


@_flash_bwd.register_fake
def _(do, q, k, v, o, lse, slopes, causal, sm_scale, deterministic, sequence_id):
    (B, H, Tq, D), (H_kv, Tk) = q.shape, k.shape[1:3]
    return _empty_bhtd(B, H, Tq, D, q), _empty_bhtd(B, H_kv, Tk, D, q), _empty_bhtd(B, H_kv, Tk, D, q)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, slopes, causal, sm_scale, deterministic, sequence_id = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], slopes, sequence_id)
    ctx.causal, ctx.sm_scale, ctx.deterministic = causal, sm_scale, deterministic


def _flash_backward(ctx, do, _dlse):
    q, k, v, o, lse, slopes, sequence_id = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, slopes, ctx.causal, ctx.sm_scale, ctx.deterministic, sequence_id)
    return dq, dk, dv, None, None, None, None, None


_flash_fwd.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def flash_attn_alibi(q, k, v, alibi_slopes=None, causal=True, softmax_scale=None, deterministic=False,
                     sequence_id=None):
    """Attention with ALiBi, as torch SDPA plus a bias slope_h * (j - i_abs), in Triton.
    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with H % H_kv == 0; any strides (last dim contiguous
    avoids a copy). fp16/bf16 on CUDA (fp32 too under TRITON_INTERPRET=1); D <= 128.
    alibi_slopes: (H,) fp32 or None. causal masks j > i + Tk - Tq. Returns (B, H, Tq, D) in q's dtype,
    a view of (B, Tq, H, D) memory. deterministic=True computes dQ in a separate kernel with a fixed
    summation order (bitwise-repeatable gradients, about 7/5 of the backward's GEMM work); the default
    accumulates dQ with fp32 atomics in the dK/dV kernel, whose order varies from run to run (by fp32
    rounding only). sequence_id: (B, Tk) integer document ids of the keys, non-decreasing along each row
    (packed documents); a query (the last Tq positions) attends only to keys of its own document, and key
    blocks wholly outside it are skipped. torch.compile traces through it without a graph break (custom ops)."""
    _check_inputs(q, k, v, alibi_slopes)
    if sequence_id is not None:
        _check_sequence_id(sequence_id, q, k)
    slopes = None if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
    sm_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _flash_fwd(q, k, v, slopes, bool(causal), float(sm_scale), bool(deterministic), sequence_id)[0]
