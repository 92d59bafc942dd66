"""The runtimes behind the workers: one ``model.backend.Backend`` per worker.

``model.backend`` defines the interface (a padded BGR batch in, ``RawOutputs`` out) and eager
PyTorch; ``export.runtimes`` adds TorchScript and ONNX Runtime. Pre-processing and pasting + RLE
(``service.pipeline``) are shared, so every backend gives the same JSON for the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.backend import Backend, TorchBackend
from model.checkpoint_io import file_digest
from model.config import ModelConfig
from model.default_model import resolve_weights

__all__ = ["Backend", "LoadedModel", "TorchBackend", "build_backends", "worker_devices"]


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

    @property
    def precision(self) -> str:
        return self.backends[0].precision


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


def build_backends(
    model: str, config: str | None, device: str, workers: int | None, backend: str = "pytorch",
    threads: int | None = None, precision: str = "auto", max_cells: tuple[int, int, int] | None = None,
) -> LoadedModel:
    """Loads the model once per distinct device; workers on the same device share it (forward
    passes in eval mode do not mutate the module; ONNX Runtime sessions are thread-safe)."""
    from export.exporter import find_export
    from export.runtimes import load_backend

    devices = worker_devices(device, workers)
    by_device: dict[torch.device, Backend] = {}
    for dev in devices:
        if dev not in by_device:
            by_device[dev] = load_backend(model, backend, config, dev, threads, precision, max_cells)
    backends: list[Backend] = [by_device[dev] for dev in devices]
    found = find_export(model) if backend != "pytorch" and str(model) != "default" else None
    if found:
        model_file, metadata = found
        name = Path(model).name
        # The digest of the checkpoint it was exported from, so that every backend (and the CPU
        # and GPU images) reports the same version for the same weights. Only an export of
        # weights that never were a file has none; its own file is then all that identifies it.
        version = metadata["source"]["sha256_12"] or file_digest(model_file)
    else:
        weights = resolve_weights(model)
        name = "default" if str(model) == "default" else weights.stem
        version = file_digest(weights)
    return LoadedModel(backends, name, version, backend, [str(d) for d in devices])
