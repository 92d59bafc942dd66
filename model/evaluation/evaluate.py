"""``transfiner evaluate``: COCO metrics of the coarse and the refined masks, and the incoherence
detector judged against ground truth (paper Tables 1 and 3).

- One forward pass per batch gives both mask sets of the same detections (``RawOutputs.mask_probs``
  refined, ``RawOutputs.coarse_probs`` coarse); both go through the Predictor's own post-processing
  (``Prediction.from_outputs`` and ``coco_records``: boxes mapped back to the image, masks pasted,
  records rounded), so the refined numbers are what users get.
- Metrics come from faster-coco-eval: box AP (``bbox``), mask AP (``segm``) and boundary AP^B
  (``boundary``: Boundary IoU, Cheng et al. 2021, dilation 2% of the image diagonal; faster-coco-eval
  uses min(mask IoU, boundary IoU) per pair, as the Boundary IoU API).
- Numbers are in percent, as detectron2's COCOEvaluator; a metric with no ground truth to judge
  (e.g. APs without small objects) is ``None`` in report.json (detectron2 prints NaN).
- The incoherence statistics use the val set's ground-truth boxes and classes, so the detector's
  quality does not enter: the backbone features of the same forward pass feed
  ``mask_head.coarse_and_incoherence`` on the GT boxes, and its incoherence >= 0.5 is compared with
  ``gt_incoherence`` of the GT masks on the 28x28 grid of each box.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from transfiner.model.datasets.coco import CocoDataset, DatasetError, make_loader
from transfiner.model.datasets.targets import gt_incoherence
from transfiner.model.inference.images import load_image_rgb
from transfiner.model.inference.precision import autocast
from transfiner.model.inference.preprocess import pad_batch
from transfiner.model.modeling.rcnn import InferenceOptions

if TYPE_CHECKING:
    from transfiner.model.config import ModelConfig

__all__ = [
    "BOUNDARY_DILATION_RATIO",
    "METRIC_NAMES",
    "IncoherenceStats",
    "check_categories",
    "coco_metrics",
    "evaluate",
    "evaluation_dataset",
    "report_markdown",
]

METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The Boundary IoU paper's (and detectron2 boundary evaluation's) default: 2% of the image diagonal.
BOUNDARY_DILATION_RATIO = 0.02
INCOHERENCE_THRESHOLD = 0.5
OVERLAY_SCORE_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------
# COCO metrics


def _load_gt(gt: Any):
    from faster_coco_eval import COCO

    if isinstance(gt, COCO):
        return gt
    return COCO(str(gt) if isinstance(gt, os.PathLike) else gt)


def coco_metrics(
    gt: Any,
    results: Sequence[dict],
    iou_type: str,
    image_ids: Sequence[int] | None = None,
    dilation_ratio: float = BOUNDARY_DILATION_RATIO,
) -> dict[str, float | None]:
    """COCO AP of ``results`` against ``gt`` with faster-coco-eval, in percent.

    - ``gt``: a faster-coco-eval ``COCO``, an annotation json path or its dict.
    - ``results``: COCO result records (``image_id``, ``category_id``, ``score``, ``bbox`` xywh
      and/or ``segmentation`` RLE).
    - ``iou_type``: ``"bbox"``, ``"segm"`` or ``"boundary"``.
    - ``image_ids``: the images evaluated (default: every image of ``gt``; give it when only part of
      the set was predicted).
    - Returns ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``; ``None`` where COCO has nothing
      to judge (-1).
    - As detectron2's COCOEvaluator, ``segm`` / ``boundary`` drop the result boxes so the area (for
      the size ranges) and box come from the mask; ``results`` is not modified.
    """
    from faster_coco_eval import COCOeval_faster

    if iou_type not in ("bbox", "segm", "boundary"):
        raise ValueError(f"iou_type must be bbox, segm or boundary, got {iou_type!r}")
    coco_gt = _load_gt(gt)
    if iou_type == "bbox":
        dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    else:
        dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    # loadRes and the evaluation write into the records (area, id, rle, boundary): give them copies.
    coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
    evaluator = COCOeval_faster(
        coco_gt,
        coco_dt,
        iou_type,
        print_function=lambda *args, **kwargs: None,
        boundary_dilation_ratio=dilation_ratio,
    )
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {
        name: (float(value) * 100.0 if value >= 0 else None)
        for name, value in zip(METRIC_NAMES, evaluator.stats[: len(METRIC_NAMES)])
    }


# --------------------------------------------------------------------------------------------
# Incoherence statistics


@dataclass
class IncoherenceStats:
    """Counts over 28x28 RoI cells: predicted incoherence (>= 0.5) against ground truth.

    recall = TP / (TP + FN), accuracy = (TP + TN) / all cells (paper Table 3); area_share = the
    mean over instances of the fraction of GT-incoherent cells in the box (Table 1's "Percent").
    Undefined values (no cells, no incoherent cells) are NaN.
    """

    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0
    instances: int = 0
    share_sum: float = 0.0

    def update(self, predicted: torch.Tensor, target: torch.Tensor, threshold: float = INCOHERENCE_THRESHOLD) -> None:
        """predicted [R, S, S] probabilities (or bool), target [R, S, S] bool."""
        if predicted.shape != target.shape:
            raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
        pred = predicted if predicted.dtype == torch.bool else predicted >= threshold
        gt = target.bool()
        self.true_positive += int((pred & gt).sum())
        self.false_positive += int((pred & ~gt).sum())
        self.false_negative += int((~pred & gt).sum())
        self.true_negative += int((~pred & ~gt).sum())
        if gt.shape[0]:
            self.instances += gt.shape[0]
            self.share_sum += float(gt.flatten(1).float().mean(1).sum())

    @property
    def cells(self) -> int:
        return self.true_positive + self.false_positive + self.false_negative + self.true_negative

    @property
    def recall(self) -> float:
        positives = self.true_positive + self.false_negative
        return self.true_positive / positives if positives else math.nan

    @property
    def accuracy(self) -> float:
        return (self.true_positive + self.true_negative) / self.cells if self.cells else math.nan

    @property
    def area_share(self) -> float:
        return self.share_sum / self.instances if self.instances else math.nan


# --------------------------------------------------------------------------------------------
# Data set and model agreement


def check_categories(
    categories: Sequence[dict], class_names: Sequence[str], category_ids: Sequence[int], source: str = "the data set"
) -> None:
    """Raises DatasetError unless the json's categories are exactly the model's classes (ids and names)."""
    data = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    model = {int(cid): str(name) for cid, name in zip(category_ids, class_names)}
    if set(data) != set(model):
        only_data = sorted(set(data) - set(model))
        only_model = sorted(set(model) - set(data))
        raise DatasetError(
            f"{source} has category ids {sorted(data)} but the model predicts {sorted(model)} "
            f"(only in the data: {[f'{i} {data[i]}' for i in only_data]}; only in the model: "
            f"{[f'{i} {model[i]}' for i in only_model]}); evaluate with a model trained on these categories"
        )
    renamed = [f"{cid}: data {data[cid]!r} vs model {model[cid]!r}" for cid in sorted(data) if data[cid] != model[cid]]
    if renamed:
        raise DatasetError(f"{source} names its categories differently from the model ({'; '.join(renamed)})")


# --------------------------------------------------------------------------------------------
# The evaluation


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def report_markdown(report: dict) -> str:
    columns = [*METRIC_NAMES, "boundary_AP"]
    header = ["masks", *METRIC_NAMES, "AP^B"]
    lines = [
        f"# Evaluation: {report['config']} on {report['num_images']} images",
        "",
        f"weights: `{report['weights']}` (backend: {report.get('backend', 'pytorch')}, "
        f"precision: {report.get('precision', 'fp32')})  ",
        f"data: `{report['data']}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name in ("coarse", "refined"):
        lines.append("| " + " | ".join([name] + [_fmt(report[name][c]) for c in columns]) + " |")
    delta = []
    for c in columns:
        a, b = report["coarse"][c], report["refined"][c]
        delta.append(_fmt(b - a if a is not None and b is not None else None, signed=True))
    lines.append("| " + " | ".join(["delta"] + delta) + " |")
    percent = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines += [
        "",
        f"box AP: {_fmt(report['bbox_AP'])}",
        "",
        "Incoherence detector on ground-truth boxes (28x28 grid, prediction >= 0.5):",
        "",
        "| recall | accuracy | incoherent share of box area |",
        "|---|---|---|",
        f"| {percent(report['incoherence_recall'])} | {percent(report['incoherence_accuracy'])} "
        f"| {percent(report['incoherent_area_share'])} |",
        "",
    ]
    if report.get("backend", "pytorch") != "pytorch":
        lines += [
            "(n/a: the incoherence statistics need the eager model's intermediate maps; an exported "
            "graph gives its outputs only. Evaluate the checkpoint with the pytorch backend for them.)",
            "",
        ]
    return "\n".join(lines)


def _overlay_pair(image: np.ndarray, coarse, refined, class_names: Sequence[str]) -> Image.Image:
    """Left the coarse masks, right the refined ones (detections with score >= 0.5)."""
    from transfiner.model.inference.visualize import draw_overlay

    panels = []
    for prediction in (coarse, refined):
        keep = prediction.scores >= OVERLAY_SCORE_THRESHOLD
        labels = [f"{class_names[c]} {s:.2f}" for c, s in zip(prediction.classes[keep], prediction.scores[keep])]
        panels.append(draw_overlay(image, prediction.boxes[keep], prediction.masks[keep], labels))
    height, width = image.shape[:2]
    gap, title = 8, 16
    canvas = Image.new("RGB", (2 * width + gap, height + title), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (panel, name) in enumerate(zip(panels, ("coarse", "refined"))):
        canvas.paste(panel, (k * (width + gap), title))
        draw.text((k * (width + gap) + 2, 2), name, fill=(0, 0, 0))
    return canvas


def _overlay_name(file_name: str, image_id: int, used: set[str]) -> str:
    name = Path(file_name).stem or str(image_id)
    if name in used:
        name = f"{name}_{image_id}"
    used.add(name)
    return f"{name}.png"


def evaluation_dataset(
    data_json: str | os.PathLike, cfg: ModelConfig, image_root: str | os.PathLike | None = None
) -> CocoDataset:
    """The evaluation images of a COCO json for a model of config ``cfg``, class k being the model's
    class k; raises DatasetError naming the problem (the json, an image file, other categories)."""
    dataset = CocoDataset(
        data_json, image_root=image_root, class_ids=None, train=False, input_cfg=cfg.input, filter_empty=False
    )
    categories = [{"id": i, "name": n} for i, n in zip(dataset.category_ids, dataset.class_names)]
    check_categories(categories, cfg.class_names, cfg.category_ids, source=str(data_json))
    if dataset.category_ids != tuple(cfg.category_ids):  # same ids, another order
        dataset = CocoDataset(
            data_json,
            image_root=image_root,
            class_ids=cfg.category_ids,
            train=False,
            input_cfg=cfg.input,
            filter_empty=False,
        )
    return dataset


def evaluate(
    predictor,
    data_json: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 2,
    max_images: int | None = None,
    num_overlays: int = 4,
    *,
    max_detections: int | None = None,
    weights: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> dict:
    """Evaluates ``predictor`` (a :class:`model.inference.predictor.Predictor`) on a COCO json; writes
    ``report.json``, ``report.md`` and ``overlays/*.png`` into ``out_dir`` and returns the report.

    - Detections use the model's score threshold (0.05) and ``max_detections`` per image (default
      the config's 100), as detectron2's evaluation.
    - ``max_images``: only the first N images of the json (the metrics then cover those images only).
    - ``weights`` is only recorded in the report.
    """
    _check_arguments(batch_size, max_images, max_detections, num_overlays)
    cfg = predictor.cfg
    dataset = evaluation_dataset(data_json, cfg, image_root)
    gt = _load_gt(Path(data_json))
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    if count == 0:
        raise DatasetError(f"{data_json}: no images to evaluate")
    subset = torch.utils.data.Subset(dataset, range(count))
    loader = make_loader(subset, batch_size, shuffle=False, num_workers=num_workers)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: the report goes into a folder")
    overlay_dir = out / "overlays"
    out.mkdir(parents=True, exist_ok=True)
    if num_overlays:
        overlay_dir.mkdir(exist_ok=True)
    found = _predict(predictor, loader, dataset, gt, overlay_dir, num_overlays, max_detections)
    report = _report(found, gt, predictor, weights, data_json)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    return report


def _check_arguments(batch_size: int, max_images: int | None, max_detections: int | None, num_overlays: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max images must be at least 1, got {max_images}")
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"max detections must be at least 1, got {max_detections}")
    if num_overlays < 0:
        raise ValueError(f"the number of overlays cannot be negative, got {num_overlays}")


@dataclass
class _Predictions:
    """What the pass over the data set found: both mask sets' COCO records, and the incoherence counts."""

    results: dict[str, list[dict]]  # "coarse" and "refined" records of the same detections
    incoherence: IncoherenceStats
    image_ids: list[int]


def _predict(
    predictor,
    loader,
    dataset: CocoDataset,
    gt,
    overlay_dir: Path,
    num_overlays: int,
    max_detections: int | None,
) -> _Predictions:
    """One forward pass per batch: the coarse and refined records of every image, the first
    ``num_overlays`` images' overlays, and (eager model only) the incoherence detector on the GT boxes."""
    from tqdm import tqdm

    from transfiner.model.inference.predictor import Prediction

    cfg = predictor.cfg
    model = predictor.model
    options = InferenceOptions(max_detections=max_detections, refine=True)
    found = _Predictions({"coarse": [], "refined": []}, IncoherenceStats(), [])
    results, image_ids = found.results, found.image_ids
    used_names: set[str] = set()
    captured: list[list[torch.Tensor]] = []
    # Incoherence statistics need the eager model's features; exported runtimes give outputs only.
    hook = None
    if model is not None:
        hook = model.backbone.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.inference_mode():
            for samples in tqdm(loader, desc="evaluate", unit="batch", disable=None):
                images = [s.image.to(predictor.device) for s in samples]
                batch, sizes = pad_batch(images, cfg.input)
                captured.clear()
                raw = predictor.backend.infer(batch, sizes, options)
                coarse_raw = dataclasses.replace(raw, mask_probs=raw.coarse_probs)
                for i, sample in enumerate(samples):
                    refined = Prediction.from_outputs(raw, i, sizes[i], sample.original_size)
                    coarse = Prediction.from_outputs(coarse_raw, i, sizes[i], sample.original_size)
                    results["refined"] += refined.coco_records(sample.image_id, cfg.category_ids)
                    results["coarse"] += coarse.coco_records(sample.image_id, cfg.category_ids)
                    image_ids.append(sample.image_id)
                    if len(image_ids) <= num_overlays:
                        info = gt.imgs[sample.image_id]
                        rgb = load_image_rgb(dataset.image_root / info["file_name"])
                        picture = _overlay_pair(rgb, coarse, refined, cfg.class_names)
                        picture.save(overlay_dir / _overlay_name(info["file_name"], sample.image_id, used_names))
                if model is not None:
                    features = captured[-1][:4]  # P2..P5, as the mask head reads them
                    with autocast(predictor.precision, predictor.device):  # as the forward pass ran
                        _update_incoherence(found.incoherence, model, features, samples, predictor.device)
    finally:
        if hook is not None:
            hook.remove()
    return found


def _report(found: _Predictions, gt, predictor, weights: str | os.PathLike | None, data_json) -> dict:
    """The COCO metrics of both mask sets, the box AP and the incoherence statistics, as report.json holds them."""
    results, image_ids, incoherence = found.results, found.image_ids, found.incoherence
    metrics = {name: {} for name in results}
    for name, records in results.items():
        for iou_type, key in (("segm", None), ("boundary", "boundary_AP")):
            values = coco_metrics(gt, records, iou_type, image_ids)
            if key is None:
                metrics[name].update(values)
            else:
                metrics[name][key] = values["AP"]
    # Coarse and refined masks belong to the same detections: one box AP.
    bbox = coco_metrics(gt, results["refined"], "bbox", image_ids)
    return {
        "coarse": metrics["coarse"],
        "refined": metrics["refined"],
        "bbox_AP": bbox["AP"],
        "bbox": bbox,
        "incoherence_recall": _finite_or_none(incoherence.recall),
        "incoherence_accuracy": _finite_or_none(incoherence.accuracy),
        "incoherent_area_share": _finite_or_none(incoherence.area_share),
        "incoherence_instances": incoherence.instances,
        "num_images": len(image_ids),
        "num_detections": len(results["refined"]),
        "config": predictor.cfg.name,
        "backend": predictor.backend.name,
        "precision": predictor.precision,
        "weights": None if weights is None else str(weights),
        "data": str(data_json),
        "boundary_dilation_ratio": BOUNDARY_DILATION_RATIO,
    }


def _update_incoherence(stats: IncoherenceStats, model, features, samples, device) -> None:
    """The incoherence detector on the GT boxes of a batch against ``gt_incoherence`` of their masks."""
    boxes = [s.boxes.to(device) for s in samples]
    if sum(len(b) for b in boxes) == 0:
        return
    classes = torch.cat([s.classes for s in samples]).to(device)
    batch_index = torch.cat([torch.full((len(b),), i, dtype=torch.int64) for i, b in enumerate(boxes)]).to(device)
    _, _, predicted = model.mask_head.coarse_and_incoherence(features, torch.cat(boxes), classes, batch_index)
    size = predicted.shape[-1]
    targets = [
        gt_incoherence(s.masks.to(device), b, torch.arange(len(b), device=device), size=size)
        for s, b in zip(samples, boxes)
        if len(b)
    ]
    stats.update(predicted, torch.cat(targets))
