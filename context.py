"""
Context parallelism: one sequence over the N processes of a group, attention passed around them as a ring.

No library does this with ALiBi (torch's context_parallel refuses an attention bias, ring-flash-attention and
Transformer Engine assert there are no ALiBi slopes), because their kernels cannot be told where a chunk sits.
Ours computes the bias from positions inside the kernel, so it only needs each pair's offset.

Layout (zigzag): a sequence of T tokens is cut into 2N chunks of c = T / 2N; rank r holds chunks r and 2N-1-r,
concatenated (2c tokens). With the causal mask the early chunks see few keys and the late ones many, so each
rank holds one of each and every ring step costs every rank the same.

Ring: each rank keeps its queries; keys and values (and in the backward their fp32 gradients) move one hop per
step, the next hop's transfer in flight while this step computes. A step scores the local query chunks against
the visiting key chunks, pair by pair: the same chunk (the diagonal: causal), a later query chunk against an
earlier key chunk (every key visible: no mask), or an earlier query chunk (nothing visible: skipped). Pairs are
merged by their log-sum-exps (LSE); the backward gives every pair the merged LSE and delta = rowsum(dO * O), so
each pair's gradients are exactly its share of the one-sequence gradient.

Pairs run on model.py's Triton kernel (attn_impl='triton', its off_shift argument) or in plain PyTorch (the
reference, also what runs on a CPU). Units here: natural-log LSEs, -inf for a row that sees no key.
"""

import contextlib
import math

import torch
import torch.distributed as dist

import model
from common import print0

LOG2E = 1.4426950408889634


# -----------------------------------------------------------------------------
# the zigzag layout

def chunk_ids(rank, n):
    """The two chunks (of 2n) that rank holds, in its order."""
    return rank, 2 * n - 1 - rank


def zigzag(x, rank, n, dim=1):
    """x's whole-sequence dim `dim` (length T, a multiple of 2n) -> this rank's 2 chunks, concatenated."""
    chunks = x.chunk(2 * n, dim=dim)
    return torch.cat([chunks[i] for i in chunk_ids(rank, n)], dim=dim)


def unzigzag(parts, dim=1):
    """The inverse: every rank's zigzag (a list indexed by rank) -> the whole sequence."""
    n = len(parts)
    chunks = [None] * (2 * n)
    for r, part in enumerate(parts):
        chunks[r], chunks[2 * n - 1 - r] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


# -----------------------------------------------------------------------------
# one (query chunk, key chunk) pair. off_shift = q_start - k_start: query row i sits at key position
# i + off_shift, as in model.py's kernel. Forward -> (o, lse); backward given the merged lse and delta.

def torch_pair_forward(q, k, v, slopes, off_shift, causal, scale, q_ids=None, k_ids=None):
    """Plain PyTorch, fp32: (o (B, H, Tq, D), lse (B, H, Tq)). q_ids / k_ids: document ids (B, Tq) / (B, Tk)."""
    s, p = _torch_scores(q, k, slopes, off_shift, causal, scale, q_ids, k_ids)
    lse = torch.logsumexp(s, dim=-1)  # -inf where a row sees no key
    p = torch.exp(s - lse.masked_fill(lse == -math.inf, 0.0)[..., None])
    return p @ _expand(v, q).float(), lse


def torch_pair_backward(do, q, k, v, slopes, off_shift, causal, scale, lse, delta, q_ids=None, k_ids=None):
    """The pair's share of (dq, dk, dv), fp32, from the merged lse and delta (B, H, Tq)."""
    s, _ = _torch_scores(q, k, slopes, off_shift, causal, scale, q_ids, k_ids)
    p = torch.exp(s - lse.masked_fill(lse == -math.inf, math.inf)[..., None])  # (B, H, Tq, Tk)
    do = do.float()
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ _expand(v, q).float().transpose(-1, -2) - delta[..., None])
    dq = ds @ _expand(k, q).float() * scale
    dk = ds.transpose(-1, -2) @ q.float() * scale
    return dq, _reduce(dk, k), _reduce(dv, k)


def _torch_scores(q, k, slopes, off_shift, causal, scale, q_ids, k_ids):
    Tq, Tk = q.size(2), k.size(2)
    i = torch.arange(Tq, device=q.device).view(-1, 1) + off_shift  # query positions among the keys
    j = torch.arange(Tk, device=q.device).view(1, -1)
    s = q.float() @ _expand(k, q).float().transpose(-1, -2) * scale  # (B, H, Tq, Tk)
    if slopes is not None:
        s = s + slopes.float().view(1, -1, 1, 1) * (j - i)
    masked = (j > i) if causal else torch.zeros(Tq, Tk, dtype=torch.bool, device=q.device)
    if q_ids is not None:
        masked = masked | (q_ids[:, None, :, None] != k_ids[:, None, None, :])
    return s.masked_fill(masked, -math.inf), masked


def _expand(kv, q):  # GQA: (B, H_kv, T, D) -> (B, H, T, D)
    return kv.repeat_interleave(q.size(1) // kv.size(1), dim=1)


def _reduce(dkv, kv):  # GQA: the gradient of _expand
    B, H_kv, T, D = kv.shape
    return dkv.view(B, H_kv, -1, T, D).sum(2)


def kernel_pair_forward(q, k, v, slopes, off_shift, causal, scale, sequence_id=None):
    """The Triton kernel (model._attn_forward) for a pair: (o in q's dtype, lse fp32 natural). sequence_id:
    the chunk's document ids, for the diagonal pair only (off_shift 0, q and k the same chunk)."""
    o, lse = model._attn_forward(q, k, v, slopes, causal, scale, sequence_id, off_shift=off_shift)
    return o, _from_kernel_lse(lse, slopes)


def kernel_pair_backward(do, q, k, v, slopes, off_shift, causal, scale, lse, delta, sequence_id=None):
    """The kernel's backward for a pair, given the merged lse (natural) and delta: (dq fp32, dk, dv in q's dtype)."""
    B, H, Tq, _ = q.shape
    lse_k, delta_k = model._stats_empty(B, H, Tq, q), model._stats_empty(B, H, Tq, q)
    lse_k.copy_(_to_kernel_lse(lse, slopes))
    delta_k.copy_(delta)
    return model._attn_backward(do, q, k, v, None, lse_k, slopes, causal, scale, False, sequence_id,
                                off_shift=off_shift, delta=delta_k, fp32_dq=True)


def _frame(lse, slopes):
    # the kernel stores row i's base-2 LSE plus slope2 * (i % LSE_FRAME) (model.py, "ALiBi frames")
    if slopes is None:
        return 0.0
    i = torch.arange(lse.size(-1), device=lse.device) % model.LSE_FRAME.value
    return (slopes.float() * LOG2E).view(1, -1, 1) * i


def _from_kernel_lse(lse, slopes):
    true2 = lse - _frame(lse, slopes)
    return torch.where(torch.isinf(lse), -math.inf, true2 / LOG2E)  # the kernel's +inf: no visible key


def _to_kernel_lse(lse, slopes):
    return torch.where(lse == -math.inf, math.inf, lse * LOG2E + _frame(lse, slopes))


# -----------------------------------------------------------------------------
# merging pairs

def merge(o, lse, o_pair, lse_pair):
    """Fold a pair's (o, lse) into the running (o, lse) of the same query rows: softmax-weighted by LSE."""
    new = torch.logaddexp(lse, lse_pair)
    seen = new > -math.inf  # rows that see no key so far stay 0 (exp(-inf - -inf) would be NaN)
    w, w_pair = (torch.where(seen, torch.exp(x - new), 0.0)[..., None] for x in (lse, lse_pair))
    return o * w + o_pair.float() * w_pair, new


# -----------------------------------------------------------------------------
# the ring

def pairs(q_rank, kv_rank, n, c):
    """The (query half, key half, off_shift, causal) pairs between q_rank's queries and kv_rank's keys, each
    half c tokens; pairs with no visible key are left out."""
    out = []
    for qh, qc in enumerate(chunk_ids(q_rank, n)):
        for kh, kc in enumerate(chunk_ids(kv_rank, n)):
            if qc >= kc:
                out.append((qh, kh, (qc - kc) * c, qc == kc))
    return out


def _visible_rows(q_ids, k_ids):
    """A fully visible pair with document ids (queries after keys): row i sees the keys of its own document, so
    only rows of the key chunk's last document see anything, and only its keys. Per batch row: (rows, first key)."""
    last = k_ids[:, -1:]
    rows = (q_ids == last).sum(1)  # a prefix: ids never decrease
    first = (k_ids != last).sum(1)  # keys before the last document
    return rows.tolist(), first.tolist()


def _pair_forward(impl, q, k, v, slopes, off_shift, causal, scale, q_ids, k_ids):
    if impl == 'torch':
        return torch_pair_forward(q, k, v, slopes, off_shift, causal, scale, q_ids, k_ids)
    if q_ids is None or causal:  # the diagonal: the kernel masks documents itself
        return kernel_pair_forward(q, k, v, slopes, off_shift, causal, scale, None if q_ids is None else q_ids)
    o = q.new_zeros(q.shape, dtype=torch.float32)
    lse = q.new_full(q.shape[:3], -math.inf, dtype=torch.float32)
    for b, (rows, first) in enumerate(zip(*_visible_rows(q_ids, k_ids))):
        if rows and first < k.size(2):
            ob, lb = kernel_pair_forward(q[b:b + 1, :, :rows], k[b:b + 1, :, first:], v[b:b + 1, :, first:], slopes,
                                         off_shift - first, False, scale)
            o[b, :, :rows], lse[b, :, :rows] = ob[0].float(), lb[0]
    return o, lse


def _pair_backward(impl, do, q, k, v, slopes, off_shift, causal, scale, lse, delta, q_ids, k_ids):
    if impl == 'torch':
        return torch_pair_backward(do, q, k, v, slopes, off_shift, causal, scale, lse, delta, q_ids, k_ids)
    if q_ids is None or causal:
        return kernel_pair_backward(do, q, k, v, slopes, off_shift, causal, scale, lse, delta,
                                    None if q_ids is None else q_ids)
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
    for b, (rows, first) in enumerate(zip(*_visible_rows(q_ids, k_ids))):
        if rows and first < k.size(2):
            g = kernel_pair_backward(do[b:b + 1, :, :rows], q[b:b + 1, :, :rows], k[b:b + 1, :, first:],
                                     v[b:b + 1, :, first:], slopes, off_shift - first, False, scale,
                                     lse[b:b + 1, :, :rows].contiguous(), delta[b:b + 1, :, :rows].contiguous())
            dq[b, :, :rows] += g[0][0].float()
            dk[b, :, first:] += g[1][0].float()
            dv[b, :, first:] += g[2][0].float()
    return dq, dk, dv


def _exchange(tensors, group):
    """Start sending tensors to the next rank of the group and receiving the previous rank's: (requests,
    buffers). The next step's data moves while this step computes."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    if n == 1:
        return [], list(tensors)
    nxt, prv = dist.get_global_rank(group, (rank + 1) % n), dist.get_global_rank(group, (rank - 1) % n)
    sends = [t.contiguous() for t in tensors]
    bufs = [torch.empty_like(t) for t in sends]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in sends] + [dist.P2POp(dist.irecv, b, prv, group) for b in bufs]
    return [(w, sends) for w in dist.batch_isend_irecv(ops)], bufs  # (sends: alive until the transfer ends)


def _steps(visiting, group):
    """The ring's steps: yields (kv_rank, the visiting tensors: kv_rank's keys, values[, document ids]); meanwhile
    they are sent on to the next rank and the previous rank's received, awaited when the caller comes back."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    for step in range(n):
        reqs, nxt = _exchange(visiting, group) if step < n - 1 else ([], None)
        yield (rank - step) % n, visiting
        for w, _ in reqs:
            w.wait()
        visiting = nxt


def _slices(rank, kv_rank, n, c):
    """pairs() as (query rows, key rows, off_shift, causal) of the two ranks' 2c-token halves."""
    for qh, kh, off, causal in pairs(rank, kv_rank, n, c):
        yield slice(qh * c, (qh + 1) * c), slice(kh * c, (kh + 1) * c), off, causal


class _Ring(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, slopes, ids, group, scale, impl):
        rank, n, c = dist.get_rank(group), dist.get_world_size(group), q.size(2) // 2
        o = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full(q.shape[:3], -math.inf, dtype=torch.float32)
        for kv_rank, (k_, v_, *ids_) in _steps([k, v] + ([ids] if ids is not None else []), group):
            for qs, ks, off, causal in _slices(rank, kv_rank, n, c):
                op, lp = _pair_forward(impl, q[:, :, qs], k_[:, :, ks], v_[:, :, ks], slopes, off, causal, scale,
                                       ids[:, qs] if ids_ else None, ids_[0][:, ks] if ids_ else None)
                o[:, :, qs], lse[:, :, qs] = merge(o[:, :, qs], lse[:, :, qs], op, lp)
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, slopes, ids, out, lse)
        ctx.group, ctx.scale, ctx.impl = group, scale, impl
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, slopes, ids, out, lse = ctx.saved_tensors
        group, scale, impl = ctx.group, ctx.scale, ctx.impl
        rank, n, c = dist.get_rank(group), dist.get_world_size(group), q.size(2) // 2
        do = model._kernel_layout(do) if impl == 'triton' else do
        delta = (do.float() * out.float()).sum(-1)  # (B, H, 2c)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        # The visiting keys' fp32 gradients (dkv) follow them around the ring, each rank adding its share, so they
        # arrive back at their owner after the last step. They travel while the next step computes: its shares go
        # into `mine` first, and are added once the accumulators have arrived.
        in_flight = None
        for kv_rank, (k_, v_, *ids_) in _steps([k, v] + ([ids] if ids is not None else []), group):
            mine = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (k, v)]
            for qs, ks, off, causal in _slices(rank, kv_rank, n, c):
                g = _pair_backward(impl, do[:, :, qs], q[:, :, qs], k_[:, :, ks], v_[:, :, ks], slopes, off, causal,
                                   scale, lse[:, :, qs].contiguous(), delta[:, :, qs].contiguous(),
                                   ids[:, qs] if ids_ else None, ids_[0][:, ks] if ids_ else None)
                dq[:, :, qs] += g[0].float()
                mine[0][:, :, ks] += g[1].float()
                mine[1][:, :, ks] += g[2].float()
            if in_flight:  # kv_rank's accumulators, from the previous rank
                for w, _ in in_flight[0]:
                    w.wait()
                mine = [a + b for a, b in zip(in_flight[1], mine)]
            in_flight = _exchange(mine, group)
        for w, _ in in_flight[0]:
            w.wait()
        dk, dv = in_flight[1]  # this rank's own keys', every rank's share in
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


@torch.compiler.disable  # a graph break here, cleanly: the compiled blocks' other parts stay compiled
def ring_attention(q, k, v, slopes, group, softmax_scale=None, impl='torch', sequence_id=None):
    """Causal ALiBi attention of one sequence held zigzag over `group`: q (B, H, 2c, D), k and v (B, H_kv, 2c, D)
    this rank's two chunks (zigzag()); sequence_id (B, 2c) their global document ids (packed documents), or None.
    Returns this rank's (B, H, 2c, D), equal to attention over the whole sequence, then zigzag()."""
    if q.size(2) % 2:
        raise ValueError(f"ring_attention: a rank holds two chunks of equal length, got {q.size(2)} tokens")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
    if slopes is not None:
        slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    if impl == 'triton':
        q, k, v = (model._kernel_layout(x) for x in (q, k, v))
    return _Ring.apply(q, k, v, slopes, sequence_id, group, float(scale), impl)


# -----------------------------------------------------------------------------
# for train.py: the settings' problems, the process groups, each process's chunks of a micro-batch, the
# memory plan, and the model's attention switched to the ring

def context_problems(s, world_size):
    """context_parallel's problems with train.py's settings s, one line each (train.setting_problems asks)."""
    cp, problems = s['context_parallel'], []
    if not isinstance(cp, int) or cp <= 1:
        return problems  # (< 1 and non-integers: out_of_range's line)
    replicas = s['dp_replicate'] if isinstance(s['dp_replicate'], int) and s['dp_replicate'] >= 1 else 1
    if world_size % (cp * replicas):
        problems.append(f"context_parallel={cp}: the {world_size // replicas} processes of each replica do not split "
                        f"into groups of {cp}")
    uneven = [L for L in [s['max_seq_len'], *s['eval_seq_lens']] if isinstance(L, int) and L % (2 * cp)]
    if uneven:
        problems.append(f"context_parallel={cp} cuts each sequence into {2 * cp} equal chunks: "
                        f"{', '.join(map(str, uneven))} tokens do not divide; use multiples of {2 * cp}")
    if s['attn_impl'] == 'flash':
        problems.append(f"context_parallel={cp} needs attn_impl='triton' or 'torch': the flash-attn package cannot "
                        f"be told where a chunk sits (its ALiBi assumes the whole sequence)")
    if s['attn_pdrop'] > 0:
        problems.append(f"context_parallel={cp} needs attn_pdrop=0: the ring attention has no dropout")
    return problems


def context_group(cp):
    """The processes that share this one's sequences, or None for cp = 1: cp consecutive ranks, the innermost
    dimension of the mesh (replicate, shard, cp), so that one node's NVLink carries the ring. FSDP shards over
    shard x cp flattened, which is train.init_distributed's 'shard' dimension as it is (consecutive ranks)."""
    if cp == 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(g, g + cp))) for g in range(0, world, cp)]  # every rank makes every group
    return groups[rank // cp]


def local_chunks(batch, cp):
    """This process's zigzag chunks of a micro-batch's (B, T) tensors (x, y[, sequence_id]): the cp processes of a
    group read the same rows, x and y shifted and document ids counted on the whole row, then each takes its own."""
    if cp == 1:
        return batch
    return tuple(zigzag(t, dist.get_rank() % cp, cp) for t in batch)


def memory_plan(config, batch_size, seq_len, cp, shards, activation_checkpointing=True, dtype='bfloat16'):
    """(total bytes, one line): one process's memory for full training with context parallelism, estimated from
    the shapes (GB = 1e9 bytes). Sharded over the `shards` processes of a replica (cp's included): fp32 weights,
    gradients and Lion's momentum, 12 bytes a parameter. Whole: the blocks FSDP has all-gathered (this one and the
    one prefetched, with their gradients while the backward runs), in the compute dtype. The activations of this
    process's batch_size x seq_len / cp tokens: with checkpointing each block's input, plus one block's inside while
    it is recomputed (Korthikanti et al. 2022: about 17 values per token per d_model with flash attention), and the
    logits three times (compute dtype, fp32, gradient). The ring: two chunks' keys and values in flight, and in the
    backward their fp32 gradients; the fp32 output and LSE accumulators of one layer."""
    d, L, V, H = config.d_model, config.n_layers, config.vocab_size, config.n_heads
    kv = config.kv_n_heads * config.head_dim
    act = 2 if dtype == 'bfloat16' else 4
    block = d * (d + 2 * kv) + d * d + 2 * config.expansion_ratio * d * d + 2 * d
    params = L * block + V * d + d
    states = 12 * params / shards
    gathered = 4 * block * act
    tokens = batch_size * seq_len // cp
    per_block = tokens * d * 17 * act
    acts = (L * tokens * d * act + per_block if activation_checkpointing else L * per_block) + tokens * V * (act + 8)
    ring = tokens * kv * 2 * (2 * act + 2 * 4) + tokens * (d + H) * 4
    total = states + gathered + acts + ring
    gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"  # noqa: E731
    return total, (f"memory plan per process (estimate): weights, gradients and Lion {gb(states)} ({params:,} "
                   f"parameters x 12 bytes over {shards}), gathered blocks {gb(gathered)}, activations {gb(acts)} "
                   f"({tokens:,} tokens: {batch_size} x {seq_len:,} / context_parallel={cp}"
                   f"{', checkpointed' if activation_checkpointing else ''}; logits {gb(tokens * V * (act + 8))}), "
                   f"ring {gb(ring)}; total {gb(total)}")


def plan_table():
    """The README's table: MPT-7B and MPT-30B at 64k, 256k and 1M tokens a sequence on 8 and 64 GPUs, one
    sequence per context-parallel group (context_parallel = the GPUs), bf16, activation checkpointing."""
    models = {'MPT-7B': model.MPTConfig(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432),
              'MPT-30B': model.MPTConfig(d_model=7168, n_heads=64, n_layers=48, vocab_size=50432)}
    rows = ["| model | tokens a sequence | GPUs (= context_parallel) | tokens a GPU | per-GPU memory (estimate) |",
            "|---|---|---|---|---|"]
    for name, config in models.items():
        for T in (65536, 262144, 1048576):
            for gpus in (8, 64):
                total, _ = memory_plan(config, 1, T, gpus, gpus)
                rows.append(f"| {name} | {T // 1024}k | {gpus} | {T // gpus:,} | {total / 1e9:.0f} GB |")
    return "\n".join(rows)


def enable(gpt, cp, batch_size, seq_len, shards, activation_checkpointing=True, dtype='bfloat16'):
    """Context parallelism for an MPT (train.py's): each block's attention becomes the ring over this process's
    group of cp (context_group); cp = 1 changes nothing. The model then takes this rank's zigzag() of each row
    (tokens, targets, sequence_id) and gives its logits. Rank 0 prints the memory plan."""
    group = context_group(cp)
    if group is None:
        return
    print0(memory_plan(gpt.config, batch_size, seq_len, cp, shards, activation_checkpointing, dtype)[1])
    cfg = gpt.config
    if cfg.attn_impl == 'flash':
        raise ValueError("context_parallel > 1 needs attn_impl='triton' or 'torch': the flash-attn package cannot "
                         "be told where a chunk sits (its ALiBi assumes the whole sequence)")

    def ring(q, k, v, slopes, sequence_id):
        impl = 'triton' if cfg.attn_impl == 'triton' and (q.is_cuda or model._INTERPRET) else 'torch'
        return ring_attention(q, k, v, slopes, group, cfg.softmax_scale, impl, sequence_id)

    for block in gpt.transformer.blocks:
        block.attn.ring = ring


@contextlib.contextmanager
def off(gpt):
    """Within it, each process attends over its own whole sequences again (e.g. train.py's zero-shot tasks)."""
    rings = [block.attn.ring for block in gpt.transformer.blocks]
    for block in gpt.transformer.blocks:
        block.attn.ring = None
    try:
        yield
    finally:
        for block, ring in zip(gpt.transformer.blocks, rings):
            block.attn.ring = ring


if __name__ == '__main__':  # python context.py: the memory plan table (README, "Long contexts")
    print(plan_table())
