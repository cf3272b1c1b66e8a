"""Tests for the Triton flash attention with in-kernel ALiBi (attn_impl='triton').

Without a GPU the kernels run under the Triton interpreter, which tests/conftest.py switches on before
triton is first imported (Triton picks interpreter or compiler when @triton.jit runs, not when a kernel
launches). With a GPU they run the real kernels (bf16 where the CPU run uses fp32). test_aot_compile
builds every kernel and autotune config for sm_80 and sm_90 without any GPU.
"""
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import triton

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


def reference_attention(q, k, v, slopes, causal, scale):
    """The same math written out plainly in float64: explicit scores, bias slope * (j - i_abs) with
    i_abs = i + Tk - Tq, bottom-right causal mask, softmax, and zeros for rows that see no key."""
    q, k, v = q.double(), k.double(), v.double()
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    i_abs = torch.arange(Tq).view(Tq, 1) + (Tk - Tq)
    j = torch.arange(Tk).view(1, Tk)
    if slopes is not None:
        scores = scores + slopes.double().view(1, H, 1, 1) * (j - i_abs)
    visible = j <= i_abs if causal else torch.ones(Tq, Tk, dtype=torch.bool)
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


def check_attention(B, H, H_kv, Tq, Tk, D, causal, alibi, layout, dtype, seed=0):
    require_kernels()
    gen = torch.Generator().manual_seed(seed)
    leaves, split = make_inputs(B, H, H_kv, Tq, Tk, D, dtype, layout, gen)
    slopes = alibi_slopes(H).to(DEVICE) if alibi else None
    out = fa.flash_attn_alibi(*split(*leaves), alibi_slopes=slopes, causal=causal)
    assert out.shape == (B, H, Tq, D) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # (B, Tq, H, D) memory: the model's reshape is free
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    out.backward(dout)

    leaves64 = [x.detach().cpu().double().requires_grad_() for x in leaves]
    ref = reference_attention(*split(*leaves64), slopes.cpu() if alibi else None, causal, 1 / math.sqrt(D))
    ref.backward(dout.cpu().double())
    for name, got, want in [("out", out, ref)] + [(f"grad{i}", x.grad, y.grad)
                                                   for i, (x, y) in enumerate(zip(leaves, leaves64))]:
        got = got.detach().cpu().double()
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err <= TOL[dtype], f"{name}: error {err:.2e} > {TOL[dtype]:.0e}"
    if causal and Tq > Tk:  # the first Tq - Tk query rows see no key at all: exactly zero, no NaN
        assert (out[:, :, : Tq - Tk] == 0).all()


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


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_attention_matches_reference(case):
    check_attention(*case, dtype=DTYPE)


@pytest.mark.parametrize("case", FP16_CASES, ids=_id)
def test_attention_fp16(case):
    check_attention(*case, dtype=torch.float16)


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
# Ahead-of-time compilation for real GPUs, no GPU needed: every kernel x autotune config is compiled for
# sm_80 and sm_90 by a worker process started without the interpreter (this file run as a script), in
# parallel. Register spills fail the test; so does an sm_90 forward without wgmma (SASS HGMMA).

AOT_ARCHS = (80, 90)


def _aot_jobs(full=False):
    """(kernel, config index, arch, dtype, head dim, causal). By default each config is built at the
    largest head dim it serves (bf16, causal: the most registers) and once more in fp16 at a padded head
    dim (masked loads, non-causal); AOT_FULL=1 builds D in {64, 80, 112, 128} x both dtypes x causal."""
    jobs = []
    tables = {"_attn_fwd": fa.FWD_TUNING, "_attn_bwd_dkdv": fa.DKDV_TUNING, "_attn_bwd_dq": fa.DQ_TUNING}
    for name, tuning in tables.items():
        for idx, (_, archs, max_block_d) in enumerate(tuning):
            dims = [d for d in (64, 80, 112, 128) if triton.next_power_of_2(d) <= max_block_d]
            for cap in archs:
                if full:
                    jobs += [(name, idx, cap, dt, d, c) for dt in ("fp16", "bf16") for d in dims for c in (True, False)]
                else:
                    jobs += [(name, idx, cap, "bf16", dims[-1], True), (name, idx, cap, "fp16", dims[-2:][0], False)]
    jobs += [("_bwd_preprocess", None, cap, "bf16", 128, True) for cap in AOT_ARCHS]
    return jobs


def _ptxas_usage(ptxas, ptx, cap, tmp):
    """Registers and spill-store bytes that this ptxas gives the PTX, via ptxas -v."""
    from triton.backends.nvidia.compiler import ptx_get_version, sm_arch_from_capability
    major, minor = divmod(ptx_get_version(ptxas.version), 10)  # the newest PTX ISA this ptxas reads
    path = os.path.join(tmp, "legacy.ptx")
    with open(path, "w") as f:
        f.write(re.sub(r"^\.version \S+", f".version {major}.{minor}", ptx, flags=re.M))
    log = subprocess.run([ptxas.path, "-v", f"--gpu-name={sm_arch_from_capability(cap)}", path, "-o", path + ".o"],
                         capture_output=True, text=True, check=True).stderr
    regs, spill = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)), int(spill.group(1))


def _aot_compile(job):
    """Runs in the worker: compile one job; report registers and stack bytes (spills) of the cubin, whether
    its SASS uses wgmma (HGMMA), and for sm_90 also the spills with the older ptxas that Triton <= 3.8
    (the GPU machines run 3.6) used for sm_90 where this Triton ships it: a newer ptxas allocates differently."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    name, idx, cap, dt, head_dim, causal = job
    meta = fa._meta(head_dim, causal, slopes=True, dtype=None)  # HEAD_DIM, BLOCK_D, CAUSAL, HAS_ALIBI, ...
    if name == "_bwd_preprocess":  # launched as in _attn_backward, with Triton's default warps/stages
        fn, options = fa._bwd_preprocess, dict(num_warps=4, num_stages=3)
        meta = dict(HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=128)
    else:
        config = getattr(fa, name).configs[idx]
        fn, options = getattr(fa, name).fn, dict(num_warps=config.num_warps, num_stages=config.num_stages)
        meta.update(config.kwargs)
    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in ("LSE", "DELTA", "SLOPES"):
            signature[p.name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif p.name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            signature[p.name] = "*" + dt
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in ("qk_scale", "sm_scale"):
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
            if p.name.startswith("stride_"):  # as the JIT specializes them for the model's layouts
                attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.time()
    compiled = triton.compile(ASTSource(fn, signature, meta, attrs), target=GPUTarget("cuda", cap, 32),
                              options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout if cap >= 90 else ""
        legacy = triton.knobs.nvidia.ptxas
        legacy = (_ptxas_usage(legacy, compiled.asm["ptx"], cap, tmp)
                  if cap >= 90 and os.path.exists(legacy.path) and legacy.path != get_ptxas(cap).path else (None, None))
    return dict(job=list(job), regs=int(re.search(r"REG:(\d+)", usage).group(1)),
                stack=int(re.search(r"STACK:(\d+)", usage).group(1)), legacy_regs=legacy[0], legacy_spill=legacy[1],
                hgmma="HGMMA" in sass, smem=compiled.metadata.shared, seconds=round(time.time() - start, 1))


def test_aot_compile():
    n_workers = max(1, min(os.cpu_count() or 1, 8))
    full = "1" if os.environ.get("AOT_FULL") == "1" else "0"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    start = time.time()
    workers = [subprocess.Popen([sys.executable, __file__, "--aot", str(i), str(n_workers), full], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n_workers)]
    results, n_jobs = [], set()
    for w in workers:
        out, err = w.communicate()
        assert w.returncode == 0, f"AOT worker failed:\n{err[-4000:]}"
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        n_jobs |= {r["n_jobs"] for r in lines if "n_jobs" in r}
        results += [r for r in lines if "job" in r]
    assert len(n_jobs) == 1 and len(results) == n_jobs.pop()
    for r in sorted(results, key=lambda r: r["job"][:3]):
        legacy = f"(older ptxas: regs {r['legacy_regs']} spill {r['legacy_spill']})" if r["legacy_regs"] else ""
        print("{:15s} cfg {} sm_{} {} D={} causal={}".format(*r["job"]), f"regs {r['regs']} stack {r['stack']}",
              legacy, f"smem {r['smem']}", "hgmma" if r["hgmma"] else "", f"{r['seconds']}s")
    print(f"{len(results)} compiles in {time.time() - start:.0f}s with {n_workers} workers")
    spills = [(r["job"], r["stack"], r["legacy_spill"]) for r in results if r["stack"] or r["legacy_spill"]]
    assert not spills, f"register spills (job, stack bytes, older-ptxas spill bytes): {spills}"
    no_wgmma = [r["job"] for r in results if r["job"][0] == "_attn_fwd" and r["job"][2] == 90 and not r["hgmma"]]
    assert not no_wgmma, f"sm_90 forward without wgmma: {no_wgmma}"


def _aot_worker(index, n_workers, full):
    assert not fa._INTERPRET  # the autotune tables differ under the interpreter
    jobs = _aot_jobs(full)
    print(json.dumps({"n_jobs": len(jobs)}), flush=True)
    for job in jobs[index::n_workers]:
        print(json.dumps(_aot_compile(job)), flush=True)
    # the autotuner's pruning (which only runs on a GPU) leaves each kernel a config for every arch and head dim
    if index == 0:
        for kernel in (fa._attn_fwd, fa._attn_bwd_dkdv, fa._attn_bwd_dq):
            for cap in AOT_ARCHS:
                fa._arch = lambda device, cap=cap: cap
                for block_d in (16, 32, 64, 128):
                    assert kernel.early_config_prune(kernel.configs, {"Q": torch.empty(0)}, BLOCK_D=block_d), \
                        (kernel.fn.__name__, cap, block_d)
    # without the interpreter the module must refuse CPU tensors with a useful message
    with pytest.raises(ValueError, match="attn_impl='torch'"):
        fa.flash_attn_alibi(*(torch.zeros(1, 1, 4, 16) for _ in range(3)))


if __name__ == "__main__" and sys.argv[1:2] == ["--aot"]:
    _aot_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")


@pytest.mark.parametrize("kv_n_heads", [None, 3])
def test_model_with_triton_matches_torch(kv_n_heads):
    # the whole model: attn_impl='triton' against the 'torch' reference, logits and every gradient
    require_kernels()
    from dataclasses import replace

    from model import MPT, MPTConfig
    config = MPTConfig(vocab_size=61, d_model=96, n_heads=6, kv_n_heads=kv_n_heads, n_layers=2, max_seq_len=64,
                       clip_qkv=2.0, attn_impl='torch')
    torch.manual_seed(0)
    reference = MPT(config)
    ours = MPT(replace(config, attn_impl='triton'))
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
