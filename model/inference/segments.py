"""Each detection's segmentation (RLE, polygons or none) and its area, from the windows around the boxes.

- ``segment``: both halves at once, for one image.
- ``fetch_segments``: the half that launches kernels and copies to the host; ``finish_segments``:
  the half that only needs the CPU (polygon tracing, areas). A GPU server runs the first in the
  thread that drives the GPU and the second anywhere.
- ``start_segments`` and ``segments_on_host`` split the first half again, so several images of a
  batch share their copies (``model.inference.fetch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch

from transfiner.model.inference.detections import ImageDetections
from transfiner.model.inference.paste import box_windows, count_masks, crop_windows, sample_windows
from transfiner.model.inference.polygons import mask_to_polygons
from transfiner.model.inference.rle import WindowChanges, changes_on_host, rles_from_changes, window_changes

__all__ = [
    "MASK_FORMATS",
    "FetchedSegments",
    "fetch_segments",
    "finish_segments",
    "segment",
    "PendingSegments",
    "start_segments",
    "segments_on_host",
]

MASK_FORMATS = ("rle", "polygon", "none")


@dataclass
class FetchedSegments:
    """What ``segment`` needs from the device, on the host (``fetch_segments``), for the part that
    only needs the CPU (``finish_segments``)."""

    mask_format: str
    rles: list[dict] | None = None  # rle: COCO compressed RLE
    windows: list[tuple[np.ndarray, tuple[int, int]]] | None = None  # polygon: (bool window, (x0, y0))
    boxes: np.ndarray | None = None  # none: [N, 4] float32, for the areas


def fetch_segments(
    detections: ImageDetections,
    image_size: tuple[int, int],
    mask_format: str = "rle",
    threshold: float = 0.5,
) -> FetchedSegments:
    """The device half of ``segment``: RLE from the windows around the boxes (``masks_to_rle``),
    or the thresholded windows themselves (polygons), or the boxes; on the host."""
    pending = start_segments(detections.mask_probs, detections.boxes, image_size, mask_format, threshold)
    return segments_on_host([pending])[0]


@dataclass
class PendingSegments:
    """``fetch_segments``' work queued on the device, before anything is copied back."""

    mask_format: str
    boxes: torch.Tensor  # [N, 4]
    changes: WindowChanges | None = None  # rle
    windows: np.ndarray | None = None  # polygon: [N, 4] ``box_windows``
    sampled: list[tuple[np.ndarray, torch.Tensor]] | None = None  # polygon: ``sample_windows``' groups


def start_segments(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    mask_format: str,
    threshold: float,
) -> PendingSegments:
    """Queues ``fetch_segments``' kernels for one image's detections; nothing waits for the device."""
    if mask_format == "none":
        return PendingSegments(mask_format, boxes)
    if mask_format == "rle":
        return PendingSegments(mask_format, boxes, changes=window_changes(mask_probs, boxes, image_size, threshold))
    if mask_format == "polygon":
        count_masks(mask_probs, boxes)
        windows = box_windows(boxes, image_size)
        sampled = list(sample_windows(mask_probs, boxes, windows, threshold))
        return PendingSegments(mask_format, boxes, windows=windows, sampled=sampled)
    raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")


def segments_on_host(pending: Sequence[PendingSegments]) -> list[FetchedSegments]:
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
            empty = (np.zeros((0, 0), dtype=bool), (0, 0))
            windows: list[tuple[np.ndarray, tuple[int, int]]] = [empty] * len(p.windows)
            for group, binary in p.sampled:
                crop_windows(windows, group, next(on_host).reshape(binary.shape), p.windows)
            out.append(FetchedSegments("polygon", windows=windows))
    return out


def finish_segments(fetched: FetchedSegments) -> tuple[list[Any] | None, list[float]]:
    """The host half of ``segment``: polygons traced from the windows, and the areas."""
    if fetched.mask_format == "none":
        return None, [float((b[2] - b[0]) * (b[3] - b[1])) for b in fetched.boxes]  # float32, as the boxes
    if fetched.mask_format == "polygon":
        return (
            [mask_to_polygons(w, origin) for w, origin in fetched.windows],
            [float(w.sum()) for w, _ in fetched.windows],
        )
    rles = fetched.rles
    return rles, [float(a) for a in mask_util.area(rles)] if rles else []


def segment(
    detections: ImageDetections,
    image_size: tuple[int, int],
    mask_format: str = "rle",
    threshold: float = 0.5,
) -> tuple[list[Any] | None, list[float]]:
    """Each detection's segmentation in ``mask_format`` and its area, from the windows around the
    boxes (no full-image masks are built).

    - ``rle``: COCO compressed RLE (``masks_to_rle``), area its pixel count.
    - ``polygon``: outer boundaries (``mask_to_polygons``), area the mask's pixel count (holes included).
    - ``none``: no segmentations (None) and the boxes' areas.
    """
    return finish_segments(fetch_segments(detections, image_size, mask_format, threshold))
