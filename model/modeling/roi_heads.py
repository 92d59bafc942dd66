"""Box branch: 2-fc box head, per-class box predictor, and detection post-processing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transfiner.model.config import ROIHeadsConfig
from transfiner.model.modeling.box_ops import (
    Box2BoxTransform,
    clip_boxes,
    is_finite,
    nms_in_each_image,
    rank_within_image,
    top_count,
)
from transfiner.model.modeling.layers import c2_xavier_fill
from transfiner.model.modeling.poolers import ROIPooler


class BoxHead(nn.Module):
    """Flatten the 7x7 RoI feature, then two fc+ReLU (detectron2's ``FastRCNNConvFCHead``)."""

    def __init__(self, in_channels: int, resolution: int, fc_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * resolution * resolution, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        c2_xavier_fill(self.fc1)
        c2_xavier_fill(self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """Class scores (K + 1, background last) and per-class box deltas (detectron2's names)."""

    def __init__(self, fc_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Always float32 (two small layers): class scores and box deltas decide which detections
        # exist and where.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return self.cls_score(x), self.bbox_pred(x)


class Detections:
    """Detections of a whole batch, flattened: rows are grouped by image, best score first."""

    def __init__(
        self,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        classes: torch.Tensor,
        batch_index: torch.Tensor,
        rank: torch.Tensor,
    ):
        self.boxes = boxes  # [D, 4] xyxy in input-image pixels
        self.scores = scores  # [D]
        self.classes = classes  # [D] int64, 0..K-1
        self.batch_index = batch_index  # [D] int64
        self.rank = rank  # [D] int64, 0-based position within its image (0: its best detection)

    def take(self, rows: torch.Tensor) -> Detections:
        """The detections ``rows`` ([R] int64, in order), ranks unchanged."""
        return Detections(
            self.boxes[rows], self.scores[rows], self.classes[rows], self.batch_index[rows], self.rank[rows]
        )


def per_image(value, index: torch.Tensor):
    """An option given once (a number or 0-dim tensor) or per image ([B] tensor), as the value
    for each entry of ``index`` (image indices of any shape); a single value stays as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.to(index.device)[index]
    return value


class BoxROIHeads(nn.Module):
    """Scores and refines proposals, then NMS per image and class into final detections."""

    def __init__(self, cfg: ROIHeadsConfig, in_channels: int, strides: tuple[int, ...] = (4, 8, 16, 32)):
        super().__init__()
        self.cfg = cfg
        self.box_pooler = ROIPooler(cfg.box_pooler_resolution, strides)
        self.box_head = BoxHead(in_channels, cfg.box_pooler_resolution, cfg.fc_dim)
        self.box_predictor = BoxPredictor(cfg.fc_dim, cfg.num_classes)
        self.box2box = Box2BoxTransform(cfg.box_reg_weights)

    def forward(
        self, features: list[torch.Tensor], proposals: torch.Tensor, proposal_batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features P2..P5; proposals [P, 4]; proposal_batch [P] -> (class logits [P, K+1], deltas [P, 4K])."""
        return self.box_predictor(self.box_head(self.box_pooler(features, proposals, proposal_batch)))

    def inference(
        self,
        logits: torch.Tensor,
        deltas: torch.Tensor,
        proposals: torch.Tensor,
        proposal_batch: torch.Tensor,
        image_sizes: torch.Tensor,
        score_thresh: float | torch.Tensor | None = None,
        detections_per_image: int | torch.Tensor | None = None,
    ) -> Detections:
        """Detectron2's ``fast_rcnn_inference`` for all images at once (no per-image loop).

        One difference: per image, only the ``cfg.pre_nms_topk_test`` best (proposal, class)
        candidates above the threshold enter NMS; an image with more loses its lowest-scoring
        ones (with the default bound, in practice only at thresholds well below the usual 0.05).
        Proposals may come in any order of images. Also returns each detection's rank in its
        image, which the mask head's refinement cap uses. The threshold and the top-k may be one
        value for the batch or one per image ([B] tensors).
        """
        score_thresh = self.cfg.score_thresh_test if score_thresh is None else score_thresh
        top_k = self.cfg.detections_per_image if detections_per_image is None else detections_per_image
        num_classes = self.cfg.num_classes
        num_images = image_sizes.shape[0]
        # Scores, decoded boxes and NMS stay float32 when the network ran in lower precision.
        probs = F.softmax(logits.float(), dim=-1)
        boxes = self.box2box.apply_deltas(deltas.float(), proposals.float()).view(-1, num_classes, 4)
        # As detectron2: a proposal with any non-finite box or score is dropped whole, and before
        # clipping (clipping would turn an infinite box into a finite one on the border).
        finite = is_finite(boxes).flatten(1).all(dim=1) & is_finite(probs).all(dim=1)  # [P]
        scores = probs[:, :-1]  # drop background: [P, K]
        valid = (scores > per_image(score_thresh, proposal_batch[:, None])) & finite[:, None]  # [P, K]

        # Lay the candidates out per image, [B, S * K]: S is the most proposals of any image, row
        # b holds image b's proposals in their order (they may come in any order of images), and
        # -inf marks what is no candidate. S is a graph value when traced, as are the sizes that
        # follow from it; the appended -1 makes it 0, not an error, when there are no proposals.
        # The RPN gives each image's proposals in decreasing score, images in any order, so
        # their slots take a [B, P] cumulative sum (P rows, not the P * K candidates).
        slot = rank_within_image(proposal_batch, num_images)  # [P]
        most = torch.cat((slot, slot.new_full((1,), -1))).max() + 1  # S
        row = proposal_batch * most + slot  # [P] each proposal's row of [B * S, K]
        proposal_at = torch.zeros(num_images * most, dtype=torch.int64, device=row.device)
        proposal_at = proposal_at.scatter(0, row, torch.arange(row.shape[0], device=row.device))  # [B * S]
        candidates = torch.full((num_images * most, num_classes), -math.inf, device=scores.device)
        candidates = candidates.index_put((row,), torch.where(valid, scores, -math.inf)).view(num_images, -1)

        # Per image, the best k candidates, best first ([B, k] -> flattened [B * k]).
        k = top_count(candidates.shape[1], self.cfg.pre_nms_topk_test)
        top_scores, top_index = candidates.topk(k, dim=1)
        width = top_scores.shape[1]  # k
        top_slots = top_index.div(num_classes, rounding_mode="floor")
        top_proposals = proposal_at.view(num_images, -1).gather(1, top_slots)
        images = torch.arange(num_images, device=row.device)[:, None].expand(-1, width).flatten()
        classes = (top_index % num_classes).flatten()
        top_proposals, top_scores = top_proposals.flatten(), top_scores.flatten()

        # NMS within each (image, class) on the valid candidates (scores are finite where valid):
        # per image, its classes moved apart by the coordinate trick (clipped boxes are >= 0).
        nms_boxes = _clipped(boxes[top_proposals, classes], image_sizes[images])  # [B * k, 4]
        kept = (
            nms_in_each_image(
                nms_boxes.view(num_images, width, 4),
                top_scores.view(num_images, width),
                classes.view(num_images, width),
                (top_scores > -math.inf).view(num_images, width),
                num_classes,
                self.cfg.nms_thresh_test,
            )
            .flatten()
            .to(torch.float32)
        )  # [B * k]

        # Rank of each kept detection in its image (a float cumsum along the [B, k] rows: TensorRT's
        # CumSum is float-only), the top-k per image (as detectron2, a negative top-k keeps every
        # detection; no Python branch on it, as it is a graph input in exported models), and the
        # rows of [B, k] in order, which groups them by image, best first.
        rank = (kept.view(num_images, width).cumsum(1) - 1).flatten().to(torch.int64)  # [B * k]
        top_k = per_image(top_k, images)  # a number, or [B * k]
        final = torch.nonzero((kept > 0) & ((rank < top_k) | (top_k < 0))).squeeze(1)  # [D]
        return Detections(nms_boxes[final], top_scores[final], classes[final], images[final], rank[final])


def _clipped(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """boxes [N, 4] clipped to sizes [N, 2] (h, w). Only the candidates that go on are clipped,
    not all P * K decoded boxes: the same values, as clipping is per coordinate."""
    return clip_boxes(boxes, sizes[:, 0:1].to(boxes.dtype), sizes[:, 1:2].to(boxes.dtype))
