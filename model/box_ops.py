"""Box encoding and the anchor generator, with detectron2's conventions (no +1 in widths)."""

from __future__ import annotations

import math

from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import nms

# detectron2's clamp on predicted log-scales, so exp() cannot overflow.
_SCALE_CLAMP = math.log(1000.0 / 16)


class Box2BoxTransform:
    """Encodes boxes as (dx, dy, dw, dh) deltas relative to reference boxes."""

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = _SCALE_CLAMP):
        self.weights = weights
        self.scale_clamp = scale_clamp

    def get_deltas(self, src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """src, target [N, 4] xyxy -> deltas [N, 4] that turn src into target."""
        src_w, src_h = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
        src_x, src_y = src[:, 0] + 0.5 * src_w, src[:, 1] + 0.5 * src_h
        tgt_w, tgt_h = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
        tgt_x, tgt_y = target[:, 0] + 0.5 * tgt_w, target[:, 1] + 0.5 * tgt_h
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (
                wx * (tgt_x - src_x) / src_w,
                wy * (tgt_y - src_y) / src_h,
                ww * torch.log(tgt_w / src_w),
                wh * torch.log(tgt_h / src_h),
            ),
            dim=1,
        )

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """deltas [N, 4k], boxes [N, 4] -> boxes [N, 4k] (k boxes per reference, e.g. per class)."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        x1, y1 = pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h
        x2, y2 = pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h
        return torch.stack((x1, y1, x2, y2), dim=-1).reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: torch.Tensor | int, width: torch.Tensor | int) -> torch.Tensor:
    """Clips xyxy boxes [..., 4] to [0, width] x [0, height]."""
    # Tensors go in as they are: torch.as_tensor would freeze them into a traced (exported) graph.
    if not isinstance(width, torch.Tensor):
        width = torch.tensor(width, dtype=boxes.dtype, device=boxes.device)
    if not isinstance(height, torch.Tensor):
        height = torch.tensor(height, dtype=boxes.dtype, device=boxes.device)
    x = boxes[..., 0::2].clamp(min=0).minimum(width.to(boxes.dtype))
    y = boxes[..., 1::2].clamp(min=0).minimum(height.to(boxes.dtype))
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def rank_within_image(batch_index: torch.Tensor, num_images: int | torch.Tensor) -> torch.Tensor:
    """0-based position of each row among the rows of its image ([D] -> [D]); rows keep order.

    A cumulative sum along the rows of the [num_images, D] membership mask: along the last,
    contiguous dimension, which CUDA scans far faster than the first of a [D, num_images] one.
    Float, not int64, because TensorRT's CumSum is float-only; exact below 2**24 rows.
    """
    images = torch.arange(num_images, device=batch_index.device)
    member = (images[:, None] == batch_index[None, :]).to(torch.float32)  # [B, D]
    return (member.cumsum(1).gather(0, batch_index[None, :]).squeeze(0) - 1).to(torch.int64)


def coordinate_trick_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each group, in one call: torchvision's coordinate trick at any size (its
    ``batched_nms`` makes one call per group above 20,000 boxes on CUDA). Boxes must be >= 0
    (clipped). Returns the kept indices by decreasing score."""
    # The appended 0 only makes the max of no boxes 0.
    max_coordinate = torch.cat((boxes.flatten(), boxes.new_zeros(1))).max()
    offsets = groups.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


GroupedNMS = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def nms_in_each_image(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, images: torch.Tensor, num_images: int,
    groups_per_image: int, iou_threshold: float, grouped_nms: GroupedNMS = coordinate_trick_nms,
) -> torch.Tensor:
    """NMS within each (image, group): boxes [N, 4], scores [N], groups [N] in [0, groups_per_image),
    images [N] sorted (each image's rows together, images in order). Returns the kept indices,
    each image's by decreasing score.

    Eager: one ``grouped_nms`` call per image, as detectron2 (which loops over images). On an H200
    that measured faster than one call for the whole batch or one per group (README), and an
    image's kept boxes then cannot depend on its batch-mates through the size of the offsets.
    Traced graphs (TorchScript, ONNX) have no loop over a dynamic batch: one call with the
    images' groups moved apart too.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return grouped_nms(boxes, scores, images * groups_per_image + groups, iou_threshold)
    counts = torch.bincount(images, minlength=num_images).tolist()  # one device sync
    kept, start = [], 0
    for count in counts:
        if count:
            rows = slice(start, start + count)
            kept.append(grouped_nms(boxes[rows], scores[rows], groups[rows], iou_threshold) + start)
        start += count
    return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64, device=boxes.device)


def top_count(available: int | torch.Tensor, wanted: int) -> int | torch.Tensor:
    """min(available, wanted), the k of a top-k; while tracing, ``available`` is a tensor and must
    stay one so the exported graph works for every size (and TopK's k keeps a constant bound)."""
    if isinstance(available, torch.Tensor):
        return available.clamp(max=wanted)
    return min(available, wanted)


def is_finite(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite``, written so the ONNX exporter does not cast the input to DOUBLE (which
    it does for IsInf, and TensorRT only takes by casting down): NaN and +-inf compare False."""
    return x.abs() < math.inf


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


class AnchorGenerator(nn.Module):
    """detectron2's ``DefaultAnchorGenerator``: one anchor size per level, several ratios.

    Anchors of a level are ordered (y, x, anchor), matching the flattening of the RPN outputs.
    """

    def __init__(
        self, sizes: tuple[int, ...], aspect_ratios: tuple[float, ...], strides: tuple[int, ...],
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.strides = strides
        self.offset = offset
        cells = [self._cell_anchors(size, aspect_ratios) for size in sizes]
        # Non-persistent: official checkpoints may carry them, ours never need to.
        for index, cell in enumerate(cells):
            self.register_buffer(f"cell_anchors_{index}", cell, persistent=False)
        self.num_anchors = len(aspect_ratios)

    @staticmethod
    def _cell_anchors(size: int, aspect_ratios: tuple[float, ...]) -> torch.Tensor:
        anchors = []
        for ratio in aspect_ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(anchors, dtype=torch.float32)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features: one [B, C, H, W] map per level -> one [H * W * A, 4] anchor tensor per level."""
        anchors = []
        for index, (feature, stride) in enumerate(zip(features, self.strides)):
            cell = getattr(self, f"cell_anchors_{index}")
            height, width = feature.shape[-2:]
            device = feature.device
            shifts_x = torch.arange(width, device=device, dtype=torch.float32) * stride + self.offset * stride
            shifts_y = torch.arange(height, device=device, dtype=torch.float32) * stride + self.offset * stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack(
                (shift_x.reshape(-1), shift_y.reshape(-1), shift_x.reshape(-1), shift_y.reshape(-1)), dim=1
            )
            anchors.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4))
        return anchors
