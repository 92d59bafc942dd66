"""Runtimes behind one interface: a padded BGR batch in, ``RawOutputs`` out.

- Only the tensor part differs between runtimes: resizing and padding (``model.inference.preprocess``)
  and mask pasting + RLE encoding (``model.inference.paste``, ``model.inference.rle``) are shared, so
  every runtime gives the same masks for the same network outputs.
- This module has eager PyTorch; ``export.backends`` adds TorchScript and ONNX Runtime, and
  ``export.backends.load_backend`` picks one by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from transfiner.model.config import ModelConfig
from transfiner.model.inference.precision import autocast, resolve_precision
from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner, RawOutputs

BACKEND_NAMES = ("pytorch", "torchscript", "onnxruntime")
# Runtimes whose graph takes one score threshold and one detection cap for a whole batch
# (``InferenceOptions.batch_wide``); eager PyTorch takes them per image.
BATCH_WIDE_OPTIONS = ("torchscript", "onnxruntime")


@runtime_checkable
class Backend(Protocol):
    """What the Predictor and the service's workers need from a runtime."""

    name: str  # one of BACKEND_NAMES
    device: torch.device  # where pre-processing should put the batch
    cfg: ModelConfig
    precision: str  # fp32, bf16 or fp16 (see model.inference.precision)

    def infer(self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions) -> RawOutputs:
        """images [B, 3, H, W] float BGR 0..255 padded with the pixel mean; image_sizes [B, 2] (h, w)."""
        ...


# Refined boxes per mask-head step of ``infer_lightest_first``, by device type. On a CPU a
# step's fixed cost is small next to its boxes' refinement, so small groups hand light images
# their answers early for free. On a GPU every step pays a sync, a chunk plan and refiner chunks
# too small to fill the card (per-image steps cost a batch of 8 x 100 detections a fifth of its
# time on an H200, README), so a batch of the usual size runs in one step there.
CPU_BOXES_PER_GROUP = 128
GPU_BOXES_PER_GROUP = 1024


class TorchBackend:
    """Eager PyTorch on one device at one precision (``auto``: bf16 on CUDA that supports it,
    else fp32). ``infer`` may be called from any thread (eval mode, no grad).

    ``boxes_per_group``: how many refined boxes ``infer_lightest_first`` puts in one mask-head
    call (default: ``CPU_BOXES_PER_GROUP`` on the CPU, else ``GPU_BOXES_PER_GROUP``)."""

    name = "pytorch"

    def __init__(
        self, model: MaskTransfiner, precision: str | None = "fp32", boxes_per_group: int | None = None
    ) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = model.device
        self.precision = resolve_precision(precision, self.device)
        default_group = CPU_BOXES_PER_GROUP if self.device.type == "cpu" else GPU_BOXES_PER_GROUP
        self.boxes_per_group = boxes_per_group or default_group

    @torch.inference_mode()
    def infer(self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions) -> RawOutputs:
        with autocast(self.precision, self.device):
            raw = self.model(images, image_sizes, options)
        if self.device.type == "cuda":
            # Timings (and the post-processing threads) must see finished kernels; this stream's
            # only, as the service post-processes earlier batches on streams of its own meanwhile.
            torch.cuda.current_stream(self.device).synchronize()
        return raw

    def infer_lightest_first(
        self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions
    ) -> Iterator[tuple[list[int], RawOutputs]]:
        """``infer`` in steps: detection for the whole batch, then the masks of groups of images,
        the images with the fewest detections to refine first (``MaskTransfiner.segment_lightest_first``).
        Each step runs when the caller asks for the next group, in the caller's thread."""
        with torch.inference_mode(), autocast(self.precision, self.device):
            detected = self.model.detect(images, image_sizes, options)
            groups = self.model.segment_lightest_first(detected, self.boxes_per_group)
        while True:
            with torch.inference_mode(), autocast(self.precision, self.device):
                step = next(groups, None)
            if step is None:
                return
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # as infer
            yield step


def infer_lightest_first(
    backend: Backend, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions
) -> Iterator[tuple[list[int], RawOutputs]]:
    """(image indices, their outputs) for a batch, in steps where the backend can (eager PyTorch),
    else one step with every image (an exported graph runs whole)."""
    if isinstance(backend, TorchBackend):
        yield from backend.infer_lightest_first(images, image_sizes, options)
    else:
        yield list(range(images.shape[0])), backend.infer(images, image_sizes, options)
