"""``transfiner predict``: segment images on any backend, write COCO results and overlays."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from transfiner.cli.arguments import (
    add_backend_argument,
    add_max_cells_argument,
    add_model_arguments,
    add_precision_argument,
    predictor_from_args,
)
from transfiner.model.inference.images import load_image_rgb


def add_predict_arguments(predict: argparse.ArgumentParser) -> None:
    predict.add_argument("images", nargs="+", help="image files")
    add_model_arguments(predict)
    add_backend_argument(predict)
    add_precision_argument(predict)
    add_max_cells_argument(predict)
    predict.add_argument("--out", required=True, help="results JSON path")
    predict.add_argument("--overlay", default=None, help="folder for overlay PNGs")
    predict.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default 2)")
    predict.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="0..1, keep detections scoring above it (default: the model's, 0.05)",
    )
    predict.add_argument("--max-detections", type=int, default=None, help="per image (default: 100)")
    predict.add_argument("--mask-threshold", type=float, default=0.5, help="0..1, binarises the masks (default 0.5)")
    predict.add_argument("--no-refine", action="store_true", help="coarse Mask R-CNN masks only")


def cmd_predict(args: argparse.Namespace) -> int:
    """``transfiner predict`` on the predictor the arguments name."""
    from tqdm import tqdm

    from transfiner.model.inference.visualize import draw_overlay

    paths = [Path(p) for p in args.images]
    ids = image_ids(paths)
    overlays = overlay_names(paths) if args.overlay else []
    predictor = predictor_from_args(args)
    cfg = predictor.cfg
    if args.overlay:
        Path(args.overlay).mkdir(parents=True, exist_ok=True)
    records = []
    for start in tqdm(range(0, len(paths), args.batch_size), desc="predict", unit="batch", disable=None):
        chunk = range(start, min(start + args.batch_size, len(paths)))
        images = [load_image_rgb(paths[i]) for i in chunk]
        predictions = predictor.predict(
            images,
            score_threshold=args.score_threshold,
            max_detections=args.max_detections,
            refine=not args.no_refine,
            mask_threshold=args.mask_threshold,
        )
        for i, image, prediction in zip(chunk, images, predictions):
            records.extend(prediction.coco_records(ids[i], cfg.category_ids))
            if args.overlay:
                labels = [f"{cfg.class_names[c]} {s:.2f}" for c, s in zip(prediction.classes, prediction.scores)]
                picture = draw_overlay(image, prediction.boxes, prediction.masks, labels)
                picture.save(Path(args.overlay) / overlays[i])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records))
    print(f"wrote {len(records)} instances for {len(paths)} images to {args.out}")
    return 0


def image_ids(paths: list[Path]) -> list[str]:
    """Each input's ``image_id`` in the results: its file name, or the path as given where another
    input has the same file name, so that no two images share an id."""
    names = Counter(path.name for path in paths)
    ids = [path.name if names[path.name] == 1 else path.as_posix() for path in paths]
    repeated = [image_id for image_id, count in Counter(ids).items() if count > 1]
    if repeated:
        raise ValueError(f"{repeated[0]} is given more than once")
    return ids


def overlay_names(paths: list[Path]) -> list[str]:
    """Each input's overlay file: ``<stem>.png``; where inputs share a stem (d1/x.png, d2/x.png,
    x.jpg), the fewest trailing parts of their paths that tell them apart, joined by ``__``, plus
    ``.png`` (d1__x.png.png, d2__x.png.png, x.jpg.png)."""
    stems = Counter(path.stem for path in paths)
    names = []
    for path in paths:
        if stems[path.stem] == 1:
            names.append(f"{path.stem}.png")
            continue
        alike = [other.parts for other in paths if other.stem == path.stem]
        for depth in range(1, len(path.parts) + 1):
            tail = path.parts[-depth:]
            if sum(other[-depth:] == tail for other in alike) == 1:
                break
        names.append("__".join(tail) + ".png")
    if len(set(names)) < len(names):  # only names that were built to look alike, such as a__b/x and a/b/x
        raise ValueError(f"the overlays of two inputs would both be named {Counter(names).most_common(1)[0][0]}")
    return names
