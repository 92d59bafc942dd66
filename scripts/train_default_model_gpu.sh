#!/usr/bin/env bash
# Trains the default model on a lent GPU machine for as long as it has, leaving a
# checkpoint to bring back whatever happens. Two steps, so the data can be rendered on the CPU
# cores while the GPU checks run:
#
#   bash scripts/train_default_model_gpu.sh data     # make-shapes: 3000 training images, seed 1
#   TRAIN_UNTIL=<epoch seconds> bash scripts/train_default_model_gpu.sh train
#
# `train` waits for the data, times a 40-iteration probe run (which also fails fast if the CUDA
# path is broken), sizes --iters so the run ends before TRAIN_UNTIL (the learning-rate schedule
# follows --iters), trains, and writes to $OUT: train.log and train.tar.part-* (model_final.pth
# in float16 storage, metrics.jsonl, config.json, loss_curve.png; join the parts with cat and
# untar). A run cut short still leaves its last checkpoint's weights. On this machine:
# NUM_IMAGES=16 DEVICE=cpu BATCH=2 WORKERS=1 for a small rehearsal.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
OUT=${OUT:-bench-results/gpu}
WORK=${WORK:-/tmp/train-default}
NUM_IMAGES=${NUM_IMAGES:-3000}
BATCH=${BATCH:-8}
WORKERS=${WORKERS:-8}            # data loader processes
DATA_WORKERS=${DATA_WORKERS:-12}  # make-shapes processes
DEVICE=${DEVICE:-cuda}
LR=${LR:-0.0004}
WARMUP=${WARMUP:-300}
INIT=${INIT:-}          # start from these weights (a checkpoint) instead of from scratch
PER_ITER=${PER_ITER:-}  # seconds an iteration takes, if known: no probe run
T=(python3 -m transfiner)
mkdir -p "$OUT" "$WORK"

if [ "${1:-}" = data ]; then
    "${T[@]}" make-shapes "$WORK/data" --num-images "$NUM_IMAGES" --seed 1 --workers "$DATA_WORKERS" \
        && touch "$WORK/data.done"
    exit $?
fi
[ "${1:-}" = train ] || { echo "usage: $0 data|train" >&2; exit 2; }

exec > >(tee -a "$OUT/train.log") 2>&1
UNTIL=${TRAIN_UNTIL:-$(( $(date +%s) + 300 ))}
for _ in $(seq 300); do [ -e "$WORK/data.done" ] && break; sleep 1; done
[ -e "$WORK/data.done" ] || { echo "no training data in $WORK/data"; exit 1; }

TRAIN=("${T[@]}" train --config small --data "$WORK/data/annotations.json" --device "$DEVICE"
    --batch-size "$BATCH" --optimizer adamw --lr "$LR" --warmup-iters "$WARMUP" --clip-grad 5.0 --no-amp
    --workers "$WORKERS" --seed 0 ${INIT:+--weights "$INIT"})

per_iter=$PER_ITER
if [ -z "$per_iter" ]; then
    "${TRAIN[@]}" --out "$WORK/probe" --iters 40 --log-period 10 --checkpoint-period 1000 \
        || { echo "probe run failed"; exit 1; }
    per_iter=$(python3 -c "
import json
records = [json.loads(line) for line in open('$WORK/probe/metrics.jsonl')]
print(min(r['s_per_iter'] for r in records[1:] or records))")
fi
left=$(( UNTIL - $(date +%s) - 40 ))  # start-up, the final save and packaging
iters=$(python3 -c "print(max(50, int($left / $per_iter / 1.1)))")
echo "$per_iter s/iter at batch $BATCH; training $iters iterations in about $left s${INIT:+, from $INIT}"
start=$(date +%s)
timeout $(( UNTIL - $(date +%s) - 10 )) "${TRAIN[@]}" --out "$WORK/run" --iters "$iters" --log-period 20 \
    --checkpoint-period 100
echo "training: rc $? after $(( $(date +%s) - start )) s"

python3 - "$WORK/run" "$WORK/pack" <<'PY'
import json, shutil, sys
from pathlib import Path

import torch

from transfiner.model.weights.checkpoint import FORMAT
from transfiner.model.training.train import plot_losses

run, pack = Path(sys.argv[1]), Path(sys.argv[2])
pack.mkdir(parents=True, exist_ok=True)
if (run / "model_final.pth").exists():
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
else:  # cut short: the weights of the last periodic training state
    state = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    checkpoint = {"format": FORMAT, "config": state["config"], "model": state["model"],
                  "trained_iters": state["iter"], "cut_short": True}
checkpoint["model"] = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
torch.save(checkpoint, pack / "model_final.pth")
for name in ("metrics.jsonl", "config.json"):
    shutil.copy(run / name, pack / name)
plot_losses(run / "metrics.jsonl", pack / "loss_curve.png")
print(f"packed {checkpoint.get('trained_iters')} iterations; last record:",
      (run / "metrics.jsonl").read_text().splitlines()[-1])
PY
tar -C "$WORK/pack" -cf "$WORK/train.tar" . && split -b 15m "$WORK/train.tar" "$OUT/train.tar.part-"
ls -la "$OUT"
