"""``transfiner predict``: segment images on any backend, write COCO results and overlays.

``--engine local`` (the default) runs here and writes one results file; ``--engine ray`` runs a
bulk job on a Ray cluster (``transfiner.bulk``) that writes resumable JSON Lines shards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transfiner.cli.arguments import (
    add_backend_argument,
    add_max_cells_argument,
    add_model_arguments,
    add_precision_argument,
    add_ray_cluster_arguments,
    model_from_args,
    predictor_from_args,
    replica_gpus,
)
from transfiner.model.inference.images import load_image_rgb
from transfiner.model.inference.naming import image_ids, overlay_names


def add_predict_arguments(predict: argparse.ArgumentParser) -> None:
    predict.add_argument(
        "images",
        nargs="+",
        metavar="INPUTS",
        help="image files; with --engine ray also folders, globs, manifests (.txt: a path a line, .json: a "
        "list) and URLs (file://, s3://, any filesystem fsspec opens)",
    )
    add_model_arguments(predict)
    add_backend_argument(predict)
    add_precision_argument(predict)
    add_max_cells_argument(predict)
    predict.add_argument(
        "--out", required=True, help="results JSON path; with --engine ray, the folder of the job's shards"
    )
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
    predict.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (default); ray: a bulk job on a Ray cluster, with Ray Data",
    )
    ray = predict.add_argument_group("--engine ray")
    add_ray_cluster_arguments(ray, "model replicas (Ray Data actors)")
    ray.add_argument("--shard-size", type=int, default=None, help="images a committed shard holds (default 1000)")
    ray.add_argument(
        "--resume", action="store_true", help="continue the job in --out: images already committed are skipped"
    )
    ray.add_argument(
        "--coco-results", default=None, help="also merge every shard into this COCO results JSON file at the end"
    )


_RAY_FLAGS = (
    "ray_address",
    "replicas",
    "min_replicas",
    "max_replicas",
    "replica_cpus",
    "replica_gpus",
    "shard_size",
    "coco_results",
)


def cmd_predict(args: argparse.Namespace) -> int:
    """``transfiner predict`` on the predictor the arguments name."""
    if args.engine == "ray":
        return cmd_predict_ray(args)
    given = [f"--{name.replace('_', '-')}" for name in _RAY_FLAGS if getattr(args, name) is not None]
    if given or args.resume:
        raise ValueError(f"{', '.join(given or ['--resume'])}: only with --engine ray")
    from tqdm import tqdm

    from transfiner.model.inference.visualize import prediction_overlay

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
                prediction_overlay(image, prediction, cfg.class_names).save(Path(args.overlay) / overlays[i])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records))
    print(f"wrote {len(records)} instances for {len(paths)} images to {args.out}")
    return 0


def cmd_predict_ray(args: argparse.Namespace) -> int:
    """``transfiner predict --engine ray``: a bulk job, its summary table at the end."""
    try:
        from transfiner.bulk.ray_job import BulkJob, JobFailed, ModelSpec, PredictOptions, Scaling, run
    except ImportError as error:
        raise ValueError(f"--engine ray needs Ray Data: pip install 'transfiner[ray]' ({error})") from None

    job = BulkJob(
        inputs=list(args.images),
        out=Path(args.out),
        model=ModelSpec(
            model=str(model_from_args(args)),
            backend=args.backend or "pytorch",
            config=args.config,
            device=args.device,
            precision=args.precision,
            max_cells=args.max_cells,
        ),
        options=PredictOptions(args.score_threshold, args.max_detections, args.mask_threshold, not args.no_refine),
        scaling=Scaling(
            replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            replica_cpus=1.0 if args.replica_cpus is None else args.replica_cpus,
            replica_gpus=replica_gpus(args.replica_gpus, args.device),
        ),
        batch_size=args.batch_size,
        shard_size=args.shard_size or 1000,
        resume=args.resume,
        overlay=Path(args.overlay) if args.overlay else None,
        ray_address=args.ray_address,
        coco_results=Path(args.coco_results) if args.coco_results else None,
    )
    try:
        summary = run(job)
    except JobFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.table())
    if job.coco_results:
        print(f"wrote {summary.coco_instances} instances to {job.coco_results}")
    return 0
