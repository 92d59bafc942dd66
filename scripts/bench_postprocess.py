"""Benchmark: COCO RLE from soft masks, full-image paste + encode vs window-only ``masks_to_rle``.

100 detections on a 1333x800 image (default): random 112x112 soft masks with a blob in each,
boxes of COCO-like sizes (16 to 600 px a side, aspect 1:2 to 2:1) anywhere in the image, clipped
to it. Today's path ``encode_rle(paste_masks(...))`` builds [N, H, W] full-image masks, copies
and encodes them; ``masks_to_rle`` samples each box's window only. Both answers are checked to
be byte-identical, then each is timed after a warm-up: median milliseconds over the repeats.

    python -m scripts.bench_postprocess --out bench-results/postprocess
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scripts.results import markdown_table, write_report
from transfiner.model.inference.paste import box_windows, paste_masks
from transfiner.model.inference.rle import encode_rle, masks_to_rle


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_postprocess", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("all", "cpu", "cuda"), default="all", help="all: the CPU, and CUDA when available"
    )
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--size", default="1333x800", help="image WxH")
    parser.add_argument("--mask-size", type=int, default=112)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="bench-results/postprocess")
    return parser.parse_args()


def make_inputs(n: int, height: int, width: int, mask_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, S, S] soft masks (a smooth, noisy blob each) and [n, 4] xyxy boxes clipped to the image."""
    gen = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.empty(n).uniform_(math.log(16), math.log(600), generator=gen))
    aspect = torch.exp(torch.empty(n).uniform_(math.log(0.5), math.log(2), generator=gen))
    bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
    cx, cy = torch.rand(n, generator=gen) * width, torch.rand(n, generator=gen) * height
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)  # [n, 4]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)

    coords = (torch.arange(mask_size) + 0.5) / mask_size * 2 - 1  # [S] in (-1, 1)
    radius = 0.6 + 0.3 * torch.rand(n, 1, 1, generator=gen)  # [n, 1, 1]
    blob = radius - (coords[None, :, None] ** 2 + coords[None, None, :] ** 2).sqrt()  # [n, S, S]
    noise = F.interpolate(
        torch.randn(n, 1, 6, 6, generator=gen), size=(mask_size, mask_size), mode="bicubic", align_corners=False
    )[:, 0]  # [n, S, S] smooth wobble
    return torch.sigmoid(12 * (blob + 0.15 * noise)), boxes


def median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()  # both answers are host objects: the work on the device is done when it returns
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    probs, boxes = make_inputs(args.masks, height, width, args.mask_size, args.seed)
    devices = ["cpu"] if args.device == "cpu" else [] if args.device == "cuda" else ["cpu"]
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append("cuda")
        elif args.device == "cuda":
            raise SystemExit("--device cuda: CUDA is not available here")

    rows = []
    size = (height, width)
    for name in devices:
        device = torch.device(name)
        p, b = probs.to(device), boxes.to(device)

        def full(p=p, b=b):
            return encode_rle(paste_masks(p, b, size))

        def windows(p=p, b=b):
            return masks_to_rle(p, b, size)

        if full() != windows():
            raise SystemExit(f"{name}: masks_to_rle differs from encode_rle(paste_masks(...))")
        full_ms = median_ms(full, device, args.warmup, args.repeats)
        window_ms = median_ms(windows, device, args.warmup, args.repeats)
        cpu = f"cpu ({torch.get_num_threads()} threads)"
        rows.append(
            {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
                "paste_encode_ms": round(full_ms, 2),
                "masks_to_rle_ms": round(window_ms, 2),
                "speedup": round(full_ms / window_ms, 2),
            }
        )

    windows = box_windows(boxes, (height, width))  # [N, 4] the pixels each detection samples
    window_pixels = ((windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])).sum()
    result = {
        "masks": args.masks,
        "image_wxh": [width, height],
        "mask_size": args.mask_size,
        "full_image_mask_mb": round(args.masks * height * width / 2**20, 1),
        "window_pixels_m": round(float(window_pixels) / 1e6, 2),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "results": rows,
    }
    table = [
        f"# Post-processing: {args.masks} masks of {args.mask_size}x{args.mask_size} at {width}x{height} -> COCO RLE",
        "",
        f"Full-image masks: {result['full_image_mask_mb']} MiB; box windows: {result['window_pixels_m']} M pixels. "
        f"Median of {args.repeats} runs after {args.warmup} warm-up; answers byte-identical.",
        "",
        *markdown_table(
            ["device", "encode_rle(paste_masks) ms", "masks_to_rle ms", "speed-up"],
            (
                [r["device"], f"{r['paste_encode_ms']:.1f}", f"{r['masks_to_rle_ms']:.1f}", f"{r['speedup']:.1f}x"]
                for r in rows
            ),
            align="lrrr",
        ),
    ]
    markdown = "\n".join(table) + "\n"
    print(markdown)
    write_report(Path(args.out), "bench_postprocess", result, markdown)


if __name__ == "__main__":
    main()
