"""Box encoding and the anchor generator, with detectron2's conventions (no +1 in widths)."""

from __future__ import annotations

import functools
import math
import sys

import torch
from torch import nn
from torchvision.ops import batched_nms, nms

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


def nms_in_each_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    valid: torch.Tensor,
    num_groups: int,
    iou_threshold: float,
    coordinate_trick: bool = True,
) -> torch.Tensor:
    """NMS within each (image, group) of a batch laid out per image -> kept [B, n] bool.

    - boxes [B, n, 4] (clipped, >= 0 where valid), scores [B, n], groups [B, n] in [0, num_groups),
      valid [B, n]: the candidates (the others take no part, whatever their values).
    - Each image's result is that of NMS on its own candidates, so it cannot depend on its
      batch-mates. Eager and TorchScript: one call per image, as detectron2 (on an H200 faster than
      one call for the batch or one per group, README), its groups moved apart by the coordinate
      trick (``coordinate_trick``) or as torchvision's ``batched_nms`` does (detectron2's RPN). A
      traced graph calls the loop scripted, so it holds for any batch size. ONNX: one
      NonMaxSuppression over the batch with the groups as its classes: per (image, group), no
      coordinates moved at all (``onnx_nms_in_each_image``).
    """
    if torch.onnx.is_in_onnx_export():
        return onnx_nms_in_each_image(boxes, scores, groups, valid, num_groups, iou_threshold)
    if torch.jit.is_tracing():
        return _scripted(nms_image_by_image)(boxes, scores, groups, valid, iou_threshold, coordinate_trick)
    return nms_image_by_image(boxes, scores, groups, valid, iou_threshold, coordinate_trick)


def nms_image_by_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
    coordinate_trick: bool,
) -> torch.Tensor:
    """``nms_in_each_image`` as a loop over the images (TorchScript-compatible)."""
    kept = torch.zeros_like(valid)
    for image in range(boxes.shape[0]):
        rows = torch.nonzero(valid[image]).squeeze(1)
        if rows.shape[0] == 0:
            continue
        image_boxes, image_scores, image_groups = boxes[image][rows], scores[image][rows], groups[image][rows]
        if coordinate_trick:
            keep = coordinate_trick_nms(image_boxes, image_scores, image_groups, iou_threshold)
        else:
            keep = batched_nms(image_boxes, image_scores, image_groups, iou_threshold)
        kept[image] = kept[image].index_fill(0, rows[keep], True)
    return kept


@functools.cache
def _scripted(function):
    """``function`` compiled by TorchScript once, so a traced graph keeps its loop."""
    return torch.jit.script(function)


# Below every score that takes part (probabilities, objectness logits), above the -inf that marks
# the others; also a finite float16, for TensorRT engines built in half precision.
ONNX_SCORE_FLOOR = -65504.0


def onnx_nms_in_each_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    valid: torch.Tensor,
    num_groups: int,
    iou_threshold: float,
) -> torch.Tensor:
    """``nms_in_each_image`` as ONNX's NonMaxSuppression, which runs per (batch item, class):
    each group is a class whose scores are -inf outside it (below the score threshold)."""
    batch, n = scores.shape
    ids = torch.arange(num_groups, device=groups.device)
    member = valid[:, None, :] & (groups[:, None, :] == ids[None, :, None])  # [B, G, n]
    class_scores = torch.where(member, scores[:, None, :].float(), -math.inf)
    boxes = torch.where(valid[..., None], boxes.float(), 0.0)  # invalid boxes may be NaN
    selected = NonMaxSuppression.apply(boxes, class_scores, iou_threshold)  # [V, 3] (image, group, box)
    flat = selected[:, 0] * n + selected[:, 2]
    kept = torch.zeros(batch * n, device=scores.device).scatter(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return (kept > 0).view(batch, n)


class NonMaxSuppression(torch.autograd.Function):
    """ONNX's NonMaxSuppression (exported as that operator): boxes [B, n, 4], scores [B, C, n]
    -> selected [V, 3] int64 (batch item, class, box). The forward pass (run while exporting only)
    computes the same in PyTorch."""

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        selected = [torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)]
        for image in range(scores.shape[0]):
            for group in range(scores.shape[1]):
                rows = torch.nonzero(scores[image, group] >= ONNX_SCORE_FLOOR).squeeze(1)
                keep = rows[nms(boxes[image, rows], scores[image, group, rows], iou_threshold)][:, None]
                selected.append(
                    torch.cat((keep.new_full(keep.shape, image), keep.new_full(keep.shape, group), keep), 1)
                )
        return torch.cat(selected)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float):
        def constant(value, dtype):
            return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))

        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            constant(sys.maxsize, torch.int64),
            constant(iou_threshold, torch.float32),
            constant(ONNX_SCORE_FLOOR, torch.float32),
        )


def best_first(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest values, largest first, and their indices: values [B, n] ->
    ([B, m], [B, m]) with m >= min(n, k); the entries past each row's k-th are -inf.

    Eager and TorchScript sort, stably, so equal values keep their order (as NMS lists the boxes
    it keeps). ONNX has no sort operator: TopK, whose k TensorRT bounds (3,840).
    """
    if torch.onnx.is_in_onnx_export():
        return values.topk(top_count(values.shape[1], k), dim=1)
    ordered, index = values.sort(dim=1, descending=True, stable=True)
    beyond = torch.arange(values.shape[1], device=values.device) >= k
    return ordered.masked_fill(beyond, -math.inf), index


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
        self,
        sizes: tuple[int, ...],
        aspect_ratios: tuple[float, ...],
        strides: tuple[int, ...],
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
