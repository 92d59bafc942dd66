"""Peak memory and time of ONNX Runtime on the default model's graph, by attention query block.

Exports the shipped default model (its own caps) once per ``--blocks`` value of
``transfiner.model.modeling.refiner.EXPORT_QUERY_BLOCK``, then runs each export in a fresh process on random
384x384 images at score threshold 0 (every image has ``--detections`` refined detections) and
reads that process's peak resident memory. Writes ``OUT/bench_onnx_memory.{json,md}``.

    python -m scripts.bench_onnx_memory --blocks 256 64 32 --images 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from scripts.results import markdown_table, write_report

EXPORT = """
import sys
import transfiner.model.modeling.refiner
transfiner.model.modeling.refiner.EXPORT_QUERY_BLOCK = int(sys.argv[1])
from transfiner.export.exporter import export_model
from transfiner.model.weights.checkpoint import build_model, load_checkpoint
from transfiner.model.weights.default import DEFAULT_WEIGHTS
model = build_model(load_checkpoint(DEFAULT_WEIGHTS)[0], DEFAULT_WEIGHTS, "cpu")
export_model(model, "onnx", sys.argv[2], source=DEFAULT_WEIGHTS)
"""

RUN = """
import resource, sys, time
import numpy as np
from transfiner.export.backends import load_backend
from transfiner.model.inference.predictor import Predictor
predictor = Predictor.from_backend(load_backend(sys.argv[1], "onnxruntime", device="cpu"))
rng = np.random.default_rng(0)
images = [rng.integers(0, 255, (384, 384, 3), dtype=np.uint8) for _ in range(int(sys.argv[2]))]
started = time.perf_counter()
found = predictor.predict(images, score_threshold=0.0, max_detections=int(sys.argv[3]))
seconds = time.perf_counter() - started
print(sum(len(p.boxes) for p in found), seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_onnx_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 64, 32])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2], help="images a forward pass")
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench-results/onnx-memory"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    cases = [(block, images) for block in args.blocks for images in args.images]
    for block, images in tqdm(cases, desc="onnx memory"):
        folder = args.out / f"export-block{block}"
        if not (folder / "model.onnx").exists():
            subprocess.run([sys.executable, "-c", EXPORT, str(block), str(folder)], check=True)
        done = subprocess.run(
            [sys.executable, "-c", RUN, str(folder), str(images), str(args.detections)],
            check=True,
            capture_output=True,
            text=True,
        )
        detections, seconds, peak_mb = done.stdout.split()
        rows.append(
            {
                "block": block,
                "images": images,
                "detections": int(detections),
                "seconds": round(float(seconds), 2),
                "peak_mb": int(peak_mb),
            }
        )
        print(rows[-1], flush=True)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": len(os.sched_getaffinity(0)),
        "rows": rows,
    }
    lines = [
        f"# ONNX Runtime, default model, random 384x384 images, {args.detections} detections an image",
        "",
        *markdown_table(
            ["query block", "images", "detections", "s", "peak MB"],
            ([r["block"], r["images"], r["detections"], r["seconds"], r["peak_mb"]] for r in rows),
            align="rrrrr",
        ),
    ]
    write_report(args.out, "bench_onnx_memory", report, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
