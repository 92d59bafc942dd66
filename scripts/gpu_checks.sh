#!/usr/bin/env bash
# What this project measures and checks on a lent GPU machine, in one run: the CUDA tests, the
# host's decoding (python -m scripts.bench_decode, seconds), then python -m scripts.bench_gpu
# (in-process and HTTP). On an H200 on 2026-11-27 the CUDA tests took 29 s and the benchmark 447 s
# with every part it had then; the parts answered since are gone, and the run is estimated at
# under 6 minutes: give the device call about 500 s. A run cut short keeps every part it
# finished, and `python -m scripts.bench_gpu --parts ... --http-servers ...` reruns what it
# missed. Run from the project root there, with cp312 wheels of what the machine's image lacks
# (fastapi, pydantic, uvicorn, pycocotools, ...: it has no network) downloaded beforehand into
# .whl/ (carry it). bench_gpu.json and bench_gpu.md go to $OUT (default bench-results/gpu),
# rewritten after each part so a run cut short still brings back what it measured; scratch files
# stay in /tmp.
set -uo pipefail
OUT=${OUT:-bench-results/gpu}
mkdir -p "$OUT"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider -k "cuda" tests/model/inference/test_precision.py \
    tests/model/inference/test_postprocess.py tests/model/modeling/test_refiner.py \
    tests/service/engine/test_cuda_smoke.py tests/service/engine/test_worker_process.py \
    2>&1 | tail -15 | tee "$OUT/cuda-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# The host's own decoding beside a busy Python thread (a few seconds): what the server's decode
# times in bench_gpu's HTTP table compare with.
timeout 60 python3 -m scripts.bench_decode --repeats 7 --busy 0,0.5 --out "$OUT/decode" 2>&1 | tail -9
timeout "${BENCH_TIMEOUT:-420}" python3 -m scripts.bench_gpu --out "$OUT" --work "$(mktemp -d)" || status=1
# The GPU image's own entrypoint on this GPU: only where Docker and the image (make images) are
# there, since the device machine reaches no registry and carries no 7 GB image. Else it says so.
if command -v docker >/dev/null && docker image inspect transfiner:gpu >/dev/null 2>&1; then
    cid=$(docker run -d --gpus all -p 127.0.0.1:18000:8000 transfiner:gpu)
    for _ in $(seq 120); do curl -sf localhost:18000/health/ready >/dev/null && break; sleep 1; done
    curl -s localhost:18000/v1/models | tee "$OUT/container-models.json"
    python3 -m transfiner make-shapes --num-images 1 /tmp/container-shapes >/dev/null
    curl -s -o "$OUT/container-segment.json" -w "container /v1/segment: HTTP %{http_code}\n" \
        --data-binary @"$(ls /tmp/container-shapes/images/* | head -1)" localhost:18000/v1/segment | tee "$OUT/container.txt"
    docker stop -t 60 "$cid" >/dev/null; echo "container exit code: $(docker wait "$cid")" | tee -a "$OUT/container.txt"
    docker rm "$cid" >/dev/null
else
    echo "container check skipped: no Docker engine with the transfiner:gpu image on this machine" | tee "$OUT/container.txt"
fi
exit $status
