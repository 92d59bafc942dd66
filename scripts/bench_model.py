"""Benchmark: per-image time and peak memory of Mask Transfiner, whole model and mask head alone.

R50-FPN with random weights (FrozenBN statistics calibrated on the image) on one 800x1333 image, for 10 / 50 / 100 detections, with the
Transfiner refinement on and off (coarse Mask R-CNN masks). Random weights with a score
threshold of 0 give exactly the asked number of detections. Peak memory is the process's peak
resident set size during the measured call, reset before each call (Linux ``clear_refs``), minus
the resident size just before it.

    .venv/bin/python scripts/bench_model.py --out bench-results/model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import preset
from model.layers import FrozenBatchNorm2d
from model.preprocess import prepare_batch
from model.rcnn import InferenceOptions, MaskTransfiner
from model.transfiner import CONTEXT_SIZE


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, repeats: int) -> tuple[float, float]:
    """-> (median seconds, peak extra MiB) over ``repeats`` calls."""
    times, peaks = [], []
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        peaks.append((_rss_kib("VmHWM") - before) / 1024)
    times.sort()
    return times[len(times) // 2], max(peaks)


def calibrate_frozen_bn(model: MaskTransfiner, batch: torch.Tensor) -> None:
    """Sets every FrozenBN's statistics to those of its input on ``batch``.

    Random convolutions with identity statistics blow activations up through 50+ layers (the
    RPN then proposes one whole-image box); calibrated statistics give the random network sane
    activations, so it yields as many distinct detections as a trained one would.
    """

    def set_stats(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model.backbone(model.normalize(batch))
    for hook in hooks:
        hook.remove()


def _exec_with_mmap_allocations() -> None:
    """Re-runs this script with glibc serving large blocks by mmap, so a freed tensor leaves the
    resident set at once and peak-RSS deltas measure what a call really allocates."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _exec_with_mmap_allocations()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="R50-FPN")
    parser.add_argument("--detections", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--out", default="bench-results/model")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = preset(args.config)
    model = MaskTransfiner(cfg).eval()
    image = torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8)
    batch, sizes = prepare_batch([image], cfg.input, "cpu")
    calibrate_frozen_bn(model, batch)
    k28, k56, k112 = cfg.transfiner.max_cells
    tokens = CONTEXT_SIZE**2 + k28 + 4 * k56 + 16 * k112

    rows = []
    cases = [(n, refine) for n in args.detections for refine in (False, True)]
    with torch.inference_mode():
        model(batch, sizes, InferenceOptions(score_threshold=0.0, max_detections=2))  # warm-up
        features = model.backbone(model.normalize(batch))[:4]
        for count, refine in tqdm(cases, desc="bench", unit="case"):
            options = InferenceOptions(score_threshold=0.0, max_detections=count, refine=refine)
            detections = model(batch, sizes, options)
            assert len(detections.scores) == count, "random weights gave too few detections"
            whole_s, whole_mib = measure(lambda: model(batch, sizes, options), args.repeats)
            head_s, head_mib = measure(
                lambda: model.mask_head(
                    features, detections.boxes, detections.classes, detections.batch_index, None, refine
                ),
                args.repeats,
            )
            rows.append({
                "detections": count, "refine": refine, "model_s": whole_s, "model_peak_mib": whole_mib,
                "mask_head_s": head_s, "mask_head_peak_mib": head_mib,
            })

    by_key = {(r["detections"], r["refine"]): r for r in rows}
    for r in rows:
        r["model_ratio_refined_vs_coarse"] = r["model_s"] / by_key[(r["detections"], False)]["model_s"]
    report = {
        "config": args.config, "image": [args.height, args.width], "device": "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "max_cells": [k28, k56, k112], "tokens_per_box": tokens, "official_worst_case_tokens": 196 + 784 + 3136 + 12544,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# {args.config}, {args.height}x{args.width}, CPU ({report['threads']} threads), random weights",
        f"Tokens per refined box: at most {tokens} (official code: up to {report['official_worst_case_tokens']}).",
        "",
        "| detections | masks | model s/img | model peak MiB | mask head s | mask head peak MiB | model time vs coarse |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['detections']} | {'refined' if r['refine'] else 'coarse'} | {r['model_s']:.2f} | "
            f"{r['model_peak_mib']:.0f} | {r['mask_head_s']:.2f} | {r['mask_head_peak_mib']:.0f} | "
            f"{r['model_ratio_refined_vs_coarse']:.2f}x |"
        )
    table = "\n".join(lines)
    (out / "bench_model.md").write_text(table + "\n")
    print(table)
    _plot(rows, out / "bench_model.png", args.config)


def _plot(rows: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for refine, style in ((False, "o--"), (True, "s-")):
        sel = [r for r in rows if r["refine"] == refine]
        label = "refined" if refine else "coarse"
        counts = [r["detections"] for r in sel]
        axes[0].plot(counts, [r["model_s"] for r in sel], style, label=f"model, {label}")
        axes[0].plot(counts, [r["mask_head_s"] for r in sel], style, alpha=0.5, label=f"mask head, {label}")
        axes[1].plot(counts, [r["model_peak_mib"] for r in sel], style, label=f"model, {label}")
        axes[1].plot(counts, [r["mask_head_peak_mib"] for r in sel], style, alpha=0.5, label=f"mask head, {label}")
    axes[0].set(xlabel="detections per image", ylabel="seconds per image", title=f"{name} CPU time")
    axes[1].set(xlabel="detections per image", ylabel="peak extra MiB", title="peak memory")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
