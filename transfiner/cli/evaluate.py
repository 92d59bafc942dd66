"""``transfiner evaluate``: box, mask and boundary AP of the coarse and the refined masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfiner.cli.arguments import (
    add_backend_argument,
    add_max_cells_argument,
    add_model_arguments,
    add_precision_argument,
    model_from_args,
    predictor_from_args,
)
from transfiner.model.evaluation.evaluate import evaluate, report_markdown


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``transfiner evaluate``'s arguments to ``parser``."""
    add_model_arguments(parser)
    add_backend_argument(parser)
    add_precision_argument(parser)
    add_max_cells_argument(parser)
    parser.add_argument("--data", required=True, help="COCO annotations json of the val set")
    parser.add_argument(
        "--image-root", default=None, help="folder the json's file names are relative to (default: next to the json)"
    )
    parser.add_argument("--out", required=True, help="report folder (report.json, report.md, overlays/)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--max-detections", type=int, default=None, help="per image (default: 100)")
    parser.add_argument("--num-overlays", type=int, default=4, help="overlay PNGs of the first N images")
    parser.add_argument("--workers", type=int, default=0, help="data loading processes")
    return parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Runs ``transfiner evaluate`` on the predictor the arguments name
    (any backend: the command line above the packages knows them); bad input raises ValueError /
    DatasetError / CheckpointError."""
    if getattr(args, "workers", 0) < 0:
        raise ValueError(f"--workers cannot be negative, got {args.workers}")
    predictor = predictor_from_args(args)
    report = evaluate(
        predictor,
        args.data,
        args.out,
        image_root=args.image_root,
        batch_size=args.batch_size,
        max_images=args.max_images,
        num_overlays=getattr(args, "num_overlays", 4),
        max_detections=getattr(args, "max_detections", None),
        weights=model_from_args(args),
        num_workers=getattr(args, "workers", 0),
    )
    print(report_markdown(report))
    print(f"wrote {Path(args.out) / 'report.json'}")
    return 0
