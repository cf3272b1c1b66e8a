"""
The SASS reader behind `python bench.py --mode=sass` (the entry point, which prints the tables): the
attention kernels of model.py compiled ahead of time on this machine, no GPU needed, for sm_90 (and sm_80)
with the installed Triton and optionally a second one (the GPU machines'), and read: registers, shared
memory, spills, and what the main loop issues per warp and iteration (instructions, wgmma, exp2, waits,
barriers, loads). Each Triton compiles in its own worker processes (this file again, `python -m bench.sass
JOBS I/N`, with the Triton's folder first on PYTHONPATH); ptxas' log (which Triton prints) gives registers
and spills, cuobjdump the SASS.

A library below bench.py: it imports model.py (the kernels and their autotune tables) and nothing else of
this repository.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sass_job_list(which):
    """Compile jobs, dicts: kernel, config (index into its table), arch, dtype, head_dim, causal, seq (sequence
    ids), tma (descriptors, sm_90), fuse_dq (dK/dV kernel: dQ by atomics, the default; False: deterministic).
    'table': every sm_90 config at head dim 128, bf16, causal, on the TMA path and the pointer fallback (head
    dims that are not a multiple of 8, misaligned views). 'aot': every config at the largest head dim it
    serves (bf16, causal, the default variant), with sequence ids, and once more in fp16 at a padded head dim
    (masked loads, not causal, the deterministic dK/dV variant), on sm_80 and sm_90, the sm_90 pointer
    fallback at the largest head dim, and the preprocess kernel. 'full': every head dim in {64, 80, 112, 128}
    a config serves x dtype x causal x sequence ids x path x dQ variant. 'pairs': 'table' for context.py's pairs
    (SHIFTED: the query offset a kernel argument)."""
    if which == "pairs":
        return [dict(job, shifted=True) for job in sass_job_list("table")]
    import triton

    import model as fa
    jobs = []
    tables = {"_attn_fwd": fa.FWD_TUNING, "_attn_bwd_dkdv": fa.DKDV_TUNING, "_attn_bwd_dq": fa.DQ_TUNING}
    for name, tuning in tables.items():
        for idx, (_, archs, max_block_d, decode, only) in enumerate(tuning):
            dims = [d for d in (64, 80, 112, 128) if triton.next_power_of_2(d) <= max_block_d]
            seqs = [only["HAS_SEQ"]] if "HAS_SEQ" in only else [False, True]
            for cap in archs:
                job = dict(kernel=name, config=idx, arch=cap, dtype="bf16", head_dim=dims[-1], causal=True,
                           seq=seqs[0], tma=cap >= 90 and name != "_attn_bwd_dq", fuse_dq=True)
                serves = lambda j: all(j[k] == only.get(c, j[k]) for k, c in (("tma", "TMA"), ("fuse_dq", "FUSE_DQ")))
                if which == "table":
                    more = [dict(job, tma=False)] if job["tma"] else []
                    jobs += [j for j in [job] + more if cap >= 90 and max_block_d >= 128 and not j["seq"]
                             and serves(j)]
                elif which == "full":
                    jobs += [j for j in (dict(job, dtype=dt, head_dim=d, causal=c, seq=seq, tma=tma, fuse_dq=fuse)
                                         for dt in ("fp16", "bf16") for d in dims for c in (True, False) for seq in seqs
                                         for tma in {job["tma"], False} for fuse in {True, name != "_attn_bwd_dkdv"})
                             if serves(j)]
                else:
                    more = [dict(job, dtype="fp16", head_dim=dims[-2:][0], causal=False, fuse_dq=False)]
                    more += [dict(job, tma=False)] if job["tma"] else []
                    jobs += [j for j in [dict(job, seq=seq) for seq in seqs] + more if serves(j)]
    if which != "table":
        jobs += [dict(kernel="_bwd_preprocess", config=None, arch=cap, dtype="bf16", head_dim=128, causal=True,
                      seq=False, tma=False, fuse_dq=True) for cap in (80, 90)]
    return jobs


def config_label(config):
    """'128x128 w8 s2' plus the names of the variant switches that are on, e.g. 'pipeline'."""
    kw = config.kwargs
    flags = [k.lower() for k, v in kw.items() if k not in ("BLOCK_M", "BLOCK_N") and v is True]
    return " ".join([f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps} s{config.num_stages}", *flags])


def compile_job(job):
    """Compile one job with this process' Triton for its arch, as the autotuner would launch it; returns the
    ptxas log's registers, spills and "serialized" advisories, shared memory, wgmma N sizes, TMA and cp.async
    counts in the PTX, and for sm_90 the SASS's main loop (sass_loop_stats)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import model as fa
    name, cap, dt = job["kernel"], job["arch"], job["dtype"]
    meta = fa._meta(job["head_dim"], job["causal"], slopes=True, dtype=None, sequence_id=True if job["seq"] else None,
                    shifted=job.get("shifted", False))
    if name == "_bwd_preprocess":  # launched as in _attn_backward, with Triton's default warps/stages
        fn, options, label = fa._bwd_preprocess, dict(num_warps=4, num_stages=3), "128 rows, 4 warps"
        meta = dict(HEAD_DIM=job["head_dim"], BLOCK_D=meta["BLOCK_D"], BLOCK_M=128)
    else:
        cfg = getattr(fa, name).configs[job["config"]]
        fn, options, label = getattr(fa, name).fn, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), \
            config_label(cfg)
        meta.update(cfg.kwargs)
        if name == "_attn_fwd":
            meta["TMA"] = job["tma"]
        if name == "_attn_bwd_dkdv":
            meta.update(FUSE_DQ=job["fuse_dq"], TMA=job["tma"], DQ_TMA=job["fuse_dq"] and job["tma"])
    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in ("Q", "K", "V", "O", "DO", "DK", "DV") and meta.get("TMA") or (
                p.name == "DQ" and meta.get("DQ_TMA")):  # host-side descriptors
            rows = meta["BLOCK_N"] if p.name in ("K", "V", "DK", "DV") else meta["BLOCK_M"]
            signature[p.name] = f"tensordesc<{'fp32' if p.name == 'DQ' else dt}[1,1,{rows},{meta['BLOCK_D']}]>"
        elif p.name in ("LSE", "DELTA") and name == "_attn_bwd_dkdv" and meta["TMA"]:
            signature[p.name] = f"tensordesc<fp32[1,1,{meta['BLOCK_M']}]>"
        elif p.name in ("LSE", "DELTA", "SLOPES") or (p.name == "DQ" and name == "_attn_bwd_dkdv"):
            signature[p.name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif p.name in ("DOC_START", "DOC_END"):
            signature[p.name], attrs[(i,)] = "*i32", [["tt.divisibility", 16]]
        elif p.name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            signature[p.name], attrs[(i,)] = "*" + dt, [["tt.divisibility", 16]]
        elif p.name in ("qk_scale", "sm_scale"):
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
            if p.name.startswith("stride_"):  # as the JIT specializes them for the model's layouts
                attrs[(i,)] = [["tt.divisibility", 16]]
    for key in [k for k, v in signature.items() if v == "constexpr" and k not in meta]:
        del signature[key]  # a constexpr this kernel version does not have
    start = time.time()
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v; print its log (captured here)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, meta, attrs), target=GPUTarget("cuda", cap, 32),
                                  options=options)
    log, ptx = log.getvalue(), compiled.asm["ptx"]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    result = dict(job=job, label=label, triton=triton.__version__,
                  regs=int(re.search(r"Used (\d+) registers", log).group(1)), spill=max(spills, default=0),
                  serialized=[line.strip() for line in log.splitlines() if "serialized" in line],
                  smem=compiled.metadata.shared,
                  wgmma_n=sorted({int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx)}),
                  tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
                  cp_async=len(re.findall(r"cp\.async\.c[ag]\.", ptx)))
    if cap >= 90:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", cubin], capture_output=True,
                                  text=True, check=True).stdout
        loops = [sass_loop_stats(body) for body in sass_loops(sass)]  # the main loop: no mask, else the shortest
        result.update(hgmma="HGMMA" in sass, n_loops=len(loops),
                      loop=min(loops, key=lambda s: (s["mask_selects"], s["instructions"])) if loops else None)
    result["seconds"] = round(time.time() - start, 1)
    return result


def sass_loops(sass):
    """The innermost loops of a SASS listing that issue wgmma (HGMMA), each as its list of instructions
    (opcode and operands, without the predicate). A loop is a conditional branch back to an earlier
    address; unconditional ones back are the returns of out-of-line code (the mbarrier wait retries)."""
    code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    spans = []
    for i, (addr, text) in enumerate(code):
        m = re.match(r"@!?U?P\w+\s+BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            first = next(j for j, (a, _) in enumerate(code) if a >= int(m.group(1), 16))
            if any(t.split()[0].startswith("HGMMA") for _, t in code[first:i + 1] if t):
                spans.append((first, i))
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    strip = lambda t: re.sub(r"^@!?U?P\w+\s+", "", t)
    return [[strip(t) for _, t in code[a:b + 1]] for a, b in innermost]


def sass_loop_stats(body):
    """Per warp and iteration of a loop: instructions (NOPs not counted), HGMMA count and shapes, MUFU.EX2,
    wgmma waits (WARPGROUP.DEPBAR), CTA barriers (BAR.SYNC), TMA loads and reductions, global loads (LDG,
    LDGSTS), local memory (spill) accesses, float selects (FSEL: masks), and how many exp2 are issued while a
    wgmma is in flight (the tensor cores working during the softmax): two passes over the loop, the second
    counted, an HGMMA in flight from its issue until a DEPBAR.LE gsb0, N leaves at most N groups pending."""
    ops = [t.split()[0] for t in body]
    in_flight, open_group, overlapped = 0, False, 0
    for count in (False, True):
        for t, op in zip(body, ops):
            if op.startswith("HGMMA"):
                open_group = "gsb0" not in t
                in_flight += "gsb0" in t
            elif op.startswith("WARPGROUP.DEPBAR"):
                in_flight = min(in_flight, int(t.rsplit(",", 1)[1], 0))
            elif op == "MUFU.EX2" and count:
                overlapped += in_flight > 0 or open_group
    shapes = sorted({op.split(".")[1] for op in ops if op.startswith("HGMMA")})
    n = lambda *prefixes: sum(op.startswith(prefixes) for op in ops)
    return dict(instructions=len(ops) - n("NOP"), hgmma=n("HGMMA"), hgmma_shapes=shapes, ex2=n("MUFU.EX2"),
                ex2_in_flight=overlapped, waits=n("WARPGROUP.DEPBAR"), bar_sync=n("BAR.SYNC"), tma_loads=n("UTMALDG"),
                tma_reduce=n("UTMAREDG"), global_loads=n("LDG.", "LDGSTS"), spill=n("LDL", "STL"),
                mask_selects=n("FSEL"))

def listing_loops(sass):
    """Every wgmma loop of a `cuobjdump -sass` listing (one kernel), as sass_loop_stats, the main loop (no
    masks, the fewest instructions) first."""
    return sorted((sass_loop_stats(body) for body in sass_loops(sass)),
                  key=lambda s: (s["mask_selects"], s["instructions"]))


def compile_all(which, second_triton='', n_workers=0):
    """Compile sass_job_list(which) with the installed Triton, and with the one in the folder second_triton (a pip
    --target folder) if it holds one, in n_workers processes in all (0: two per CPU core, at most 16). Returns
    compile_job's results, each with the columns bench.py prints, sorted by kernel, arch, config and path."""
    jobs = sass_job_list(which)
    folders = [None] + ([second_triton] if second_triton and os.path.isdir(os.path.join(second_triton, "triton"))
                        else [])
    if len(folders) == 1:
        print(f"(no second Triton in {second_triton!r}: the installed one only)")
    # twice as many processes as cores by default: the jobs differ in size and each Triton has its own share
    # (3.9 compiles about 25% slower than 3.6), so one process per core would leave cores idle at the end
    n_per = max(1, (n_workers or min(2 * (os.cpu_count() or 1), 16)) // len(folders))
    workers = []
    for folder in folders:
        # always compile: a cached kernel skips ptxas, whose log is read here
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", TRITON_ALWAYS_COMPILE="1",
                   OMP_NUM_THREADS="1")
        if folder:
            env["PYTHONPATH"] = os.pathsep.join([folder, *filter(None, [env.get("PYTHONPATH")])])
        command = [sys.executable, "-m", "bench.sass", which]  # from ROOT, where model.py is
        workers += [subprocess.Popen(command + [f"{i}/{n_per}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for i in range(n_per)]
    rows = []
    for w in workers:
        out, err = w.communicate()
        if w.returncode != 0:
            sys.exit(f"error: a sass worker failed:\n{err[-4000:]}")
        rows += [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("sass-result ")]
    if len(rows) != len(jobs) * len(folders):
        sys.exit(f"error: {len(rows)} of {len(jobs) * len(folders)} compiles came back")
    for r in rows:
        j, loop = r["job"], r.get("loop") or {}
        r.update(kernel=j["kernel"], config=r["label"], arch=f"sm_{j['arch']}", path="tma" if j["tma"] else "pointers",
                 **{k: j[k] for k in ("dtype", "head_dim", "causal", "seq")},
                 **{f"loop_{k}": ("/".join(v) if isinstance(v, list) else v) for k, v in loop.items()})
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["job"]["config"] or 0, r["path"] != "tma", r["dtype"],
                             r["head_dim"], r["seq"], r["triton"]))
    return rows


if __name__ == '__main__':  # a worker (compile_all starts them): compile jobs I, I+N, ... of JOBS, one JSON line each
    which, part = sys.argv[1:3]
    i, n = map(int, part.split("/"))
    for job in sass_job_list(which)[i::n]:
        print("sass-result " + json.dumps(compile_job(job)), flush=True)
