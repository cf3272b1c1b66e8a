#!/usr/bin/env bash
# What a lent GPU is for, prepared without one. Two ways to spend it:
#   bash bench/gpu_session.sh quick [--dry_run]                  # the first GPU: at most 8 minutes, 2 files
#   bash bench/gpu_session.sh tests attn race train sample       # or: all (about 20 minutes, split across calls)
#
# quick: one command for a first session (15 minutes of device time, its start included): the steps in order of
# value, each under its own `timeout`, all within QUICK_SECONDS (455) so that it ends within 8 minutes, each
# printing as it goes and adding its figures to $OUT/quick.json as it ends, so a cut run still returns what it
# did. $OUT gets two files: quick.json (device, versions, commit, and per step its command, exit status,
# seconds and results) and quick.log (everything printed). A step's time includes its compiling and autotuning.
#   tests            the GPU kernel tests at training shapes, bf16 against float64: forward, backward, fused and
#                    separate dQ, sequence ids, TMA and pointer paths, each variant (115 s)
#   attn             bench.py --mode=attn at (4, 16, 4096, 128), causal bf16: the autotuner's pick, each variant
#                    forced, deterministic (separate dQ); SDPA + float mask, FlexAttention + ALiBi, SDPA no bias (115 s)
#   train_mpt_125m   bench.py --mode=train, micro-batch 8, compiled, beside transformers' MPT (70 s)
#   train_mpt_1b     the same, micro-batch 2 (where transformers' eager attention still fits) (100 s)
#   sample_mpt_125m  bench.py --mode=sample: decode tokens/s beside transformers' generate, batch 1 and 16 (60 s)
# --dry_run (on any machine, no GPU used): each step's command with the flag that only checks it (pytest
# --collect-only, bench.py --dry_run=True: arguments parse, config files and tests exist, the models build on
# the meta device, the variants are in the autotune tables); $OUT gets quick.log only. tests/test_bench.py runs it.
#
# The other steps, each writing a log (and JSON where bench.py makes one) under $OUT, and their rough cost on an
# H100/H200 (10-minute cap per device command):
#   tests  the attention and model tests on CUDA: real bf16 kernels, training-scale shapes vs float64 (~3 min)
#   attn   bench.py --mode=attn: ours vs SDPA + float mask, FlexAttention + ALiBi, SDPA no bias, eager (~2 min)
#   race   compute-sanitizer racecheck and memcheck on a small forward + backward, both dQ paths (~2 min)
#   train  bench.py --mode=train, largest micro-batch, compiled, vs transformers: mpt_125m, mpt_350m, mpt_1b (~5 min)
#   sample bench.py --mode=sample: decode tokens/s vs transformers' generate, mpt_125m and mpt_1b (~2 min)
#   shakespeare  train.py config/shakespeare_char.py (nanoGPT's val loss: 1.4697), then one torchrun process
#          (~6 min); needs data/tinyshakespeare.txt in the work tree (copy ../shared/data/ there and carry it)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/session}
mkdir -p "$OUT"
quick() {  # quick [--dry_run]
    local dry=0 log=$OUT/quick.log results=$OUT/quick.json tmp failed=()
    case "${1:-}" in
    --dry_run) dry=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_session.sh quick [--dry_run]"; exit 2 ;;
    esac
    tmp=$(mktemp -d)  # the steps' own JSON (bench.py --json), merged into quick.json as each ends
    trap 'rm -rf "$tmp"' EXIT
    : > "$log"
    local deadline=$((SECONDS + ${QUICK_SECONDS:-455}))
    say() { echo "$*" | tee -a "$log"; }
    merge() {  # merge NAME STATUS SECONDS COMMAND LOG_LINE: the step into quick.json (a new file, then renamed)
        python - "$results" "$tmp" "$log" "$@" <<'PY'
import json, os, re, sys
results, tmp, log, name, status, seconds, command, first = sys.argv[1:]
data = json.load(open(results)) if os.path.exists(results) else {}
outcome = "skipped: out of time" if status == "skipped" else "ok" if status == "0" else \
    "cut at its limit" if status in ("124", "137") else "failed"
step = dict(command=command, seconds=int(seconds), exit=int(status) if status.isdigit() else None, outcome=outcome)
mine = os.path.join(tmp, name + ".json")  # bench.py's own file: its rows and environment
if os.path.exists(mine):
    ran = json.load(open(mine))
    step.update(rows=ran["rows"], environment=ran["environment"])
output = open(log).read().splitlines()[int(first):]
outcomes = [m.groups() for m in (re.match(r"(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", line)
                                 for line in output) if m]
if outcomes:  # pytest -vv: one line per test, as it ends
    step["tests"] = {what: sum(o == what for _, o in outcomes) for what in sorted({o for _, o in outcomes})}
    step["failed"] = [test for test, o in outcomes if o in ("FAILED", "ERROR")]
    step["summary"] = next((line.strip("= ") for line in reversed(output) if re.search(r"\d+ (passed|failed|skipped)", line)), "")
if outcome != "ok" and output:  # what it printed last: the error, or how far a cut step got
    step["tail"] = output[-25:]
data.setdefault("steps", {})[name] = step
with open(results + ".new", "w") as f:
    json.dump(data, f, indent=1)
os.replace(results + ".new", results)
PY
    }
    step() {  # step NAME SECONDS CHECK CMD...: CMD under `timeout`, at most SECONDS (fewer if the budget is nearly
        # spent), printing into the log as it goes, then into quick.json; with --dry_run, CMD CHECK (it checks only)
        local name=$1 limit=$2 check=$3 start=$SECONDS first rc; shift 3
        if ((dry)); then
            say "== $name: $* $check"
            "$@" "$check" 2>&1 | tee -a "$log"
            rc=${PIPESTATUS[0]}
            say "== $name: check exit $rc after $((SECONDS - start)) s"
            ((rc == 0)) || failed+=("$name")
            return
        fi
        local left=$((deadline - SECONDS))
        ((limit > left)) && limit=$left
        if ((limit < 20)); then
            say "== $name: skipped, ${left} s of the budget left"
            merge "$name" skipped 0 "$*" "$(wc -l < "$log")"
            failed+=("$name")
            return
        fi
        first=$(wc -l < "$log")
        say "== $name (at most $limit s): $*"
        # INT first, as Ctrl-C would: pytest then prints its summary; KILL 10 s later if that did not end it
        PYTHONUNBUFFERED=1 timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
        say "== $name: exit $rc after $((SECONDS - start)) s$( ((rc == 124 || rc == 137)) && echo ": cut at its limit")"
        merge "$name" "$rc" $((SECONDS - start)) "$*" "$first"
        ((rc == 0)) || failed+=("$name")
    }

    say "== quick$( ((dry)) && echo ' --dry_run') at $(date -u +%FT%TZ), commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    command -v timeout > /dev/null || { say "error: no timeout command (coreutils)"; exit 1; }
    if ((!dry)); then  # the device and the versions, first: they come back even if every step fails
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$log"
        timeout 60 python - "$results" "${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" <<'PY' 2>&1 | tee -a "$log"
import importlib.util, json, platform, sys, time
import torch, triton
env = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
           capability=".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None,
           torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version())
for package in ("transformers", "flash_attn"):
    env[package] = __import__(package).__version__ if importlib.util.find_spec(package) else None
json.dump(dict(environment=env, commit=sys.argv[2], command="bash bench/gpu_session.sh quick",
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), steps={}), open(sys.argv[1], "w"), indent=1)
print(" | ".join(f"{k} {v}" for k, v in env.items()))
PY
    fi
    # in order of value; each line: name, seconds, the flag that only checks it, the command
    step tests 115 --collect-only python -m pytest -vv -rfE -p no:cacheprovider \
        tests/test_attention.py::test_attention_bf16_training_scale_paths \
        tests/test_attention.py::test_attention_bf16_training_scale
    step attn 115 --dry_run=True python bench.py --mode=attn "--attn_shapes=[(4, 16, 4096, 128)]" \
        --attn_variants=True --attn_eager=False --json="$tmp/attn.json"
    step train_mpt_125m 70 --dry_run=True python bench.py config/mpt_125m.py --mode=train --batch_size=8 \
        --compile=True --compare_hf=True --json="$tmp/train_mpt_125m.json"
    step train_mpt_1b 100 --dry_run=True python bench.py config/mpt_1b.py --mode=train --batch_size=2 \
        --compile=True --compare_hf=True --json="$tmp/train_mpt_1b.json"
    step sample_mpt_125m 60 --dry_run=True python bench.py config/mpt_125m.py --mode=sample \
        --sample_new_tokens=128 --json="$tmp/sample_mpt_125m.json"
    say "== quick$( ((dry)) && echo ' --dry_run') done after $SECONDS s; not clean: ${failed[*]:-none}"
    ((dry)) || say "== wrote $results and $log"
    [ ${#failed[@]} -eq 0 ]
}

if [ "${1:-}" = quick ]; then
    quick "${@:2}"
    exit
fi

steps=("$@")
[ ${#steps[@]} -eq 0 ] || [ "${steps[0]}" = all ] && steps=(tests attn race train sample shakespeare)
python - > "$OUT/environment.txt" <<'PY'
import platform, torch, triton
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| python", platform.python_version())
PY
cat "$OUT/environment.txt"

run() {  # run NAME CMD...: time it, keep its output, say how it ended
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s; last lines of $OUT/$name.log:"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
}

for step in "${steps[@]}"; do
    case $step in
    tests)  # the AOT test needs PyPI for Triton 3.6; the GPU machines have no network and run 3.6 anyway
        run tests python -m pytest tests/test_attention.py tests/test_model.py -q -x -k "not aot_compile" ;;
    attn)
        run attn python bench.py --mode=attn --attn_variants=True --json="$OUT/attn.json" ;;
    race)
        cat > "$OUT/race.py" <<'PY'
import torch
from model import alibi_slopes, flash_attn_alibi
for deterministic in (False, True):
    for ids in (None, torch.tensor([[0] * 100 + [1] * 156]).cuda()):
        q, k, v = (torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        out = flash_attn_alibi(q, k, v, alibi_slopes(4).cuda(), deterministic=deterministic, sequence_id=ids)
        out.sum().backward()
torch.cuda.synchronize()
print("ran forward + backward, both dQ paths, with and without sequence ids")
PY
        run racecheck env PYTHONPATH=. compute-sanitizer --tool racecheck --racecheck-report all python "$OUT/race.py"
        run memcheck env PYTHONPATH=. compute-sanitizer --tool memcheck python "$OUT/race.py" ;;
    train)
        for c in mpt_125m mpt_350m mpt_1b; do
            run "train_$c" python bench.py "config/$c.py" --mode=train --compare_hf=True --batch_size=0 \
                --json="$OUT/train_$c.json"
        done ;;
    sample)
        for c in mpt_125m mpt_1b; do
            run "sample_$c" python bench.py "config/$c.py" --mode=sample --json="$OUT/sample_$c.json"
        done ;;
    shakespeare)
        python prepare.py shakespeare_char --input=data/tinyshakespeare.txt --out_dir=data/shakespeare_char \
            > "$OUT/prepare.log" 2>&1 || { echo "prepare failed: see $OUT/prepare.log"; continue; }
        run shakespeare python train.py config/shakespeare_char.py --out_dir=out-gpu-shakespeare
        run shakespeare_torchrun torchrun --standalone --nproc_per_node=1 train.py config/shakespeare_char.py \
            --out_dir=out-gpu-shakespeare-torchrun --max_iters=500 --lr_decay_iters=5000 ;;
    *)
        echo "unknown step $step: use quick, or tests attn race train sample shakespeare, or all"; exit 2 ;;
    esac
done
