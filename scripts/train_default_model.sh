#!/usr/bin/env bash
# Reproduces the shipped default model (model/default_model/): data, training in two phases,
# evaluation on data of three seeds training never saw, packaging. The shipped model was trained
# on a lent NVIDIA H200 (0.13-0.18 s an iteration at batch 8; 6.3 minutes for both phases, with
# scripts/train_default_model_gpu.sh, which runs these training commands with --iters sized to
# the time it had); the same commands run on a CPU, at about 1 s an iteration at batch 2 on 2
# cores, so some hours at batch 8.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/default}
T=${T:-.venv/bin/transfiner}
TRAIN=("$T" train --config small --data "$OUT/data/train/annotations.json" --batch-size 8 --optimizer adamw
       --clip-grad 5.0 --no-amp --workers 8 --seed 0 --log-period 20 --checkpoint-period 100)

$T make-shapes "$OUT/data/train" --num-images 3000 --seed 1 --workers 12
for seed in 21 22 2; do  # seeds training never saw
    $T make-shapes "$OUT/data/seed$seed" --num-images 100 --seed "$seed" --workers 12
done
start=$(date +%s)
# Phase 1, from scratch; phase 2, fine-tuned from it with the learning rate restarted.
"${TRAIN[@]}" --out "$OUT/train" --iters 1691 --lr 0.0004 --warmup-iters 300
"${TRAIN[@]}" --out "$OUT/finetune" --weights "$OUT/train/model_final.pth" --iters 1006 --lr 0.0002 --warmup-iters 100
minutes=$(python3 -c "print(($(date +%s) - $start) / 60)")
for seed in 21 22 2; do
    $T evaluate --model "$OUT/finetune/model_final.pth" --data "$OUT/data/seed$seed/annotations.json" \
        --out "$OUT/eval-$seed"
done
.venv/bin/python scripts/package_default_model.py model/default_model --run "$OUT/train" --run "$OUT/finetune" \
    --eval "fresh seed 21=$OUT/eval-21" --eval "fresh seed 22=$OUT/eval-22" \
    --eval "seed 2 (the validation set of the model before)=$OUT/eval-2" \
    --commands scripts/train_default_model.sh --hardware "${HARDWARE:-an NVIDIA H200}" --wall-time-min "$minutes" \
    --notes model/default_model/NOTES.md
