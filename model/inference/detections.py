"""One image's detections of a batch: its rows, its boxes in its own pixels, its COCO records.

- ``select_detections``: one image's rows of a batch, optionally narrowed (threshold, classes,
  top-k, coarse masks), picked by ``detection_rows``.
- ``image_detections``: those rows in the image's own pixels (``rescale_boxes``, as detectron2's
  ``detector_postprocess``); nothing leaves the device.
- ``coco_records``: COCO result records, rounded, the same for the ``Predictor``, evaluation and
  the service.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transfiner.model.modeling.rcnn import RawOutputs

__all__ = [
    "ImageDetections",
    "select_detections",
    "detection_rows",
    "rescale_boxes",
    "image_detections",
    "coco_records",
]


@dataclass
class ImageDetections:
    """One image's detections in its own pixels, on the device the outputs were left on."""

    boxes: torch.Tensor  # [N, 4] float32 xyxy, clipped to the image, none empty
    scores: torch.Tensor  # [N] float32
    classes: torch.Tensor  # [N] int64 contiguous class index
    mask_probs: torch.Tensor  # [N, S, S] float32 soft masks inside each box


def select_detections(
    raw: RawOutputs,
    index: int,
    score_threshold: float | None = None,
    classes: Collection[int] | None = None,
    max_detections: int | None = None,
    refine: bool = True,
) -> RawOutputs:
    """Image ``index``'s detections, as a one-image ``RawOutputs`` (batch index 0): those scoring
    above ``score_threshold``, of ``classes``, the first ``max_detections`` (``detection_rows``);
    ``mask_probs`` holds the coarse masks when ``refine`` is off."""
    rows = detection_rows(raw.batch_index, raw.scores, raw.classes, index, score_threshold, classes, max_detections)
    probs = raw.mask_probs if refine else raw.coarse_probs
    return RawOutputs(
        boxes=raw.boxes[rows],
        scores=raw.scores[rows],
        classes=raw.classes[rows],
        batch_index=torch.zeros_like(rows),
        mask_probs=probs[rows],
        coarse_probs=raw.coarse_probs[rows],
    )


def detection_rows(
    batch_index: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    index: int,
    score_threshold: float | None = None,
    kept_classes: Collection[int] | None = None,
    max_detections: int | None = None,
) -> torch.Tensor:
    """The rows [n] of a batch's detections (batch_index, scores, classes [D], on any device)
    that image ``index`` gets: scoring above ``score_threshold``, of ``kept_classes``, the first
    ``max_detections``.

    Detections come out of the model sorted by score within each image and NMS only lets a box
    suppress lower-scored ones, so a higher threshold or a smaller top-k applied here gives
    exactly what a forward pass run with them would have given."""
    rows = torch.nonzero(batch_index == index).flatten()  # [n] in the model's order
    if score_threshold is not None:
        rows = rows[scores[rows] > score_threshold]  # strict, as the model's own filter
    if kept_classes is not None:
        allowed = torch.tensor(sorted(kept_classes), dtype=classes.dtype, device=rows.device)
        rows = rows[torch.isin(classes[rows], allowed)]
    if max_detections is not None:
        rows = rows[:max_detections]
    return rows


def rescale_boxes(
    boxes: torch.Tensor, input_size: torch.Tensor, original: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [N, 4] from network-input pixels (``input_size`` (h, w)) to the ``original`` image's,
    clipped to it; and [N] bool: which are non-empty (detectron2 drops the others)."""
    height, width = original
    scale = torch.tensor([width / input_size[1].item(), height / input_size[0].item()] * 2, device=boxes.device)
    boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def image_detections(
    raw: RawOutputs, index: int, input_size: torch.Tensor, original: tuple[int, int]
) -> ImageDetections:
    """Detectron2's ``detector_postprocess`` for image ``index`` of a batch: boxes rescaled from
    the network input (``input_size`` (h, w)) to ``original`` (h, w), empty ones dropped. Nothing
    leaves the device: masks are sampled from these later, where they are."""
    rows = raw.batch_index == index  # [D] bool
    boxes, nonempty = rescale_boxes(raw.boxes[rows], input_size, original)
    return ImageDetections(
        boxes=boxes[nonempty].float(),
        scores=raw.scores[rows][nonempty].float(),
        classes=raw.classes[rows][nonempty],
        mask_probs=raw.mask_probs[rows][nonempty].float(),
    )


def coco_records(
    image_id: Any,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    category_ids: Sequence[int],
    segmentations: Sequence[Any] | None = None,
    areas: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One COCO results record per detection: ``image_id``, ``bbox`` as xywh rounded to 2
    decimals, ``score`` rounded to 5, ``category_id``; then ``category_name``, ``area`` and
    ``segmentation`` where given (``segment`` gives the last two). Keys in the order of the
    service's ``schemas.Instance``, which sends these records as they are.

    boxes: [N, 4] xyxy in image pixels; scores: [N]; classes: [N] contiguous class indices, mapped
    through ``category_ids`` (and ``class_names``).
    """
    out = []
    for i, (box, score, cls) in enumerate(zip(boxes, scores, classes)):
        x0, y0, x1, y1 = (float(v) for v in box)
        record = {
            "image_id": image_id,
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "score": round(float(score), 5),
            "category_id": int(category_ids[int(cls)]),
        }
        if class_names is not None:
            record["category_name"] = class_names[int(cls)]
        if areas is not None:
            record["area"] = areas[i]
        if segmentations is not None:
            record["segmentation"] = segmentations[i]
        out.append(record)
    return out
