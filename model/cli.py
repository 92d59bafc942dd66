"""The ``transfiner`` command line.

Every sub-command reports bad input as one clear line on stderr and exit status 2 (1 for a
failed check such as an incomplete checkpoint conversion), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint_io import CheckpointError
from .config import PRESET_NAMES
from .data import DatasetError, load_image_rgb
from .default_model import add_backend_argument, add_model_arguments, add_precision_argument


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .default_model import predictor_from_args
    from .visualize import draw_overlay

    predictor = predictor_from_args(args)
    cfg = predictor.cfg
    paths = [Path(p) for p in args.images]
    if args.overlay:
        Path(args.overlay).mkdir(parents=True, exist_ok=True)
    records = []
    for start in tqdm(range(0, len(paths), args.batch_size), desc="predict", unit="batch", disable=None):
        chunk = paths[start : start + args.batch_size]
        images = [load_image_rgb(p) for p in chunk]
        predictions = predictor.predict(
            images, score_threshold=args.score_threshold, max_detections=args.max_detections,
            refine=not args.no_refine,
            mask_threshold=args.mask_threshold,
        )
        for path, image, prediction in zip(chunk, images, predictions):
            records.extend(prediction.coco_records(path.name, cfg.category_ids))
            if args.overlay:
                labels = [f"{cfg.class_names[c]} {s:.2f}" for c, s in zip(prediction.classes, prediction.scores)]
                picture = draw_overlay(image, prediction.boxes, prediction.masks, labels)
                picture.save(Path(args.overlay) / f"{path.stem}.png")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records))
    print(f"wrote {len(records)} instances for {len(paths)} images to {args.out}")
    return 0


def cmd_convert_official(args: argparse.Namespace) -> int:
    from .checkpoint import convert_official_state_dict, save_checkpoint
    from .checkpoint_io import read_state_dict
    from .config import preset
    from .rcnn import MaskTransfiner

    official = read_state_dict(args.input, allow_pickle=args.allow_pickle)
    model = MaskTransfiner(preset(args.config))
    converted, report = convert_official_state_dict(official, model)
    print(report.format())
    if not report.ok:
        print(f"error: {args.input} cannot be used as {args.config}: keys are missing or have the wrong shape",
              file=sys.stderr)
        return 1
    model.load_state_dict(converted)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.output, model, source=str(args.input))
    print(f"wrote {args.output} ({args.config}, {sum(t.numel() for t in converted.values()) / 1e6:.2f} M values)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transfiner", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="segment images, write COCO results JSON")
    predict.add_argument("images", nargs="+", help="image files")
    add_model_arguments(predict)
    add_backend_argument(predict)
    add_precision_argument(predict)
    predict.add_argument("--out", required=True, help="results JSON path")
    predict.add_argument("--overlay", default=None, help="folder for overlay PNGs")
    predict.add_argument("--batch-size", type=int, default=2)
    predict.add_argument("--score-threshold", type=float, default=None)
    predict.add_argument("--max-detections", type=int, default=None, help="per image (default: 100)")
    predict.add_argument("--mask-threshold", type=float, default=0.5)
    predict.add_argument("--no-refine", action="store_true", help="coarse Mask R-CNN masks only")
    predict.set_defaults(func=cmd_predict)

    convert = commands.add_parser("convert-official", help="convert an official SysCV/transfiner checkpoint")
    convert.add_argument("input", help="detectron2-format .pth (or .pkl with --allow-pickle)")
    convert.add_argument("output", help="where to write our checkpoint")
    convert.add_argument("--config", required=True, choices=[n for n in PRESET_NAMES if n != "small"])
    convert.add_argument("--allow-pickle", action="store_true",
                         help="allow reading .pkl files (numpy arrays only; pickle can run code)")
    convert.set_defaults(func=cmd_convert_official)

    from export.cli import add_export_arguments, cmd_export
    from service.cli import add_serve_arguments, cmd_serve
    from service.loadtest.cli import add_bench_arguments, cmd_bench

    from .evaluate import add_evaluate_arguments, cmd_evaluate
    from .shapes import add_make_shapes_arguments, cmd_make_shapes
    from .train import add_train_arguments, cmd_train

    # Sub-commands whose arguments live next to their implementation.
    for name, help_text, add_arguments, command in (
        ("make-shapes", "write a synthetic fine-detail COCO data set", add_make_shapes_arguments, cmd_make_shapes),
        ("train", "train on a COCO-format data set", add_train_arguments, cmd_train),
        ("evaluate", "box, mask and boundary AP of coarse vs refined masks", add_evaluate_arguments, cmd_evaluate),
        ("serve", "run the REST service (FastAPI, dynamic batching)", add_serve_arguments, cmd_serve),
        ("export", "export as TorchScript or ONNX (and check the TensorRT path)", add_export_arguments, cmd_export),
        ("bench", "load-test a running service", add_bench_arguments, cmd_bench),
    ):
        sub = commands.add_parser(name, help=help_text)
        add_arguments(sub)
        sub.set_defaults(func=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CheckpointError, DatasetError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
