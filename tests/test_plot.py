"""plot.py: a tiny train.py run's metrics.jsonl and a bench.py --json result drawn to PNGs; what the lines hold
is checked against metrics.jsonl read here, and the tokens against the run's own batch arithmetic."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import plot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "assets" / "tinyshakespeare.txt"
PNG = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 4 * 2 * 16  # batch_size x gradient_accumulation_steps x max_seq_len below


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk's width, height


def run_plot(*args, env=None):
    return subprocess.run([sys.executable, "plot.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real train.py run: 8 steps of a tiny character-level model, evaluated every 4 steps at two lengths."""
    tmp = tmp_path_factory.mktemp("plot")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    (tmp / "data").mkdir()
    ids[:180_000].tofile(tmp / "data" / "train.bin")
    ids[180_000:].tofile(tmp / "data" / "val.bin")
    args = ["--vocab_size=65", "--d_model=32", "--n_heads=4", "--n_layers=2", "--max_seq_len=16", "--batch_size=4",
            "--gradient_accumulation_steps=2", "--max_iters=8", "--eval_interval=4", "--eval_iters=2",
            "--log_interval=1", "--eval_seq_lens=[8, 32]", "--compile=False", "--device=cpu", "--dtype=float32",
            "--warmup_iters=2", "--lr_decay_iters=8", f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}"]
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    # (train.py's last line, checked here rather than in another run: the summary of what was trained and saved)
    best = min(json.loads(line)["val_loss"] for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()
               if "val_loss" in line)
    assert r.stdout.splitlines()[-1] == (f"done: 8 steps, {8 * TOKENS_PER_STEP:,} tokens, best val loss {best:.4f}; "
                                         f"{tmp / 'out' / 'ckpt.pt'} holds the best weights: python sample.py "
                                         f"--out_dir={tmp / 'out'}")
    return tmp / "out"


def test_a_run_is_drawn_against_tokens(tiny_run):
    r = run_plot(tiny_run)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {tiny_run / 'loss.png'}" and png_size(tiny_run / "loss.png") == (1000, 400)
    # the lines hold metrics.jsonl's losses (read here, later lines winning) at step x tokens per step, step 0 left
    # out (off a log axis); the second panel the last evaluation's loss at each length
    train, val, by_len = {}, {}, None
    for line in (tiny_run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            val[record["iter"]], by_len = record["val_loss"], record["val_loss_by_seq_len"]
        else:
            train[record["iter"]] = record["loss"]
    assert sorted(val) == [0, 4, 8] and sorted(train) == list(range(8))
    fig = plot.plot_runs([plot.read_run(str(tiny_run))], plt)
    left, right = fig.axes
    lines = {line.get_label(): line for line in left.get_lines()}
    for kind, losses in (("train", train), ("val", val)):
        line = lines[f"out {kind}"]
        assert list(line.get_xdata()) == [k * TOKENS_PER_STEP for k in sorted(losses) if k]
        assert list(line.get_ydata()) == [losses[k] for k in sorted(losses) if k]
    assert left.get_xscale() == "log" and left.get_xlabel() == "tokens"
    (lengths,) = right.get_lines()
    assert list(lengths.get_xdata()) == [8, 16, 32] and list(lengths.get_ydata()) == [by_len[k] for k in ("8", "16", "32")]
    plt.close(fig)


def test_two_runs_one_picture_and_an_eval_only_record_left_out(tiny_run, tmp_path):
    # a second run: the first one's metrics with an eval_only record appended (train.py --eval_only=True writes
    # one), and no checkpoint, so its axis is steps
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text((tiny_run / "metrics.jsonl").read_text()
                                         + json.dumps({"iter": 8, "val_loss": 99.0, "eval_only": True}) + "\n")
    run = plot.read_run(str(other))
    assert run["x_label"] == "steps" and run["val"] == ([4, 8], plot.read_run(str(tiny_run))["val"][1])
    r = run_plot(tiny_run, other, f"--out={tmp_path / 'both.png'}", "--title=two runs")
    assert r.returncode == 0, r.stderr
    assert png_size(tmp_path / "both.png") == (1000, 400)


def test_bench_results(tmp_path):
    # a real bench.py attn result (the CPU's smoke-test shape), and train and sample results in bench.py's format
    attn = tmp_path / "attn.json"
    r = subprocess.run([sys.executable, "bench.py", "--mode=attn", "--warmup=1", "--iters=1", f"--json={attn}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(attn.read_text())["rows"]
    fig = plot.plot_bench([plot.read_bench(str(attn))], plt)
    forward = fig.axes[0]
    timed = [row for row in rows if row.get("fwd_tflops") is not None]
    heights = sorted(round(p.get_height(), 12) for p in forward.patches)
    assert heights == sorted(round(row["fwd_tflops"], 12) for row in timed) and len(timed) >= 3
    plt.close(fig)
    r = run_plot(attn)
    assert r.returncode == 0, r.stderr
    assert png_size(tmp_path / "attn.png") == (1000, 400)
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps(dict(mode="sample", environment={}, rows=[
        dict(model="1M", batch=1, new_tokens=8, ours_tok_s=100.0, hf_tok_s=50.0),
        dict(model="1M", batch=16, new_tokens=8, ours_tok_s=900.0, hf_tok_s=300.0)])))
    fig = plot.plot_bench([plot.read_bench(str(sample))], plt)
    assert sorted(p.get_height() for p in fig.axes[0].patches) == [50.0, 100.0, 300.0, 900.0]
    plt.close(fig)
    for name in ("a", "b"):
        (tmp_path / f"train_{name}.json").write_text(json.dumps(dict(mode="train", environment={}, rows=[
            dict(impl="ours", tokens_per_sec=2000.0 if name == "a" else 1000.0, mfu_pct=40.0),
            dict(impl="transformers", tokens_per_sec=500.0, mfu_pct=None, note="")])))
    r = run_plot(tmp_path / "train_a.json", tmp_path / "train_b.json", f"--out={tmp_path / 'train.png'}")
    assert r.returncode == 0 and png_size(tmp_path / "train.png") == (1000, 400), r.stderr


@pytest.mark.parametrize("case,message", [
    ("nothing", "nothing to plot"),
    ("missing", "nope: no such file or folder"),
    ("no metrics", "no metrics.jsonl: give a train.py out_dir or a bench.py --json file"),
    ("not bench", "not a bench.py --json result"),
    ("mixed", "plot runs (folders) and bench.py results (.json files) separately"),
    ("no matplotlib", "pip install matplotlib"),
])
def test_bad_input_is_one_clear_line(tiny_run, tmp_path, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.json").write_text("[1, 2]")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "matplotlib.py").write_text("raise ImportError('not installed')\n")
    args, env = {"nothing": ([], None), "missing": ([tmp_path / "nope"], None), "no metrics": ([tmp_path / "empty"], None),
                 "not bench": ([tmp_path / "x.json"], None), "mixed": ([tiny_run, tmp_path / "x.json"], None),
                 "no matplotlib": ([tiny_run], {"PYTHONPATH": str(tmp_path / "fake")})}[case]
    r = run_plot(*args, env=env)
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_eval_tasks_get_a_panel_of_their_own(tiny_run, tmp_path):
    # train.py --eval_tasks adds {'tasks': {name: {items, acc[, acc_norm]}}} to each val record: a third panel, a line
    # per task, acc_norm where the task has it (multiple choice), else acc (completion), against tokens
    run_dir = tmp_path / "tasks"
    shutil.copytree(tiny_run, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "val_loss" in row:
            row["tasks"] = {"mc": dict(items=10, acc=0.1 * row["iter"], acc_norm=0.05 * row["iter"]),
                            "lm": dict(items=10, acc=0.02 * row["iter"])}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot.plot_runs([plot.read_run(str(run_dir))], plt)
    assert len(fig.axes) == 3
    lines = {line.get_label(): line for line in fig.axes[2].get_lines()}
    assert list(lines["tasks mc"].get_xdata()) == [4 * TOKENS_PER_STEP, 8 * TOKENS_PER_STEP]
    assert list(lines["tasks mc"].get_ydata()) == pytest.approx([0.2, 0.4])
    assert list(lines["tasks lm"].get_ydata()) == pytest.approx([0.08, 0.16])
    plt.close(fig)
    r = run_plot(run_dir)
    assert r.returncode == 0, r.stderr
