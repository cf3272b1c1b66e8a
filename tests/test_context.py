"""Context parallelism (context.py): a (query chunk, key chunk) pair at any offset against float64, chunks
merged by LSE equal to the whole sequence, and the ring over 2 and 4 gloo processes equal to one process."""
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import context  # noqa: E402
import model  # noqa: E402  (tests/conftest.py imported it first, with TRITON_INTERPRET=1 on a CPU)
from model import alibi_slopes, torch_attention  # noqa: E402

KERNEL = model._INTERPRET or torch.cuda.is_available()
DEVICE = "cpu" if model._INTERPRET or not torch.cuda.is_available() else "cuda"
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
needs_kernel = pytest.mark.skipif(not KERNEL, reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")


def reference_pair(q, k, v, slopes, off, causal, scale, q_ids=None, k_ids=None):
    """float64, written out: query row i at key position i + off, bias slope * (j - i - off), keys j > i + off
    masked (causal), other documents masked; (o, lse) with lse -inf and o 0 for a row that sees no key."""
    q, k, v = q.double(), k.double(), v.double()
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    i = torch.arange(Tq).view(Tq, 1) + off
    j = torch.arange(Tk).view(1, Tk)
    if slopes is not None:
        s = s + slopes.double().view(1, H, 1, 1) * (j - i)
    visible = (j <= i) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    visible = visible.expand(q.shape[0], 1, Tq, Tk)
    if q_ids is not None:
        visible = visible & (q_ids[:, None, :, None] == k_ids[:, None, None, :])
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(lse == -math.inf, 0)[..., None])
    return p @ v, lse


def qkv(B, H, H_kv, Tq, Tk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g).to(dtype) for h, T in ((H, Tq), (H_kv, Tk), (H_kv, Tk))]


# (Tq, Tk, off_shift, causal): offsets negative (keys after the queries; some rows see nothing), zero, inside the
# key chunk, and >= Tk (every key before every query); ragged lengths, both ways round
PAIRS = [(100, 257, -40, True), (100, 257, 0, True), (100, 257, 157, True), (100, 257, 300, False),
         (257, 100, -157, True), (257, 100, 0, False), (257, 100, 100, True)]


@needs_kernel
@pytest.mark.parametrize("Tq,Tk,off,causal", PAIRS)
def test_kernel_pair_matches_float64(Tq, Tk, off, causal):
    # the kernel told a pair's offset, with GQA (2 query heads on 1 kv head): its outputs and LSE, and its
    # backward given the (here: the pair's own) LSE and delta, against float64
    H, H_kv, D = 2, 1, 32
    q, k, v = qkv(1, H, H_kv, Tq, Tk, D, seed=off % 97)
    slopes, scale = alibi_slopes(H), 1 / math.sqrt(D)
    o_ref, lse_ref = reference_pair(q, k, v, slopes, off, causal, scale)
    o, lse = context.kernel_pair_forward(*(x.to(DEVICE) for x in (q, k, v)), slopes.to(DEVICE), off, causal, scale)
    assert torch.allclose(o.cpu().double(), o_ref, atol=2e-5)
    seen = lse_ref > -math.inf
    assert torch.equal(lse.cpu() > -math.inf, seen) and torch.allclose(lse.cpu().double()[seen], lse_ref[seen], atol=2e-5)
    # the backward: autograd of the float64 reference against the kernel given lse and delta
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o_d, _ = reference_pair(qd, kd, vd, slopes, off, causal, scale)
    o_d.backward(do)
    delta = (do * o_ref).sum(-1).float()
    g = context.kernel_pair_backward(do.float().to(DEVICE), *(x.to(DEVICE) for x in (q, k, v)), slopes.to(DEVICE),
                                     off, causal, scale, lse_ref.float().to(DEVICE), delta.to(DEVICE))
    for got, want in zip(g, (qd.grad, kd.grad, vd.grad)):
        assert torch.allclose(got.cpu().double(), want, atol=1e-4), (got.cpu().double() - want).abs().max()


@pytest.mark.parametrize("Tq,Tk,off,causal", PAIRS)
def test_torch_pair_matches_float64(Tq, Tk, off, causal):
    # the plain-PyTorch pair (what ring attention runs on a CPU), with document ids, forward and backward
    H, H_kv, D = 4, 1, 16
    q, k, v = qkv(2, H, H_kv, Tq, Tk, D, seed=3)
    slopes, scale = alibi_slopes(H), 0.3
    q_ids = torch.arange(Tq).div(40, rounding_mode='floor').view(1, -1).repeat(2, 1) + 2
    k_ids = torch.arange(Tk).div(70, rounding_mode='floor').view(1, -1).repeat(2, 1)
    o_ref, lse_ref = reference_pair(q, k, v, slopes, off, causal, scale, q_ids, k_ids)
    o, lse = context.torch_pair_forward(q, k, v, slopes, off, causal, scale, q_ids, k_ids)
    assert torch.allclose(o.double(), o_ref, atol=1e-5) and torch.allclose(lse.double(), lse_ref, atol=1e-5)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference_pair(qd, kd, vd, slopes, off, causal, scale, q_ids, k_ids)[0].backward(do)
    g = context.torch_pair_backward(do.float(), q, k, v, slopes, off, causal, scale, lse_ref.float(),
                                    (do * o_ref).sum(-1).float(), q_ids, k_ids)
    for got, want in zip(g, (qd.grad, kd.grad, vd.grad)):
        assert torch.allclose(got.double(), want, atol=1e-4)


def test_zigzag_round_trip():
    x = torch.arange(2 * 24).view(2, 24)
    for n in (1, 2, 3, 4):
        parts = [context.zigzag(x, r, n) for r in range(n)]
        assert torch.equal(context.unzigzag(parts), x)
        assert parts[0][:, :24 // (2 * n)].equal(x[:, :24 // (2 * n)])  # rank 0 holds the first chunk


def documents(B, T, seed):
    """Packed document ids (B, T): documents of random lengths, crossing chunk (and rank) boundaries."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        cuts = torch.randint(1, T, (5,), generator=g)
        for c in cuts:
            ids[b, c:] += 1
    return ids


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_kernel)])
@pytest.mark.parametrize("n,docs", [(2, False), (4, False), (2, True), (4, True)])
def test_chunks_merged_equal_the_whole_sequence(impl, n, docs):
    # every rank's pairs, computed here in one process in ring order and merged by LSE, give attention over the
    # whole sequence (outputs), and the pairs' backward given the merged LSE and delta its gradients
    B, H, H_kv, c, D = 2, 4, 2, 13, 16
    T = 2 * n * c
    q, k, v = qkv(B, H, H_kv, T, T, D, seed=n)
    slopes, scale = alibi_slopes(H), 1 / math.sqrt(D)
    ids = documents(B, T, n) if docs else None
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch_attention(*leaves, slopes, causal=True, softmax_scale=scale, sequence_id=ids)
    do = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    want.backward(do)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    Q, K, V = ([dev(context.zigzag(x, r, n, dim=2)) for r in range(n)] for x in (q, k, v))
    I = [dev(context.zigzag(ids, r, n)) if docs else None for r in range(n)]
    DO = [dev(context.zigzag(do, r, n, dim=2)) for r in range(n)]
    s = dev(slopes)
    sl = lambda h: slice(h * c, (h + 1) * c)  # noqa: E731
    outs, lses = [], []
    for r in range(n):
        o = torch.zeros(B, H, 2 * c, D, device=DEVICE)
        lse = torch.full((B, H, 2 * c), -math.inf, device=DEVICE)
        for step in range(n):
            kr = (r - step) % n
            for qh, kh, off, causal in context.pairs(r, kr, n, c):
                op, lp = context._pair_forward(impl, Q[r][:, :, sl(qh)], K[kr][:, :, sl(kh)], V[kr][:, :, sl(kh)], s,
                                               off, causal, scale, None if not docs else I[r][:, sl(qh)],
                                               None if not docs else I[kr][:, sl(kh)])
                o[:, :, sl(qh)], lse[:, :, sl(qh)] = context.merge(o[:, :, sl(qh)], lse[:, :, sl(qh)], op, lp)
        outs.append(o)
        lses.append(lse)
    merged = context.unzigzag([o.cpu() for o in outs], dim=2)
    assert torch.allclose(merged, want.detach(), atol=1e-5)
    if impl == 'triton':  # and the kernel on the whole sequence: its outputs, and below its gradients
        kernel_leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
        whole = model.flash_attn_alibi(*kernel_leaves, s, softmax_scale=scale,
                                       sequence_id=None if ids is None else ids.to(DEVICE))
        whole.backward(do.to(DEVICE))
        assert torch.allclose(merged, whole.detach().cpu(), atol=1e-5)
    dq = [torch.zeros(B, H, 2 * c, D) for _ in range(n)]
    dk = [torch.zeros(B, H_kv, 2 * c, D) for _ in range(n)]
    dv = [torch.zeros(B, H_kv, 2 * c, D) for _ in range(n)]
    for r in range(n):
        delta = (DO[r] * outs[r]).sum(-1)
        for kr in range(n):
            for qh, kh, off, causal in context.pairs(r, kr, n, c):
                g = context._pair_backward(impl, DO[r][:, :, sl(qh)], Q[r][:, :, sl(qh)], K[kr][:, :, sl(kh)],
                                           V[kr][:, :, sl(kh)], s, off, causal, scale,
                                           lses[r][:, :, sl(qh)].contiguous(), delta[:, :, sl(qh)].contiguous(),
                                           None if not docs else I[r][:, sl(qh)], None if not docs else I[kr][:, sl(kh)])
                dq[r][:, :, sl(qh)] += g[0].float().cpu()
                dk[kr][:, :, sl(kh)] += g[1].float().cpu()
                dv[kr][:, :, sl(kh)] += g[2].float().cpu()
    for i, (got, leaf) in enumerate(zip((dq, dk, dv), leaves)):
        assert torch.allclose(context.unzigzag(got, dim=2), leaf.grad, atol=1e-4)
        if impl == 'triton':
            assert torch.allclose(context.unzigzag(got, dim=2), kernel_leaves[i].grad.cpu(), atol=1e-4)


# ---- the ring over gloo processes ----------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ring_worker(rank, n, port, impl, docs, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    B, H, H_kv, c, D = 2, 4, 2, 13, 16
    T = 2 * n * c
    q, k, v = qkv(B, H, H_kv, T, T, D, seed=7)
    ids = documents(B, T, 11) if docs else None
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(8))
    mine = [context.zigzag(x, rank, n, dim=2).requires_grad_() for x in (q, k, v)]
    y = context.ring_attention(*mine, alibi_slopes(H), dist.group.WORLD, 1 / math.sqrt(D), impl,
                               None if ids is None else context.zigzag(ids, rank, n))
    y.backward(context.zigzag(do, rank, n, dim=2))
    torch.save([y.detach(), *(x.grad for x in mine)], Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_kernel)])
@pytest.mark.parametrize("n,docs", [(2, False), (4, True)])
def test_ring_attention_over_processes_equals_one_process(tmp_path, impl, n, docs):
    # n gloo processes, one sequence zigzagged over them (packed documents crossing chunk boundaries in one case):
    # the ring's outputs and gradients are the one-process attention's
    if impl == "triton" and DEVICE != "cpu":
        pytest.skip("the spawned processes run the kernel under the interpreter, on the CPU")
    if impl == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # for the spawned processes' first `import triton`
    try:
        mp.spawn(_ring_worker, args=(n, _free_port(), impl, docs, str(tmp_path)), nprocs=n, join=True)
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
    B, H, H_kv, c, D = 2, 4, 2, 13, 16
    T = 2 * n * c
    q, k, v = (x.requires_grad_() for x in qkv(B, H, H_kv, T, T, D, seed=7))
    ids = documents(B, T, 11) if docs else None
    want = torch_attention(q, k, v, alibi_slopes(H), causal=True, softmax_scale=1 / math.sqrt(D), sequence_id=ids)
    want.backward(torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(8)))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(n)]
    for i, ref in enumerate((want.detach(), q.grad, k.grad, v.grad)):
        got = context.unzigzag([p[i] for p in parts], dim=2)
        assert torch.allclose(got, ref, atol=1e-5 if i == 0 else 1e-4), (i, (got - ref).abs().max())
