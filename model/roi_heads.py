"""Box branch: 2-fc box head, per-class box predictor, and detection post-processing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from .box_ops import Box2BoxTransform, clip_boxes, group_by_image, is_finite, rank_within_image
from .config import ROIHeadsConfig
from .layers import c2_xavier_fill
from .poolers import ROIPooler


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
        return self.cls_score(x), self.bbox_pred(x)


class Detections:
    """Detections of a whole batch, flattened: rows are grouped by image, best score first."""

    def __init__(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, batch_index: torch.Tensor):
        self.boxes = boxes  # [D, 4] xyxy in input-image pixels
        self.scores = scores  # [D]
        self.classes = classes  # [D] int64, 0..K-1
        self.batch_index = batch_index  # [D] int64


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
        self, logits: torch.Tensor, deltas: torch.Tensor, proposals: torch.Tensor,
        proposal_batch: torch.Tensor, image_sizes: torch.Tensor, score_thresh: float | None = None,
        detections_per_image: int | None = None,
    ) -> Detections:
        """Detectron2's ``fast_rcnn_inference`` for all images at once (no per-image loop)."""
        score_thresh = self.cfg.score_thresh_test if score_thresh is None else score_thresh
        top_k = self.cfg.detections_per_image if detections_per_image is None else detections_per_image
        num_classes = self.cfg.num_classes
        probs = F.softmax(logits.float(), dim=-1)
        boxes = self.box2box.apply_deltas(deltas, proposals).view(-1, num_classes, 4)
        # As detectron2: a proposal with any non-finite box or score is dropped whole, and before
        # clipping (clipping would turn an infinite box into a finite one on the border).
        finite = is_finite(boxes).flatten(1).all(dim=1) & is_finite(probs).all(dim=1)  # [P]
        scores = probs[:, :-1]  # drop background: [P, K]
        sizes = image_sizes[proposal_batch]  # [P, 2]
        boxes = clip_boxes(boxes, sizes[:, None, 0:1].to(boxes.dtype), sizes[:, None, 1:2].to(boxes.dtype))

        proposal_index, classes = torch.nonzero((scores > score_thresh) & finite[:, None], as_tuple=True)
        boxes = boxes[proposal_index, classes]
        scores = scores[proposal_index, classes]
        batch_index = proposal_batch[proposal_index]

        # One NMS group per (image, class); the result is sorted by decreasing score.
        keep = batched_nms(boxes, scores, batch_index * num_classes + classes, self.cfg.nms_thresh_test)
        # Top-k per image (as detectron2, a negative top-k keeps every detection; no Python branch
        # on it, as it is a graph input in exported models), then group the rows by image.
        num_images = image_sizes.shape[0]
        keep = keep[(rank_within_image(batch_index[keep], num_images) < top_k) | (top_k < 0)]
        keep = keep[group_by_image(batch_index[keep], num_images)]
        return Detections(boxes[keep], scores[keep], classes[keep], batch_index[keep])
