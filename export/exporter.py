"""Writes a trained model as TorchScript or ONNX, plus the metadata file that describes it.

- An export folder holds ``model.ts`` (TorchScript) or ``model.onnx``, and ``metadata.json``: the
  model config (class names, preprocessing), the input/output spec, the opset, the versions that
  exported it and the checkpoint it came from. ``export.backends`` loads such a folder.
- Both formats come from one trace of ``ExportableMaskTransfiner`` (TorchScript's tracer; the ONNX
  exporter traces the same way). Tracing records tensor shapes as graph values, and the model's
  forward has no Python number taken from a tensor and no loop over images or boxes but NMS's loop
  over the images (scripted into the TorchScript graph, one NonMaxSuppression in ONNX), so the graph
  holds for any batch size, image size and detection count. The parity tests check exactly that, on
  inputs unlike the example.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path

import torch

import transfiner.model as model_package
from transfiner.export.graph import (
    INPUT_NAMES,
    INPUTS,
    OUTPUT_NAMES,
    OUTPUTS,
    ExportableMaskTransfiner,
    dynamic_axes,
    example_inputs,
    specs_as_dicts,
)
from transfiner.model.config import COVERING_MAX_CELLS, ModelConfig
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.modeling.refiner import tokens_per_box
from transfiner.model.weights.files import file_digest

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
METADATA_FILE = "metadata.json"
METADATA_VERSION = 1
# Opset 17: LayerNormalization as one op; RoiAlign with half-pixel coordinates needs >= 16.
DEFAULT_OPSET = 17
# ONNX Runtime (1.31) has no RoiAlign of opset 22, and the exporter stops at 21.
MAX_OPSET = 21


class ExportError(ValueError):
    """An export folder that cannot be used (missing file, other format, unreadable metadata)."""


@dataclass
class ExportResult:
    model_file: Path
    metadata_file: Path
    size_bytes: int
    seconds: float


def graph_code_digest() -> str:
    """12 hex digits of the source that decides an exported graph (the ``model`` and ``export``
    packages): a checkpoint's cached export is keyed by it, so new code exports it again."""
    digest = hashlib.sha256()
    for package in (Path(model_package.__file__).parent, Path(__file__).parent):
        for source in sorted(package.rglob("*.py")):
            digest.update(f"{package.name}/{source.relative_to(package).as_posix()}\0".encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("transfiner", "torch", "torchvision", "onnx", "onnxruntime-gpu", "onnxruntime"):
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            pass
    return versions


@contextlib.contextmanager
def _tracing():
    """No grad, and no tracer chatter. The tracer warns about every Python bool it meets; the ones
    here are static (config values, the fixed top-k sizes, torchvision's empty-input shortcut),
    and the parity tests check the result on other sizes and counts. torch.jit and the legacy
    ONNX exporter also announce their deprecation on every call."""
    with warnings.catch_warnings(), torch.no_grad():
        for category in (torch.jit.TracerWarning, FutureWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        yield


def trace(model: MaskTransfiner) -> torch.jit.ScriptModule:
    """TorchScript trace of the whole network on ``example_inputs`` (on the model's device)."""
    with _tracing():
        return torch.jit.trace(
            ExportableMaskTransfiner(model), example_inputs(model.cfg, model.device), check_trace=False
        )


def _export_onnx(model: MaskTransfiner, path: Path, opset: int) -> None:
    with _tracing(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the exporter's notes on constant folding
        # The TorchScript-based exporter: it keeps NonZero/NonMaxSuppression with dynamic output
        # sizes, which torch.export (dynamo=True) would need guards for everywhere.
        torch.onnx.export(
            ExportableMaskTransfiner(model),
            example_inputs(model.cfg, model.device),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes(),
            do_constant_folding=True,
        )


def export_model(
    model: MaskTransfiner,
    fmt: str,
    out_dir: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Exports ``model`` (eval mode, on its device) as ``fmt`` into ``out_dir``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx" and not DEFAULT_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset}: the graph needs an opset from {DEFAULT_OPSET} (LayerNormalization, "
            f"RoiAlign's half-pixel coordinates) to {MAX_OPSET} (ONNX Runtime's RoiAlign)"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: an export goes into a folder")
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / FORMATS[fmt]
    model.eval()
    start = time.perf_counter()
    try:
        if fmt == "torchscript":
            trace(model).save(str(model_file))
        else:
            _export_onnx(model, model_file, opset)
    except Exception as error:  # noqa: BLE001 - a half-written file must not be loaded later
        model_file.unlink(missing_ok=True)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(f"the {fmt} export failed: {type(error).__name__}: {first_line}") from error
    seconds = time.perf_counter() - start
    for other in set(FORMATS.values()) - {model_file.name}:  # an earlier export's, which the metadata
        (out / other).unlink(missing_ok=True)  # below no longer describes
    metadata = build_metadata(model.cfg, fmt, model_file, model.device, opset, source)
    metadata_file = out / METADATA_FILE
    metadata_file.write_text(json.dumps(metadata, indent=2))
    return ExportResult(model_file, metadata_file, model_file.stat().st_size, seconds)


def build_metadata(
    cfg: ModelConfig,
    fmt: str,
    model_file: Path,
    device: torch.device,
    opset: int,
    source: str | os.PathLike | None,
) -> dict:
    return {
        "metadata_version": METADATA_VERSION,
        "format": fmt,
        "file": model_file.name,
        "sha256_12": file_digest(model_file),
        # TorchScript traces keep the device they were traced on; ONNX files run anywhere.
        "traced_on": str(device) if fmt == "torchscript" else None,
        "opset": opset if fmt == "onnx" else None,
        "class_names": list(cfg.class_names),
        "category_ids": list(cfg.category_ids),
        "preprocessing": {
            "color": "BGR",
            "value_range": "0..255 float32",
            "resize": "shortest edge to min_size_test, longest at most max_size_test, bilinear, antialiased",
            "min_size_test": cfg.input.min_size_test,
            "max_size_test": cfg.input.max_size_test,
            "size_divisibility": cfg.input.size_divisibility,
            "pad_value": "pixel_mean",
            "pixel_mean": list(cfg.input.pixel_mean),
            "pixel_std": list(cfg.input.pixel_std),
            "normalization": "inside the graph",
        },
        "inputs": specs_as_dicts(INPUTS),
        "outputs": specs_as_dicts(OUTPUTS),
        "max_refined_per_image": cfg.transfiner.max_refined_per_image,
        # The graph's shapes are static: every box is padded to these caps. Where a box has more
        # above-threshold cells than its level's cap, the graph refines fewer nodes than the
        # official code (see the README); with 784 at every level it selects exactly its nodes.
        "node_selection": {
            "max_cells": list(cfg.transfiner.max_cells),
            "tokens_per_box": tokens_per_box(cfg.transfiner.max_cells),
            "official": tuple(cfg.transfiner.max_cells) == COVERING_MAX_CELLS,
        },
        "config": cfg.to_dict(),
        "source": {
            "checkpoint": str(source) if source else None,
            "sha256_12": file_digest(source) if source and Path(source).is_file() else None,
        },
        "exported_by": _versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def find_export(path: str | os.PathLike) -> tuple[Path, dict] | None:
    """An export folder (or a model file inside one) -> (model file, metadata); None if ``path``
    is not an export at all (e.g. a checkpoint). Raises ``ExportError`` for a broken one."""
    path = Path(path)
    if not path.exists():
        # Not an export: the caller's checkpoint reader reports the missing path. Looking in its
        # parent folder instead would take a mistyped name inside an export folder (the current
        # directory, for a bare name) for that folder's model.
        return None
    folder = path if path.is_dir() else path.parent
    metadata_file = folder / METADATA_FILE
    if path.is_file() and path.suffix not in (".onnx", ".ts"):
        return None
    if not metadata_file.is_file():
        if path.is_dir() or path.suffix in (".onnx", ".ts"):
            raise ExportError(f"{folder} has no {METADATA_FILE}: export it with `transfiner export`")
        return None
    try:
        metadata = json.loads(metadata_file.read_text())
        fmt, name = metadata["format"], metadata["file"]
        ModelConfig.from_dict(metadata["config"])
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{metadata_file} is not a transfiner export metadata file ({error})") from error
    if metadata.get("metadata_version") != METADATA_VERSION:
        raise ExportError(
            f"{metadata_file} has metadata version {metadata.get('metadata_version')}, "
            f"this transfiner reads {METADATA_VERSION}: export again"
        )
    model_file = folder / name
    if path.is_file() and path != model_file:
        raise ExportError(f"{metadata_file} describes {name}, not {path.name}")
    if not model_file.is_file():
        raise ExportError(f"{model_file} is missing (named by {metadata_file})")
    if fmt not in FORMATS:
        raise ExportError(f"{metadata_file}: unknown format {fmt!r}")
    return model_file, metadata
