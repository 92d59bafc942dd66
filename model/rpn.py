"""Region proposal network: detectron2's ``StandardRPNHead`` and ``find_top_rpn_proposals``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from .box_ops import AnchorGenerator, Box2BoxTransform, clip_boxes
from .config import RPNConfig


class RPNHead(nn.Module):
    """Shared 3x3 conv, then per-anchor objectness logits and box deltas on every level."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """-> per level: logits [B, H*W*A] and deltas [B, H*W*A, 4], in the anchors' order."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            batch, _, height, width = t.shape
            logits.append(self.objectness_logits(t).permute(0, 2, 3, 1).flatten(1))
            d = self.anchor_deltas(t).view(batch, -1, 4, height, width)
            deltas.append(d.permute(0, 3, 4, 1, 2).flatten(1, -2))
        return logits, deltas


class RPN(nn.Module):
    """Proposes boxes: decode every anchor, keep the top-k per level, then NMS per image."""

    def __init__(self, cfg: RPNConfig, in_channels: int, strides: tuple[int, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        self.anchor_generator = AnchorGenerator(cfg.anchor_sizes, cfg.aspect_ratios, strides)
        self.rpn_head = RPNHead(in_channels, self.anchor_generator.num_anchors)
        self.box2box = Box2BoxTransform(cfg.box_reg_weights)

    def forward(
        self, features: list[torch.Tensor], image_sizes: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """features: P2..P6; image_sizes [B, 2] (h, w) before padding.

        Returns (proposals, anchors, logits, deltas): proposals is a list of [P_i, 5] tensors
        (x1, y1, x2, y2, objectness logit) per image; the rest are what the losses need.
        """
        anchors = self.anchor_generator(features)
        logits, deltas = self.rpn_head(features)
        pre_topk = self.cfg.pre_nms_topk_train if self.training else self.cfg.pre_nms_topk_test
        post_topk = self.cfg.post_nms_topk_train if self.training else self.cfg.post_nms_topk_test
        with torch.no_grad():
            proposals = self._top_proposals(anchors, logits, deltas, image_sizes, pre_topk, post_topk)
        return proposals, anchors, logits, deltas

    def _top_proposals(
        self, anchors: list[torch.Tensor], logits: list[torch.Tensor], deltas: list[torch.Tensor],
        image_sizes: torch.Tensor, pre_topk: int, post_topk: int,
    ) -> list[torch.Tensor]:
        batch = logits[0].shape[0]
        boxes_per_level, scores_per_level, level_ids = [], [], []
        for level, (anchors_l, logits_l, deltas_l) in enumerate(zip(anchors, logits, deltas)):
            num = min(pre_topk, logits_l.shape[1])
            scores, index = logits_l.topk(num, dim=1)  # [B, num], sorted
            picked_deltas = torch.gather(deltas_l, 1, index[..., None].expand(-1, -1, 4))
            picked_anchors = anchors_l[index.reshape(-1)]
            boxes = self.box2box.apply_deltas(picked_deltas.reshape(-1, 4), picked_anchors)
            boxes_per_level.append(boxes.view(batch, num, 4))
            scores_per_level.append(scores)
            level_ids.append(torch.full((num,), level, dtype=torch.int64, device=scores.device))
        boxes_all = torch.cat(boxes_per_level, dim=1)
        scores_all = torch.cat(scores_per_level, dim=1)
        level_all = torch.cat(level_ids)

        proposals = []
        for i in range(batch):
            boxes, scores, levels = boxes_all[i], scores_all[i], level_all
            boxes = clip_boxes(boxes, image_sizes[i, 0], image_sizes[i, 1])
            keep = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            kept = batched_nms(boxes, scores, levels, self.cfg.nms_thresh)[:post_topk]
            proposals.append(torch.cat((boxes[kept], scores[kept, None]), dim=1))
        return proposals
