#!/usr/bin/env bash
# Reproduces the shipped default model (model/weights/default_model/): data, training in three phases,
# evaluation on data of three seeds training never saw, packaging. Phases 1 and 2 of the shipped
# model ran on a lent NVIDIA H200 (0.13-0.18 s an iteration at batch 8; 6.3 minutes for both,
# with scripts/train_default_model_gpu.sh, which runs these training commands with --iters sized
# to the time it had), phase 3 on a 2-core CPU (2.8 s an iteration, 47 minutes).
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
# Phase 1, from scratch; phases 2 and 3, each fine-tuned from the one before with the learning
# rate restarted. Phases 1 and 2 ran on the H200, phase 3 on a 2-core CPU (--workers 1 there;
# the number of loader processes changes nothing).
"${TRAIN[@]}" --out "$OUT/train" --iters 1691 --lr 0.0004 --warmup-iters 300
"${TRAIN[@]}" --out "$OUT/finetune" --weights "$OUT/train/model_final.pth" --iters 1006 --lr 0.0002 --warmup-iters 100
"${TRAIN[@]}" --out "$OUT/finetune2" --weights "$OUT/finetune/model_final.pth" --iters 1000 --lr 0.0001 --warmup-iters 50
minutes=$(python3 -c "print(($(date +%s) - $start) / 60)")
for seed in 21 22 2; do
    $T evaluate --model "$OUT/finetune2/model_final.pth" --data "$OUT/data/seed$seed/annotations.json" \
        --out "$OUT/eval-$seed"
done
.venv/bin/python -m scripts.package_default_model model/weights/default_model --run "$OUT/train" --run "$OUT/finetune" --run "$OUT/finetune2" \
    --eval "fresh seed 21=$OUT/eval-21" --eval "fresh seed 22=$OUT/eval-22" \
    --eval "seed 2 (the validation set of the model before)=$OUT/eval-2" \
    --commands scripts/train_default_model.sh --hardware "${HARDWARE:-an NVIDIA H200 (phases 1 and 2) and a 2-core CPU (phase 3)}" --wall-time-min "$minutes" \
    --notes model/weights/default_model/NOTES.md
