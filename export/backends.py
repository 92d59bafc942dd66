"""TorchScript and ONNX Runtime behind ``model.inference.backend.Backend``, and ``load_backend`` by name.

- ``load_backend(model, "onnxruntime")`` accepts an export folder (``transfiner export``), a model
  file inside one, or what ``--model`` accepts elsewhere (``default``, a checkpoint), as
  ``export.resolve.resolve_model`` decides.
- Checkpoints are exported once into a cache folder (``$TRANSFINER_CACHE``, default
  ``~/.cache/transfiner``) keyed by the checkpoint's digest and the exporting code's
  (``graph_code_digest``), so ``transfiner serve --backend onnxruntime`` works on the default model
  with no extra step, and an upgrade never runs a graph the old code made.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from transfiner.export.exporter import METADATA_FILE, ExportError, export_model, find_export, graph_code_digest
from transfiner.export.graph import INPUT_NAMES, graph_arguments, raw_outputs
from transfiner.export.resolve import RUNTIME_FORMATS, ResolvedModel, check_backend_name, resolve_model
from transfiner.model.config import ModelConfig
from transfiner.model.inference.backend import Backend, TorchBackend
from transfiner.model.inference.predictor import resolve_device
from transfiner.model.modeling.rcnn import InferenceOptions, RawOutputs
from transfiner.model.weights.checkpoint import load_model
from transfiner.model.weights.files import file_digest

logger = logging.getLogger(__name__)


def _keep_options(raw: RawOutputs, options: InferenceOptions) -> RawOutputs:
    """The exported graph always refines; ``refine=False`` takes the coarse masks it also returns."""
    if options.refine:
        return raw
    return RawOutputs(raw.boxes, raw.scores, raw.classes, raw.batch_index, raw.coarse_probs, raw.coarse_probs)


class TorchScriptBackend:
    """A traced ``model.ts`` on the device it was traced for (traces keep device constants)."""

    name = "torchscript"

    def __init__(self, model_file: Path, metadata: dict, device: torch.device) -> None:
        traced_on = torch.device(metadata.get("traced_on") or "cpu")
        if traced_on.type != device.type:
            raise ExportError(
                f"{model_file} was traced on {traced_on.type} and cannot run on {device.type}: export it "
                f"again with --device {device.type}"
            )
        import torchvision  # noqa: F401  (registers torchvision::nms and roi_align for the loaded graph)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                self.module = torch.jit.load(str(model_file), map_location=device).eval()
        except RuntimeError as error:
            raise ExportError(f"{model_file} cannot be loaded as TorchScript: {error}") from error
        self.cfg = ModelConfig.from_dict(metadata["config"])
        self.device = device
        self.precision = "fp32"  # traced in float32

    @torch.inference_mode()
    def infer(self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions) -> RawOutputs:
        options = options.batch_wide()  # the graph takes one value per batch
        threshold, top_k = graph_arguments(self.cfg, options, self.device)
        outputs = self.module(images.to(self.device), image_sizes.to(self.device), threshold, top_k)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # as TorchBackend
        return _keep_options(raw_outputs(outputs), options)


class OnnxRuntimeBackend:
    """``model.onnx`` in an ONNX Runtime session: the CUDA provider on a GPU, else the CPU one.

    Sessions are thread-safe, so the service's workers may share one. Pre-processing happens on
    the CPU (``device``); inputs and outputs cross as numpy arrays.
    """

    name = "onnxruntime"

    def __init__(self, model_file: Path, metadata: dict, device: torch.device, threads: int | None = None) -> None:
        import onnxruntime as ort

        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ExportError("this onnxruntime has no CUDA provider: install onnxruntime-gpu")
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # CUDA/cuDNN from the nvidia wheels torch brought
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        session_options = ort.SessionOptions()
        if threads:
            session_options.intra_op_num_threads = threads
        session_options.log_severity_level = 3  # the exporter's unused-initializer notes are noise
        try:
            self.session = ort.InferenceSession(str(model_file), session_options, providers=providers)
        except Exception as error:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            raise ExportError(f"{model_file} cannot be loaded by ONNX Runtime: {error}") from error
        if device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ExportError(f"ONNX Runtime could not start its CUDA provider for {device}")
        self.cfg = ModelConfig.from_dict(metadata["config"])
        self.device = torch.device("cpu")
        self.precision = "fp32"  # exported in float32
        self.providers = self.session.get_providers()

    def infer(self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions) -> RawOutputs:
        options = options.batch_wide()  # the graph takes one value per batch
        threshold, top_k = graph_arguments(self.cfg, options)
        values = (images.float(), image_sizes.long(), threshold, top_k)
        feeds = {name: value.cpu().numpy() for name, value in zip(INPUT_NAMES, values)}
        outputs = self.session.run(None, feeds)
        return _keep_options(raw_outputs([torch.from_numpy(np.asarray(o)) for o in outputs]), options)


def cache_root() -> Path:
    return Path(os.environ.get("TRANSFINER_CACHE") or Path.home() / ".cache" / "transfiner")


def exported_copy(
    source: ResolvedModel,
    fmt: str,
    config: str | ModelConfig | None,
    device: torch.device,
    max_cells: tuple[int, int, int] | None = None,
) -> Path:
    """The cached export of a checkpoint (``source``, from ``resolve_model``), made on first use;
    with ``max_cells``, exported with those node caps instead of the checkpoint's."""
    if not source.is_checkpoint:
        raise ExportError(f"{source.path} is already an export; exported copies are made from checkpoints")
    key = f"{source.weights_digest}-{graph_code_digest()}-{fmt}" + (f"-{device.type}" if fmt == "torchscript" else "")
    if max_cells is not None:
        key += "-cells" + "-".join(str(k) for k in max_cells)
    folder = cache_root() / "exports" / key
    if (folder / "metadata.json").is_file():
        return folder
    logger.info("exporting %s as %s into %s (first use)", source.name, fmt, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Export next to the target, then rename: a half-written folder is never taken for an export.
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        export_model(load_model(source.path, config, device, max_cells), fmt, staging, source=source.path)
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same export first
            if not (folder / "metadata.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_backend(
    model: str | os.PathLike | ResolvedModel = "default",
    backend: str = "pytorch",
    config: str | ModelConfig | None = None,
    device: str | torch.device | None = "auto",
    threads: int | None = None,
    precision: str | None = "auto",
    max_cells: tuple[int, int, int] | None = None,
) -> Backend:
    """A runtime by name (``pytorch``, ``torchscript``, ``onnxruntime``) for ``model`` (what
    ``--model`` names, or ``resolve_model``'s answer for this backend, so that a caller that also
    needs its name and version resolves once), at ``precision`` (``model.inference.precision``; exported
    graphs are float32, so they take auto or fp32), with node caps ``max_cells`` (default: the
    checkpoint's; an export folder keeps its own)."""
    check_backend_name(backend)
    device = resolve_device(device)
    if backend != "pytorch" and precision not in (None, "auto", "fp32"):
        raise ValueError(
            f"the {backend} backend runs the float32 export; --precision {precision} needs --backend pytorch"
        )
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, backend)
    if backend == "pytorch":
        if not resolved.is_checkpoint:  # resolved for another backend
            raise ExportError(
                f"{resolved.path} is an exported model ({resolved.export_format}): the pytorch "
                "backend needs a checkpoint"
            )
        return TorchBackend(load_model(resolved.path, config, device, max_cells), precision)
    fmt = RUNTIME_FORMATS[backend]
    if resolved.is_checkpoint:
        found = find_export(exported_copy(resolved, fmt, config, device, max_cells))
        assert found is not None, "exported_copy returns an export folder"
        model_file, metadata = found
    else:
        model_file, metadata = resolved.path, resolved.metadata
    exported_caps = tuple(metadata["config"]["transfiner"]["max_cells"])
    if max_cells is not None and tuple(max_cells) != exported_caps:
        raise ValueError(
            f"{model_file} was exported with max cells {exported_caps}: its graph's shapes are "
            "static, so export the checkpoint again with `transfiner export --max-cells` (or give "
            "the checkpoint)"
        )
    if metadata["format"] != fmt:  # an answer of resolve_model for another backend
        raise ExportError(
            f"{model_file} is an export in the {metadata['format']} format; --backend {backend} needs {fmt}"
        )
    digest = file_digest(model_file)
    if digest != metadata["sha256_12"]:
        # Another model's file copied in: it would run under this metadata's name and version.
        raise ExportError(
            f"{model_file} is not the file its {METADATA_FILE} describes (sha256 {digest}, "
            f"recorded {metadata['sha256_12']}): export it again"
        )
    if backend == "torchscript":
        return TorchScriptBackend(model_file, metadata, device)
    return OnnxRuntimeBackend(model_file, metadata, device, threads)


__all__ = ["OnnxRuntimeBackend", "TorchBackend", "TorchScriptBackend", "load_backend", "exported_copy"]
