#!/usr/bin/env bash
# Everything issue 13 asks of a lent GPU, as steps in order of value; each writes a log (and JSON where
# bench.py makes one) under $OUT. Prepared without a GPU: run the steps that fit the session's device time,
#   bash bench/gpu_session.sh tests attn race train sample      # or: all
# Steps and their rough cost on an H100/H200 (10-minute cap per device command: split across calls):
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
        run attn python bench.py --mode=attn --json="$OUT/attn.json" ;;
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
        echo "unknown step $step: use tests attn race train sample shakespeare, or all"; exit 2 ;;
    esac
done
