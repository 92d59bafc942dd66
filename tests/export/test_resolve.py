"""``export.resolve.resolve_model``: the one place that decides default / checkpoint / export folder.

Real files throughout: the tiny seeded checkpoint and real ONNX and TorchScript exports of it.
"""

from __future__ import annotations

import shutil
import typing
from pathlib import Path

import pytest

from transfiner.cli.main import main
from transfiner.export.backends import OnnxRuntimeBackend, TorchScriptBackend, load_backend
from transfiner.export.exporter import ExportError, ExportResult, export_model
from transfiner.export.resolve import RUNTIME_FORMATS, ResolvedModel, resolve_model, runtime_for
from transfiner.model.inference.backend import BACKEND_NAMES, TorchBackend
from transfiner.model.weights.checkpoint import load_model
from transfiner.model.weights.default import DEFAULT_WEIGHTS
from transfiner.model.weights.files import CheckpointError, file_digest
from transfiner.service.engine.loading import build_backends
from transfiner.service.settings import ServiceSettings

EXPORT_FORMATS = tuple(RUNTIME_FORMATS.values())


@pytest.fixture(scope="module")
def exports(checkpoint: Path, tmp_path_factory) -> dict[str, ExportResult]:
    """The tiny checkpoint exported in each format (``export_model`` records its digest)."""
    root = tmp_path_factory.mktemp("resolve-exports")
    model = load_model(checkpoint)
    return {fmt: export_model(model, fmt, root / fmt, source=checkpoint) for fmt in EXPORT_FORMATS}


def test_backend_names_have_one_definition():
    assert set(RUNTIME_FORMATS) | {"pytorch"} == set(BACKEND_NAMES)
    # The settings keep a Literal (for their JSON schema); it must list the same names.
    assert typing.get_args(ServiceSettings.model_fields["backend"].annotation) == BACKEND_NAMES


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_default_is_the_shipped_checkpoint(backend):
    resolved = resolve_model("default", backend)
    assert (resolved.kind, resolved.path, resolved.name) == ("default", DEFAULT_WEIGHTS, "default")
    assert resolved.is_checkpoint and resolved.export_format is None
    assert resolved.weights_digest == file_digest(DEFAULT_WEIGHTS)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_checkpoint_path_is_a_checkpoint_for_every_backend(checkpoint, backend):
    for spec in (checkpoint, str(checkpoint)):
        resolved = resolve_model(spec, backend)
        assert (resolved.kind, resolved.path, resolved.name) == ("checkpoint", checkpoint, "tiny")
        assert resolved.weights_digest == file_digest(checkpoint)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_an_export_folder_or_its_file_is_that_export(exports, checkpoint, fmt):
    model_file = exports[fmt].model_file
    for spec in (model_file.parent, model_file):
        resolved = resolve_model(spec, runtime_for(fmt))
        assert (resolved.kind, resolved.path, resolved.export_format) == ("export", model_file, fmt)
        assert resolved.name == spec.name and not resolved.is_checkpoint
        # The version is the source checkpoint's digest, not the export file's own.
        assert resolved.weights_digest == file_digest(checkpoint) != file_digest(model_file)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_an_export_refuses_the_backends_that_cannot_run_it(exports, fmt):
    folder = exports[fmt].model_file.parent
    with pytest.raises(ExportError, match=f"exported model: run it with --backend {runtime_for(fmt)}"):
        resolve_model(folder, "pytorch")
    other = next(name for name in RUNTIME_FORMATS if name != runtime_for(fmt))
    with pytest.raises(ExportError, match=f"is an export in the {fmt} format; --backend {other} needs"):
        resolve_model(folder, other)
    # An answer resolved for one runtime is refused by another one too.
    with pytest.raises(ExportError, match=f"is an export in the {fmt} format"):
        load_backend(resolve_model(folder, runtime_for(fmt)), other, device="cpu")
    with pytest.raises(ExportError, match="pytorch backend needs a checkpoint"):
        load_backend(resolve_model(folder, runtime_for(fmt)), "pytorch", device="cpu")


def test_unknown_backend(checkpoint):
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; choose one of pytorch, torchscript"):
        resolve_model(checkpoint, "tensorrt")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_missing_path_is_an_error_never_the_current_folder(exports, backend, monkeypatch):
    """From inside an export folder, a mistyped name is reported, not taken for that folder's model."""
    monkeypatch.chdir(exports["onnx"].model_file.parent)
    for typo in ("typo.pth", "modle.onnx", "typo/"):
        with pytest.raises(CheckpointError, match=f"model not found: {typo.rstrip('/')}"):
            resolve_model(typo, backend)


def test_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; give a checkpoint file"):
        resolve_model(tmp_path, "pytorch")
    (tmp_path / "model_final.pth").write_bytes(b"")  # a training run's folder: its checkpoint is named
    with pytest.raises(CheckpointError, match=f"give a checkpoint file, e.g. {tmp_path / 'model_final.pth'}$"):
        resolve_model(tmp_path, "pytorch")
    with pytest.raises(ExportError, match="has no metadata.json"):
        resolve_model(tmp_path, "onnxruntime")


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_a_model_file_its_metadata_does_not_describe_is_refused(exports, fmt, tmp_path):
    """Another export's file copied into a folder would otherwise run under this metadata's name,
    caps and version."""
    folder = tmp_path / "copy"
    shutil.copytree(exports[fmt].model_file.parent, folder)
    model_file = folder / exports[fmt].model_file.name
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(ExportError, match="is not the file its metadata.json describes"):
        load_backend(folder, runtime_for(fmt), device="cpu")


def test_every_backend_loads_what_was_resolved(exports, checkpoint):
    """``load_backend`` takes a resolved model as well as what ``--model`` names."""
    assert isinstance(load_backend(resolve_model(checkpoint), "pytorch", device="cpu"), TorchBackend)
    folders = {fmt: exports[fmt].model_file.parent for fmt in EXPORT_FORMATS}
    onnx = load_backend(resolve_model(folders["onnx"], "onnxruntime"), "onnxruntime", device="cpu")
    assert isinstance(onnx, OnnxRuntimeBackend)
    script = load_backend(folders["torchscript"], "torchscript", device="cpu")
    assert isinstance(script, TorchScriptBackend)


def test_every_backend_reports_the_weights_digest_as_version(exports, checkpoint):
    """The eager service on the checkpoint and the TorchScript and ONNX Runtime services on its
    exports report one version: the checkpoint's digest."""
    weights_version = file_digest(checkpoint)
    served = {
        "pytorch": build_backends(str(checkpoint), None, "cpu", 1, "pytorch"),
        **{
            runtime_for(fmt): build_backends(str(exports[fmt].model_file.parent), None, "cpu", 1, runtime_for(fmt))
            for fmt in EXPORT_FORMATS
        },
    }
    assert {backend: loaded.version for backend, loaded in served.items()} == dict.fromkeys(
        BACKEND_NAMES, weights_version
    )
    assert served["pytorch"].name == "tiny"
    assert served["onnxruntime"].name == "onnx" and served["torchscript"].name == "torchscript"


def test_the_commands_check_the_model_first(exports, tmp_path, monkeypatch, capsys):
    """``serve`` refuses a wrong --model before it binds a port; ``export`` needs a checkpoint."""
    folder = exports["onnx"].model_file.parent
    assert main(["serve", "--model", str(folder)]) == 2
    assert "exported model: run it with --backend onnxruntime" in capsys.readouterr().err
    assert main(["serve", "--model", str(folder), "--backend", "torchscript"]) == 2
    assert "--backend torchscript needs torchscript" in capsys.readouterr().err
    assert main(["export", "--format", "onnx", "--model", str(folder), "--out", str(tmp_path / "again")]) == 2
    assert "exported model" in capsys.readouterr().err
    monkeypatch.chdir(folder)
    assert main(["serve", "--model", "typo.onnx", "--backend", "onnxruntime"]) == 2
    assert "model not found: typo.onnx" in capsys.readouterr().err


def test_resolved_models_compare_by_what_they_name(checkpoint):
    assert resolve_model(checkpoint, "pytorch") == resolve_model(str(checkpoint), "onnxruntime")
    assert isinstance(resolve_model("default"), ResolvedModel)
