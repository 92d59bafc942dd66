#!/usr/bin/env bash
# What the GPU Docker image serves by default, measured on a lent GPU machine: the default model
# behind `transfiner serve --device cuda` (PyTorch backend, precision auto, model workers in
# processes of their own), loaded by `transfiner bench` with its generated 384x384 make-shapes
# images at 1, 8 and 32 clients, then the same with the worker in a thread. About two minutes on a
# warm machine; run after scripts/gpu_checks.sh when the device time allows (same .whl/ carry).
# Writes $OUT/default-model-{process,thread}/report.{json,md} (default bench-results/gpu).
# DEVICE=cpu REQUESTS=8 PYTHON=.venv/bin/python tries it out on a machine without a GPU.
set -uo pipefail
OUT=${OUT:-bench-results/gpu}
DEVICE=${DEVICE:-cuda}
REQUESTS=${REQUESTS:-96}
PYTHON=${PYTHON:-python3}
source scripts/gpu_env.sh
status=0
port=8123
for worker in process thread; do
    flag=$([ "$worker" = process ] && echo --worker-process || echo --no-worker-process)
    "$PYTHON" -m transfiner serve --model default --device "$DEVICE" "$flag" --port $port \
        --log-level warning > "/tmp/serve-$worker.log" 2>&1 &
    server=$!
    timeout 100 "$PYTHON" -m transfiner bench --url "http://127.0.0.1:$port" --wait-ready 60 \
        --concurrency 1 8 32 --requests "$REQUESTS" --out "$OUT/default-model-$worker" 2>&1 | grep -E "^closed c=" || status=1
    kill -INT $server; wait $server
    port=$((port + 1))
done
exit $status
