"""The backend-independent steps around the forward pass, shared by every runtime.

* ``batch_options``: the ``InferenceOptions`` a batch runs with: per image, its own request's
  threshold, detection cap, class filter and refinement, so no request pays for a batch-mate's.
* ``network_image``: a decoded upload -> what waits in the queue (``NetworkImage``), on a decode
  thread; ``preprocess``: those of one canvas -> the padded BGR batch (``model.inference.preprocess``).
* ``fetch``: each request's rows of the batch outputs (``model.inference.detections.detection_rows``:
  a higher threshold or a smaller top-k applied there gives exactly what a forward pass run with
  them would have given; ``refine=false`` takes the coarse masks of the same detections), boxes
  back to image pixels, RLE or polygon windows from each mask's window around its box (no
  full-image masks), onto the host; in the worker's thread, by ``model.inference.fetch`` with the
  ``Predictor``'s own post-processing.
* ``records``: the COCO result records, host only, in a post-processing thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transfiner.model.config import InputConfig, ModelConfig
from transfiner.model.inference.detections import coco_records
from transfiner.model.inference.fetch import DetectionRequest, FetchedDetections, fetch_detections
from transfiner.model.inference.preprocess import canvas_shape, network_shape, pad_batch, resize_image
from transfiner.model.inference.segments import finish_segments
from transfiner.model.modeling.rcnn import InferenceOptions, RawOutputs
from transfiner.model.transfer import to_device


@dataclass(frozen=True)
class RequestOptions:
    """A request's post-processing options, with classes as contiguous model indices."""

    score_threshold: float = 0.5
    max_detections: int = 100
    classes: frozenset[int] | None = None
    mask_threshold: float = 0.5
    mask_format: str = "rle"
    refine: bool = True


@dataclass
class NetworkImage:
    """An upload as it waits in the queue: pixels that give the network input exactly, in
    whichever form takes fewer bytes (see ``network_image``)."""

    pixels: torch.Tensor  # [3, h, w]: uint8 RGB as decoded, or float32 BGR at ``network`` if ``resized``
    resized: bool
    original: tuple[int, int]  # (h, w) of the uploaded image, upright: boxes and masks come back in it
    network: tuple[int, int]  # (h, w) of the network input (``model.inference.preprocess.network_shape``)
    canvas: tuple[int, int]  # (H, W) padded network input: a batch holds one canvas

    @property
    def height(self) -> int:
        return self.original[0]

    @property
    def width(self) -> int:
        return self.original[1]

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()


@dataclass
class PreparedBatch:
    images: torch.Tensor  # [B, 3, H, W] BGR, padded to the batch's one canvas
    sizes: torch.Tensor  # [B, 2] (h, w) network input size of each image, on the images' device
    network: list[tuple[int, int]]  # the same on the host
    originals: list[tuple[int, int]]  # (h, w) of each uploaded image


def batch_options(options: Sequence[RequestOptions], cfg: ModelConfig) -> InferenceOptions:
    """Each image's forward-pass settings from its own request ([B] tensors, see
    ``model.modeling.rcnn.InferenceOptions``): the model then keeps, and computes masks for, only the
    detections each request gets back. A request without masks (``mask_format=none``) skips
    refinement; one with a class filter picks from the model's top-k (the config's
    ``detections_per_image``) before its own ``max_detections``, as ``fetch`` does."""
    cap = cfg.roi_heads.detections_per_image
    classes = None
    if any(o.classes is not None for o in options):
        classes = torch.ones(len(options), cfg.roi_heads.num_classes, dtype=torch.bool)  # [B, K]
        for row, o in zip(classes, options):
            if o.classes is not None:
                row[:] = False
                row[sorted(o.classes)] = True
    return InferenceOptions(
        score_threshold=torch.tensor([o.score_threshold for o in options], dtype=torch.float32),
        max_detections=torch.tensor([o.max_detections if cap < 0 else min(o.max_detections, cap) for o in options]),
        refine=torch.tensor([o.refine and o.mask_format != "none" for o in options]),
        classes=classes,
    )


def network_image(rgb: np.ndarray, original: tuple[int, int], cfg: InputConfig) -> NetworkImage:
    """A decoded [h, w, 3] uint8 RGB array (``original`` (h, w) upright, larger when the JPEG was
    decoded at a reduced scale) -> what its request holds while it waits for a batch.

    - The network input is float32 (4 bytes a value): when that is smaller than the decoded uint8
      pixels (shrinking by more than 2x a side: large photos) the resize runs here, on the decode
      thread, and the decoded pixels are freed before the request queues.
    - Otherwise (small images, upscaled to ``min_size_test``) the uint8 pixels wait and the worker
      resizes them.
    - Either way by ``model.inference.preprocess.resize_image`` to the original's network size, so
      the input is the Predictor's (on CPU to the bit; a CUDA worker resizes small images on the GPU).
    """
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)  # [3, h, w] uint8, a view
    network = network_shape(*original, cfg)
    resized = 4 * network[0] * network[1] < pixels.shape[1] * pixels.shape[2]
    if resized:
        pixels = resize_image(pixels, network, "cpu")
    return NetworkImage(pixels, resized, tuple(original), network, canvas_shape(*original, cfg))


def preprocess(images: Sequence[NetworkImage], cfg: InputConfig, device: torch.device) -> PreparedBatch:
    """Queued images of one canvas -> the padded network batch, exactly as the ``Predictor``."""
    canvases = {image.canvas for image in images}
    if len(canvases) > 1:
        raise ValueError(f"a batch must hold one canvas, got {sorted(canvases)}: the batcher groups by canvas")
    uploaded = [to_device(image.pixels, device) for image in images]
    resized = [
        pixels if image.resized else resize_image(pixels, image.network, device)
        for image, pixels in zip(images, uploaded)
    ]
    batch, sizes = pad_batch(resized, cfg)
    return PreparedBatch(batch, sizes, [image.network for image in images], [image.original for image in images])


def fetch(
    raw: RawOutputs,
    indices: Sequence[int],
    prepared: PreparedBatch,
    options: Sequence[RequestOptions],
) -> list[FetchedDetections]:
    """The device half of post-processing for the requests ``indices`` of a batch (``options``
    by batch index), in the worker's thread: each one's rows, boxes in its own pixels, RLE (or
    polygon windows) from each mask's window, onto the host in two copies for all of them
    (``model.inference.fetch.fetch_detections``).

    On a GPU this is the thread that launches the forward pass's kernels anyway; from a pool of
    post-processing threads the same kernels contended with it for the GIL and the driver, and
    slowed every forward pass by more than they cost here."""
    requests = [
        DetectionRequest(
            i,
            prepared.network[i],
            prepared.originals[i],
            options[i].score_threshold,
            options[i].classes,
            options[i].max_detections,
            options[i].refine,
            options[i].mask_format,
            options[i].mask_threshold,
        )
        for i in indices
    ]
    return fetch_detections(raw, requests)


def records(fetched: FetchedDetections, cfg: ModelConfig, image_id: Any) -> list[dict[str, Any]]:
    """The host half: one request's COCO result records (see ``schemas.Instance``)."""
    segmentations, areas = finish_segments(fetched.segments)
    return coco_records(
        image_id,
        fetched.boxes,
        fetched.scores,
        fetched.classes,
        cfg.category_ids,
        segmentations,
        areas,
        cfg.class_names,
    )
