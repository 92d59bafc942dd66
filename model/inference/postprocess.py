"""Backend-independent post-processing: the network's outputs -> an image's COCO results.

Every backend (eager PyTorch, TorchScript, ONNX Runtime) ends with ``RawOutputs``: boxes in
network-input pixels and per-detection mask probabilities. This module is the one place that
turns them into results, for the ``Predictor``, evaluation and the service alike, so all of them
produce identical records:

* ``select_detections``: one image's rows of a batch, optionally narrowed (threshold, classes,
  top-k, coarse masks); ``image_detections``: those rows in the image's own pixels
  (``rescale_boxes``, as detectron2's ``detector_postprocess``);
* masks: binary masks pasted from the soft ones (``paste_masks``), COCO RLE (``masks_to_rle``),
  polygons (``model.polygons.mask_to_polygons`` on each window, ``segment``);
* ``coco_records``: COCO result records, rounded;
* ``fetch_detections``: all of the above that needs the device, for several images of a batch at
  once, with the host waiting for the device twice in all (the service's worker).

A detection can only be foreground inside the small integer window around its box
(see ``box_windows``), so everything here samples those windows only
(``sample_windows``, batched over detections); ``masks_to_rle`` encodes straight
from them, and full-image masks (``paste_masks``) are built only when asked for.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

from transfiner.model.inference.polygons import mask_to_polygons
from transfiner.model.modeling.rcnn import RawOutputs
from transfiner.model.transfer import to_device

__all__ = [
    "ImageDetections", "select_detections", "detection_rows", "rescale_boxes", "image_detections", "segment",
    "fetch_segments", "finish_segments", "FetchedSegments", "DetectionRequest", "FetchedDetections",
    "fetch_detections", "coco_records", "WindowChanges", "window_changes", "changes_on_host", "rles_from_changes",
    "box_windows", "sample_windows", "paste_windows", "paste_masks", "encode_rle", "masks_to_rle",
]

MASK_FORMATS = ("rle", "polygon", "none")


# --------------------------------------------------------------------------------------------
# Detections of one image


@dataclass
class ImageDetections:
    """One image's detections in its own pixels, on the device the outputs were left on."""

    boxes: torch.Tensor  # [N, 4] float32 xyxy, clipped to the image, none empty
    scores: torch.Tensor  # [N] float32
    classes: torch.Tensor  # [N] int64 contiguous class index
    mask_probs: torch.Tensor  # [N, S, S] float32 soft masks inside each box


def select_detections(
    raw: RawOutputs, index: int, score_threshold: float | None = None, classes: Collection[int] | None = None,
    max_detections: int | None = None, refine: bool = True,
) -> RawOutputs:
    """Image ``index``'s detections, as a one-image ``RawOutputs`` (batch index 0): those scoring
    above ``score_threshold``, of ``classes``, the first ``max_detections`` (``detection_rows``);
    ``mask_probs`` holds the coarse masks when ``refine`` is off."""
    rows = detection_rows(raw.batch_index, raw.scores, raw.classes, index, score_threshold, classes, max_detections)
    probs = raw.mask_probs if refine else raw.coarse_probs
    return RawOutputs(
        boxes=raw.boxes[rows], scores=raw.scores[rows], classes=raw.classes[rows],
        batch_index=torch.zeros_like(rows), mask_probs=probs[rows], coarse_probs=raw.coarse_probs[rows],
    )


def detection_rows(
    batch_index: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, index: int,
    score_threshold: float | None = None, kept_classes: Collection[int] | None = None,
    max_detections: int | None = None,
) -> torch.Tensor:
    """The rows [n] of a batch's detections (batch_index, scores, classes [D], on any device)
    that image ``index`` gets: scoring above ``score_threshold``, of ``kept_classes``, the first
    ``max_detections``.

    Detections come out of the model sorted by score within each image and NMS only lets a box
    suppress lower-scored ones, so a higher threshold or a smaller top-k applied here gives
    exactly what a forward pass run with them would have given."""
    rows = torch.nonzero(batch_index == index).flatten()  # [n] in the model's order
    if score_threshold is not None:
        rows = rows[scores[rows] > score_threshold]  # strict, as the model's own filter
    if kept_classes is not None:
        allowed = torch.tensor(sorted(kept_classes), dtype=classes.dtype, device=rows.device)
        rows = rows[torch.isin(classes[rows], allowed)]
    if max_detections is not None:
        rows = rows[:max_detections]
    return rows


def rescale_boxes(
    boxes: torch.Tensor, input_size: torch.Tensor, original: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [N, 4] from network-input pixels (``input_size`` (h, w)) to the ``original`` image's,
    clipped to it; and [N] bool: which are non-empty (detectron2 drops the others)."""
    height, width = original
    scale = torch.tensor([width / input_size[1].item(), height / input_size[0].item()] * 2, device=boxes.device)
    boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def image_detections(
    raw: RawOutputs, index: int, input_size: torch.Tensor, original: tuple[int, int]
) -> ImageDetections:
    """Detectron2's ``detector_postprocess`` for image ``index`` of a batch: boxes rescaled from
    the network input (``input_size`` (h, w)) to ``original`` (h, w), empty ones dropped. Nothing
    leaves the device: masks are sampled from these later, where they are."""
    rows = raw.batch_index == index  # [D] bool
    boxes, nonempty = rescale_boxes(raw.boxes[rows], input_size, original)
    return ImageDetections(
        boxes=boxes[nonempty].float(),
        scores=raw.scores[rows][nonempty].float(),
        classes=raw.classes[rows][nonempty],
        mask_probs=raw.mask_probs[rows][nonempty].float(),
    )


# --------------------------------------------------------------------------------------------
# Segmentations and COCO records


@dataclass
class FetchedSegments:
    """What ``segment`` needs from the device, on the host: the part of post-processing that
    launches kernels (``fetch_segments``) apart from the part that only needs the CPU
    (``finish_segments``), so a GPU server can run the first in the one thread that drives the
    GPU and the second anywhere."""

    mask_format: str
    rles: list[dict] | None = None  # rle: COCO compressed RLE
    windows: list[tuple[np.ndarray, tuple[int, int]]] | None = None  # polygon: (bool window, (x0, y0))
    boxes: np.ndarray | None = None  # none: [N, 4] float32, for the areas


def fetch_segments(
    detections: ImageDetections, image_size: tuple[int, int], mask_format: str = "rle", threshold: float = 0.5,
) -> FetchedSegments:
    """The device half of ``segment``: RLE from the windows around the boxes (``masks_to_rle``),
    or the thresholded windows themselves (polygons), or the boxes; on the host."""
    pending = _start_segments(detections.mask_probs, detections.boxes, image_size, mask_format, threshold)
    return _segments_on_host([pending])[0]


@dataclass
class _PendingSegments:
    """``fetch_segments``' work queued on the device, before anything is copied back."""

    mask_format: str
    boxes: torch.Tensor  # [N, 4]
    changes: WindowChanges | None = None  # rle
    windows: np.ndarray | None = None  # polygon: [N, 4] ``box_windows``
    sampled: list[tuple[np.ndarray, torch.Tensor]] | None = None  # polygon: ``sample_windows``' groups


def _start_segments(
    mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], mask_format: str, threshold: float,
) -> _PendingSegments:
    if mask_format == "none":
        return _PendingSegments(mask_format, boxes)
    if mask_format == "rle":
        return _PendingSegments(mask_format, boxes, changes=window_changes(mask_probs, boxes, image_size, threshold))
    if mask_format == "polygon":
        _check(mask_probs, boxes)
        windows = box_windows(boxes, image_size)
        sampled = list(sample_windows(mask_probs, boxes, windows, threshold))
        return _PendingSegments(mask_format, boxes, windows=windows, sampled=sampled)
    raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")


def _segments_on_host(pending: Sequence[_PendingSegments]) -> list[FetchedSegments]:
    """Several images' pending segments onto the host: one copy for all the run changes, one for
    all the polygon windows."""
    found = iter(changes_on_host([p.changes for p in pending if p.mask_format == "rle"]))
    sampled = [binary for p in pending if p.mask_format == "polygon" for _, binary in p.sampled]
    if sampled:
        flat = torch.cat([b.reshape(-1) for b in sampled]).cpu().numpy()
        on_host = iter(np.split(flat, np.cumsum([b.numel() for b in sampled])[:-1]))
    out = []
    for p in pending:
        if p.mask_format == "none":
            out.append(FetchedSegments("none", boxes=p.boxes.cpu().numpy()))
        elif p.mask_format == "rle":
            out.append(FetchedSegments("rle", rles=rles_from_changes(p.changes, next(found))))
        else:
            windows: list[tuple[np.ndarray, tuple[int, int]]] = [(np.zeros((0, 0), dtype=bool), (0, 0))] * len(p.windows)
            for group, binary in p.sampled:
                _crop_windows(windows, group, next(on_host).reshape(binary.shape), p.windows)
            out.append(FetchedSegments("polygon", windows=windows))
    return out


@dataclass(frozen=True)
class DetectionRequest:
    """What one image asks of its batch's outputs (``fetch_detections``)."""

    index: int  # the image in the batch
    input_size: tuple[int, int]  # (h, w) of its network input
    original: tuple[int, int]  # (h, w) of the image the results are in
    score_threshold: float | None = None
    classes: Collection[int] | None = None
    max_detections: int | None = None
    refine: bool = True  # False: the coarse masks of the same detections
    mask_format: str = "rle"
    mask_threshold: float = 0.5


@dataclass
class FetchedDetections:
    """One image's detections on the host; ``finish_segments`` completes their segments."""

    boxes: np.ndarray  # [N, 4] float32 xyxy in the image's own pixels
    scores: np.ndarray  # [N] float32
    classes: np.ndarray  # [N] int64 contiguous class indices
    segments: FetchedSegments


def fetch_detections(raw: RawOutputs, requests: Sequence[DetectionRequest]) -> list[FetchedDetections]:
    """``select_detections``, ``image_detections`` and ``fetch_segments`` for several images of
    one batch, with the same results, and the host waiting for the device twice in all: for the
    batch's boxes, scores and classes, then for every mask's run changes. Rows are picked and
    boxes rescaled on the host; only the masks are sampled where they are.

    Each wait lets the GPU run dry while the host prepares what comes next, and in a server the
    waiting thread may then queue behind others for the interpreter lock; the one-image path
    waits about a dozen times an image (rows, sizes, boxes, every group of windows)."""
    if not requests:
        return []
    boxes, scores, classes, batch_index = _columns_on_host(raw)
    device = raw.mask_probs.device
    selected, pending = [], []
    for r in requests:
        rows = detection_rows(batch_index, scores, classes, r.index, r.score_threshold, r.classes, r.max_detections)
        scaled, nonempty = rescale_boxes(boxes[rows], torch.tensor(r.input_size), r.original)
        rows, scaled = rows[nonempty], scaled[nonempty].float()
        selected.append((scaled, scores[rows].float(), classes[rows]))
        if r.mask_format == "none":
            probs = raw.mask_probs[:0]  # not sampled
        else:
            probs = (raw.mask_probs if r.refine else raw.coarse_probs).index_select(0, to_device(rows, device))
        pending.append(_start_segments(probs.float(), scaled, r.original, r.mask_format, r.mask_threshold))
    segments = _segments_on_host(pending)
    return [
        FetchedDetections(b.numpy(), s.numpy(), c.numpy(), segment)
        for (b, s, c), segment in zip(selected, segments)
    ]


def _columns_on_host(raw: RawOutputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes, scores, classes, batch_index) of a batch on the host, each in its own dtype, by
    one copy: float64 holds every float16/bfloat16/float32 value and class or image index exactly."""
    columns = (raw.boxes, raw.scores[:, None], raw.classes[:, None], raw.batch_index[:, None])
    packed = torch.cat([c.to(torch.float64) for c in columns], dim=1).cpu()  # [D, 7]
    return (
        packed[:, :4].to(raw.boxes.dtype), packed[:, 4].to(raw.scores.dtype),
        packed[:, 5].to(raw.classes.dtype), packed[:, 6].to(raw.batch_index.dtype),
    )


def finish_segments(fetched: FetchedSegments) -> tuple[list[Any] | None, list[float]]:
    """The host half of ``segment``: polygons traced from the windows, and the areas."""
    if fetched.mask_format == "none":
        return None, [float((b[2] - b[0]) * (b[3] - b[1])) for b in fetched.boxes]  # float32, as the boxes
    if fetched.mask_format == "polygon":
        return ([mask_to_polygons(w, origin) for w, origin in fetched.windows],
                [float(w.sum()) for w, _ in fetched.windows])
    rles = fetched.rles
    return rles, [float(a) for a in mask_util.area(rles)] if rles else []


def segment(
    detections: ImageDetections, image_size: tuple[int, int], mask_format: str = "rle", threshold: float = 0.5,
) -> tuple[list[Any] | None, list[float]]:
    """Each detection's segmentation in ``mask_format`` and its area, from the windows around the
    boxes (no full-image masks are built).

    ``rle``: COCO compressed RLE (``masks_to_rle``), area its pixel count; ``polygon``: outer
    boundaries (``mask_to_polygons``), area the mask's pixel count (holes included);
    ``none``: no segmentations (None) and the boxes' areas.
    """
    return finish_segments(fetch_segments(detections, image_size, mask_format, threshold))


def coco_records(
    image_id: Any, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, category_ids: Sequence[int],
    segmentations: Sequence[Any] | None = None, areas: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One COCO results record per detection: ``image_id``, ``bbox`` as xywh rounded to 2
    decimals, ``score`` rounded to 5, ``category_id``; then ``category_name``, ``area`` and
    ``segmentation`` where given (``segment`` gives the last two). Keys in the order of the
    service's ``schemas.Instance``, which sends these records as they are.

    boxes: [N, 4] xyxy in image pixels; scores: [N]; classes: [N] contiguous class indices, mapped
    through ``category_ids`` (and ``class_names``).
    """
    out = []
    for i, (box, score, cls) in enumerate(zip(boxes, scores, classes)):
        x0, y0, x1, y1 = (float(v) for v in box)
        record = {
            "image_id": image_id,
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "score": round(float(score), 5),
            "category_id": int(category_ids[int(cls)]),
        }
        if class_names is not None:
            record["category_name"] = class_names[int(cls)]
        if areas is not None:
            record["area"] = areas[i]
        if segmentations is not None:
            record["segmentation"] = segmentations[i]
        out.append(record)
    return out


# --------------------------------------------------------------------------------------------
# Masks from the soft masks, inside each box's window

# A group of windows sampled together holds at most this many (padded) pixels, or one window:
# bounds the [n, h, w, 2] float32 sampling grid (32 MB) however many large boxes there are.
_GROUP_PIXELS = 1 << 22
# ... and pads to its largest window by at most this factor over the pixels it really needs. On
# the CPU a padded pixel costs as much as a real one (1.25 was fastest at 1 and 2 threads on
# scripts/bench_postprocess.py; 1.5 at 16, by 15%); on a GPU padding is nearly free and every
# group costs kernel launches and a sync: fewer, fuller groups.
_GROUP_WASTE = {"cpu": 1.25}
_GROUP_WASTE_ACCELERATOR = 8.0


def box_windows(boxes: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """The pixels ``paste_masks`` samples for each box, as [N, 4] int64 (x0, y0, x1, y1).

    detectron2's integer window ``[floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1)``
    of the float32 box, clipped to the image. Every pixel outside it is background. Boxes with
    zero, negative or NaN width or height (or non-finite corners) and boxes entirely outside the
    image give an empty window, all zeros.
    """
    height, width = int(image_size[0]), int(image_size[1])
    # float32 as the sampling sees them; float64 holds them exactly for floor/ceil.
    b = boxes.detach().to(torch.float32).cpu().numpy().astype(np.float64).reshape(-1, 4)  # [N, 4]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(b).all(axis=1) & (b[:, 2] - b[:, 0] > 0) & (b[:, 3] - b[:, 1] > 0)
    b = np.where(ok[:, None], b, 0.0)
    # Clipping both ends to the image keeps the ints small and an outside box's window empty.
    x0 = np.clip(np.floor(b[:, 0]) - 1, 0, width)
    x1 = np.clip(np.ceil(b[:, 2]) + 1, 0, width)
    y0 = np.clip(np.floor(b[:, 1]) - 1, 0, height)
    y1 = np.clip(np.ceil(b[:, 3]) + 1, 0, height)
    windows = np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)  # [N, 4]
    empty = ~ok | (windows[:, 2] <= windows[:, 0]) | (windows[:, 3] <= windows[:, 1])
    windows[empty] = 0
    return windows


def _window_groups(windows: np.ndarray, device: torch.device) -> list[np.ndarray]:
    """Indices of the non-empty windows, grouped to be sampled together: largest first, a group
    closed when padding to its largest height and width would waste too much or hold too many
    pixels. One launch per group instead of per box, without one big box padding all the others."""
    widths = (windows[:, 2] - windows[:, 0]).tolist()  # Python ints: the loop stays cheap
    heights = (windows[:, 3] - windows[:, 1]).tolist()
    areas = [w * h for w, h in zip(widths, heights)]
    order = sorted((i for i in range(len(areas)) if areas[i] > 0), key=lambda i: -areas[i])
    waste = _GROUP_WASTE.get(device.type, _GROUP_WASTE_ACCELERATOR)
    groups: list[list[int]] = []
    group: list[int] = []
    need = pad_w = pad_h = 0
    for i in order:
        w, h = max(pad_w, widths[i]), max(pad_h, heights[i])
        padded = (len(group) + 1) * w * h
        if group and (padded > _GROUP_PIXELS or padded > waste * (need + areas[i])):
            groups.append(group)
            group, need, w, h = [], 0, widths[i], heights[i]
        group.append(i)
        need, pad_w, pad_h = need + areas[i], w, h
    if group:
        groups.append(group)
    return [np.asarray(g, dtype=np.int64) for g in groups]


def sample_windows(
    mask_probs: torch.Tensor, boxes: torch.Tensor, windows: np.ndarray, threshold: float = 0.5
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Binarized soft masks sampled inside their windows, a group of detections per ``grid_sample``.

    Same result as detectron2 v0.5 ``paste_masks_in_image`` on CPU: the centre of pixel (x, y),
    i.e. (x + 0.5, y + 0.5), is mapped to the box's normalized coordinates and the mask is sampled
    bilinearly (``align_corners=False``, zeros outside the mask), in float32, with the same
    operations in the same order as one box at a time, so grouping changes no pixel.

    Args:
        mask_probs: [N, S, S] float mask probabilities (any S, any float dtype).
        boxes: [N, 4] xyxy boxes in output-image pixels.
        windows: [N, 4] int (x0, y0, x1, y1) from ``box_windows``; empty ones are skipped.
        threshold: a pixel is foreground when its sampled probability >= threshold.

    Yields:
        (group [g] int64 detection indices, [g, h, w] bool on the device of ``mask_probs``), h and
        w the group's largest window height and width: detection ``group[j]``'s window is at the
        top left, [j, :y1 - y0, :x1 - x0], and False beyond it.
    """
    groups = _window_groups(windows, mask_probs.device)
    if not groups:
        return
    device = mask_probs.device
    sizes = windows[:, 2:] - windows[:, :2]  # [N, 2] (w, h)
    width, height = (int(v) for v in sizes.max(axis=0))
    origin = to_device(windows[:, :2], device)  # [N, 2] (x0, y0)
    extent = to_device(sizes, device)  # [N, 2] (w, h)
    boxes = to_device(boxes, device).to(torch.float32)  # [N, 4]
    # On the CPU grid_sample runs the items of its batch in parallel: a group of fewer windows
    # than threads is cut into strips of rows, one item each, to keep every thread busy.
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    cols = torch.arange(width, device=device)  # [W]
    rows = torch.arange(height + threads, device=device)  # [H'], room to round strips up
    # The grid is separable: one row of x and one column of y coordinates per detection.
    xs = (origin[:, :1] + cols).to(torch.float32)  # [N, W] pixel x, exact integers
    ys = (origin[:, 1:] + rows).to(torch.float32)  # [N, H']
    gx = (xs + 0.5 - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1  # [N, W]
    gy = (ys + 0.5 - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1  # [N, H']
    # |g| >= 2 already samples zero for any S >= 1; clamping keeps sub-pixel boxes from
    # producing inf coordinates without changing any result. Beyond its window (padding, and
    # all of an empty window's NaN/inf) a detection samples there too: zero, background for
    # any threshold > 0.
    inside_x = cols < extent[:, :1]  # [N, W]
    inside_y = rows < extent[:, 1:]  # [N, H']
    gx = torch.where(inside_x, gx.clamp(-2, 2), 2.0)
    gy = torch.where(inside_y, gy.clamp(-2, 2), 2.0)
    probs = mask_probs.to(torch.float32)  # [N, S, S]
    for group in groups:
        index = to_device(group, device)
        g = len(group)
        w, h = (int(v) for v in sizes[group].max(axis=0))
        strips = min(h, -(-threads // g))
        strip = -(-h // strips)  # rows per strip; strips * strip < h + threads
        grid = torch.empty(g, strips * strip, w, 2, device=device)  # [g, h', w, 2] as (x, y)
        grid[..., 0] = gx[index, None, :w]
        grid[..., 1] = gy[index, : strips * strip, None]
        items = probs[index if strips == 1 else index.repeat_interleave(strips), None]  # [g * strips, 1, S, S]
        sampled = F.grid_sample(items, grid.view(g * strips, strip, w, 2), mode="bilinear", align_corners=False)
        binary = (sampled.view(g, strips * strip, w) >= threshold)[:, :h]  # [g, h, w]
        if not threshold > 0:  # then the padding's zeros pass: mask it out (a rare threshold)
            binary &= inside_y[index, :h, None] & inside_x[index, None, :w]
        yield group, binary


def paste_windows(
    mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float = 0.5
) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Each detection's binary mask inside its window, and the window's top-left pixel (x, y).

    The full-image mask of detection i is ``window`` at ``[y:y + h, x:x + w]`` and False
    elsewhere; degenerate boxes give a [0, 0] window at (0, 0). Windows are on the device of
    ``mask_probs`` (views of the batch they were sampled in).
    """
    n = _check(mask_probs, boxes)
    windows = box_windows(boxes, image_size)  # [N, 4]
    empty = torch.zeros(0, 0, dtype=torch.bool, device=mask_probs.device)
    out: list[tuple[torch.Tensor, tuple[int, int]]] = [(empty, (0, 0))] * n
    for group, sampled in sample_windows(mask_probs, boxes, windows, threshold):
        _crop_windows(out, group, sampled, windows)
    return out


def _crop_windows(out: list, group: np.ndarray, sampled, windows: np.ndarray) -> None:
    """Puts each detection of ``group`` into ``out`` as (its window cut from ``sampled`` [g, h, w],
    tensor or array, where it sits at the top left; the window's top-left pixel (x, y))."""
    for window, (x0, y0, x1, y1), i in zip(sampled, windows[group].tolist(), group.tolist()):
        out[i] = (window[: y1 - y0, : x1 - x0], (x0, y0))


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """Paste per-box soft masks into the image and binarize them (``sample_windows``).

    Args:
        mask_probs: [N, S, S] float mask probabilities (any S, any float dtype).
        boxes: [N, 4] xyxy boxes in output-image pixel coordinates.
        image_size: (height, width) of the output image.
        threshold: a pixel is foreground when its sampled probability >= threshold.

    Returns:
        [N, height, width] bool masks on the device of ``mask_probs``. Boxes with
        zero (or negative, or NaN) width or height give empty masks.
    """
    height, width = int(image_size[0]), int(image_size[1])
    n = _check(mask_probs, boxes)
    out = torch.zeros(n, height, width, dtype=torch.bool, device=mask_probs.device)  # [N, H, W]
    for i, (window, (x0, y0)) in enumerate(paste_windows(mask_probs, boxes, image_size, threshold)):
        h, w = window.shape
        out[i, y0 : y0 + h, x0 : x0 + w] = window
    return out


def masks_to_rle(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> list[dict]:
    """``encode_rle(paste_masks(...))``, byte for byte, without building full-image masks.

    COCO RLE runs down the columns (index x * H + y, first run background). Outside its window
    a detection is background, so every change of value is at a window column's pixel rows
    y0..y1: each window's columns are scanned on the device (``window_changes``), and only the
    change positions go to the host (``changes_on_host``), where pycocotools compresses the
    runs (``rles_from_changes``).

    Args: as ``paste_masks``.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}``, as ``encode_rle``.
    """
    changes = window_changes(mask_probs, boxes, image_size, threshold)
    return rles_from_changes(changes, changes_on_host([changes])[0])


@dataclass
class WindowChanges:
    """``masks_to_rle``'s device half for one image: where each window column changes value."""

    image_size: tuple[int, int]  # (H, W)
    windows: np.ndarray  # [N, 4] int64 (x0, y0, x1, y1), ``box_windows``
    # Per group of windows sampled together: its detection indices and the (w, h + 1) of their flags.
    groups: list[tuple[np.ndarray, tuple[int, int]]]
    # [T] bool on the device: every group's [g, w, h + 1] flags (a run starts or ends at row k of
    # window column x), flattened and concatenated in the order of ``groups``.
    flags: torch.Tensor


def window_changes(
    mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float = 0.5,
) -> WindowChanges:
    """Samples each detection's window (``sample_windows``) and marks, down each window column
    with background above and below it, where the value changes. Queues kernels only: nothing
    here waits for the device (boxes may be on the host)."""
    n = _check(mask_probs, boxes)
    windows = box_windows(boxes, image_size)  # [N, 4]
    groups, flags = [], []
    if n:
        for group, binary in sample_windows(mask_probs, boxes, windows, threshold):
            cols = F.pad(binary.transpose(1, 2), (1, 1))  # [g, w, h + 2], column-major
            change = cols[..., 1:] != cols[..., :-1]  # [g, w, h + 1]
            groups.append((group, (change.shape[1], change.shape[2])))
            flags.append(change.reshape(-1))
    if not flags:
        flat = torch.zeros(0, dtype=torch.bool, device=mask_probs.device)
    else:
        flat = flags[0] if len(flags) == 1 else torch.cat(flags)
    return WindowChanges((int(image_size[0]), int(image_size[1])), windows, groups, flat)


def changes_on_host(changes: Sequence[WindowChanges]) -> list[np.ndarray]:
    """The positions of the set flags of several ``WindowChanges`` (ascending int64, one array
    each), in one copy from the device: the host waits for it once, however many images."""
    if not changes:
        return []
    flags = [c.flags for c in changes]
    found = _flat_nonzero(flags[0] if len(flags) == 1 else torch.cat(flags)).cpu().numpy()
    ends = np.cumsum([len(f) for f in flags])
    cuts = np.searchsorted(found, ends[:-1])
    starts = np.concatenate(([0], ends[:-1]))
    return [part - start for part, start in zip(np.split(found, cuts), starts)]


def rles_from_changes(changes: WindowChanges, found: np.ndarray) -> list[dict]:
    """``masks_to_rle``'s host half: the compressed RLE of each detection, from the positions
    ``found`` (ascending) of ``changes.flags``' set values."""
    height, width = changes.image_size
    windows = changes.windows
    n = len(windows)
    if n == 0:
        return []
    sizes = [len(group) * w * k1 for group, (w, k1) in changes.groups]
    cuts = np.searchsorted(found, np.cumsum(sizes)[:-1]) if sizes else []
    at, owner = [np.zeros(1, np.int64)], [np.full(1, n)]  # a sentinel past the last detection
    offset = 0
    for (group, (w, k1)), flat, size in zip(changes.groups, np.split(found, cuts), sizes):
        flat = flat - offset  # sorted by (j, x, k) within the group
        offset += size
        j, x, k = flat // (w * k1), flat // k1 % w, flat % k1  # detection group[j], window column x
        detection = group[j]
        at.append((windows[detection, 0] + x) * height + windows[detection, 1] + k)  # image x * H + y
        owner.append(detection)
    at, owner = np.concatenate(at), np.concatenate(owner)
    order = np.argsort(owner, kind="stable")  # by detection, each one's changes still ascending
    at, owner = at[order], owner[order]
    # A run ending at the bottom of a full-height window column and one starting at the top of
    # the next column are one run: the two changes at the same index cancel.
    repeated = (at[1:] == at[:-1]) & (owner[1:] == owner[:-1])
    keep = np.ones(len(at), dtype=bool)
    keep[1:] &= ~repeated
    keep[:-1] &= ~repeated
    at, owner = at[keep], owner[keep]
    starts = np.searchsorted(owner, np.arange(n + 1))  # detection i's changes: starts[i]:starts[i + 1]
    total = height * width
    uncompressed = []
    for i in range(n):
        positions = at[starts[i] : starts[i + 1]]
        counts = np.diff(positions, prepend=0, append=total)  # a background run first, maybe empty
        if len(positions) and positions[-1] == total:
            counts = counts[:-1]  # the mask ends with foreground: no background run after it
        uncompressed.append({"size": [height, width], "counts": counts})
    rles = mask_util.frPyObjects(uncompressed, height, width)  # compresses in C, as encode
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _flat_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the True values of 1-D ``flags``, ascending, on its device."""
    if flags.device.type == "cpu":  # numpy's is several times faster than torch's on the CPU
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return flags.nonzero()[:, 0]


def _check(mask_probs: torch.Tensor, boxes: torch.Tensor) -> int:
    n = mask_probs.shape[0]
    if boxes.shape[0] != n:
        raise ValueError(f"{n} masks but {boxes.shape[0]} boxes")
    return n


def encode_rle(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """Encode binary masks as COCO compressed RLE.

    Args:
        masks: [N, H, W] bool (or 0/1 integer) torch tensor (any device) or numpy array.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}``: JSON-serializable, and
        ``pycocotools.mask.decode`` accepts them as they are.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected [N, H, W] masks, got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants a Fortran-ordered uint8 [H, W, N], i.e. the memory of a
    # C-ordered [N, W, H]: transpose (on the GPU if the tensor is there), copy once.
    if isinstance(masks, torch.Tensor):
        nwh = masks.transpose(1, 2).to(torch.uint8, memory_format=torch.contiguous_format)
        nwh = nwh.cpu().numpy()
    else:
        nwh = np.asarray(masks).transpose(0, 2, 1).astype(np.uint8, order="C")
    rles = mask_util.encode(nwh.transpose(2, 1, 0))  # [H, W, N], Fortran order
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
