"""Runtimes behind one interface: a padded BGR batch in, ``RawOutputs`` out.

Only the tensor part differs between runtimes; decoding, resizing and padding
(``service.pipeline.preprocess``) and mask pasting + RLE encoding (``service.pipeline.postprocess``)
are shared, so every backend gives the same JSON for the same network outputs. An ONNX Runtime
backend (export issue) implements ``Backend`` and is added to ``build_backends``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from model.config import ModelConfig
from model.default_model import load_predictor, resolve_weights
from model.rcnn import InferenceOptions, MaskTransfiner, RawOutputs


@runtime_checkable
class Backend(Protocol):
    """What a worker needs from a runtime."""

    name: str  # "pytorch", "onnxruntime", ...
    device: torch.device  # where pre-processing should put the batch
    cfg: ModelConfig

    def infer(self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions) -> RawOutputs:
        """images [B, 3, H, W] float BGR 0..255 padded with the pixel mean; image_sizes [B, 2] (h, w)."""
        ...


class TorchBackend:
    """Eager PyTorch on one device. ``infer`` may be called from any thread (eval mode, no grad)."""

    name = "pytorch"

    def __init__(self, model: MaskTransfiner) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = model.device

    @torch.inference_mode()
    def infer(self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions) -> RawOutputs:
        raw = self.model(images, image_sizes, options)
        if self.device.type == "cuda":
            # Timings (and the post-processing threads) must see finished kernels.
            torch.cuda.synchronize(self.device)
        return raw


@dataclass
class LoadedModel:
    """The backends (one per worker) and what /v1/models says about them."""

    backends: list[Backend]
    name: str
    version: str
    backend: str
    devices: list[str]

    @property
    def cfg(self) -> ModelConfig:
        return self.backends[0].cfg


def checkpoint_version(path: str | os.PathLike) -> str:
    """The first 12 hex digits of the checkpoint's SHA-256: changes whenever the weights do."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def worker_devices(device: str, workers: int | None) -> list[torch.device]:
    """One worker per GPU by default (``auto``/``cuda``), else one CPU worker; more cycle over them."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    elif device == "auto":
        gpus = [torch.device("cpu")]
    else:
        gpus = [torch.device(device)]
    count = workers or len(gpus)
    return [gpus[i % len(gpus)] for i in range(count)]


def build_backends(model: str, config: str | None, device: str, workers: int | None) -> LoadedModel:
    """Loads the checkpoint once per distinct device; workers on the same device share it
    (forward passes in eval mode do not mutate the module)."""
    weights = resolve_weights(model)
    devices = worker_devices(device, workers)
    by_device: dict[torch.device, TorchBackend] = {}
    for dev in devices:
        if dev not in by_device:
            by_device[dev] = TorchBackend(load_predictor(model, config, dev).model)
    backends: list[Backend] = [by_device[dev] for dev in devices]
    version = checkpoint_version(weights) if weights is not None else "random"
    name = "default" if str(model) == "default" else Path(weights).stem
    return LoadedModel(backends, name, version, TorchBackend.name, [str(d) for d in devices])
