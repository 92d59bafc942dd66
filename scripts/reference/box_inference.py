"""The box inference as it was before the pre-NMS bound (kept as the reference for tests and
``scripts.bench_box_inference``): every candidate above the threshold goes into torchvision's
``batched_nms``, then per-image ranks and grouping from a [detections x images] one-hot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from transfiner.model.modeling.box_ops import clip_boxes, is_finite
from transfiner.model.modeling.roi_heads import BoxROIHeads


def _image_one_hot(batch_index: torch.Tensor, num_images: int) -> torch.Tensor:
    images = torch.arange(num_images, device=batch_index.device)
    return (batch_index[:, None] == images).to(torch.float32)


def _rank(one_hot: torch.Tensor) -> torch.Tensor:
    return ((one_hot.cumsum(0) * one_hot).sum(1) - 1).to(torch.int64)


def rank_within_image(batch_index: torch.Tensor, num_images: int) -> torch.Tensor:
    return _rank(_image_one_hot(batch_index, num_images))


def group_by_image(batch_index: torch.Tensor, num_images: int) -> torch.Tensor:
    one_hot = _image_one_hot(batch_index, num_images)
    counts = one_hot.sum(0)
    first_row = (counts.cumsum(0) - counts).to(torch.int64)
    destination = first_row[batch_index] + _rank(one_hot)
    order = torch.arange(batch_index.shape[0], device=batch_index.device)
    return torch.zeros_like(order).scatter(0, destination, order)


def reference_inference(
    heads: BoxROIHeads,
    logits: torch.Tensor,
    deltas: torch.Tensor,
    proposals: torch.Tensor,
    proposal_batch: torch.Tensor,
    image_sizes: torch.Tensor,
    score_thresh: float,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> boxes, scores, classes, batch_index, rank (the last as rcnn.py computed it)."""
    num_classes = heads.cfg.num_classes
    probs = F.softmax(logits.float(), dim=-1)
    boxes = heads.box2box.apply_deltas(deltas, proposals).view(-1, num_classes, 4)
    finite = is_finite(boxes).flatten(1).all(dim=1) & is_finite(probs).all(dim=1)
    scores = probs[:, :-1]
    sizes = image_sizes[proposal_batch]
    boxes = clip_boxes(boxes, sizes[:, None, 0:1].to(boxes.dtype), sizes[:, None, 1:2].to(boxes.dtype))

    proposal_index, classes = torch.nonzero((scores > score_thresh) & finite[:, None], as_tuple=True)
    boxes = boxes[proposal_index, classes]
    scores = scores[proposal_index, classes]
    batch_index = proposal_batch[proposal_index]

    keep = batched_nms(boxes, scores, batch_index * num_classes + classes, heads.cfg.nms_thresh_test)
    num_images = image_sizes.shape[0]
    keep = keep[(rank_within_image(batch_index[keep], num_images) < top_k) | (top_k < 0)]
    keep = keep[group_by_image(batch_index[keep], num_images)]
    rank = rank_within_image(batch_index[keep], num_images)
    return boxes[keep], scores[keep], classes[keep], batch_index[keep], rank
