"""The runtimes behind the workers: one ``model.inference.backend.Backend`` per worker.

``model.inference.backend`` defines the interface (a padded BGR batch in, ``RawOutputs`` out) and eager
PyTorch; ``export.backends`` adds TorchScript and ONNX Runtime. Pre-processing and pasting + RLE
(``service.engine.pipeline``) are shared, so every backend gives the same JSON for the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfiner.model.config import ModelConfig
from transfiner.model.inference.backend import Backend, TorchBackend

__all__ = [
    "Backend",
    "LoadedModel",
    "TorchBackend",
    "build_backends",
    "max_batch_size_for",
    "resolved_settings",
    "uses_worker_process",
    "worker_devices",
    "workers_on_gpu",
]


@dataclass
class LoadedModel:
    """The backends (one per worker) and what /v1/models says about them."""

    backends: list[Backend]  # in this process; empty when the workers are processes of their own
    name: str
    version: str
    backend: str
    devices: list[str]
    cfg: ModelConfig
    precision: str


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


def workers_on_gpu(device: str, workers: int | None) -> bool:
    """Whether the model workers run on GPUs (``worker_devices`` gives all GPUs or none)."""
    return worker_devices(device, workers)[0].type == "cuda"


def uses_worker_process(worker_process: bool | None, device: str, workers: int | None) -> bool:
    """``worker_process`` as set; by default a process of its own for workers on CUDA devices (a
    GPU's launch thread must not wait for the GIL; README, "worker process"), a thread on the
    CPU (whose forward passes release the GIL for long stretches, and a child costs a second
    copy of the model in memory)."""
    return workers_on_gpu(device, workers) if worker_process is None else worker_process


# Images per forward pass when none is set. On a GPU, batches pay: on an H200 at 800x1333, batch 8
# answered 1.9x (10 detections) and 1.5x (100) the images/s of batch 1, and every HTTP figure in
# the README was taken at 8. The CPU keeps the service's first default.
GPU_MAX_BATCH_SIZE = 8
CPU_MAX_BATCH_SIZE = 4


def max_batch_size_for(max_batch_size: int | None, device: str, workers: int | None) -> int:
    """``max_batch_size`` as set; by default 8 where a worker is on a GPU, 4 on the CPU."""
    if max_batch_size is not None:
        return max_batch_size
    return GPU_MAX_BATCH_SIZE if workers_on_gpu(device, workers) else CPU_MAX_BATCH_SIZE


def resolved_settings(settings):
    """``settings`` with what depends on the machine decided (worker processes, batch size), so
    everything downstream, and /v1/models, sees what runs."""
    return settings.model_copy(
        update={
            "worker_process": uses_worker_process(settings.worker_process, settings.device, settings.workers),
            "max_batch_size": max_batch_size_for(settings.max_batch_size, settings.device, settings.workers),
        }
    )


def build_backends(
    model: str,
    config: str | None,
    device: str,
    workers: int | None,
    backend: str = "pytorch",
    threads: int | None = None,
    precision: str = "auto",
    max_cells: tuple[int, int, int] | None = None,
) -> LoadedModel:
    """Loads the model once per distinct device; workers on the same device share it (forward
    passes in eval mode do not mutate the module; ONNX Runtime sessions are thread-safe)."""
    from transfiner.export.backends import load_backend
    from transfiner.export.resolve import resolve_model

    # Resolved once: every device's backend, the name and the version come from the same answer.
    # The version is the weights' digest (for an export, its source checkpoint's), so every
    # backend (and the CPU and GPU images) reports the same version for the same weights.
    resolved = resolve_model(model, backend)
    devices = worker_devices(device, workers)
    by_device: dict[torch.device, Backend] = {}
    for dev in devices:
        if dev not in by_device:
            by_device[dev] = load_backend(resolved, backend, config, dev, threads, precision, max_cells)
    backends: list[Backend] = [by_device[dev] for dev in devices]
    return LoadedModel(
        backends,
        resolved.name,
        resolved.weights_digest,
        backend,
        [str(d) for d in devices],
        backends[0].cfg,
        backends[0].precision,
    )
