"""
Parallel speed of prepare.py: tokens/s at num_proc=1 and num_proc=2 on >= 20 MB of text.

    python bench_prepare.py [--input=tinyshakespeare.txt] [--mb=24] [--repeat=5] [--wait=60]

The corpus is tiny Shakespeare repeated with its lines shuffled (seeded) per copy, written twice to a
temporary folder: as one .txt file (one document, cut into pieces for the workers) and as a .jsonl of
~4 KB documents. Each run is a whole prepare.py run: reading, tokenizing, writing. Scaling is the
num_proc=2 rate over twice the num_proc=1 rate, each the best of --repeat interleaved runs; on a
2-core machine the goal is >= 70%. A shared machine skews timings, so each run first waits (up to
--wait seconds) for other processes to leave the CPUs idle, and the CPU they used meanwhile is shown.
"""
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from configurator import configure, help_if_asked, out_of_range

help_if_asked(__file__)  # --help: the settings below

import prepare

# -----------------------------------------------------------------------------
input = ''  # the text to repeat; empty: ../shared/data/tinyshakespeare.txt if there, else the shipped assets/ copy
mb = 24.0  # megabytes of text to tokenize in each run
repeat = 5  # runs of each kind, interleaved; the best of them counts
wait = 60.0  # seconds each run may wait first for the CPUs to be idle
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
shared = Path(__file__).resolve().parents[1] / "shared"
if (shared / "tiktoken").is_dir():  # the GPT-2 BPE with no download, as in the tests
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared / "tiktoken"))
problems = out_of_range(globals(), __file__, whole=dict(repeat=1), at_least=dict(wait=0), positive=('mb',))
if problems:
    sys.exit('error: ' + '\nerror: '.join(problems))
default = shared / "data" / "tinyshakespeare.txt"
source = Path(input or (default if default.exists() else prepare.shakespeare_text))
if not source.exists():
    sys.exit(f"bench_prepare.py: no {source}: give --input=PATH to some text")

lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
rng, text = random.Random(0), []
while sum(map(len, text)) < mb * 1e6:
    rng.shuffle(lines)
    text.append("".join(lines))
text = "".join(text)


def snapshot():
    """(CPU seconds the whole machine has been busy, this process's and its children's, now): Linux only."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return busy, sum(os.times()[:4]), time.time()


def others_since(start):
    """Cores' worth of CPU that other processes used since a snapshot."""
    (busy0, own0, t0), (busy, own, t) = start, snapshot()
    return max(0.0, (busy - busy0 - (own - own0)) / (t - t0))


def run(path, num_proc):
    """One whole prepare.py run: (tokens/s, cores' worth of CPU that other processes used meanwhile)."""
    cfg = prepare.configured([f"--input={path}", f"--out_dir={path.parent / 'out'}", "--overwrite", f"--num_proc={num_proc}"])
    deadline = time.time() + wait
    while time.time() < deadline:  # wait, up to --wait seconds, for a second in which the CPUs were idle
        start = snapshot()
        time.sleep(1)
        if others_since(start) < 0.2:
            break
    start = snapshot()
    with contextlib.redirect_stdout(io.StringIO()):
        meta = prepare.prepare(cfg)
    return (meta["train_tokens"] + meta["val_tokens"]) / (time.time() - start[2]), others_since(start)


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(0, len(text), 4000):
            f.write(json.dumps({"text": text[i:i + 4000]}) + "\n")
    print(f"{len(text.encode()) / 1e6:.1f} MB of text, {os.cpu_count()} CPUs, best of {repeat} interleaved runs")
    best = {}
    for _ in range(repeat):  # interleaved, and the best kept: other work on a shared machine only slows a run
        for name in ("corpus.txt", "corpus.jsonl"):
            for num_proc in (1, 2):
                best[name, num_proc] = max(best.get((name, num_proc), (0, 0)), run(tmp / name, num_proc))
    for name in ("corpus.txt", "corpus.jsonl"):
        for num_proc in (1, 2):
            rate, others = best[name, num_proc]
            print(f"{name:13s} num_proc={num_proc}: {rate:12,.0f} tokens/s  (other processes meanwhile: {others:.2f} cores)")
        print(f"{name:13s} scaling: num_proc=2 reaches {best[name, 2][0] / (2 * best[name, 1][0]):.1%} of twice num_proc=1")
