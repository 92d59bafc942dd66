"""Several images' detections of one batch onto the host at once (the service's worker).

``fetch_detections`` gives what ``select_detections``, ``image_detections`` and
``fetch_segments`` give one image at a time, with the host waiting for the device twice in all.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from transfiner.model.inference.detections import detection_rows, rescale_boxes
from transfiner.model.inference.segments import FetchedSegments, segments_on_host, start_segments
from transfiner.model.modeling.rcnn import RawOutputs
from transfiner.model.transfer import to_device

__all__ = ["DetectionRequest", "FetchedDetections", "fetch_detections"]


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
    one batch, with the same results, and the host waiting for the device twice in all.

    - The waits: for the batch's boxes, scores and classes, then for every mask's run changes.
    - Rows are picked and boxes rescaled on the host; only the masks are sampled where they are.
    - Why so few: each wait lets the GPU run dry while the host prepares what comes next, and in a
      server the waiting thread may then queue behind others for the interpreter lock; the
      one-image path waits about a dozen times an image (rows, sizes, boxes, every group of windows).
    """
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
        pending.append(start_segments(probs.float(), scaled, r.original, r.mask_format, r.mask_threshold))
    segments = segments_on_host(pending)
    return [
        FetchedDetections(b.numpy(), s.numpy(), c.numpy(), segment) for (b, s, c), segment in zip(selected, segments)
    ]


def _columns_on_host(raw: RawOutputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes, scores, classes, batch_index) of a batch on the host, each in its own dtype, by
    one copy: float64 holds every float16/bfloat16/float32 value and class or image index exactly."""
    columns = (raw.boxes, raw.scores[:, None], raw.classes[:, None], raw.batch_index[:, None])
    packed = torch.cat([c.to(torch.float64) for c in columns], dim=1).cpu()  # [D, 7]
    return (
        packed[:, :4].to(raw.boxes.dtype),
        packed[:, 4].to(raw.scores.dtype),
        packed[:, 5].to(raw.classes.dtype),
        packed[:, 6].to(raw.batch_index.dtype),
    )
