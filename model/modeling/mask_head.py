"""Mask branch: coarse Mask R-CNN head, incoherence detector, semantic P2 convs, and the refiner."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transfiner.model.config import MaskHeadConfig, TransfinerConfig
from transfiner.model.modeling.layers import Conv2d, c2_msra_fill
from transfiner.model.modeling.poolers import ROIPooler
from transfiner.model.modeling.refiner import LEVEL_SIZES, TransfinerRefiner


class CoarseMaskHead(nn.Module):
    """Mask R-CNN's head: 4 convs on the 14x14 RoI feature, 2x deconv, per-class 28x28 logits.

    Names (``mask_fcn1..4``, ``deconv``, ``predictor``) are detectron2's, so vanilla Mask R-CNN
    weights load here too.
    """

    def __init__(self, in_channels: int, cfg: MaskHeadConfig, num_classes: int) -> None:
        super().__init__()
        self.num_conv = cfg.num_conv
        channels = in_channels
        for index in range(1, cfg.num_conv + 1):
            conv = Conv2d(channels, cfg.conv_dim, 3, padding=1)
            c2_msra_fill(conv)
            self.add_module(f"mask_fcn{index}", conv)
            channels = cfg.conv_dim
        self.deconv = nn.ConvTranspose2d(channels, cfg.conv_dim, 2, stride=2)
        c2_msra_fill(self.deconv)
        self.predictor = nn.Conv2d(cfg.conv_dim, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, C, 14, 14] -> (logits [R, K, 28, 28], the last conv's features [R, D, 14, 14])."""
        for index in range(1, self.num_conv + 1):
            x = F.relu(getattr(self, f"mask_fcn{index}")(x))
        return self.predictor(F.relu(self.deconv(x))), x


class IncoherenceDetector(nn.Module):
    """Predicts where the 28x28 coarse mask loses information (one probability map per box).

    As the official code (which differs from the paper here): the input is the detached 14x14 RoI
    feature *plus* the coarse head's last conv features; 4 convs (the last one narrower), a 2x
    deconv, a 1x1 predictor and a sigmoid. Official names: ``mask_fcn_uncertain1..4``,
    ``deconv_uncertain``, ``predictor_uncertain``.
    """

    def __init__(self, in_channels: int, cfg: MaskHeadConfig) -> None:
        super().__init__()
        dims = [cfg.conv_dim] * (cfg.num_conv - 1) + [cfg.incoherence_dim]
        channels = in_channels
        for index, dim in enumerate(dims, start=1):
            conv = Conv2d(channels, dim, 3, padding=1)
            c2_msra_fill(conv)
            self.add_module(f"conv{index}", conv)
            channels = dim
        self.num_conv = len(dims)
        self.deconv = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        c2_msra_fill(self.deconv)
        self.predictor = nn.Conv2d(channels, 1, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, roi_features: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """roi_features [R, C, 14, 14], mask_features [R, C, 14, 14] -> [R, 28, 28] probabilities."""
        # Detached like the official code: the incoherence loss trains the mask convs, not the FPN.
        x = roi_features.detach() + mask_features
        for index in range(1, self.num_conv + 1):
            x = F.relu(getattr(self, f"conv{index}")(x))
        # float32 probabilities: the quadtree thresholds them (1e-6 is below bf16's resolution near 0.5).
        return self.predictor(self.deconv(x)).squeeze(1).float().sigmoid()


class SemanticEnhancer(nn.Module):
    """Four 3x3 convs on the whole P2 map; P2 + their output feeds the 28/56/112 RoIAligns.

    Official name ``roi_heads.mask_pooler.conv_norm_relus_semantic`` (indices 0, 2, 4, 6).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(4):
            conv = nn.Conv2d(channels, channels, 3, padding=1)
            nn.init.xavier_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
            layers.append(conv)
            if index < 3:
                layers.append(nn.ReLU())
        self.convs = nn.Sequential(*layers)

    def forward(self, p2: torch.Tensor) -> torch.Tensor:
        """p2 [B, C, H/4, W/4] -> the semantic features of the same shape (added to P2 by the caller)."""
        return self.convs(p2)


class TransfinerMaskHead(nn.Module):
    """Everything after the detections: coarse masks, incoherence, and quadtree refinement."""

    def __init__(
        self,
        in_channels: int,
        mask_cfg: MaskHeadConfig,
        transfiner_cfg: TransfinerConfig,
        num_classes: int,
        strides: tuple[int, ...] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        self.cfg = transfiner_cfg
        self.pooler = ROIPooler(mask_cfg.pooler_resolution, strides)
        self.coarse = CoarseMaskHead(in_channels, mask_cfg, num_classes)
        self.incoherence = IncoherenceDetector(in_channels, mask_cfg)
        self.semantic = SemanticEnhancer(in_channels)
        self.refiner = TransfinerRefiner(transfiner_cfg, in_channels, self.pooler.scales)

    def coarse_and_incoherence(
        self, features: list[torch.Tensor], boxes: torch.Tensor, classes: torch.Tensor, batch_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (14x14 RoI features [R, C, 14, 14], coarse [R, 28, 28], incoherence [R, 28, 28])."""
        roi_features, mask_features, coarse = self._coarse(features, boxes, classes, batch_index)
        return roi_features, coarse, self.incoherence(roi_features, mask_features)

    def _coarse(
        self, features: list[torch.Tensor], boxes: torch.Tensor, classes: torch.Tensor, batch_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (RoI features [R, C, 14, 14], mask features [R, D, 14, 14], coarse probs [R, 28, 28])."""
        roi_features = self.pooler(features, boxes, batch_index)
        logits, mask_features = self.coarse(roi_features)
        coarse = logits[torch.arange(logits.shape[0], device=logits.device), classes].float().sigmoid()
        return roi_features, mask_features, coarse

    def forward(
        self,
        features: list[torch.Tensor],
        boxes: torch.Tensor,
        classes: torch.Tensor,
        batch_index: torch.Tensor,
        refine_mask: torch.Tensor | None = None,
        refine: bool = True,
        enhanced: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask probabilities of every detection.

        features: P2..P5; boxes [D, 4], classes [D], batch_index [D]; refine_mask [D] bool picks
        the detections to refine (default: all). Returns (masks, coarse), both [D, 112, 112]:
        coarse is the 28x28 mask bilinearly upsampled (as the official code for boxes it does not
        refine); masks is refined where chosen and equal to coarse elsewhere.
        """
        roi_features, mask_features, coarse = self._coarse(features, boxes, classes, batch_index)
        size = LEVEL_SIZES[-1]
        upsampled = F.interpolate(coarse[:, None].float(), size=(size, size), mode="bilinear")[:, 0]
        if not (refine and self.cfg.enabled):
            return upsampled, upsampled

        index = torch.arange(boxes.shape[0], device=boxes.device)
        if refine_mask is not None:
            index = index[refine_mask]
        incoherence = self.incoherence(roi_features[index], mask_features[index])
        if enhanced is None:
            enhanced = self.enhanced_features(features)
        refined = self.refiner(
            enhanced,
            boxes[index],
            batch_index[index],
            self.pooler.levels(boxes[index]),
            roi_features[index],
            coarse[index],
            incoherence,
        )
        return upsampled.index_put((index,), refined), upsampled

    def enhanced_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """P2 + semantic(P2), P3, P4, P5: what the 28/56/112 RoIAligns read (official pooler).

        In float32 whatever the precision: RoIAlign samples in float32 (``multilevel_roi_align``),
        and the refiner reads these maps once per chunk of boxes and level, so they are cast once
        here instead of in every one of those calls."""
        return [(features[0] + self.semantic(features[0])).float()] + [f.float() for f in features[1:4]]
