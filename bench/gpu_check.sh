#!/usr/bin/env bash
# Issue 18's GPU figures in one device session (about 8 minutes): the cuda tests, training throughput per
# cell on the GPU, and the 300 s recipe on tiny Shakespeare (three runs side by side on the one GPU: two
# seeds of the lstm, one gru). Everything it prints also goes to $OUT/log.txt, with each run's curves.png.
#
# Here, once:   mkdir -p .gpu && cp ../shared/data/tinyshakespeare.txt .gpu/ && echo /.gpu/ >> .git/info/exclude
# On the GPU:   device run, command "bash bench/gpu_check.sh .gpu/tinyshakespeare.txt", carry [".gpu"]
set -uo pipefail
corpus=${1:?usage: bash bench/gpu_check.sh CORPUS [SECONDS]}
budget=${2:-300}
device=${DEVICE:-cuda}  # DEVICE=cpu: a smoke test of this script on a machine without a GPU
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/log.txt") 2>&1

# The device image has torch with CUDA and the runtime's dependencies; install the project alone, offline.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

echo "## cuda tests"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_device.py 2>&1 | tail -4

echo "## training throughput per cell (recipe's shape), GPU"
python3 bench/train_throughput.py --device "$device" --cells --steps 20 --rounds 3

echo "## recipe: ${budget} s each, three runs side by side"
common=(--corpus "$corpus" --device "$device" --precision bf16 --num-layers 3 --hidden-size 512 --dropout 0.2
        --batch-size 128 --bptt 100 --lr 2e-3 --warmup-steps 100 --eval-every 250 --time-budget "$budget" --quiet)
pids=()
for spec in "lstm 1" "lstm 2" "gru 1"; do
    read -r cell seed <<<"$spec"
    python3 -c "from textgen.service.cli import main; main()" train "${common[@]}" --cell "$cell" --seed "$seed" \
        --out "/tmp/runs/$cell-$seed" >"/tmp/runs-$cell-$seed.txt" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
for spec in "lstm 1" "lstm 2" "gru 1"; do
    read -r cell seed <<<"$spec"
    run="/tmp/runs/$cell-$seed"
    tail -n 1 "/tmp/runs-$cell-$seed.txt"
    python3 - "$run" "$cell-$seed" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
val = [r for r in records if r["split"] == "val"]
train = [r for r in records if r["split"] == "train"]
best = min(val, key=lambda r: r["loss"])
print(f"{sys.argv[2]}: best held-out {best['loss']:.4f} at step {best['step']} ({best['elapsed']:.0f} s); "
      f"last {val[-1]['loss']:.4f} at step {val[-1]['step']}; "
      f"tokens/s {train[-1]['tokens_per_s'] if train else 0:,.0f}; "
      f"curve " + " ".join(f"{r['step']}:{r['loss']:.3f}" for r in val))
PY
    cp "$run/curves.png" "$out/curves-$cell-$seed.png" 2>/dev/null
done
