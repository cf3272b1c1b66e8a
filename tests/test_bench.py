"""bench.py on the CPU: a smoke test of each mode's machinery and output (no timing assertions)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d_model=64", "--n_heads=4", "--n_layers=2", "--vocab_size=128", "--max_seq_len=32", "--batch_size=2",
        "--warmup=1", "--iters=2", "--compile=False", "--device=cpu", "--dtype=float32"]


def run_bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench.py", *TINY, *args, f"--json={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, json.loads(out.read_text())


def test_train_mode_with_transformers_comparison(tmp_path):
    pytest.importorskip("transformers")
    stdout, result = run_bench(tmp_path, "--mode=train", "--compare_hf=True")
    assert "ms_per_step" in stdout and "tokens_per_sec" in stdout
    ours, hf = result["rows"]
    assert ours["params"] == hf["params"]  # the same model on both sides
    expected = 2 * 2 * 32 / (ours["ms_per_step"] / 1e3)  # batch x micro_steps x seq per step
    assert ours["tokens_per_sec"] == pytest.approx(expected, rel=1e-6)
    assert hf["tokens_per_sec"] > 0 and hf["speedup"] > 0
    assert ours["mfu_pct"] is None  # no peak FLOP/s is known for a CPU
    env = result["environment"]
    assert env["torch"] and env["triton"] and "cuda" in env and result["mode"] == "train"


def test_attn_mode_checks_agreement_and_reports_tflops(tmp_path):
    stdout, result = run_bench(tmp_path, "--mode=attn")
    rows = {r["impl"]: r for r in result["rows"]}
    for name in ("SDPA + ALiBi float mask", "SDPA, no bias (ceiling)", "eager reference"):
        assert rows[name]["max_err"] < 1e-4 and rows[name]["fwd_tflops"] > 0
        assert rows[name]["bwd_tflops"] > 0 and rows[name]["fwd_bwd_tflops"] > 0
        assert rows[name]["bwd_tflops"] == pytest.approx(2.5 * 4 * 2 * 128 * 128 * 32 / 2 / rows[name]["bwd_ms"] / 1e9)
    assert rows["ours (triton)"]["note"] == "needs CUDA"  # a subprocess without TRITON_INTERPRET


def test_sample_mode_matches_transformers_greedy(tmp_path):
    pytest.importorskip("transformers")
    stdout, result = run_bench(tmp_path, "--mode=sample", "--sample_batch_sizes=[1, 3]",
                               "--sample_prompt_len=8", "--sample_new_tokens=12")
    for row in result["rows"]:
        assert row["same_greedy_tokens"] == 12  # in fp32 both generate the same tokens
        assert row["ours_tok_s"] > 0 and row["hf_tok_s"] > 0


def test_unknown_mode_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "bench.py", "--mode=speed"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown mode='speed'" in r.stderr and "Traceback" not in r.stderr


# two wgmma loops as cuobjdump prints them: the main one (q k^T of the next block issued before the exp2s,
# an mbarrier wait whose retry lives out of line) and a masked one (FSEL) with a spill reload
SASS_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*0110*/              @!P0 BRA 0x400 ;
        /*0120*/                   WARPGROUP.ARRIVE ;
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R24, R152, gdesc[UR8].tnspB, R24 ;
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, R156, gdesc[UR12].tnspB, R24, gsb0 ;
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0160*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR16], RZ, !UPT, gsb0 ;
        /*0170*/                   MUFU.EX2 R3, R4 ;
        /*0180*/                   MUFU.EX2 R5, R6 ;
        /*0190*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*01a0*/               @P3 UTMALDG.4D [UR20], [UR22] ;
        /*01b0*/                   NOP ;
        /*01c0*/               @P1 BRA 0x100 ;
        /*0200*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0210*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0220*/                   FSEL R3, R3, -INF , P2 ;
        /*0230*/                   MUFU.EX2 R3, R3 ;
        /*0240*/                   LDL R7, [R1+0x8] ;
        /*0250*/               @P1 BRA 0x200 ;
        /*0260*/                   EXIT ;
        /*0400*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R2 ;
        /*0410*/              @!P0 BRA 0x400 ;
        /*0420*/                   BRA 0x120 ;
"""


def test_sass_mode_reads_a_listings_loops(tmp_path):
    listing = tmp_path / "k.sass"
    listing.write_text(SASS_LISTING)
    _, result = run_bench(tmp_path, "--mode=sass", f"--sass_listing={listing}")
    main, masked = result["rows"]  # the main loop first: no masks
    assert main == dict(instructions=12, hgmma=3, hgmma_shapes=["64x128x16", "64x64x16"], ex2=2, ex2_in_flight=2,
                        waits=1, bar_sync=1, tma_loads=1, tma_reduce=0, global_loads=0, spill=0, mask_selects=0)
    assert (masked["instructions"], masked["ex2_in_flight"], masked["spill"], masked["mask_selects"]) == (6, 0, 1, 1)


QUICK_STEPS = ["tests", "attn", "train_mpt_125m", "train_mpt_1b", "sample_mpt_125m"]


def test_gpu_session_quick_dry_run_checks_every_step(tmp_path):
    # bench/gpu_session.sh quick, the first GPU session's one command, checked on the CPU: every step's command
    # reached with the flag that only checks it (pytest --collect-only, bench.py --dry_run=True), nothing run,
    # nothing in $OUT but the log
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "bench/gpu_session.sh", "quick", "--dry_run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["quick.log"]
    log = (tmp_path / "out" / "quick.log").read_text()
    for name in QUICK_STEPS:
        assert f"== {name}: check exit 0" in log, name
    assert [line.split(":")[0] for line in log.splitlines() if "check exit" in line] == [f"== {n}" for n in QUICK_STEPS]
    assert "21 tests collected" in log  # the GPU kernel tests, which the CPU skips
    assert "ours (triton, PIPELINE=False forced), ours (triton, PIPELINE=True forced)" in log
    assert "1311.1M-parameter model" in log and log.count("; nothing ran") == 4


def test_dry_run_stops_at_a_bad_setting(tmp_path):
    r = subprocess.run([sys.executable, "bench.py", "--mode=attn", "--attn_shapes=[(4, 16, 4096)]", "--dry_run=True"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "error: attn_shapes=[(4, 16, 4096)]" in r.stderr and "Traceback" not in r.stderr
