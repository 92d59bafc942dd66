"""The backend-independent steps around the forward pass, shared by every runtime.

* ``batch_options``: the one ``InferenceOptions`` a batch runs with, the most permissive any of
  its requests needs (lowest score threshold, most detections, refinement if anyone wants it).
* ``preprocess``: decoded RGB arrays -> the padded BGR batch (``model.preprocess``).
* ``select``: one request's rows of the batch outputs. Detections come out of the model sorted
  by score within each image and NMS only lets a box suppress lower-scored ones, so a higher
  threshold or a smaller top-k applied here gives exactly what a forward pass run with them
  would have given; ``refine=false`` takes the coarse masks of the same detections.
* ``postprocess``: boxes back to image pixels, masks pasted, then RLE or polygons, as the
  ``Predictor`` does (``Predictor.postprocess``), and the COCO result records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch

from model.config import InputConfig, ModelConfig
from model.predictor import Predictor, rescale_boxes
from model.preprocess import prepare_batch, resized_shape, to_rgb_tensor
from model.rcnn import InferenceOptions, RawOutputs

from .polygons import mask_to_polygons


@dataclass(frozen=True)
class RequestOptions:
    """A request's post-processing options, with classes as contiguous model indices."""

    score_threshold: float = 0.5
    max_detections: int = 100
    classes: frozenset[int] | None = None
    mask_threshold: float = 0.5
    mask_format: str = "rle"
    refine: bool = True


@dataclass
class PreparedBatch:
    images: torch.Tensor  # [B, 3, H, W] BGR, padded
    sizes: torch.Tensor  # [B, 2] (h, w) network input size of each image
    originals: list[tuple[int, int]]  # (h, w) of each decoded image


def network_input_shape(height: int, width: int, cfg: InputConfig) -> tuple[int, int]:
    """(h, w) an image of this size is resized to before padding (for the pixel budget)."""
    return resized_shape(height, width, cfg.min_size_test, cfg.max_size_test)


def batch_options(options: Sequence[RequestOptions], cfg: ModelConfig) -> InferenceOptions:
    """The forward-pass settings that serve every request of a batch.

    A class filter is applied to the model's full top-k (the config's ``detections_per_image``)
    before the request's own ``max_detections``, so a batch holding such a request runs the full
    top-k; otherwise the largest ``max_detections`` asked for is enough.
    """
    cap = cfg.roi_heads.detections_per_image
    if any(o.classes is not None for o in options):
        top_k = cap
    else:
        wanted = max(o.max_detections for o in options)
        top_k = wanted if cap < 0 else min(wanted, cap)
    return InferenceOptions(
        score_threshold=min(o.score_threshold for o in options),
        max_detections=top_k,
        refine=any(o.refine for o in options),
    )


def preprocess(images: Sequence[np.ndarray], cfg: InputConfig, device: torch.device) -> PreparedBatch:
    """[H, W, 3] uint8 RGB arrays -> the padded network batch, exactly as the ``Predictor``."""
    rgb = [to_rgb_tensor(image) for image in images]
    batch, sizes = prepare_batch(rgb, cfg, device)
    return PreparedBatch(batch, sizes, [(int(i.shape[0]), int(i.shape[1])) for i in images])


def select(raw: RawOutputs, index: int, options: RequestOptions) -> RawOutputs:
    """Image ``index``'s detections that ``options`` asks for, as a one-image ``RawOutputs``
    (batch index 0); ``mask_probs`` holds the coarse masks when ``refine`` is off."""
    rows = torch.nonzero(raw.batch_index == index).flatten()
    rows = rows[raw.scores[rows] > options.score_threshold]  # strict, as the model's own filter
    if options.classes is not None:
        allowed = torch.tensor(sorted(options.classes), dtype=raw.classes.dtype, device=rows.device)
        rows = rows[torch.isin(raw.classes[rows], allowed)]
    rows = rows[: options.max_detections]
    probs = raw.mask_probs if options.refine else raw.coarse_probs
    return RawOutputs(
        boxes=raw.boxes[rows], scores=raw.scores[rows], classes=raw.classes[rows],
        batch_index=torch.zeros_like(rows), mask_probs=probs[rows], coarse_probs=raw.coarse_probs[rows],
    )


def scaled_boxes(
    raw: RawOutputs, input_size: torch.Tensor, original: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, scores and classes of a one-image ``RawOutputs`` in image pixels, without pasting
    masks (for ``mask_format=none``)."""
    boxes, nonempty = rescale_boxes(raw.boxes, input_size, original)
    return (
        boxes[nonempty].float().cpu().numpy(),
        raw.scores[nonempty].float().cpu().numpy(),
        raw.classes[nonempty].cpu().numpy(),
    )


def postprocess(
    raw: RawOutputs, index: int, input_size: torch.Tensor, original: tuple[int, int],
    options: RequestOptions, cfg: ModelConfig, image_id: Any,
) -> list[dict[str, Any]]:
    """One request's COCO result records (see ``schemas.Instance``) from the batch outputs."""
    chosen = select(raw, index, options)
    if options.mask_format == "none":
        boxes, scores, classes = scaled_boxes(chosen, input_size, original)
        areas = [float((b[2] - b[0]) * (b[3] - b[1])) for b in boxes]
        return records(boxes, scores, classes, [None] * len(boxes), areas, cfg, image_id)
    prediction = Predictor.postprocess(chosen, 0, input_size, original, options.mask_threshold)
    if options.mask_format == "polygon":
        segmentations: list[Any] = [mask_to_polygons(mask) for mask in prediction.masks]
        areas = [float(a) for a in prediction.masks.reshape(len(prediction), -1).sum(axis=1)]
    else:
        segmentations = prediction.rles
        areas = [float(a) for a in mask_util.area(segmentations)] if segmentations else []
    return records(prediction.boxes, prediction.scores, prediction.classes, segmentations, areas, cfg, image_id)


def records(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, segmentations: Sequence[Any],
    areas: Sequence[float], cfg: ModelConfig, image_id: Any,
) -> list[dict[str, Any]]:
    """COCO result records, rounded as ``Prediction.coco_records`` (xywh boxes)."""
    out = []
    for box, score, cls, segmentation, area in zip(boxes, scores, classes, segmentations, areas):
        x0, y0, x1, y1 = (float(v) for v in box)
        record = {
            "image_id": image_id,
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "score": round(float(score), 5),
            "category_id": int(cfg.category_ids[int(cls)]),
            "category_name": cfg.class_names[int(cls)],
            "area": area,
        }
        if segmentation is not None:
            record["segmentation"] = segmentation
        out.append(record)
    return out
