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

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F


ATTN_IMPLS = ('torch', 'triton', 'flash')


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
    attn_impl: str = 'torch'  # 'torch' | 'triton' | 'flash', see attention()

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

def torch_attention(q, k, v, slopes=None, causal=True, softmax_scale=None, dropout_p=0.0, key_start=None):
    """The reference: SDPA with ALiBi (and the masks) given as an additive float mask.
    key_start (B,): keys before it are padding (left-padded prompts in generate) and are masked."""
    Tq, Tk = q.size(-2), k.size(-2)
    i = torch.arange(Tk - Tq, Tk, device=q.device).view(-1, 1)  # absolute query positions
    j = torch.arange(Tk, device=q.device).view(1, -1)
    bias = torch.zeros(1, Tq, Tk, device=q.device)
    if slopes is not None:
        bias = slopes.view(-1, 1, 1).float() * (j - i)  # (H, Tq, Tk)
    masked = (j > i) if causal else torch.zeros(Tq, Tk, dtype=torch.bool, device=q.device)
    if key_start is not None:
        masked = masked | (j < key_start.view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
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
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise RuntimeError("attn_impl='flash' needs the flash-attn package: "
                           "pip install flash-attn --no-build-isolation (or use attn_impl='triton')") from None
    if not causal and slopes is not None:
        raise ValueError("attn_impl='flash' computes ALiBi as -slope*|i-j|, which differs from MPT's "
                         "slope*(j-i) without the causal mask: use attn_impl='triton' or 'torch'")
    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                        softmax_scale=softmax_scale, causal=causal,
                        alibi_slopes=None if slopes is None else slopes.float())
    return y.transpose(1, 2)


_notified = set()


def attention(q, k, v, slopes, config, causal=True, dropout_p=0.0, key_start=None):
    """The one place where config.attn_impl picks an implementation."""
    impl = config.attn_impl
    if impl == 'triton' and not q.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        if 'cpu' not in _notified:
            print("note: attn_impl='triton' needs a CUDA device; using attn_impl='torch' on CPU")
            _notified.add('cpu')
        impl = 'torch'
    if key_start is not None:
        impl = 'torch'  # only the reference takes a padding mask (generate with prompts of unequal length)
    if impl == 'triton':
        if dropout_p > 0:
            raise ValueError("attn_pdrop > 0 needs attn_impl='torch': the Triton kernel has no dropout")
        return flash_attn_alibi(q, k, v, slopes, causal, config.softmax_scale)
    if impl == 'flash':
        return flash_package_attention(q, k, v, slopes, causal, config.softmax_scale, dropout_p)
    return torch_attention(q, k, v, slopes, causal, config.softmax_scale, dropout_p, key_start)


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

    def forward(self, x, slopes, kv_cache=None):
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
        y = attention(q, k, v, slopes, cfg, dropout_p=dropout_p, key_start=key_start)  # (B, nh, T, hs)
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

    def forward(self, x, slopes, kv_cache=None):
        x = x + self.resid_drop(self.attn(self.norm_1(x), slopes, kv_cache))
        x = x + self.resid_drop(self.ffn(self.norm_2(x)))
        return x


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

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> (logits, loss). With targets (B, T) (-1 = ignore) the logits of every
        position and the mean cross-entropy; without, only the last position's logits (B, 1, V)."""
        if not idx.is_cuda and idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            # checked on CPU only, where it costs nothing; on CUDA a bad id is a device-side assert,
            # so train.py and sample.py check their tokens on the host before they reach the GPU
            raise ValueError(f"token id {int(idx.max() if idx.max() >= self.config.vocab_size else idx.min())} "
                             f"is outside the vocabulary [0, {self.config.vocab_size}): "
                             f"the data was made with another tokenizer, or vocab_size is too small")
        x = self.transformer.emb_drop(self.transformer.wte(idx))  # (B, T, C)
        slopes = self.alibi(x.device)
        for i, block in enumerate(self.transformer.blocks):
            x = block(x, slopes, None if kv_cache is None else kv_cache[i])
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
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # -------------------------------------------------------------------------
    # generation with a KV cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
                 max_len=None, generator=None, stream=None):
        """Continue prompts by up to max_new_tokens tokens. The prompts run through the model once
        (prefill, filling a preallocated KV cache), then each step feeds only the newest token.
        idx: a (B, T) tensor, or a list of prompts (lists or 1-D tensors) of different lengths.
        temperature 0 is greedy; top_k / top_p sample only among the k likeliest tokens / the smallest
        set of tokens holding probability top_p. A row that emits eos_token then repeats it, and
        generation stops once every row has. max_len bounds prompt + new tokens (default the training
        max_seq_len; ALiBi has no position table, so it may be set beyond). stream(tokens) is called
        with each step's (B,) new tokens. Returns (B, T + n) for a tensor, else a list of 1-D tensors."""
        cfg, device = self.config, self.transformer.wte.weight.device
        prompts = [torch.as_tensor(p, dtype=torch.long).flatten().cpu() for p in idx]
        lengths = [len(p) for p in prompts]
        B, T = len(prompts), max(lengths, default=0)
        max_len = max_len or cfg.max_seq_len
        if B == 0 or min(lengths) == 0:
            raise ValueError("generate needs at least one prompt, and no empty prompt")
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
            tokens = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (B,)
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
        hf = json.loads((path / 'config.json').read_text())
        config = MPTConfig(**{**config_from_hf(hf), **overrides})
        return cls.from_state_dict(config, load_hf_state_dict(path), source=str(path))

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
                            'prefix_lm': False, 'attn_uses_sequence_id': False},
        }

    def save_hf(self, path):
        """Write a directory that transformers' MptForCausalLM.from_pretrained loads with no network
        (config.json + model.safetensors) and that gives the same logits."""
        from safetensors.torch import save_file
        config = self.hf_config()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / 'model.safetensors'), metadata={'format': 'pt'})

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
    elif hasattr(os, 'sysconf') and 'SC_AVPHYS_PAGES' in os.sysconf_names:
        free = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    else:
        return
    if nbytes > free:
        raise ValueError(f"{what} needs {nbytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free on "
                         f"{device}: generate fewer samples at once or lower max_len")


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


def load_hf_state_dict(path):
    """All tensors of a save_pretrained directory: model.safetensors, pytorch_model.bin, or the shards
    listed in their *.index.json."""
    files = []
    for name in ('model.safetensors', 'pytorch_model.bin'):
        index = path / f'{name}.index.json'
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
            break
        if (path / name).is_file():
            files = [name]
            break
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")
    state = {}
    for name in files:
        if name.endswith('.safetensors'):
            from safetensors.torch import load_file
            state.update(load_file(str(path / name)))
        else:
            state.update(torch.load(path / name, map_location='cpu', weights_only=True))
    return state


# peak dense bf16 tensor-core FLOP/s, from the vendors' datasheets; first match in the device name wins
PEAK_FLOPS = [
    ('GH200', 989e12), ('H200', 989e12), ('H100 NVL', 835e12), ('H100 PCIe', 756e12), ('H100', 989e12),
    ('B200', 2250e12), ('A100', 312e12), ('A10', 125e12), ('L40S', 362e12), ('L4', 121e12),
    ('V100', 125e12),  # fp16: V100 has no bf16
]


def peak_flops_per_device(device=None):
    """The peak bf16 FLOP/s of a CUDA device from PEAK_FLOPS, or None (CPU, unknown GPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != 'cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)
