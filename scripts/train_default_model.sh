#!/usr/bin/env bash
# Reproduces the shipped default model (model/default_model/) on a CPU: data, training,
# evaluation on a separately generated validation set, packaging. Training is most of the time:
# 2000 iterations at 1.07 s each on 2 otherwise idle cores; the shipped model's training took
# 78 minutes of wall time, the cores shared with other work (model/default_model/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/default}
T=.venv/bin/transfiner

$T make-shapes "$OUT/data/train" --num-images 600 --seed 1
$T make-shapes "$OUT/data/val" --num-images 100 --seed 2   # another seed: never seen in training
start=$(date +%s)
$T train --config small --data "$OUT/data/train/annotations.json" --out "$OUT/train" \
    --iters 2000 --batch-size 2 --optimizer adamw --lr 0.0002 --warmup-iters 200 --clip-grad 5.0 \
    --checkpoint-period 500 --log-period 20 --seed 0
train_minutes=$(( ($(date +%s) - start + 30) / 60 ))  # the wall time the model's README states
$T evaluate --model "$OUT/train/model_final.pth" --data "$OUT/data/val/annotations.json" --out "$OUT/eval"
.venv/bin/python scripts/package_default_model.py "$OUT/train" "$OUT/eval" model/default_model \
    --commands scripts/train_default_model.sh --wall-time-min "$train_minutes"
