"""Multi-level RoIAlignV2 (``aligned=True``) over FPN levels P2..P5, as detectron2's ROIPooler."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import roi_align


def assign_fpn_levels(
    boxes: torch.Tensor,
    min_level: int = 2,
    max_level: int = 5,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
) -> torch.Tensor:
    """boxes [R, 4] xyxy -> [R] int64 index into P2..P5 (0 = P2), the FPN paper's rule."""
    sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    return (levels.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


def multilevel_roi_align(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor,
    output_size: int,
    scales: tuple[float, ...],
    sampling_ratio: int = 0,
) -> torch.Tensor:
    """RoIAlignV2 of each RoI on its own level.

    features: per level [B, C, H_l, W_l]; rois [R, 5] (batch index, x1, y1, x2, y2) in image
    pixels; levels [R] int64 index into ``features``. Returns [R, C, output_size, output_size].
    """
    if torch.jit.is_tracing():
        return _roi_align_per_level_traced(features, rois, levels, output_size, scales, sampling_ratio)
    # The RoIs sorted by level, each level's a slice: one wait for the device (the counts) where
    # picking each level's rows by a mask would wait once per level. Every RoI is pooled alone,
    # so the order changes no value.
    counts = torch.bincount(levels, minlength=len(features)).tolist()
    order = torch.argsort(levels, stable=True)
    pooled = [
        _roi_align(feature, rois[index], output_size, scale, sampling_ratio)
        for feature, scale, index, count in zip(features, scales, order.split(counts), counts)
        if count
    ]
    channels = features[0].shape[1]
    output = features[0].new_zeros((rois.shape[0], channels, output_size, output_size))
    if pooled:
        output[order] = torch.cat(pooled).to(output.dtype)
    return output


def _roi_align_per_level_traced(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor,
    output_size: int,
    scales: tuple[float, ...],
    sampling_ratio: int,
) -> torch.Tensor:
    """``multilevel_roi_align`` for traced graphs (TorchScript, ONNX): no count may become a
    constant of the graph, so each level picks its rows by a mask."""
    channels = features[0].shape[1]
    output = features[0].new_zeros((rois.shape[0], channels, output_size, output_size))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = torch.nonzero(levels == level).squeeze(1)
        output = output.index_put((index,), _roi_align(feature, rois[index], output_size, scale, sampling_ratio))
    return output


def _roi_align(feature: torch.Tensor, rois: torch.Tensor, output_size: int, scale: float, sampling_ratio: int):
    """RoIAlignV2 of ``rois`` [n, 5] on one level -> [n, C, S, S] in the feature map's dtype.

    RoI coordinates stay float32 at every precision (bf16 would round a coordinate near 1000 to a
    multiple of 4 pixels), so a bf16/fp16 feature map is sampled in float32, as torchvision's
    CUDA autocast does (its CPU kernel wants equal types)."""
    return roi_align(
        feature if feature.dtype == rois.dtype else feature.to(rois.dtype),
        rois,
        output_size,
        spatial_scale=scale,
        sampling_ratio=sampling_ratio,
        aligned=True,
    ).to(feature.dtype)


def boxes_to_rois(boxes: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    """boxes [R, 4], batch_index [R] -> rois [R, 5] in torchvision's format."""
    return torch.cat((batch_index[:, None].to(boxes.dtype), boxes), dim=1)


class ROIPooler(nn.Module):
    """Pools each box at a fixed resolution from the FPN level that matches its size."""

    def __init__(self, output_size: int, strides: tuple[int, ...] = (4, 8, 16, 32), sampling_ratio: int = 0):
        super().__init__()
        self.output_size = output_size
        self.scales = tuple(1.0 / s for s in strides)
        self.sampling_ratio = sampling_ratio
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        return assign_fpn_levels(boxes, self.min_level, self.max_level)

    def forward(self, features: list[torch.Tensor], boxes: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """features P2..P5, boxes [R, 4], batch_index [R] -> [R, C, S, S]."""
        return multilevel_roi_align(
            features,
            boxes_to_rois(boxes, batch_index),
            self.levels(boxes),
            self.output_size,
            self.scales,
            self.sampling_ratio,
        )
