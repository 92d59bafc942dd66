"""``transfiner make-shapes``: write the synthetic fine-detail data set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transfiner.model.datasets.shapes import CATEGORIES, ShapesConfig, parse_size, write_shapes


def add_make_shapes_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add make-shapes' arguments (out, --num-images, --seed, --size) to ``parser``."""
    parser.add_argument("out", help="output folder (gets annotations.json and images/)")
    parser.add_argument("--num-images", type=int, required=True, help="how many images to generate")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", default="384x384", help="image size WIDTHxHEIGHT (default 384x384)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes rendering in parallel (default 1; the output does not depend on it)",
    )
    return parser


def cmd_make_shapes(args: argparse.Namespace) -> int:
    """Run ``make-shapes``: validate ``args`` (ValueError on bad input), write the data set, print a summary."""
    width, height = parse_size(getattr(args, "size", None))
    if args.num_images is None or int(args.num_images) < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    if int(args.seed) < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    workers = int(getattr(args, "workers", 1))
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    cfg = ShapesConfig(num_images=int(args.num_images), seed=int(args.seed), width=width, height=height)
    path = write_shapes(cfg, args.out, workers)
    count = len(json.loads(path.read_text())["annotations"])
    print(
        f"wrote {cfg.num_images} images ({width}x{height}, {count} instances, "
        f"{len(CATEGORIES)} categories) to {Path(args.out)}; annotations: {path}"
    )
    return 0
