"""The whole network: ResNet-FPN, RPN, box head, and the Transfiner mask head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbone import build_backbone
from .config import ModelConfig
from .mask_head import TransfinerMaskHead
from .roi_heads import BoxROIHeads
from .rpn import RPN


@dataclass
class InferenceOptions:
    """Per-call settings; ``None`` means the config's value."""

    score_threshold: float | None = None
    max_detections: int | None = None
    refine: bool = True
    max_refined_per_image: int | None = None


@dataclass
class RawOutputs:
    """Detections of a batch, flattened and grouped by image (best score first within an image).

    Boxes are in the pixels of the resized (network input) image; the Predictor maps them back.
    """

    boxes: torch.Tensor  # [D, 4] xyxy
    scores: torch.Tensor  # [D]
    classes: torch.Tensor  # [D] int64, contiguous class index
    batch_index: torch.Tensor  # [D] int64
    mask_probs: torch.Tensor  # [D, 112, 112] float
    coarse_probs: torch.Tensor  # [D, 112, 112] the coarse masks of the same detections


class MaskTransfiner(nn.Module):
    """Mask R-CNN (ResNet-FPN) with the Transfiner mask head.

    ``forward`` takes a padded batch of BGR images in 0..255 and returns ``RawOutputs``.
    Parameter names follow detectron2 (``backbone.bottom_up.*``, ``proposal_generator.*``,
    ``roi_heads.*``), except the mask branch, which lives under ``mask_head.*`` with named parts;
    ``model.checkpoint`` maps the official names onto it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.resnet, cfg.fpn)
        channels = cfg.fpn.out_channels
        self.proposal_generator = RPN(cfg.rpn, channels, self.backbone.strides)
        self.roi_heads = BoxROIHeads(cfg.roi_heads, channels)
        self.mask_head = TransfinerMaskHead(channels, cfg.mask_head, cfg.transfiner, cfg.roi_heads.num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.input.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.input.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions | None = None
    ) -> RawOutputs:
        """images [B, 3, H, W] BGR 0..255, H and W divisible by 32, zero-padded after the image
        (pad with the pixel mean, so padding is 0 after normalisation); image_sizes [B, 2] (h, w)
        of each image before padding."""
        options = options or InferenceOptions()
        features = self.backbone(self.normalize(images))
        rpn = self.proposal_generator
        anchors = rpn.anchor_generator(features)
        proposal_boxes, _, proposal_batch = rpn.propose(anchors, *rpn.rpn_head(features), image_sizes)
        box_features = features[:4]  # P2..P5; P6 only feeds the RPN
        logits, deltas = self.roi_heads(box_features, proposal_boxes, proposal_batch)
        detections = self.roi_heads.inference(
            logits, deltas, proposal_boxes, proposal_batch, image_sizes,
            options.score_threshold, options.max_detections,
        )
        cap = options.max_refined_per_image
        cap = self.cfg.transfiner.max_refined_per_image if cap is None else cap
        refine_mask = detections.rank < cap
        mask_probs, coarse_probs = self.mask_head(
            box_features, detections.boxes, detections.classes, detections.batch_index,
            refine_mask, options.refine,
        )
        return RawOutputs(
            detections.boxes, detections.scores, detections.classes, detections.batch_index, mask_probs, coarse_probs
        )
