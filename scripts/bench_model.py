"""Benchmark: per-image time and peak memory of Mask Transfiner, whole model and mask head alone.

R50-FPN with random weights (FrozenBN statistics calibrated on the image) on one 800x1333 image,
for 10 / 50 / 100 detections, with the Transfiner refinement on and off (coarse Mask R-CNN masks).
Random weights with a score threshold of 0 give exactly the asked number of detections. Peak
memory is the process's peak resident set size during the measured call, reset before each call
(Linux ``clear_refs``), minus the resident size just before it.

The refiner section compares, on the same detections and the same module, the refinement as it
was (every box padded to the caps ``--padded-cells``, chunks of ``boxes_per_chunk`` boxes) with
the refinement now (covering caps, chunks by token budget, trimmed to the real nodes). Random
weights give incoherence ~0.5 everywhere: all 28- and 56-level cells and no 112-level one, 4,116
tokens a box, as many as the official code refines there; ``--padded-cells 784,784,1`` pads that
to 4,132.

    python -m scripts.bench_model --out bench-results/model
    python -m scripts.bench_model --skip-model --detections 10 50 100 --out bench-results/refiner

``--caps-data annotations.json`` instead evaluates the shipped default model on make-shapes
images at several node caps (``--caps``): mask AP / AP^B and forward time per image, and the
tokens a refined box really had (trimmed; the caps' padded length in brackets).

    python -m scripts.bench_model --caps-data data/val/annotations.json --max-images 20 --out bench-results/caps
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from scripts.results import markdown_table, write_report
from transfiner.model.config import COVERING_MAX_CELLS, parse_max_cells, preset
from transfiner.model.inference.preprocess import prepare_batch
from transfiner.model.modeling.layers import FrozenBatchNorm2d
from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner
from transfiner.model.modeling.refiner import PointQuadtree, tokens_per_box


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
    """Re-runs this module with glibc serving large blocks by mmap, so a freed tensor leaves the
    resident set at once and peak-RSS deltas measure what a call really allocates."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)


def main() -> None:
    _exec_with_mmap_allocations()
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_model", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="R50-FPN")
    parser.add_argument("--detections", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--max-cells", type=parse_max_cells, default=None, help="caps of the whole-model rows")
    parser.add_argument(
        "--padded-cells", type=parse_max_cells, default=(784, 784, 1), help="caps of the padded (before) refiner rows"
    )
    parser.add_argument("--skip-model", action="store_true", help="only the refiner section")
    parser.add_argument("--skip-padded", action="store_true", help="refiner section: only the trimmed rows")
    parser.add_argument("--caps-data", default=None, help="COCO json: run the default model's caps sweep instead")
    parser.add_argument(
        "--caps",
        type=parse_max_cells,
        nargs="+",
        default=[(784, 196, 64), (784, 392, 128), (784, 588, 256), COVERING_MAX_CELLS],
    )
    parser.add_argument("--max-images", type=int, default=20, help="caps sweep: first N images of --caps-data")
    parser.add_argument("--out", default="bench-results/model")
    args = parser.parse_args()
    if args.caps_data:
        bench_caps(args)
        return

    torch.manual_seed(0)
    cfg = preset(args.config)
    if args.max_cells is not None:
        cfg.transfiner.max_cells = args.max_cells
    model = MaskTransfiner(cfg).eval()
    image = torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8)
    batch, sizes = prepare_batch([image], cfg.input, "cpu")
    calibrate_frozen_bn(model, batch)
    k28, k56, k112 = cfg.transfiner.max_cells
    tokens = tokens_per_box(cfg.transfiner.max_cells)

    rows = []
    cases = [] if args.skip_model else [(n, refine) for n in args.detections for refine in (False, True)]
    with torch.inference_mode():
        model(batch, sizes, InferenceOptions(score_threshold=0.0, max_detections=2))  # warm-up
        features = model.backbone(model.normalize(batch))[:4]
        for count, refine in tqdm(cases, desc="bench", unit="case"):
            options = InferenceOptions(score_threshold=0.0, max_detections=count, refine=refine)
            detections = model(batch, sizes, options)
            assert len(detections.scores) == count, "random weights gave too few detections"
            whole_s, whole_mib = measure(partial(model, batch, sizes, options), args.repeats)
            head_s, head_mib = measure(
                partial(
                    model.mask_head,
                    features,
                    detections.boxes,
                    detections.classes,
                    detections.batch_index,
                    None,
                    refine,
                ),
                args.repeats,
            )
            rows.append(
                {
                    "detections": count,
                    "refine": refine,
                    "model_s": whole_s,
                    "model_peak_mib": whole_mib,
                    "mask_head_s": head_s,
                    "mask_head_peak_mib": head_mib,
                }
            )

        refiner_rows = bench_refiner(model, batch, sizes, features, args)

    by_key = {(r["detections"], r["refine"]): r for r in rows}
    for r in rows:
        r["model_ratio_refined_vs_coarse"] = r["model_s"] / by_key[(r["detections"], False)]["model_s"]
    report = {
        "config": args.config,
        "image": [args.height, args.width],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "max_cells": [k28, k56, k112],
        "tokens_per_box": tokens,
        "official_worst_case_tokens": 196 + 784 + 3136 + 12544,
        "tokens_per_chunk": cfg.transfiner.tokens_per_chunk,
        "boxes_per_chunk": cfg.transfiner.boxes_per_chunk,
        "rows": rows,
        "refiner_rows": refiner_rows,
    }
    lines = [
        f"# {args.config}, {args.height}x{args.width}, CPU ({report['threads']} threads), random weights",
        f"Tokens per refined box: at most {tokens} (official code: up to {report['official_worst_case_tokens']}).",
        "",
        *markdown_table(
            [
                "detections",
                "masks",
                "model s/img",
                "model peak MiB",
                "mask head s",
                "mask head peak MiB",
                "model time vs coarse",
            ],
            (
                [
                    r["detections"],
                    "refined" if r["refine"] else "coarse",
                    f"{r['model_s']:.2f}",
                    f"{r['model_peak_mib']:.0f}",
                    f"{r['mask_head_s']:.2f}",
                    f"{r['mask_head_peak_mib']:.0f}",
                    f"{r['model_ratio_refined_vs_coarse']:.2f}x",
                ]
                for r in rows
            ),
            align="rlrrrrr",
        ),
        "",
        f"Refiner alone, same detections: padded to caps {list(args.padded_cells)} in chunks of "
        f"{cfg.transfiner.boxes_per_chunk} boxes (before) vs covering caps, chunks of at most "
        f"{cfg.transfiner.tokens_per_chunk} tokens, trimmed to the real nodes (now).",
        "",
        *markdown_table(
            [
                "detections",
                "refinement",
                "real tokens/box (mean)",
                "computed tokens",
                "s",
                "peak MiB",
                "max abs diff vs padded",
            ],
            (
                [
                    r["detections"],
                    r["mode"],
                    f"{r['real_tokens_mean']:.0f}",
                    r["computed_tokens"],
                    f"{r['seconds']:.2f}",
                    f"{r['peak_mib']:.0f}",
                    "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}",
                ]
                for r in refiner_rows
            ),
            align="rlrrrrr",
        ),
    ]
    table = "\n".join(lines)
    out = Path(args.out)
    write_report(out, "bench_model", report, table)
    print(table)
    if rows:
        _plot(rows, out / "bench_model.png", args.config)


def bench_refiner(model: MaskTransfiner, batch, sizes, features, args) -> list[dict]:
    """The refinement of the same detections, padded to caps as before vs trimmed as now."""
    return [row for count in args.detections for row in bench_refiner_at(model, batch, sizes, features, args, count)]


def bench_refiner_at(model: MaskTransfiner, batch, sizes, features, args, count: int) -> list[dict]:
    """``bench_refiner``'s rows for ``count`` detections."""
    head = model.mask_head
    refiner = head.refiner
    thresholds = model.cfg.transfiner.thresholds
    covering = PointQuadtree(thresholds, COVERING_MAX_CELLS)
    padded = PointQuadtree(thresholds, args.padded_cells)
    enhanced = head.enhanced_features(features)
    rows = []
    det = model(batch, sizes, InferenceOptions(score_threshold=0.0, max_detections=count, refine=False))
    roi_features, mask_features, coarse = head._coarse(features, det.boxes, det.classes, det.batch_index)
    incoherence = head.incoherence(roi_features, mask_features)
    per_box = (det.boxes, det.batch_index, head.pooler.levels(det.boxes), roi_features, coarse)
    real = (
        sum(
            tokens_per_box(level)
            for level in torch.stack([lv.cell_valid.sum(1) for lv in covering(incoherence)], 1).tolist()
        )
        / count
    )

    def before() -> torch.Tensor:
        step = refiner.boxes_per_chunk
        return torch.cat(
            [
                refiner.refine_chunk(enhanced, *(t[s : s + step] for t in per_box), padded(incoherence[s : s + step]))
                for s in range(0, count, step)
            ]
        )

    def now() -> torch.Tensor:
        refiner.quadtree = covering
        try:
            return refiner(enhanced, *per_box, incoherence)
        finally:
            refiner.quadtree = default

    default = refiner.quadtree
    reference = None
    cases = [("trimmed (now)", now)] if args.skip_padded else [("padded (before)", before), ("trimmed (now)", now)]
    for mode, fn in cases:
        outputs = []
        seconds, peak = measure(lambda fn=fn, outputs=outputs: outputs.append(fn()), args.repeats)
        result = outputs.pop()
        outputs.clear()
        refiner.quadtree = covering
        chunks = refiner.chunks(incoherence)
        refiner.quadtree = default
        computed = (
            count * tokens_per_box(args.padded_cells)
            if mode.startswith("padded")
            else sum(len(index) * (196 + sum(lv.nodes.shape[1] for lv in levels)) for index, levels in chunks)
        )
        diff = None if reference is None else float((result - reference).abs().max())
        reference = result if reference is None else reference
        rows.append(
            {
                "detections": count,
                "mode": mode,
                "real_tokens_mean": real,
                "computed_tokens": computed,
                "seconds": seconds,
                "peak_mib": peak,
                "max_abs_diff": diff,
            }
        )
        print(rows[-1], flush=True)
    return rows


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


class TimedBackend:
    """A backend that adds up the seconds of its forward passes (the Predictor's ``infer``)."""

    def __init__(self, backend) -> None:
        self.inner = backend
        self.name, self.device, self.cfg, self.precision = backend.name, backend.device, backend.cfg, backend.precision
        self.model = backend.model
        self.seconds = 0.0
        self.images = 0

    def infer(self, images, image_sizes, options):
        start = time.perf_counter()
        raw = self.inner.infer(images, image_sizes, options)
        self.seconds += time.perf_counter() - start
        self.images += images.shape[0]
        return raw


def bench_caps(args) -> None:
    """The default model at each of ``args.caps``: AP, AP^B, forward time, tokens per refined box."""
    from transfiner.model.evaluation.evaluate import evaluate
    from transfiner.model.inference.predictor import Predictor, load_predictor

    out = Path(args.out)
    rows = []
    for caps in args.caps:
        base = load_predictor("default", device="cpu", precision="fp32", max_cells=caps)
        timed = TimedBackend(base.backend)
        refiner = timed.model.mask_head.refiner
        incoherence: list[torch.Tensor] = []  # of the refined boxes; their tokens are counted after timing
        hook = refiner.register_forward_hook(lambda module, inputs, output, kept=incoherence: kept.append(inputs[-1]))
        try:
            report = evaluate(
                Predictor.from_backend(timed),
                args.caps_data,
                out / "-".join(map(str, caps)),
                batch_size=1,
                max_images=args.max_images,
                num_overlays=0,
            )
        finally:
            hook.remove()
        real: list[int] = []
        for maps in incoherence:
            for _, levels in refiner.chunks(maps):
                real.extend((196 + sum(lv.valid.sum(1) for lv in levels)).tolist())
        rows.append(
            {
                "max_cells": list(caps),
                "padded_tokens": tokens_per_box(caps),
                "real_tokens_mean": sum(real) / max(len(real), 1),
                "refined_boxes": len(real),
                "mask_AP": report["refined"]["AP"],
                "boundary_AP": report["refined"]["boundary_AP"],
                "box_AP": report["bbox_AP"],
                "coarse_mask_AP": report["coarse"]["AP"],
                "forward_s_per_image": timed.seconds / timed.images,
                "images": timed.images,
            }
        )
        print(rows[-1], flush=True)
    lines = [
        f"# Default model, {rows[0]['images']} make-shapes images ({args.caps_data}), "
        f"CPU ({torch.get_num_threads()} threads), fp32",
        "",
        *markdown_table(
            ["max cells", "tokens/box real (padded)", "mask AP", "AP^B", "box AP", "forward s/img"],
            (
                [
                    ",".join(map(str, r["max_cells"])),
                    f"{r['real_tokens_mean']:.0f} ({r['padded_tokens']})",
                    f"{r['mask_AP']:.2f}",
                    f"{r['boundary_AP']:.2f}",
                    f"{r['box_AP']:.2f}",
                    f"{r['forward_s_per_image']:.3f}",
                ]
                for r in rows
            ),
            align="lrrrrr",
        ),
    ]
    write_report(out, "bench_caps", rows, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
