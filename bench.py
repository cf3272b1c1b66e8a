"""
Speed, measured side by side with the alternatives in one process on one device, so that ratios
hold even on a noisy machine. Takes the same settings as train.py (a config file, --key=value).

    python bench.py config/mpt_1b.py --mode=train [--compare_hf=True] [--profile=True]
    python bench.py --mode=attn
    python bench.py config/mpt_125m.py --mode=sample
    python bench.py --mode=sass
    ... --json=bench.json   writes every figure, with the device and the versions
    ... --dry_run=True      checks the settings and what they build, runs nothing (bench/gpu_session.sh quick)

train:  the real training step of train.py (forward, backward, Lion; its FSDP wrapping and
        precision) on random tokens: ms/step, tokens/s, MFU, peak memory; --compare_hf=True times
        transformers' MptForCausalLM (eager attention) on the same config and batch.
attn:   forward, backward and forward+backward TFLOP/s of causal ALiBi attention, bf16: our Triton kernel,
        SDPA with the bias as a float mask, FlexAttention with an ALiBi score_mod, SDPA without
        bias (the ceiling for a kernel without ALiBi), flash-attn if installed, the eager reference;
        --attn_variants=True also times our kernel with each of its variants forced.
sample: decode tokens/s of model.generate against transformers' generate on the same weights.
sass:   no GPU needed: the attention kernels compiled for sm_90 (and sm_80) with the installed Triton and
        the GPU machines' (--sass_triton), and read: registers, shared memory, spills, and what the main
        loop issues per warp and iteration (instructions, wgmma, exp2, waits, barriers, loads); the
        reader is bench/sass.py.
"""
import contextlib
import functools
import math
import os
import platform
import sys
import time
from json import dump as json_dump

from configurator import configure, device_problem, help_if_asked, out_of_range

help_if_asked(__file__)  # --help: the settings below, read from this file before torch's slow import

import torch
import torch.nn.functional as F

import train
from bench import sass
from model import MPT, MPTConfig, alibi_slopes, check_attention, flash_attn_alibi, torch_attention

# -----------------------------------------------------------------------------
# every setting of train.py (a config file and --key=value work as there), then bench's own
globals().update(train.default_settings())
mode = 'train'  # 'train' | 'attn' | 'sample' | 'sass'
dry_run = False  # check the settings and what they build (a model on the meta device, the variants), run nothing
# (train mode: --batch_size is the micro-batch as in train.py; --batch_size=0 searches for the largest that fits)
warmup = 3  # untimed steps (compilation, autotuning, allocator warm-up)
iters = 10  # timed steps
micro_steps = 2  # train mode: micro-batches per timed step (all of gradient_accumulation_steps would take long)
compare_hf = False  # train mode: also time transformers' MptForCausalLM on the same config and batch
profile = False  # train mode: write a torch.profiler trace to out_dir/trace.json
json = ''  # write every figure to this file (--json=bench.json)
attn_shapes = [(8, 16, 2048, 128), (4, 16, 4096, 128), (16, 12, 2048, 64)]  # attn mode: (B, H, T, D)
# attn mode: also time our kernel with each variant forced (model.py's FWD_VARIANTS, DKDV_VARIANTS: the first
# forms, then the pipelined ones), each autotuned among its own configs, beside the autotuner's pick
attn_variants = False
attn_eager = True  # attn mode: also time the eager reference (matmul + softmax: slow at long T)
sample_batch_sizes = [1, 16]  # sample mode: prompts generated at once
sample_prompt_len = 128  # sample mode: prompt tokens, then...
sample_new_tokens = 256  # ...tokens generated per prompt
# sass mode: which compiles. 'table': sm_90, bf16, D=128, causal, every config, TMA and pointer paths; 'aot':
# tests/test_attention.py's set (sm_80 and sm_90, head dims, variants); 'full': every combination; 'pairs': 'table'
# for context parallelism's chunk pairs (the kernels told the query offset, SHIFTED)
sass_jobs = 'table'
# sass mode: a second Triton (a pip --target folder) to compile with too, if it exists; the AOT test installs
# the GPU machines' 3.6 here
sass_triton = os.path.expanduser('~/.cache/mpt-aot/triton-3.6.0')
sass_workers = 0  # sass mode: compiling processes in all (0: two per CPU core, at most 16)
sass_listing = ''  # sass mode: read the loops of this `cuobjdump -sass` listing (one kernel) instead of compiling
settings = configure(globals(), sys.argv[1:])
_problems = out_of_range(settings, __file__, whole=dict(warmup=0, iters=1, micro_steps=1, sample_prompt_len=1,
                                                        sample_new_tokens=1, batch_size=0, max_seq_len=1))
_problems += [p for p in [device_problem(device)] if p]
if not all(isinstance(s, (tuple, list)) and len(s) == 4 and all(isinstance(n, int) and n >= 1 for n in s)
           for s in attn_shapes):
    _problems.append(f"attn_shapes={attn_shapes!r}: use a list of (B, H, T, D), four whole numbers >= 1 each")
if _problems:
    sys.exit('error: ' + '\nerror: '.join(_problems))
# -----------------------------------------------------------------------------

cuda = torch.device(device).type == 'cuda'


def timed(fn, n_warmup=warmup, n_iters=iters):
    """Mean seconds per call, after warm-up; device events on CUDA, wall clock elsewhere."""
    for _ in range(n_warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n_iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n_iters
    t0 = time.perf_counter()
    for _ in range(n_iters):
        fn()
    return (time.perf_counter() - t0) / n_iters


def print_table(rows, columns):
    """One readable table: a row per dict, the given columns, numbers rounded."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.1e}" if 0 < abs(v) < 0.1 else f"{v:,.1f}"
        return 'n/a' if v is None else str(v)
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print('  '.join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print('  '.join(v.rjust(w) for v, w in zip(row, widths)))


def environment():
    import triton
    env = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               python=platform.python_version(), device=torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu')
    try:
        import transformers
        env['transformers'] = transformers.__version__
    except ImportError:
        pass
    return env


def model_config(**overrides):
    return MPTConfig(**{**{k: settings[k] for k in MPTConfig.__dataclass_fields__ if k in settings}, **overrides})


def check(config):
    """The attention settings' problems as one line, before any work (model.check_attention)."""
    try:
        check_attention(config, device, getattr(torch, dtype))
    except ValueError as e:
        sys.exit(f"error: {e}")


# -----------------------------------------------------------------------------
# train: train.py's own step, timed

def random_batches(n, B, vocab_size, dev):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [(torch.randint(0, vocab_size, (B, max_seq_len), device=dev, generator=g),
             torch.randint(0, vocab_size, (B, max_seq_len), device=dev, generator=g)) for _ in range(n)]


def largest_batch_size(step, limit=1024):
    """The largest power-of-two micro-batch for which step(B) runs without running out of memory."""
    best, B = None, 1
    while B <= limit:
        try:
            step(B)
            best, B = B, 2 * B
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if best is None:
        sys.exit("error: not even a micro-batch of 1 fits: try activation_checkpointing=True or more GPUs")
    return best


def bench_train():
    rank, world_size, dev, mesh = train.init_distributed(device)
    config = model_config()
    check(config)
    model = train.setup_model(config, mesh, dtype, activation_checkpointing, compile, seed)
    exp_avgs = train.lion_state(model)

    def step(B, batches=None):
        batches = batches or random_batches(micro_steps, B, config.vocab_size, dev)
        return train.train_step(model, exp_avgs, batches, learning_rate, learning_rate, weight_decay,
                                beta1, beta2, grad_clip)
    B = batch_size if batch_size > 0 else largest_batch_size(step) if cuda else 1
    batches = random_batches(micro_steps, B, config.vocab_size, dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t = timed(lambda: step(B, batches))
    tokens_per_sec = B * max_seq_len * micro_steps * world_size / t
    impl = 'torch' if config.attn_impl == 'triton' and not cuda else config.attn_impl  # model.py's CPU fallback
    rows = [dict(impl=f"ours ({impl} attention, FSDP x{world_size}{', compiled' if compile else ''})",
                 params=f"{model.num_params() / 1e6:.1f}M", batch=B, seq=max_seq_len, micro_steps=micro_steps,
                 ms_per_step=t * 1e3, tokens_per_sec=tokens_per_sec,
                 mfu_pct=pct(model.estimate_mfu(tokens_per_sec / world_size, max_seq_len, peak_flops or None)),
                 peak_mem_gb=torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None)]
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        os.makedirs(out_dir, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                step(B, batches)
        prof.export_chrome_trace(os.path.join(out_dir, 'trace.json'))
        print(f"wrote {os.path.join(out_dir, 'trace.json')}")
    if compare_hf:
        rows.append(bench_hf_train(model, B, batches, micro_steps, dev))
        rows[-1]['speedup'] = rows[-1]['ms_per_step'] / rows[0]['ms_per_step'] if rows[-1].get('ms_per_step') else None
    print_table(rows, ['impl', 'params', 'batch', 'seq', 'micro_steps', 'ms_per_step', 'tokens_per_sec', 'mfu_pct',
                       'peak_mem_gb', 'speedup', 'note'])
    torch.distributed.destroy_process_group()
    return rows


def pct(x):
    return None if x is None else 100 * x


def bench_hf_train(model, B, batches, micro_steps, dev):
    """transformers' MptForCausalLM (eager attention) training on the same config and batches, the way
    one trains it without FSDP: fp32 weights, bf16 autocast, and the same Lion update."""
    row = dict(impl="transformers MptForCausalLM (eager)", batch=B, seq=max_seq_len, micro_steps=micro_steps)
    try:
        from transformers import MptConfig, MptForCausalLM
        hf_config = MptConfig(**model.hf_config())
    except ImportError:
        return {**row, 'note': 'transformers not installed'}
    except ValueError as e:  # a model transformers' MPT cannot express (GQA, qk_ln, ...)
        return {**row, 'note': str(e).split(';')[0]}
    torch.manual_seed(seed)
    hf = MptForCausalLM(hf_config).to(dev).train()
    params = [p for p in hf.parameters()]
    exp_avgs = [torch.zeros_like(p) for p in params]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

    def step():
        for x, y in batches:
            with autocast:
                loss = hf(input_ids=x, labels=y).loss  # HF shifts labels itself; the cost is the same
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        train.lion_step(params, [p.grad for p in params], exp_avgs, learning_rate, beta1, beta2, weight_decay,
                        learning_rate)
        hf.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        t = timed(step)
    except torch.OutOfMemoryError:
        return {**row, 'note': 'out of memory at this batch size'}
    tokens_per_sec = B * max_seq_len * micro_steps / t
    return {**row, 'params': f"{sum(p.numel() for p in params) / 1e6:.1f}M", 'ms_per_step': t * 1e3,
            'tokens_per_sec': tokens_per_sec, 'mfu_pct': pct(model.estimate_mfu(tokens_per_sec, max_seq_len, peak_flops or None)),
            'peak_mem_gb': torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None}


# -----------------------------------------------------------------------------
# attn: one attention call at a time, each checked against the float32 reference first (causal, ALiBi)

def tuned_rows():
    """Our kernel's rows that the autotuner serves, name -> {kernel: the launch constants its configs must have}:
    the autotuner's pick (no constraint), and with attn_variants each variant forced, variant i being the
    forward's and the dK/dV kernel's i-th form (model.py's FWD_VARIANTS, DKDV_VARIANTS; a kernel's last where it
    has fewer). deterministic=True runs the tables' first entries and the separate dQ kernel, untuned."""
    import model as fa
    variants = {fa._attn_fwd: fa.FWD_VARIANTS, fa._attn_bwd_dkdv: fa.DKDV_VARIANTS}
    rows = {'ours (triton)': {kernel: {} for kernel in variants}}
    for i in range(max(map(len, variants.values()))) if attn_variants else []:
        want = {kernel: forms[min(i, len(forms) - 1)] for kernel, forms in variants.items()}
        label = ', '.join(sorted({f'{k}={v}' for w in want.values() for k, v in w.items()}))
        rows[f'ours (triton, {label} forced)'] = want
    return rows


@contextlib.contextmanager
def tuned_as(want):
    """Within: each kernel of want ({kernel: launch constants}) autotunes among its configs with those constants
    only (model.py has no switch for it: its pruning is wrapped, as tests/test_attention.py's `variant` fixture
    does), in a tuning cache of its own, apart from the other rows' picks. Yields a dict that, after the block,
    holds 'tuned': each kernel's picks, and 'unserved': the kernels that had no config of the variant for a launch
    (their usual configs ran)."""
    found, saved, unserved = {}, [], set()

    def only(prune, constants, name):
        def pruned(configs, nargs, **meta):
            kept = prune(configs, nargs, **meta)
            wanted = [c for c in kept if all(c.kwargs.get(k) == v for k, v in constants.items())]
            if not wanted:
                unserved.add(name)
            return wanted or kept
        return pruned
    for kernel, constants in want.items():
        if len(kernel.configs) == 1 and any(kernel.configs[0].kwargs.get(k) != v for k, v in constants.items()):
            unserved.add(kernel.fn.__name__)  # the interpreter's one-config table, which the autotuner does not prune
        saved.append((kernel, kernel.early_config_prune, kernel.cache))
        kernel.early_config_prune, kernel.cache = only(kernel.early_config_prune, constants, kernel.fn.__name__), {}
    try:
        yield found
    finally:
        found['tuned'] = '; '.join(f"{kernel.fn.__name__.removeprefix('_attn_')} {sass.config_label(c)}"
                                   for kernel, _, _ in saved for c in kernel.cache.values())
        found['unserved'] = sorted(unserved)
        for kernel, prune, cache in saved:
            kernel.early_config_prune, kernel.cache = prune, cache


def attention_impls(slopes, T, dtype):
    """name -> fn(q, k, v), causal with ALiBi (but the ceiling), or name -> why it is unavailable here."""
    impls = {}
    ours = list(tuned_rows()) + ['ours (triton, deterministic)']
    if cuda or os.environ.get('TRITON_INTERPRET') == '1':
        for name in ours:
            impls[name] = functools.partial(flash_attn_alibi, alibi_slopes=slopes, deterministic='deterministic' in name)
    else:
        impls.update(dict.fromkeys(ours, 'needs CUDA'))
    try:
        import flash_attn  # noqa: F401
        from model import flash_package_attention
        impls['flash-attn'] = lambda q, k, v: flash_package_attention(q, k, v, slopes)
    except ImportError:
        impls['flash-attn'] = 'not installed'
    if cuda:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        causal_blocks = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T,
                                          device=device)

        def alibi_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)
        impls['FlexAttention + ALiBi'] = lambda q, k, v: flex(q, k, v, score_mod=alibi_mod, block_mask=causal_blocks)
    else:
        impls['FlexAttention + ALiBi'] = 'needs CUDA'
    # the bias as the model without a fused kernel would hold it: built once, (H, T, T), -inf above the diagonal
    pos = torch.arange(T, device=device)
    rel = pos.view(1, -1) - pos.view(-1, 1)  # j - i
    mask = (slopes.view(-1, 1, 1) * rel).masked_fill(rel > 0, float('-inf')).to(dtype)
    impls['SDPA + ALiBi float mask'] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    impls['SDPA, no bias (ceiling)'] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def eager(q, k, v):  # plain matmul + softmax, as transformers' MPT computes attention
        s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.size(-1))) + mask
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v
    if attn_eager:
        impls['eager reference'] = eager
    return impls


def attention_and_grads(fn, q, k, v, do):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def measure(row, fn, q, k, v, do, ref, flops):
    """fn checked against the float32 reference (output and gradients), then its forward, backward and both
    timed, into row."""
    got = attention_and_grads(fn, q, k, v, do)
    err = max(((x.float() - r).abs().max() / r.abs().max().clamp(min=1)).item() for x, r in zip(got, ref))
    row['max_err'] = err  # relative to the largest reference value, over out, dq, dk, dv
    del got
    if not err < (5e-2 if q.dtype == torch.bfloat16 else 1e-4):
        row['note'] = f"disagrees with the reference (max err {err:.3g}): not timed"
        return
    t_fwd = timed(lambda: fn(q, k, v))
    out = fn(q, k, v)  # the backward alone: one forward's graph, differentiated again and again
    t_bwd = timed(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    del out
    t_all = timed(lambda: attention_and_grads(fn, q, k, v, do))
    row.update(fwd_ms=t_fwd * 1e3, fwd_tflops=flops / t_fwd / 1e12,
               bwd_ms=t_bwd * 1e3, bwd_tflops=2.5 * flops / t_bwd / 1e12,  # bwd = 2.5 fwd
               fwd_bwd_ms=t_all * 1e3, fwd_bwd_tflops=3.5 * flops / t_all / 1e12)


def bench_attn():
    shapes = attn_shapes if cuda else [(1, 2, 128, 32)]  # CPU: a smoke test of the machinery
    dt = torch.bfloat16 if cuda else torch.float32
    tuned = tuned_rows()
    rows = []
    for B, H, T, D in shapes:
        slopes = alibi_slopes(H).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dt, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn_like(q)
        # float32 references for the agreement check (output and gradients), with ALiBi and without
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        refs = {bias: [t.detach() for t in attention_and_grads(lambda q, k, v: torch_attention(q, k, v, s),
                                                                q32, k32, v32, do.float())]
                for bias, s in (('alibi', slopes), ('none', None))}
        flops = 4 * B * H * T * T * D / 2  # causal: half the scores
        for name, fn in attention_impls(slopes, T, dt).items():
            row = dict(shape=f"{B}x{H}x{T}x{D}", impl=name)
            rows.append(row)
            if isinstance(fn, str):
                row['note'] = fn
                continue
            picks = {}
            try:
                with tuned_as(tuned.get(name, {})) as picks:
                    measure(row, fn, q, k, v, do, refs['none' if 'no bias' in name else 'alibi'], flops)
            except torch.OutOfMemoryError:
                row['note'] = 'out of memory'
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            if picks.get('tuned'):
                row['tuned'] = picks['tuned']  # the configs the autotuner kept, e.g. 'fwd 128x128 w8 s2 pipeline'
            if picks.get('unserved'):
                row['note'] = '; '.join(filter(None, [row.get('note'), f"no config of this variant for "
                                                      f"{', '.join(picks['unserved'])}: its usual ones ran"]))
            # as it goes, for a run cut short (the table comes at the end)
            print(f"  {row['shape']} {name}: " + (f"fwd {row['fwd_tflops']:.1f}, bwd {row['bwd_tflops']:.1f}, "
                                                  f"fwd+bwd {row['fwd_bwd_tflops']:.1f} TFLOP/s"
                                                  if 'fwd_tflops' in row else '') + f" {row.get('note', '')}"
                  + (f" [{row['tuned']}]" if 'tuned' in row else ''), flush=True)
    print_table(rows, ['shape', 'impl', 'fwd_ms', 'fwd_tflops', 'bwd_ms', 'bwd_tflops', 'fwd_bwd_ms', 'fwd_bwd_tflops',
                       'max_err', 'note', 'tuned'])
    return rows


# -----------------------------------------------------------------------------
# sample: decode speed against transformers' generate on the same weights

def hf_twin(model):
    """transformers' MptForCausalLM holding the same weights as our model."""
    from transformers import MptConfig, MptForCausalLM
    with torch.device('meta'):
        hf = MptForCausalLM(MptConfig(**model.hf_config()))
    hf.load_state_dict({**model.state_dict(), 'lm_head.weight': model.transformer.wte.weight}, assign=True)
    hf.tie_weights()
    return hf.eval()


def bench_sample():
    dt = getattr(torch, dtype)
    torch.manual_seed(seed)
    config = model_config(init_device=device)
    check(config)
    model = MPT(config).to(dt).eval()
    try:
        hf = hf_twin(model)
    except ImportError:
        hf = None
    rows = []
    for B in sample_batch_sizes:
        prompt = torch.randint(0, model.config.vocab_size, (B, sample_prompt_len), device=device)
        n = sample_new_tokens
        ours_out = model.generate(prompt, n, temperature=0, max_len=sample_prompt_len + n)
        t = timed(lambda: model.generate(prompt, n, temperature=0, max_len=sample_prompt_len + n), 1, 3)
        row = dict(model=f"{model.num_params() / 1e6:.0f}M", batch=B, new_tokens=n, ours_tok_s=B * n / t)
        if hf is not None:
            def hf_generate():
                # use_cache: transformers 5's MptConfig defaults it to False, which recomputes the whole
                # sequence for every token (measured: 2.0 tok/s where the cache gives 64 at d_model 256)
                return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                   attention_mask=torch.ones_like(prompt), pad_token_id=0)
            with torch.no_grad():
                hf_out = hf_generate()
                t_hf = timed(hf_generate, 1, 3)
            same = (hf_out[:, sample_prompt_len:] == ours_out[:, sample_prompt_len:]).long().cumprod(1).sum(1)
            row.update(hf_tok_s=B * n / t_hf, speedup=t_hf / t, same_greedy_tokens=int(same.min()))
        rows.append(row)
    print_table(rows, ['model', 'batch', 'new_tokens', 'ours_tok_s', 'hf_tok_s', 'speedup', 'same_greedy_tokens'])
    return rows


# -----------------------------------------------------------------------------
# sass: the attention kernels compiled ahead of time on this machine (no GPU), and their SASS read
# (bench/sass.py compiles and reads; here the tables are printed)

def bench_sass():
    if sass_listing:  # a listing from elsewhere: every wgmma loop, main loop first
        loops = sass.listing_loops(open(sass_listing).read())
        print_table(loops, list(loops[0]) if loops else ['instructions'])
        return loops
    rows = sass.compile_all(sass_jobs, sass_triton, sass_workers)
    columns = ['kernel', 'config', 'path', 'triton', 'regs', 'smem', 'spill', 'loop_instructions', 'loop_hgmma',
               'loop_hgmma_shapes', 'loop_ex2', 'loop_ex2_in_flight', 'loop_waits', 'loop_bar_sync',
               'loop_tma_loads', 'loop_global_loads', 'loop_spill']
    if sass_jobs not in ("table", "pairs"):
        columns[3:3] = ['arch', 'dtype', 'head_dim', 'causal', 'seq']
    print_table(rows, columns)
    print("loop: the kernel's main loop (its innermost wgmma loop with the fewest instructions), per warp and "
          "iteration; ex2_in_flight: exp2 issued while a wgmma is in flight")
    return rows


# -----------------------------------------------------------------------------
# dry run: what a mode would build, checked without running it (bench/gpu_session.sh quick --dry_run)

def dry_run_check():
    """One line on what the settings build, or exit with an error: the model (on the meta device) and the
    attention settings for train and sample, transformers' twin for compare_hf, each forced variant's configs
    in the GPU's autotune tables for attn, the listing for sass."""
    if mode in ('train', 'sample'):
        config = model_config(init_device='meta')
        check(config)
        model = MPT(config)
        line = f"a {model.num_params() / 1e6:.1f}M-parameter model, {config.attn_impl} attention"
        if mode == 'train' and compare_hf:
            try:
                from transformers import MptConfig
                MptConfig(**model.hf_config())
                line += ", and transformers' MptForCausalLM beside it"
            except ImportError:
                line += " (transformers is not installed: no comparison)"
            except ValueError as e:
                line += f" (transformers' MPT cannot express it: {str(e).split(';')[0]})"
        return line
    if mode == 'attn':
        import model as fa
        for name, want in tuned_rows().items():
            for kernel, constants in want.items():
                tables = {fa._attn_fwd: fa.FWD_TUNING, fa._attn_bwd_dkdv: fa.DKDV_TUNING}[kernel]
                if not any(all(c.kwargs.get(k) == v for k, v in constants.items()) for c, *_ in tables):
                    sys.exit(f"error: {name}: {kernel.fn.__name__} has no config with {constants}")
        return f"shapes {attn_shapes}; our kernel's rows: {', '.join(tuned_rows())}, deterministic"
    if sass_listing and not os.path.isfile(sass_listing):
        sys.exit(f"error: sass_listing={sass_listing!r}: no such file")
    return f"sass jobs {sass_jobs!r}: {len(sass.sass_job_list(sass_jobs))} compiles per Triton"


# -----------------------------------------------------------------------------

if __name__ == '__main__':
    modes = {'train': bench_train, 'attn': bench_attn, 'sample': bench_sample, 'sass': bench_sass}
    if mode not in modes:
        sys.exit(f"error: unknown mode={mode!r}: use one of {', '.join(modes)}")
    if dry_run:  # the settings passed the checks above; nothing runs
        print(f"dry run, {mode}: {dry_run_check()}; nothing ran")
        sys.exit(0)
    env = environment()
    print(f"{mode} on {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']}")
    rows = modes[mode]()
    if json:
        with open(json, 'w') as f:
            json_dump(dict(mode=mode, environment=env, command=' '.join(['python', *sys.argv]), rows=rows,
                           settings={k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))}),
                      f, indent=2)
        print(f"wrote {json}")
