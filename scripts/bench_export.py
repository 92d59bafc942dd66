"""Benchmark: per-image latency of eager PyTorch vs TorchScript vs ONNX Runtime, and file sizes.

The same model (default: the shipped default model), the same pre-processed inputs (make-shapes
images, batch of one), measured side by side: each round runs every backend once on the same
image, in rotating order, so slow spells of a noisy machine hit all of them alike. Ratios are
per round (eager time / backend time), then the median over rounds.

    python -m scripts.bench_export --out bench-results/export
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from scripts.results import markdown_table, write_report
from transfiner.export.backends import load_backend
from transfiner.export.exporter import export_model
from transfiner.export.resolve import resolve_model
from transfiner.model.datasets.shapes import ShapesConfig, render_image
from transfiner.model.inference.backend import BACKEND_NAMES, TorchBackend
from transfiner.model.inference.preprocess import prepare_batch, to_rgb_tensor
from transfiner.model.modeling.rcnn import InferenceOptions
from transfiner.model.weights.checkpoint import load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a checkpoint")
    parser.add_argument("--images", type=int, default=6, help="make-shapes images (384x384)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="the service's default")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    parser.add_argument("--out", default="bench-results/export")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = resolve_model(args.model, "pytorch").path
    model = load_model(weights, device="cpu")
    cfg = model.cfg

    exports = Path(tempfile.mkdtemp(prefix="bench-export-"))
    sizes_mb = {"checkpoint": weights.stat().st_size / 2**20}
    export_seconds = {}
    for fmt in tqdm(("torchscript", "onnx"), desc="export", disable=None):
        result = export_model(model, fmt, exports / fmt, source=weights)
        sizes_mb[fmt] = result.size_bytes / 2**20
        export_seconds[fmt] = result.seconds
    backends = {
        "pytorch": TorchBackend(model),
        "torchscript": load_backend(exports / "torchscript", "torchscript", device="cpu"),
        "onnxruntime": load_backend(exports / "onnx", "onnxruntime", device="cpu", threads=args.threads),
    }

    shapes = ShapesConfig(num_images=args.images, seed=7)
    images = [to_rgb_tensor(render_image(shapes, i)[0]) for i in range(args.images)]
    inputs = [prepare_batch([image], cfg.input, "cpu") for image in images]
    options = InferenceOptions(score_threshold=args.score_threshold)

    for backend in backends.values():  # warm-up: first calls allocate and plan
        backend.infer(*inputs[0], options)

    times: dict[str, list[float]] = {name: [] for name in BACKEND_NAMES}
    detections = []
    steps = args.rounds * len(inputs)
    with tqdm(total=steps, desc="latency", unit="image", disable=None) as progress:
        for step in range(steps):
            batch, sizes = inputs[step % len(inputs)]
            order = BACKEND_NAMES[step % 3 :] + BACKEND_NAMES[: step % 3]
            for name in order:
                start = time.perf_counter()
                raw = backends[name].infer(batch, sizes, options)
                times[name].append(time.perf_counter() - start)
                if name == "pytorch":
                    detections.append(len(raw.scores))
            progress.update()

    ratios = {name: statistics.median(e / t for e, t in zip(times["pytorch"], times[name])) for name in BACKEND_NAMES}
    summary = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "model": str(args.model),
        "config": cfg.name,
        "images": args.images,
        "rounds": args.rounds,
        "score_threshold": args.score_threshold,
        "mean_detections": statistics.mean(detections),
        "latency_ms": {
            name: {"median": 1e3 * statistics.median(t), "mean": 1e3 * statistics.mean(t), "min": 1e3 * min(t)}
            for name, t in times.items()
        },
        "speedup_vs_eager": ratios,
        "file_size_mb": sizes_mb,
        "export_seconds": export_seconds,
    }
    lines = [
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), {cfg.name} model, "
        f"{args.images} make-shapes images 384x384 x {args.rounds} rounds, batch 1, score threshold "
        f"{args.score_threshold}, {summary['mean_detections']:.1f} detections per image on average.",
        "",
        *markdown_table(
            ["backend", "median ms/img", "mean ms/img", "speed-up vs eager (median of per-image ratios)"],
            (
                [
                    name,
                    f"{summary['latency_ms'][name]['median']:.0f}",
                    f"{summary['latency_ms'][name]['mean']:.0f}",
                    f"{ratios[name]:.2f}x",
                ]
                for name in BACKEND_NAMES
            ),
            align="lrrr",
        ),
        "",
        *markdown_table(["file", "MiB"], ([name, f"{size:.1f}"] for name, size in sizes_mb.items()), align="lr"),
    ]
    write_report(out, "bench_export", summary, "\n".join(lines))
    print("\n".join(lines))
    plot(times, out / "bench_export.png")


def plot(times: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.boxplot([[1e3 * t for t in times[name]] for name in BACKEND_NAMES], tick_labels=list(BACKEND_NAMES))
    axis.set_ylabel("ms per image")
    axis.set_title("Per-image latency on CPU (same inputs)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
