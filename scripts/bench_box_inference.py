"""Benchmark: box inference (scores, decoding, NMS, per-image top-k), previous vs current.

Synthetic box-head outputs at R50 sizes: 8 images, 1000 proposals each (interleaved by image,
as the RPN emits them), 80 classes + background, 800x1333 images. Logits mimic a trained head:
most proposals lean to the background, the others to one class, so a 0.05 threshold leaves a
few hundred candidates per image while 0 leaves all 80,000. "previous" is the implementation
before the pre-NMS bound (``scripts.reference.box_inference``), "current" is ``BoxROIHeads.inference``.

    python -m scripts.bench_box_inference --out bench-results/box_inference
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from scripts.reference.box_inference import reference_inference
from scripts.results import markdown_table, write_report
from transfiner.model.config import ROIHeadsConfig
from transfiner.model.modeling.roi_heads import BoxROIHeads


def synthetic_outputs(images: int, per_image: int, num_classes: int, device: str, seed: int = 0):
    """-> logits [P, K+1], deltas [P, 4K], proposals [P, 4], proposal_batch [P], image_sizes [B, 2]."""
    g = torch.Generator().manual_seed(seed)
    p = images * per_image
    height, width = 800, 1333
    batch = torch.arange(images).repeat_interleave(per_image)[torch.randperm(p, generator=g)]
    # Proposals around a few dozen objects per image, as the RPN's are.
    objects = torch.rand(images, 30, 4, generator=g) * torch.tensor([width, height, 300, 300]) + 16
    pick = objects[batch, torch.randint(0, 30, (p,), generator=g)]
    centre = pick[:, :2] + torch.randn(p, 2, generator=g) * 10
    size = pick[:, 2:] * (1 + 0.2 * torch.randn(p, 2, generator=g)).clamp(min=0.3)
    proposals = torch.cat((centre - size / 2, centre + size / 2), dim=1)
    logits = torch.randn(p, num_classes + 1, generator=g)
    logits[:, -1] += 4.0  # background
    lean = torch.randint(0, num_classes, (p,), generator=g)
    logits[torch.arange(p), lean] += torch.rand(p, generator=g) * 9.0
    deltas = torch.randn(p, 4 * num_classes, generator=g) * 0.3
    image_sizes = torch.tensor([[height, width]]).repeat(images, 1)
    return [t.to(device) for t in (logits, deltas, proposals, batch, image_sizes)]


def timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_box_inference", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--proposals", type=int, default=1000, help="per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped without a GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench-results/box_inference")
    args = parser.parse_args()

    cfg = ROIHeadsConfig(num_classes=args.classes)
    rows = []
    with torch.inference_mode():
        for device in args.devices:
            if device == "cuda" and not torch.cuda.is_available():
                print("no CUDA device: skipping cuda")
                continue
            heads = BoxROIHeads(cfg, in_channels=256).eval().to(device)
            inputs = synthetic_outputs(args.images, args.proposals, args.classes, device)
            probs = torch.softmax(inputs[0], dim=-1)[:, :-1]
            for thresh in args.thresholds:
                top_k = cfg.detections_per_image
                candidates = (probs > thresh).sum().item() / args.images
                old = reference_inference(heads, *inputs, thresh, top_k)
                new = heads.inference(*inputs, thresh, top_k)
                identical = (
                    old[3].tolist() == new.batch_index.tolist()
                    and old[2].tolist() == new.classes.tolist()
                    and torch.equal(old[1], new.scores)
                    and torch.equal(old[0], new.boxes)
                )
                old_ms = timed(partial(reference_inference, heads, *inputs, thresh, top_k), device, args.repeats)
                new_ms = timed(partial(heads.inference, *inputs, thresh, top_k), device, args.repeats)
                rows.append(
                    {
                        "device": device,
                        "threshold": thresh,
                        "candidates_per_image": candidates,
                        "detections_per_image": new.scores.shape[0] / args.images,
                        "previous_ms_per_image": old_ms / args.images,
                        "current_ms_per_image": new_ms / args.images,
                        "speedup": old_ms / new_ms,
                        "identical_to_previous": identical,
                    }
                )
                print(json.dumps(rows[-1]))

    report = {
        "images": args.images,
        "proposals_per_image": args.proposals,
        "classes": args.classes,
        "pre_nms_topk_test": cfg.pre_nms_topk_test,
        "detections_per_image": cfg.detections_per_image,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows,
    }
    lines = [
        f"# Box inference, {args.images} images x {args.proposals} proposals, {args.classes} classes, "
        f"pre-NMS bound {cfg.pre_nms_topk_test}",
        f"CPU: {report['machine']} ({report['cpu_threads']} threads); GPU: {report['gpu']}; torch {torch.__version__}",
        "",
        *markdown_table(
            [
                "device",
                "threshold",
                "candidates/img",
                "detections/img",
                "previous ms/img",
                "current ms/img",
                "speedup",
                "identical",
            ],
            (
                [
                    r["device"],
                    r["threshold"],
                    f"{r['candidates_per_image']:.0f}",
                    f"{r['detections_per_image']:.0f}",
                    f"{r['previous_ms_per_image']:.2f}",
                    f"{r['current_ms_per_image']:.2f}",
                    f"{r['speedup']:.1f}x",
                    "yes" if r["identical_to_previous"] else "no",
                ]
                for r in rows
            ),
            align="lrrrrrrl",
        ),
    ]
    table = "\n".join(lines)
    write_report(Path(args.out), "bench_box_inference", report, table)
    print(table)


if __name__ == "__main__":
    main()
