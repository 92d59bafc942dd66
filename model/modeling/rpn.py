"""Region proposal network: detectron2's ``StandardRPNHead`` and ``find_top_rpn_proposals``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transfiner.model.config import RPNConfig
from transfiner.model.modeling.box_ops import (
    AnchorGenerator,
    Box2BoxTransform,
    best_first,
    clip_boxes,
    is_finite,
    nms_in_each_image,
    top_count,
)


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
        """-> per level: logits [B, H*W*A] and deltas [B, H*W*A, 4], in the anchors' order.

        Always in float32 (a few percent of the network's work): objectness ranks the proposals
        and feeds NMS, and the deltas place every proposal; in bf16 the default model lost 0.5
        box AP here (CPU, 100 validation images), and nothing measurable elsewhere."""
        with torch.autocast(features[0].device.type, enabled=False):
            return self._forward([f.float() for f in features])

    def _forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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
        with torch.no_grad():
            boxes, scores, batch_index = self.propose(anchors, logits, deltas, image_sizes)
        rows = [batch_index == i for i in range(image_sizes.shape[0])]
        proposals = [torch.cat((boxes[r], scores[r, None]), dim=1) for r in rows]
        return proposals, anchors, logits, deltas

    def propose(
        self,
        anchors: list[torch.Tensor],
        logits: list[torch.Tensor],
        deltas: list[torch.Tensor],
        image_sizes: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """detectron2's ``find_top_rpn_proposals`` for the whole batch at once.

        Returns the proposals of all images flattened, each image's in decreasing objectness:
        boxes [P, 4], objectness logits [P], batch index [P]. Apart from NMS (a loop over the
        images, scripted into traced graphs, or one operator in ONNX: ``nms_in_each_image``) there
        is no loop over images and no Python number taken from a tensor, so the same code traces
        (TorchScript, ONNX) for any batch size, image size and proposal count.
        """
        pre_topk = self.cfg.pre_nms_topk_train if self.training else self.cfg.pre_nms_topk_test
        post_topk = self.cfg.post_nms_topk_train if self.training else self.cfg.post_nms_topk_test
        batch = image_sizes.shape[0]
        boxes_per_level, scores_per_level, level_ids = [], [], []
        for level, (anchors_l, logits_l, deltas_l) in enumerate(zip(anchors, logits, deltas)):
            scores, index = logits_l.topk(top_count(logits_l.shape[1], pre_topk), dim=1)  # [B, n], sorted
            picked_deltas = torch.gather(deltas_l, 1, index[..., None].expand(-1, -1, 4))
            picked_anchors = anchors_l[index.reshape(-1)]
            boxes = self.box2box.apply_deltas(picked_deltas.reshape(-1, 4), picked_anchors)
            boxes_per_level.append(boxes.view(batch, -1, 4))
            scores_per_level.append(scores)
            level_ids.append(torch.full_like(index[0], level))
        boxes = torch.cat(boxes_per_level, dim=1)  # [B, N, 4]
        scores = torch.cat(scores_per_level, dim=1)  # [B, N]
        levels = torch.cat(level_ids)  # [N]

        sizes = image_sizes[:, None, :].to(boxes.dtype)  # [B, 1, 2]
        boxes = clip_boxes(boxes, sizes[..., 0:1], sizes[..., 1:2])
        valid = is_finite(boxes).all(dim=2) & is_finite(scores)
        valid = valid & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # [B, N]

        # NMS inside each (image, level) with torchvision's batched_nms, as detectron2; then each
        # image's best post_topk kept proposals, best first.
        kept = nms_in_each_image(
            boxes, scores, levels.expand(batch, -1), valid, len(anchors), self.cfg.nms_thresh, coordinate_trick=False
        )
        ranked = torch.where(kept, scores, -math.inf)
        best, index = best_first(ranked, post_topk)  # [B, >= k]
        batch_index, slot = torch.nonzero(best > -math.inf, as_tuple=True)
        index = index[batch_index, slot]
        return boxes[batch_index, index], scores[batch_index, index], batch_index
