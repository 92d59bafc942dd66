"""Runtimes behind one interface: a padded BGR batch in, ``RawOutputs`` out.

Only the tensor part differs between runtimes. Resizing and padding (``model.preprocess``) and
mask pasting + RLE encoding (``model.postprocess``) are shared, so every runtime gives the same
masks for the same network outputs. This module has eager PyTorch; ``export.runtimes`` adds
TorchScript and ONNX Runtime, and ``export.runtimes.load_backend`` picks one by name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .config import ModelConfig
from .precision import autocast, resolve_precision
from .rcnn import InferenceOptions, MaskTransfiner, RawOutputs

BACKEND_NAMES = ("pytorch", "torchscript", "onnxruntime")


@runtime_checkable
class Backend(Protocol):
    """What the Predictor and the service's workers need from a runtime."""

    name: str  # one of BACKEND_NAMES
    device: torch.device  # where pre-processing should put the batch
    cfg: ModelConfig
    precision: str  # fp32, bf16 or fp16 (see model.precision)

    def infer(self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions) -> RawOutputs:
        """images [B, 3, H, W] float BGR 0..255 padded with the pixel mean; image_sizes [B, 2] (h, w)."""
        ...


class TorchBackend:
    """Eager PyTorch on one device at one precision (``auto``: bf16 on CUDA that supports it,
    else fp32). ``infer`` may be called from any thread (eval mode, no grad)."""

    name = "pytorch"

    def __init__(self, model: MaskTransfiner, precision: str | None = "fp32") -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = model.device
        self.precision = resolve_precision(precision, self.device)

    @torch.inference_mode()
    def infer(self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions) -> RawOutputs:
        with autocast(self.precision, self.device):
            raw = self.model(images, image_sizes, options)
        if self.device.type == "cuda":
            # Timings (and the post-processing threads) must see finished kernels; this stream's
            # only, as the service post-processes earlier batches on streams of its own meanwhile.
            torch.cuda.current_stream(self.device).synchronize()
        return raw
