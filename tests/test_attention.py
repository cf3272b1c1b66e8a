"""Tests for the Triton flash attention with in-kernel ALiBi (attn_impl='triton').

Without a GPU the kernels run under the Triton interpreter, which tests/conftest.py switches on before
triton is first imported (Triton picks interpreter or compiler when @triton.jit runs, not when a kernel
launches). With a GPU they run the real kernels (bf16 where the CPU run uses fp32). test_aot_compile
builds every kernel and autotune config for sm_80 and sm_90 without any GPU.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as fa  # noqa: E402  (tests/conftest.py imported it first, with TRITON_INTERPRET=1 on a CPU)
from model import alibi_slopes  # noqa: E402

if fa._INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16  # fp32 needs the interpreter: CUDA takes 16-bit


def require_kernels():
    # triton.language's helpers (tl.zeros, tl.cdiv, ...) must be interpreted too when the kernels are
    from triton.runtime.jit import JITFunction
    compiled_helpers = any(isinstance(f, JITFunction) for f in vars(triton.language.standard).values())
    if DEVICE is None or (fa._INTERPRET and compiled_helpers):
        pytest.fail("no GPU, and triton was imported before TRITON_INTERPRET=1 was set: set it before the "
                    "first `import triton` of the test session (tests/conftest.py)")


def reference_attention(q, k, v, slopes, causal, scale, sequence_id=None):
    """The same math written out plainly in float64: explicit scores, bias slope * (j - i_abs) with
    i_abs = i + Tk - Tq, bottom-right causal mask, softmax, and zeros for rows that see no key. With
    sequence_id (B, Tk), a block-diagonal mask: query i sees key j only if ids[i_abs] == ids[j]."""
    q, k, v = q.double(), k.double(), v.double()
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    i_abs = torch.arange(Tq, device=q.device).view(Tq, 1) + (Tk - Tq)
    j = torch.arange(Tk, device=q.device).view(1, Tk)
    if slopes is not None:
        scores = scores + slopes.to(q.device).double().view(1, H, 1, 1) * (j - i_abs)
    visible = j <= i_abs if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if sequence_id is not None:
        ids = sequence_id.to(q.device)
        visible = visible & (ids[:, Tk - Tq:, None] == ids[:, None, :])[:, None]  # (B, 1, Tq, Tk)
    empty = ~visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    return probs @ v


def make_inputs(B, H, H_kv, Tq, Tk, D, dtype, layout, gen):
    """Leaf tensors plus a function that turns them into (q, k, v). layout 'fused' gives the model's
    strided views: one qkv tensor (B, T, (H + 2 H_kv) D) when Tq == Tk, else q and a fused kv; 'bhtd'
    contiguous tensors; 'dmajor' transposed ones."""
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    heads = lambda x, T: x.view(B, T, -1, D).transpose(1, 2)  # (B, T, n*D) -> (B, n, T, D), no copy
    if layout == "fused" and Tq == Tk:
        def split(qkv):
            q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=2)
            return heads(q, Tq), heads(k, Tk), heads(v, Tk)
        return [rand(B, Tq, (H + 2 * H_kv) * D)], split
    if layout == "fused":
        def split(q, kv):
            k, v = kv.split([H_kv * D, H_kv * D], dim=2)
            return heads(q, Tq), heads(k, Tk), heads(v, Tk)
        return [rand(B, Tq, H * D), rand(B, Tk, 2 * H_kv * D)], split
    if layout == "dmajor":  # last-dim stride != 1: the wrapper has to make a contiguous copy
        return ([rand(B, H, D, Tq), rand(B, H_kv, D, Tk), rand(B, H_kv, D, Tk)],
                lambda q, k, v: (q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)))
    return [rand(B, H, Tq, D), rand(B, H_kv, Tk, D), rand(B, H_kv, Tk, D)], lambda q, k, v: (q, k, v)


# Tolerances, as max |got - want| / max(1, max |want|) against float64 on the same (rounded) inputs:
# - fp32 (interpreter, tl.dot with input_precision="ieee"): fp32 rounding in dot products of length
#   <= 257, in exp2 and in the online-softmax rescaling, ~1e-7 each; the ALiBi frames keep scores near
#   the diagonal small, so the errors stay there. Measured <= 6e-7 over these cases: 1e-5.
# - fp16: P and dS are rounded to fp16 (rel. 2^-11 ~ 5e-4) before the PV / dS K / dS^T Q dots, and out
#   and the grads are rounded to fp16 when stored. Measured <= 7e-4: 3e-3.
# - bf16 (real GPUs only: the interpreter multiplies raw bf16 bits in tl.dot): 8 mantissa bits, 3e-2.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def check_attention(B, H, H_kv, Tq, Tk, D, causal, alibi, layout, dtype, seed=0, deterministic=False,
                    sequence_id=None):
    require_kernels()
    gen = torch.Generator().manual_seed(seed)
    leaves, split = make_inputs(B, H, H_kv, Tq, Tk, D, dtype, layout, gen)
    slopes = alibi_slopes(H).to(DEVICE) if alibi else None
    out = fa.flash_attn_alibi(*split(*leaves), alibi_slopes=slopes, causal=causal, deterministic=deterministic,
                              sequence_id=sequence_id)
    assert out.shape == (B, H, Tq, D) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # (B, Tq, H, D) memory: the model's reshape is free
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    out.backward(dout)

    leaves64 = [x.detach().cpu().double().requires_grad_() for x in leaves]
    ref = reference_attention(*split(*leaves64), slopes.cpu() if alibi else None, causal, 1 / math.sqrt(D),
                              sequence_id)
    ref.backward(dout.cpu().double())
    for name, got, want in [("out", out, ref)] + [(f"grad{i}", x.grad, y.grad)
                                                   for i, (x, y) in enumerate(zip(leaves, leaves64))]:
        got = got.detach().cpu().double()
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err <= TOL[dtype], f"{name}: error {err:.2e} > {TOL[dtype]:.0e}"
    if causal and Tq > Tk:  # the first Tq - Tk query rows see no key at all: exactly zero, no NaN
        assert (out[:, :, : Tq - Tk] == 0).all()
    return out, [x.grad for x in leaves]


# Training scale, bf16, on a GPU only (the interpreter would take hours): what the model runs, against
# float64 computed on the same GPU. MPT-1B/7B's head dim 128 at 2k; MPT-30B's 64 heads of 112 at 4k;
# grouped-query attention 8:1; decoding one token against 4,096 cached keys; packed documents.
GPU_CASES = [
    # B, H, H_kv, Tq, Tk, D, documents per row (0: no sequence_id)
    (2, 16, 16, 2048, 2048, 128, 0),
    (1, 64, 64, 4096, 4096, 112, 0),
    (1, 32, 4, 2048, 2048, 128, 0),
    (4, 32, 32, 1, 4096, 128, 0),
    (2, 16, 16, 2048, 2048, 128, 7),
]


@pytest.mark.skipif(DEVICE != "cuda", reason="training-scale bf16 shapes: GPU only")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-H{}-Hkv{}-Tq{}-Tk{}-D{}-docs{}".format(*c))
def test_attention_bf16_training_scale(case):
    B, H, H_kv, Tq, Tk, D, docs = case
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
               for n, T in ((H, Tq), (H_kv, Tk), (H_kv, Tk)))
    slopes = alibi_slopes(H).to(DEVICE)
    sequence_id = None
    if docs:  # random document boundaries, non-decreasing ids
        starts = torch.sort(torch.randperm(Tk - 1, generator=gen)[:docs - 1] + 1).values
        sequence_id = (torch.arange(Tk)[None, :, None] >= starts[None, None, :]).sum(-1).expand(B, Tk).to(DEVICE)
    out = fa.flash_attn_alibi(q, k, v, alibi_slopes=slopes, causal=True, sequence_id=sequence_id)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, torch.bfloat16)
    out.backward(dout)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*leaves64, slopes, True, 1 / math.sqrt(D), sequence_id)
    ref.backward(dout.double())
    for name, got, want in [("out", out, ref)] + [(f"d{n}", x.grad, y.grad) for n, x, y in zip("qkv", (q, k, v), leaves64)]:
        got = got.detach().double()
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err <= TOL[torch.bfloat16], f"{name}: error {err:.2e} > {TOL[torch.bfloat16]:.0e}"


# The same at training scale on each path a GPU takes: sm_90's TMA path (descriptors, what aligned tensors
# get) and the pointer fallback (here q starts 2 bytes past a 16-byte boundary, as a misaligned view would),
# dQ fused into the dK/dV kernel (atomics, or TMA reduce-add) and deterministic=True's separate dQ kernel
# (bitwise repeatable), each kernel variant where it serves (`variant`: the pipelined forms serve the TMA path
# without sequence ids, with fused dQ). (1, 4, 1000, 64): ragged blocks and 5 packed documents.
# bench/gpu_session.sh quick runs these first.
GPU_PATH_CASES = [
    # B, H, T, D, documents per row (0: no sequence_id), deterministic, path
    (2, 8, 2048, 128, 0, False, "tma"),
    (2, 8, 2048, 128, 0, True, "tma"),
    (2, 8, 2048, 128, 0, False, "pointers"),
    (2, 8, 2048, 128, 0, True, "pointers"),
    (1, 4, 1000, 64, 5, False, "tma"),
    (1, 4, 1000, 64, 5, True, "tma"),
    (1, 4, 1000, 64, 5, False, "pointers"),
    (1, 4, 1000, 64, 5, True, "pointers"),
]


@pytest.mark.skipif(DEVICE != "cuda", reason="training-scale bf16 shapes: GPU only")
@pytest.mark.parametrize("case", GPU_PATH_CASES, ids=lambda c: "B{}-H{}-T{}-D{}-docs{}".format(*c[:5])
                         + ("-deterministic" if c[5] else "-fused_dq") + f"-{c[6]}")
def test_attention_bf16_training_scale_paths(case, variant, monkeypatch):
    B, H, T, D, docs, deterministic, path = case
    if variant and (path != "tma" or docs or deterministic):
        pytest.skip("the pipelined variants serve the TMA path without sequence ids, with fused dQ")
    if path == "tma" and fa._arch(torch.device(DEVICE)) < 90:
        pytest.skip("TMA: sm_90 and newer")
    made = []
    monkeypatch.setattr(fa, "_descriptor", lambda x, d, make=fa._descriptor: made.append(x.shape) or make(x, d))
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(B, H, T, D, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(3)]
    sequence_id = None
    if docs:  # random document boundaries, non-decreasing ids
        starts = torch.sort(torch.randperm(T - 1, generator=gen)[:docs - 1] + 1).values
        sequence_id = (torch.arange(T)[None, :, None] >= starts[None, None, :]).sum(-1).expand(B, T).to(DEVICE)
    dout = torch.randn(B, H, T, D, generator=gen).to(DEVICE, torch.bfloat16)
    slopes = alibi_slopes(H).to(DEVICE)

    def run():
        q, k, v = (x.clone().requires_grad_() for x in values)
        if path == "pointers":
            flat = torch.empty(q.numel() + 1, device=DEVICE, dtype=q.dtype)
            q = flat[1:].view(q.shape).copy_(q.detach()).requires_grad_()
            assert q.data_ptr() % 16 != 0
        out = fa.flash_attn_alibi(q, k, v, alibi_slopes=slopes, causal=True, deterministic=deterministic,
                                  sequence_id=sequence_id)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]

    got = run()
    assert bool(made) == (path == "tma"), f"{len(made)} descriptors made on the {path} path"
    if not deterministic:  # the autotuner ran the forced variant (deterministic runs fixed, untuned entries)
        for kernel, variants in ((fa._attn_fwd, fa.FWD_VARIANTS), (fa._attn_bwd_dkdv, fa.DKDV_VARIANTS)):
            want = variants[min(variant, len(variants) - 1)]
            assert kernel.cache and all(c.kwargs.get(k) == v for c in kernel.cache.values() for k, v in want.items()), kernel.cache
    leaves64 = [x.double().requires_grad_() for x in values]
    ref = reference_attention(*leaves64, slopes, True, 1 / math.sqrt(D), sequence_id)
    want = [ref.detach(), *torch.autograd.grad(ref, leaves64, dout.double())]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        g = g.double()
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err = (g - w).abs().max().item() / max(1.0, w.abs().max().item())
        assert err <= TOL[torch.bfloat16], f"{name}: error {err:.2e} > {TOL[torch.bfloat16]:.0e}"
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(got, run())), "deterministic=True differs between two runs"


# Together these cover: Tq = Tk = 1; lengths that are not block multiples and span several blocks
# (the interpreter configs use 16/32-row blocks); Tq < Tk (prefill with a KV cache, and decode);
# Tq > Tk (fully-masked rows); GQA (8 heads on 2, 3 heads on 1); D in {16, 32, 64, 80, 112, 128};
# no ALiBi; MPT's slopes for 3 heads (non-power-of-two branch); causal and not; strided qkv views.
CASES = [
    # B, H, H_kv, Tq, Tk, D, causal, alibi, layout
    (1, 2, 2, 1, 1, 16, True, True, "bhtd"),  # a single token
    (1, 2, 1, 17, 17, 32, True, True, "fused"),
    (2, 2, 2, 100, 100, 64, True, True, "fused"),
    (1, 1, 1, 257, 257, 16, True, True, "bhtd"),
    (1, 2, 2, 17, 100, 32, True, True, "fused"),  # prefill against a KV cache
    (1, 2, 1, 1, 257, 64, True, True, "bhtd"),  # decode: one query, 257 keys
    (1, 2, 2, 100, 17, 32, True, True, "bhtd"),  # Tq > Tk: 83 rows see no key
    (1, 8, 2, 40, 40, 32, True, True, "fused"),  # GQA, 4 query heads per kv head
    (1, 3, 1, 33, 33, 16, True, True, "bhtd"),  # 3 heads on 1 kv head
    (2, 2, 2, 57, 57, 80, False, True, "bhtd"),  # head dim 80, padded to 128
    (1, 2, 2, 17, 17, 112, True, True, "bhtd"),  # MPT-30B's head dim
    (1, 2, 1, 100, 100, 128, True, False, "fused"),  # no ALiBi
    (1, 2, 2, 65, 100, 16, False, True, "bhtd"),
    (1, 2, 2, 100, 100, 32, False, False, "bhtd"),  # plain softmax attention
    (1, 2, 1, 17, 33, 32, True, True, "dmajor"),
]
FP16_CASES = [
    (1, 2, 1, 100, 100, 64, True, True, "fused"),
    (1, 2, 2, 17, 100, 32, True, True, "bhtd"),
    (1, 2, 2, 100, 17, 32, True, True, "bhtd"),
]
_id = lambda c: "B{}-H{}-Hkv{}-Tq{}-Tk{}-D{}-{}-{}-{}".format(
    *c[:6], "causal" if c[6] else "full", "alibi" if c[7] else "noalibi", c[8])


# The kernels' variants: the same math scheduled differently (model.py's FWD_VARIANTS, DKDV_VARIANTS), all
# in the autotune tables, so that on a GPU any of them may run. The tests below run with each one forced in
# turn: variant i of every kernel (its last one where a kernel has fewer). The interpreter runs the same
# Triton code sequentially, so what it checks is the math and the control flow of each variant (prologues,
# peeled iterations, look-ahead tiles, which blocks are visited), not the asynchronous schedule on a GPU.
# On the CPU a variant past the first runs only where a GPU's autotuner may pick it (model.py's _PIPELINED:
# the sm_90 TMA path, without sequence ids): on the descriptor path, and not with sequence ids.
VARIANT_KERNELS = [("_attn_fwd", "FWD_TUNING", "FWD_VARIANTS"), ("_attn_bwd_dkdv", "DKDV_TUNING", "DKDV_VARIANTS")]
N_VARIANTS = max(len(getattr(fa, variants)) for _, _, variants in VARIANT_KERNELS)


@pytest.fixture(params=range(N_VARIANTS), ids=lambda i: f"variant{i}")
def variant(request, monkeypatch):
    saved = []
    for kernel_name, table_name, variants_name in VARIANT_KERNELS:
        kernel, table, variants = getattr(fa, kernel_name), getattr(fa, table_name), getattr(fa, variants_name)
        want = variants[min(request.param, len(variants) - 1)]
        is_wanted = lambda config, want=want: all(config.kwargs.get(k) == v for k, v in want.items())
        monkeypatch.setattr(kernel, "cache", {})
        if DEVICE == "cuda":  # the wanted variant's configs wherever they serve (a GPU's table lists them all)
            prune = kernel.early_config_prune
            monkeypatch.setattr(kernel, "early_config_prune", lambda configs, nargs, prune=prune, is_wanted=is_wanted,
                                **meta: [c for c in prune(configs, nargs, **meta) if is_wanted(c)]
                                or prune(configs, nargs, **meta))
            continue
        # the interpreter's table lists the first variant only: the same tile with the wanted one's switches
        config, *rest = table[0]
        entry = (triton.Config({**config.kwargs, **want}, num_warps=config.num_warps, num_stages=config.num_stages,
                               pre_hook=config.pre_hook), *rest)
        saved.append((table, list(table)))
        table[:] = [entry]  # the autotuner's pruning reads this list alongside kernel.configs
        monkeypatch.setattr(kernel, "configs", [entry[0]])
    yield request.param
    for table, entries in saved:
        table[:] = entries


def variant_path(variant, monkeypatch):
    # under the interpreter, variants past the first run on the path they serve: descriptors (sm_90's TMA)
    if variant and DEVICE == "cpu":
        monkeypatch.setattr(fa, "INTERPRET_TMA", True)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_attention_matches_reference(case, variant, monkeypatch):
    variant_path(variant, monkeypatch)
    check_attention(*case, dtype=DTYPE)


@pytest.mark.parametrize("case", FP16_CASES, ids=_id)
def test_attention_fp16(case, variant, monkeypatch):
    variant_path(variant, monkeypatch)
    check_attention(*case, dtype=torch.float16)


# the sm_90 path (host-side tensor descriptors: TMA on the GPU, zero-filled out-of-bounds tiles, dQ by TMA
# reduce-add) under the interpreter: fused strided views, padded head dims, ragged blocks, Tq < Tk, Tq > Tk,
# decode, GQA
TMA_CASES = [CASES[i] for i in (1, 2, 4, 5, 6, 7, 9, 12)]


@pytest.mark.parametrize("case", TMA_CASES, ids=_id)
def test_attention_tma(case, monkeypatch, variant):
    if DEVICE != "cpu":
        pytest.skip("on a GPU the architecture picks the path (sm_90: TMA)")
    if variant:
        pytest.skip("test_attention_matches_reference runs the other variants on this path, every case")
    made = []
    monkeypatch.setattr(fa, "INTERPRET_TMA", True)
    monkeypatch.setattr(fa, "_descriptor", lambda x, d, make=fa._descriptor: made.append(x.shape) or make(x, d))
    check_attention(*case, dtype=DTYPE)
    assert len(made) == 4 + 6  # forward: q, k, v, out; dK/dV kernel: q, k, v, dout, dk, dv


# the deterministic backward (separate dQ kernel) against float64, and bitwise equal over two runs
DETERMINISTIC_CASES = [CASES[i] for i in (2, 4, 5, 6, 7, 9, 13)]


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=_id)
def test_attention_deterministic(case):
    out1, grads1 = check_attention(*case, dtype=DTYPE, deterministic=True)
    out2, grads2 = check_attention(*case, dtype=DTYPE, deterministic=True)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2))


def test_deterministic_runs_fixed_tiles_not_the_autotuners_pick(monkeypatch):
    # The autotuner picks a tile by timing, which differs between processes, and the rounding depends on the
    # tile: deterministic=True must run a fixed entry of each table (the first its pruning keeps) without
    # timing anything. Here every table gets a second entry, and timing fails the test.
    require_kernels()
    from triton.runtime.autotuner import Autotuner
    tables = ((fa._attn_fwd, fa.FWD_TUNING), (fa._attn_bwd_dkdv, fa.DKDV_TUNING), (fa._attn_bwd_dq, fa.DQ_TUNING))
    for kernel, table in tables:
        config, *rest = table[0]
        other = triton.Config({**config.kwargs, "BLOCK_M": 2 * config.kwargs["BLOCK_M"],
                               "BLOCK_N": 2 * config.kwargs["BLOCK_N"]},
                              num_warps=config.num_warps, num_stages=config.num_stages, pre_hook=config.pre_hook)
        table.append((other, *rest))  # the pruning zips the configs with this list
        monkeypatch.setattr(kernel, "configs", [config, other])
        monkeypatch.setattr(kernel, "cache", {})

    def no_timing(*args, **kwargs):
        raise AssertionError("the autotuner timed configs")
    monkeypatch.setattr(Autotuner, "_bench", no_timing)
    try:
        check_attention(1, 2, 1, 40, 40, 32, True, True, "bhtd", DTYPE, deterministic=True)
        with pytest.raises(AssertionError, match="timed configs"):  # the default path does tune
            check_attention(1, 2, 1, 40, 40, 32, True, True, "bhtd", DTYPE)
    finally:
        for _, table in tables:
            table.pop()


def _rss_mib():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_rows_beyond_2_31_elements(tma, monkeypatch, variant):
    # q, k, v and dO whose rows lie up to 2.5e9 elements from their base (row stride 2^23, 300 rows, as
    # fused qkv rows are at T > 100k): int32 row offsets would wrap and read the wrong memory (or
    # segfault). The views sit in one 5 GB torch.empty that is never touched beyond the rows used,
    # so it stays virtual: the process' resident memory grows by far less than a GB.
    require_kernels()
    if DEVICE == "cpu" and variant and not tma:
        pytest.skip("the other variants serve the TMA path only")
    if DEVICE == "cpu":
        monkeypatch.setattr(fa, "INTERPRET_TMA", tma)
    elif tma:
        pytest.skip("on a GPU the architecture picks the path")
    dtype = torch.float16
    stride, T, D = 2 ** 23, 300, 16
    rss = _rss_mib() if DEVICE == "cpu" else None
    big = torch.empty(T * stride + 4 * D, dtype=dtype, device=DEVICE)
    q, k, v, do = (big.as_strided((1, 1, T, D), (T * stride, T * stride, stride, 1), storage_offset=i * D)
                   for i in range(4))
    assert (T - 1) * stride + 3 * D >= 2 ** 31
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for x in (q, k, v, do):
            x.copy_(torch.randn(x.shape, generator=gen))
    for x in (q, k, v):
        x.requires_grad_()
    slopes = alibi_slopes(1).to(DEVICE)
    out = fa.flash_attn_alibi(q, k, v, alibi_slopes=slopes)
    out.backward(do)
    if rss is not None:
        assert _rss_mib() - rss < 1024, "the big buffer was touched"
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, slopes.cpu(), True, 1 / math.sqrt(D))
    ref.backward(do.detach().cpu().double())
    for got, want in [(out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)]:
        err = (got.detach().cpu().double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err <= TOL[dtype]
    del big


def test_grid_takes_more_than_65535_heads(monkeypatch):
    # CUDA caps grid axes 1 and 2 at 65,535: B * H = 70,000 (batch x heads) must still launch. Under the
    # interpreter the 70,000 programs would take many minutes, so the launches are recorded instead of run
    # (the kernels' decoding of the 1-D program id is what every other test exercises); on a GPU the
    # kernels run and are checked against float64.
    require_kernels()
    B, H, T, D = 7000, 10, 3, 16
    if DEVICE == "cuda":
        check_attention(B, H, H, T, T, D, True, True, "bhtd", DTYPE)
        check_attention(B, H, 1, T, T, D, True, True, "bhtd", DTYPE, deterministic=True)
        return
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getattr__(self, name):  # deterministic=True reads the autotuner's table, then launches .fn
            return self if name == "fn" else getattr(self.kernel, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                metas = [dict(c.kwargs, **kwargs) for c in getattr(self.kernel, "configs", [None]) if c] or [kwargs]
                for meta in metas:
                    launches.append((self.kernel, grid(meta) if callable(grid) else grid))
            return launch

    for name in ("_attn_fwd", "_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        monkeypatch.setattr(fa, name, Recorder(getattr(fa, name)))
    for deterministic in (False, True):
        q, k, v = (torch.zeros(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
        fa.flash_attn_alibi(q, k, v, deterministic=deterministic).sum().backward()
    assert len({id(kernel) for kernel, _ in launches}) == 4
    for kernel, grid in launches:
        assert len(grid) == 1 or all(n <= 65535 for n in grid[1:]), grid
        assert grid[0] * (grid[1] if len(grid) > 1 else 1) >= B * H or kernel is fa._attn_bwd_dkdv
        assert grid[0] < 2 ** 31


@pytest.mark.parametrize("n_bh,n_blocks,group", [(7, 5, 3), (4, 6, 4), (5, 1, 2), (1, 4, 8)])
def test_causal_programs_launch_longest_first(n_bh, n_blocks, group):
    # _block_ids' causal schedule: every (row, block) exactly once, in groups of `group` rows (the last one
    # smaller), and inside a group the longest programs (query blocks: the last; key blocks: the first) first
    require_kernels()

    @triton.jit
    def ids(OUT, n_blocks, n_bh, group, LONGEST: tl.constexpr):
        bh, blk = fa._block_ids(n_blocks, n_bh, group, LONGEST)
        tl.store(OUT + 2 * tl.program_id(0) + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, bh, blk))

    for longest in ("last", "first"):
        out = torch.full((n_bh * n_blocks, 2), -1, dtype=torch.int32, device=DEVICE)
        ids[(n_bh * n_blocks,)](out, n_blocks, n_bh, group, longest)
        pairs = [tuple(p) for p in out.tolist()]
        assert sorted(pairs) == [(r, b) for r in range(n_bh) for b in range(n_blocks)]
        for start in range(0, n_bh * n_blocks, group * n_blocks):
            chunk = pairs[start:start + group * n_blocks]
            assert {r for r, _ in chunk} == set(range(start // n_blocks, min(n_bh, start // n_blocks + group)))
            length = [b + 1 if longest == "last" else n_blocks - b for _, b in chunk]
            assert length == sorted(length, reverse=True)


def _packed_ids(B, T, doc_lengths, gen):
    """(B, T) document ids: row 0 packs doc_lengths (the last one filling the rest), other rows random ones."""
    rows = []
    for r in range(B):
        lengths = doc_lengths if r == 0 else torch.randint(1, 40, (T,), generator=gen).tolist()
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T]
        rows.append(torch.cat([ids, ids.new_full((T - len(ids),), len(lengths))]) + 3 * r)
    return torch.stack(rows)


# Packed documents (sequence_id): several documents inside one 16/32-row block (lengths 1, 2, 3, 5), one
# spanning several blocks (60), Tq < Tk (the ids are the keys'), GQA, ALiBi on and off, causal or not,
# both backward paths, the sm_90 (descriptor) path
SEQ_CASES = [
    # B, H, H_kv, Tq, Tk, D, causal, alibi, layout, deterministic, tma
    (2, 2, 2, 100, 100, 32, True, True, "fused", False, False),
    (1, 4, 2, 100, 100, 16, True, False, "bhtd", False, False),
    (1, 2, 1, 37, 100, 32, True, True, "fused", False, False),
    (2, 2, 2, 100, 100, 32, False, True, "bhtd", False, False),
    (1, 2, 2, 100, 100, 32, True, True, "bhtd", True, False),
    (1, 2, 1, 37, 100, 32, False, True, "bhtd", True, False),
    (2, 2, 2, 100, 100, 32, True, True, "fused", False, True),
]


@pytest.mark.parametrize("case", SEQ_CASES, ids=lambda c: _id(c[:9]) + ("-deterministic" if c[9] else "")
                         + ("-tma" if c[10] else ""))
def test_attention_sequence_id(case, monkeypatch, variant):
    *shape, deterministic, tma = case
    if tma and DEVICE != "cpu":
        pytest.skip("on a GPU the architecture picks the path")
    if variant and DEVICE == "cpu":
        pytest.skip("the other variants do not serve sequence ids")
    monkeypatch.setattr(fa, "INTERPRET_TMA", tma)
    B, Tk = shape[0], shape[4]
    ids = _packed_ids(B, Tk, [1, 2, 3, 5, 60, 2], torch.Generator().manual_seed(1)).to(DEVICE)
    check_attention(*shape, dtype=DTYPE, deterministic=deterministic, sequence_id=ids)


def test_sequence_id_errors():
    require_kernels()
    q = torch.zeros(1, 2, 8, 16, device=DEVICE, dtype=DTYPE)
    for ids, msg in [(torch.zeros(1, 7, dtype=torch.long), "shape"), (torch.zeros(1, 8), "integer"),
                     (torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]]), "non-decreasing")]:
        with pytest.raises(ValueError, match=msg):
            fa.flash_attn_alibi(q, q, q, sequence_id=ids.to(DEVICE) if DEVICE == "cpu" else ids)
    with pytest.raises(ValueError, match="Tq = 8 > Tk = 4"):
        fa.flash_attn_alibi(q, q[:, :, :4], q[:, :, :4], sequence_id=torch.zeros(1, 4, dtype=torch.long))


def test_empty_inputs():
    # no queries, or no keys at all (every row fully masked): zeros and finite grads, nothing launched badly
    require_kernels()
    for Tq, Tk in [(0, 5), (5, 0)]:
        q, k, v = (torch.randn(1, 2, T, 16, device=DEVICE, dtype=DTYPE).requires_grad_() for T in (Tq, Tk, Tk))
        out = fa.flash_attn_alibi(q, k, v, alibi_slopes=alibi_slopes(2).to(DEVICE))
        out.sum().backward()
        assert out.shape == (1, 2, Tq, 16) and (out == 0).all()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_input_errors():
    require_kernels()
    def qkv(B=1, H=2, H_kv=2, T=8, D=16, dtype=DTYPE, **over):
        t = {"q": torch.zeros(B, H, T, D, dtype=dtype, device=DEVICE),
             "k": torch.zeros(B, H_kv, T, D, dtype=dtype, device=DEVICE),
             "v": torch.zeros(B, H_kv, T, D, dtype=dtype, device=DEVICE)}
        t.update(over)
        return t["q"], t["k"], t["v"]

    dev = dict(device=DEVICE, dtype=DTYPE)
    bad = [
        (qkv(dtype=torch.float64), "dtype"),
        (qkv(D=160), "head dim"),
        (qkv(k=torch.zeros(1, 2, 8, 32, **dev), v=torch.zeros(1, 2, 8, 32, **dev)), "head dims differ"),
        (qkv(k=torch.zeros(2, 2, 8, 16, **dev), v=torch.zeros(2, 2, 8, 16, **dev)), "batch"),
        (qkv(H=3, H_kv=2), "multiple"),
        (qkv(v=torch.zeros(1, 2, 9, 16, **dev)), "same shape"),
        (qkv(q=torch.zeros(2, 8, 16, **dev)), "4-D"),
    ]
    if DEVICE == "cpu":  # the interpreter gets bf16 dots wrong, so the wrapper refuses bf16 there
        bad.append((qkv(dtype=torch.bfloat16), "dtype"))
    for (q, k, v), msg in bad:
        with pytest.raises(ValueError, match=msg):
            fa.flash_attn_alibi(q, k, v)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fa.flash_attn_alibi(*qkv(), alibi_slopes=torch.ones(3, **dev))


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs, no GPU needed: `bench.py --mode=sass --sass_jobs=aot` compiles
# every kernel x autotune config for sm_80 and sm_90 (the sm_90 pointer fallback too) in worker processes
# started without the interpreter, with two Tritons: the installed one, and the one the GPU machines run
# (AOT_TRITON, installed on first use into a cache folder with pip install --target and put first on the
# workers' PYTHONPATH). Each Triton compiles with its own ptxas; its log (ptxas -v, which Triton runs)
# gives registers, spills and advisories, and the sm_90 SASS the main loop. Fails on: register spills;
# ptxas' "wgmma ... serialized" advisory; shared memory over the limit; an sm_90 kernel without wgmma in
# its SASS (HGMMA); an sm_90 wgmma with N < 64 (a score GEMM too narrow for the tensor cores); an sm_90
# forward whose tiles are not loaded with TMA (cp.async.bulk.tensor); and pipelined variants whose main
# loop lost what they are for (PIPELINED_LOOP below).

AOT_ARCHS = (80, 90)
SMEM_LIMIT = {80: 166912, 90: 232448}
# The known spills, (triton major.minor, kernel, config, path, sequence ids) -> bytes; any other spill, or a
# bigger one, fails. Why they stay:
# - sm_90 dK/dV in its first form (K and V re-read every iteration, 1 stage), Triton 3.6: 36-40 bytes; no
#   tile with wgmma N >= 64 avoids them (the pipelined variant beside it has none).
# - the sm_90 pointer fallback (head dims not a multiple of 8, misaligned views: rare) holds pointer tiles and
#   masks in registers beside the accumulators. Its dK/dV tile spills least (44 bytes with 3.6, was 344);
#   measured with 3.6 at D = 128: 64x64 w4 s1 220 bytes, s2 548; 64x128 w8 s2 424; 128x64 w8 s1 308.
# - Triton 3.9 (not what the GPU machines run) with the pipelined variants: its loop scheduler issues the
#   forward's next q k^T after the softmax rather than before it, and its ptxas spills in both; with 3.6
#   both are spill-free and keep their schedule (_pipelined_loop_problems is checked for AOT_TRITON only).
ALLOWED_SPILL = {
    ("3.6", "_attn_bwd_dkdv", "64x128 w8 s1", "tma", False): 40,
    ("3.6", "_attn_bwd_dkdv", "64x128 w8 s1", "tma", True): 36,
    ("3.6", "_attn_bwd_dkdv", "64x128 w8 s1", "pointers", False): 44,
    ("3.9", "_attn_bwd_dkdv", "64x128 w8 s1", "pointers", False): 128,
    ("3.9", "_attn_bwd_dkdv", "64x64 w4 s2", "pointers", False): 32,
    ("3.9", "_attn_fwd", "64x64 w4 s3", "pointers", False): 24,
    ("3.9", "_attn_fwd", "128x128 w8 s2 pipeline", "tma", False): 100,
    ("3.9", "_attn_bwd_dkdv", "64x128 w8 s2 pipeline", "tma", False): 32,
}
AOT_TRITON = os.environ.get("AOT_TRITON", "3.6.0")  # what the H100/H200 machines run (with torch 2.11)
AOT_CACHE = Path(os.environ.get("AOT_CACHE", Path.home() / ".cache" / "mpt-aot"))
ROOT = Path(__file__).resolve().parents[1]


def _aot_triton_path():
    """A folder holding triton==AOT_TRITON (pip install --target on first use), or None for the installed one."""
    if AOT_TRITON == triton.__version__:
        return None
    target = AOT_CACHE / f"triton-{AOT_TRITON}"
    if not (target / "triton" / "__init__.py").is_file():
        AOT_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=AOT_CACHE))
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                            f"triton=={AOT_TRITON}"], capture_output=True, text=True)
        assert r.returncode == 0, f"pip install triton=={AOT_TRITON} failed (network?):\n{r.stderr[-2000:]}"
        try:
            tmp.rename(target)  # atomic: a half-finished install is never taken for a whole one
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pipelined_loop_problems(r):
    """What a pipelined variant's main loop (sm_90, TMA, D = 128) must keep, as problems found: the forward
    issues every exp2 with q k^T of the next block in flight and waits for wgmma once per iteration; the
    dK/dV kernel's loop waits at most twice, loads only Q, dO (and the next tile's dO), LSE and delta (K and
    V once, before the loop) and does not touch local memory."""
    job, loop = r["job"], r.get("loop")
    if "pipeline" not in r["label"] or job["arch"] < 90 or job["head_dim"] != 128 or r["triton"] != AOT_TRITON:
        return []
    if job["kernel"] == "_attn_fwd":
        wrong = {"ex2_in_flight": loop["ex2_in_flight"] != loop["ex2"], "waits": loop["waits"] > 1}
    else:
        wrong = {"waits": loop["waits"] > 2, "tma_loads": loop["tma_loads"] > 5, "spill": loop["spill"] > 0}
    return [what for what, bad in wrong.items() if bad]


def test_aot_compile(tmp_path):
    folder = _aot_triton_path()
    # the checks that need the GPU tables (no interpreter), meanwhile in another process
    checks = subprocess.Popen([sys.executable, __file__, "--aot-checks"], env=dict(os.environ, TRITON_INTERPRET="0"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "sass.json"
    jobs = "full" if os.environ.get("AOT_FULL") == "1" else "aot"
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--mode=sass", f"--sass_jobs={jobs}",
                        f"--sass_triton={folder or ''}", f"--json={out}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"bench.py --mode=sass failed:\n{r.stderr[-4000:]}"
    print(r.stdout)
    results = json.loads(out.read_text())["rows"]
    versions = sorted({r["triton"] for r in results})
    assert len(versions) == (2 if folder else 1) and AOT_TRITON in versions, versions
    sm90 = [r for r in results if r["job"]["arch"] >= 90 and r["kernel"] != "_bwd_preprocess"]
    allowed = lambda r: ALLOWED_SPILL.get((r["triton"].rsplit(".", 1)[0], r["kernel"], r["label"], r["path"], r["seq"]),
                                          0)
    failures = {
        "register spills": [r for r in results if r["spill"] > allowed(r)],
        "shared memory over the arch's limit": [r for r in results if r["smem"] > SMEM_LIMIT[r["job"]["arch"]]],
        "ptxas: wgmma serialized": [r for r in results if r["serialized"]],
        "sm_90 kernel without wgmma (HGMMA)": [r for r in sm90 if not r["hgmma"]],
        "sm_90 wgmma with N < 64": [r for r in sm90 if min(r["wgmma_n"], default=0) < 64],
        "sm_90 forward without TMA loads": [r for r in sm90 if r["kernel"] == "_attn_fwd" and r["job"]["tma"]
                                            and (r["tma_loads"] == 0 or r["cp_async"])],
        "pipelined variant's main loop": [r for r in sm90 if _pipelined_loop_problems(r)],
    }
    problems = {what: [(r["triton"], r["job"], r["label"], _pipelined_loop_problems(r) or r["spill"]) for r in rs]
                for what, rs in failures.items() if rs}
    assert not problems, "\n".join(f"{what}: {rs}" for what, rs in problems.items())
    _, err = checks.communicate()
    assert checks.returncode == 0, f"--aot-checks failed:\n{err[-4000:]}"


def _aot_checks():
    assert not fa._INTERPRET  # the autotune tables differ under the interpreter
    # the autotuner's pruning (which only runs on a GPU) leaves each kernel a config for every arch, head
    # dim and Tq (decode or not)
    import itertools
    for kernel in (fa._attn_fwd, fa._attn_bwd_dkdv, fa._attn_bwd_dq):
        for cap in AOT_ARCHS:
            fa._arch = lambda device, cap=cap: cap
            for block_d, tq_bucket, seq, tma, fuse_dq in itertools.product((16, 32, 64, 128), (1, 16, 32, 4096),
                                                                           (False, True), (False, cap >= 90),
                                                                           (True, False)):
                args = {"DOC_START": torch.empty(0), "tq_bucket": tq_bucket}
                meta = dict(BLOCK_D=block_d, HAS_SEQ=seq, TMA=tma, FUSE_DQ=fuse_dq)
                assert kernel.early_config_prune(kernel.configs, args, **meta), (kernel.fn.__name__, cap, meta)
    # without the interpreter the module must refuse CPU tensors with a useful message
    with pytest.raises(ValueError, match="attn_impl='torch'"):
        fa.flash_attn_alibi(*(torch.zeros(1, 1, 4, 16) for _ in range(3)))


if __name__ == "__main__" and sys.argv[1:2] == ["--aot-checks"]:
    _aot_checks()


@pytest.mark.parametrize("kv_n_heads,deterministic", [(None, False), (3, False), (3, True)])
def test_model_with_triton_matches_torch(kv_n_heads, deterministic):
    # the whole model: attn_impl='triton' against the 'torch' reference, logits and every gradient
    # (attn_deterministic picks the backward with the separate dQ kernel)
    require_kernels()
    from dataclasses import replace

    from model import MPT, MPTConfig
    config = MPTConfig(vocab_size=61, d_model=96, n_heads=6, kv_n_heads=kv_n_heads, n_layers=2, max_seq_len=64,
                       clip_qkv=2.0, attn_impl='torch')
    torch.manual_seed(0)
    reference = MPT(config)
    ours = MPT(replace(config, attn_impl='triton', attn_deterministic=deterministic))
    ours.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(2))
    results = []
    for model in (reference, ours):
        model = model.to(DEVICE, DTYPE)
        logits, loss = model(idx.to(DEVICE), targets.to(DEVICE))
        loss.backward()
        results.append((logits.double().cpu(), loss.item(), {n: p.grad.double().cpu() for n, p in model.named_parameters()}))
    (logits_ref, loss_ref, grads_ref), (logits, loss, grads) = results
    tol = TOL[DTYPE] * 10  # errors compound over two layers and the loss
    assert (logits - logits_ref).abs().max() <= tol * max(1.0, logits_ref.abs().max())
    assert abs(loss - loss_ref) <= tol
    for name, g in grads_ref.items():
        assert (grads[name] - g).abs().max() <= tol * max(1.0, g.abs().max()), name


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "sequence-id"])
def test_compiled_block_has_no_graph_break(packed):
    # the kernels are custom ops with fake versions and a registered autograd: torch.compile sees one graph
    # per block (fullgraph=True raises on any graph break). On the CPU the 'aot_eager' backend traces
    # exactly what Inductor would (Dynamo, then AOTAutograd through the fake ops) without spending ~20 s on
    # C++ codegen; on a GPU it is Inductor. The compiled block's output and gradients equal the eager ones.
    require_kernels()
    import torch._dynamo

    from model import Block, MPTConfig
    config = MPTConfig(vocab_size=61, d_model=64, n_heads=4, kv_n_heads=2, n_layers=1, attn_impl='triton',
                       attn_uses_sequence_id=packed)
    torch.manual_seed(0)
    block = Block(config).to(DEVICE, DTYPE)
    x = torch.randn(2, 37, 64, device=DEVICE, dtype=DTYPE, requires_grad=True)
    slopes = alibi_slopes(4).to(DEVICE)
    ids = torch.tensor([0] * 10 + [1] * 20 + [2] * 7, device=DEVICE).repeat(2, 1) if packed else None
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        fn = torch.compile(block, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager") \
            if compiled else block
        y = fn(x, slopes, None, ids)
        y.backward(torch.ones_like(y))
        results.append([y.detach()] + [t.grad.clone() for t in (x, *block.parameters())])
        for t in (x, *block.parameters()):
            t.grad = None
    explained = torch._dynamo.explain(block)(x, slopes, None, ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    tol = TOL[DTYPE]
    for eager, compiled in zip(*results):
        assert (eager.double() - compiled.double()).abs().max() <= tol * max(1.0, eager.abs().max().item())


def test_decoding_does_not_retune(monkeypatch):
    # KV-cache decoding: one query against 1, 2, ..., 300 keys. The forward's autotune key (what a new tuning
    # run is triggered by) must stay the same at every step: Tk is not part of it. Prefill lengths may retune
    # per power of two of Tq. The launches are recorded (their arguments by name), not run.
    require_kernels()
    keys, arg_names = [], fa._attn_fwd.arg_names

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(arg_names, args), **kwargs)
                keys.append(tuple(named[k] for k in fa.FWD_KEY))
                assert named["Tq"] == 1 or named["tq_bucket"] > fa.DECODE_MAX_TQ
            return launch

    monkeypatch.setattr(fa, "_attn_fwd", Recorder())
    k = torch.zeros(1, 2, 300, 32, device=DEVICE, dtype=DTYPE)
    q = torch.zeros(1, 2, 1, 32, device=DEVICE, dtype=DTYPE)
    for t in range(1, 301):
        fa.flash_attn_alibi(q, k[:, :, :t], k[:, :, :t], alibi_slopes=alibi_slopes(2).to(DEVICE))
    assert len(keys) == 300 and len(set(keys)) == 1
    assert set(keys).pop()[fa.FWD_KEY.index("tq_bucket")] <= fa.DECODE_MAX_TQ  # the decode configs serve it
    for t in (100, 128, 200, 256):  # prefill: Tq = Tk, one key per power of two
        fa.flash_attn_alibi(k[:, :, :t], k[:, :, :t], k[:, :, :t])
    assert len(set(keys)) == 1 + 2


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the first document's rows, under the interpreter
def test_sequence_id_skips_earlier_documents(variant):
    # Two documents, 128 and 64 tokens (block-aligned for every tile size). The first one's keys and values
    # are NaN: the second document's outputs and gradients can only be finite (and right) if no block of the
    # first document is ever loaded for it, i.e. its key blocks are skipped, not merely masked.
    require_kernels()
    if variant and DEVICE == "cpu":
        pytest.skip("the other variants do not serve sequence ids")
    B, H, D, T, split = 1, 2, 32, 192, 128
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).to(DEVICE, DTYPE) for _ in range(3))
    k[:, :, :split] = float("nan")
    v[:, :, :split] = float("nan")
    ids = torch.tensor([[0] * split + [1] * (T - split)], device=DEVICE)
    slopes = alibi_slopes(H).to(DEVICE)
    for deterministic in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fa.flash_attn_alibi(*leaves, alibi_slopes=slopes, sequence_id=ids, deterministic=deterministic)
        dout = torch.randn(out.shape, generator=gen).to(DEVICE, DTYPE)
        dout[:, :, :split] = 0
        out.backward(dout)
        tail = [x.detach()[:, :, split:].cpu().double().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*tail, slopes.cpu(), True, 1 / math.sqrt(D))
        ref.backward(dout[:, :, split:].cpu().double())
        for got, want in [(out, ref)] + [(x.grad, y.grad) for x, y in zip(leaves, tail)]:
            got = got.detach()[:, :, split:].cpu().double()
            assert torch.isfinite(got).all()
            assert (got - want).abs().max().item() <= TOL[DTYPE] * max(1.0, want.abs().max().item())
