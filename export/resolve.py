"""Which model a ``--model`` names: the shipped default, a checkpoint, or a ``transfiner export`` folder.

- Every command and the service decide this here, once, with ``resolve_model(spec, backend)``:

  * ``"default"`` -> the shipped checkpoint (``model.weights.default.DEFAULT_WEIGHTS``);
  * an export folder, or the model file inside one -> that export, for the runtime that reads its
    format (``onnxruntime`` for ONNX, ``torchscript`` for TorchScript), never for eager PyTorch;
  * any other path -> a checkpoint file, which must exist. A path that does not exist is an error:
    nothing here looks in the current directory (or any other) for a model it was not named.

- The result's ``weights_digest`` is the version every backend reports for the same weights: the
  checkpoint's digest, or, for an export, the digest of the checkpoint it was exported from (its
  metadata holds it), so the eager, TorchScript and ONNX Runtime services agree.
- ``model`` only knows checkpoints (``model.weights.default.resolve_weights``); export folders are
  this package's, so the whole decision lives here and ``service`` and the command line call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from transfiner.export.exporter import ExportError, find_export
from transfiner.model.inference.backend import BACKEND_NAMES
from transfiner.model.weights.default import resolve_weights
from transfiner.model.weights.files import file_digest

# Which export format each runtime reads (eager PyTorch reads checkpoints only).
RUNTIME_FORMATS = {"torchscript": "torchscript", "onnxruntime": "onnx"}

ModelKind = Literal["default", "checkpoint", "export"]


def runtime_for(fmt: str) -> str:
    """The backend that runs an export of format ``fmt`` (``onnx`` -> ``onnxruntime``)."""
    return next(name for name, runtime_fmt in RUNTIME_FORMATS.items() if runtime_fmt == fmt)


@dataclass(frozen=True)
class ResolvedModel:
    """What a ``--model`` names, checked for the backend it was resolved for."""

    kind: ModelKind
    path: Path  # the checkpoint file, or the export's model file (model.onnx / model.ts)
    name: str  # what /v1/models calls it: "default", the checkpoint's stem, or the export's name as given
    export_format: str | None = None  # "onnx" or "torchscript" for an export, else None
    metadata: dict | None = field(default=None, repr=False, compare=False)  # the export's metadata.json

    @property
    def is_checkpoint(self) -> bool:
        return self.kind != "export"

    @cached_property
    def weights_digest(self) -> str:
        """The version: the weights' digest. Computed on first use only, as hashing a large
        checkpoint costs time that ``predict`` does not need to spend."""
        if self.metadata is not None:
            # Only an export of weights that never were a file lacks its source's digest; its
            # own file is then all that identifies it.
            return self.metadata["source"]["sha256_12"] or file_digest(self.path)
        return file_digest(self.path)


def check_backend_name(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")


def resolve_model(spec: str | os.PathLike, backend: str = "pytorch") -> ResolvedModel:
    """``spec`` (``"default"``, a checkpoint, an export folder or its model file) for ``backend``.

    Raises ``CheckpointError`` for a missing or unreadable-as-a-path checkpoint and
    ``ExportError`` for a broken export or an export the backend cannot run. ``backend="pytorch"``
    is also what needs a checkpoint for its own sake (``transfiner export``)."""
    check_backend_name(backend)
    if str(spec) == "default":
        return ResolvedModel("default", resolve_weights("default"), "default")
    try:
        found = find_export(spec)
    except ExportError:
        if backend != "pytorch":
            raise
        # Not an export at all (e.g. a folder without metadata.json): for a checkpoint reader
        # the checkpoint error below says what is wrong with it.
        found = None
    if found is None:
        weights = resolve_weights(spec)
        return ResolvedModel("checkpoint", weights, weights.stem)
    model_file, metadata = found
    fmt = metadata["format"]
    if backend == "pytorch":
        raise ExportError(
            f"{spec} is an exported model: run it with --backend {runtime_for(fmt)} "
            "(the pytorch backend and `transfiner export` need its checkpoint)"
        )
    if fmt != RUNTIME_FORMATS[backend]:
        raise ExportError(
            f"{model_file} is an export in the {fmt} format; --backend {backend} needs {RUNTIME_FORMATS[backend]}"
        )
    return ResolvedModel("export", model_file, Path(spec).name, fmt, metadata)


__all__ = ["RUNTIME_FORMATS", "ModelKind", "ResolvedModel", "check_backend_name", "resolve_model", "runtime_for"]
