"""Export: TorchScript and ONNX files of the whole model, their runtimes, and the TensorRT checks.

The model under test is the shipped default model (trained weights: scores are spread out, so
parity is not at the mercy of near-ties between classes) with a lighter refiner and smaller
inputs than its own config, to keep the suite fast. Every comparison runs on batches, image
sizes and detection counts unlike the tracing example (two noise images, 5 detections each).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pycocotools import mask as mask_utils

from tests.service.support import metric, running
from tests.support import encode, scene
from transfiner.cli.export import compare_outputs, mask_iou, masks_match
from transfiner.cli.main import main
from transfiner.export.backends import OnnxRuntimeBackend, TorchScriptBackend, load_backend
from transfiner.export.exporter import ExportError, export_model, find_export
from transfiner.export.graph import INPUT_NAMES, OUTPUT_NAMES, example_inputs
from transfiner.export.tensorrt import GRAPH_OPERATORS, check_onnx, graph_operators, support_matrix
from transfiner.model.inference.backend import TorchBackend
from transfiner.model.inference.predictor import Predictor
from transfiner.model.inference.preprocess import prepare_batch
from transfiner.model.modeling.rcnn import InferenceOptions
from transfiner.model.weights.checkpoint import build_model, load_checkpoint, save_checkpoint
from transfiner.model.weights.default import DEFAULT_WEIGHTS
from transfiner.model.weights.files import file_digest
from transfiner.service.settings import ServiceSettings


@pytest.fixture(scope="module")
def model():
    cfg, _ = load_checkpoint(DEFAULT_WEIGHTS)
    cfg = dataclasses.replace(
        cfg,
        input=dataclasses.replace(cfg.input, min_size_test=256, max_size_test=400),
        transfiner=dataclasses.replace(cfg.transfiner, max_cells=(784, 49, 16)),
    )
    return build_model(cfg, DEFAULT_WEIGHTS, "cpu").eval()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export_model(model, fmt, root / fmt, source=DEFAULT_WEIGHTS) for fmt in ("onnx", "torchscript")}


@pytest.fixture(scope="module")
def runtimes(model, exports):
    return {
        "torchscript": load_backend(exports["torchscript"].model_file.parent, "torchscript", device="cpu"),
        "onnxruntime": load_backend(exports["onnx"].model_file.parent, "onnxruntime", device="cpu"),
    }


def shapes_images(sizes, seed=0):
    """Shapes-like scenes (the default model's domain) of the given (h, w) sizes, as uint8 CHW."""
    return [torch.from_numpy(scene(h, w, seed + i)).permute(2, 0, 1).contiguous() for i, (h, w) in enumerate(sizes)]


@pytest.fixture(scope="module")
def batch(model):
    # Three images, odd sizes, portrait and landscape: batch, height and width all differ
    # from the example the graph was traced on.
    return prepare_batch(shapes_images([(150, 230), (301, 170), (97, 133)]), model.cfg.input, "cpu")


def run_all(model, runtimes, batch, options):
    images, sizes = batch
    eager = TorchBackend(model).infer(images, sizes, options)
    return eager, {name: runtime.infer(images, sizes, options) for name, runtime in runtimes.items()}


def test_example_differs_from_test_inputs(model, batch):
    example = example_inputs(model.cfg)
    assert example[0].shape[0] != batch[0].shape[0]
    assert example[0].shape[2:] != batch[0].shape[2:]


def test_torchscript_is_identical_to_eager(model, runtimes, batch):
    """Detections and coarse masks to the bit. The refined masks to float noise only: eager
    PyTorch trims each chunk's token sequences to its real nodes, the traced graph keeps the
    static caps (masked padding changes the order of the attention's sums, not what is summed)."""
    eager, got = run_all(model, {"torchscript": runtimes["torchscript"]}, batch, InferenceOptions(0.05, 100))
    traced = got["torchscript"]
    assert 3 <= len(eager.scores) < 300
    assert set(eager.batch_index.tolist()) == {0, 1, 2}
    for field in ("boxes", "scores", "classes", "batch_index", "coarse_probs"):
        assert torch.equal(getattr(eager, field), getattr(traced, field)), field
    torch.testing.assert_close(traced.mask_probs, eager.mask_probs, rtol=0, atol=1e-5)


def test_onnxruntime_matches_eager(model, runtimes, batch):
    eager, got = run_all(model, {"onnxruntime": runtimes["onnxruntime"]}, batch, InferenceOptions(0.05, 100))
    onnx_out = got["onnxruntime"]
    report = compare_outputs(eager, onnx_out)
    assert report["ok"], report
    assert torch.equal(eager.classes, onnx_out.classes)
    torch.testing.assert_close(onnx_out.boxes, eager.boxes, rtol=1e-3, atol=1e-2)
    assert mask_iou(eager.mask_probs, onnx_out.mask_probs).min() >= 0.99
    assert mask_iou(eager.coarse_probs, onnx_out.coarse_probs).min() >= 0.99
    # The refinement really ran in the graph: refined masks differ from the coarse ones.
    assert (onnx_out.mask_probs - onnx_out.coarse_probs).abs().max() > 0.1


@pytest.mark.parametrize("name", ["torchscript", "onnxruntime"])
def test_zero_detections(model, runtimes, batch, name):
    eager, got = run_all(model, {name: runtimes[name]}, batch, InferenceOptions(score_threshold=1.0))
    out = got[name]
    assert len(eager.scores) == 0 and len(out.scores) == 0
    assert out.boxes.shape == (0, 4) and out.mask_probs.shape == (0, 112, 112)


@pytest.mark.parametrize("name", ["torchscript", "onnxruntime"])
def test_one_hundred_detections(model, runtimes, name):
    images, sizes = prepare_batch(shapes_images([(120, 180)], seed=5), model.cfg.input, "cpu")
    options = InferenceOptions(score_threshold=0.0, max_detections=100)
    eager = TorchBackend(model).infer(images, sizes, options)
    out = runtimes[name].infer(images, sizes, options)
    assert len(eager.scores) == 100
    report = compare_outputs(eager, out)
    assert report["ok"], report


def test_options_are_graph_inputs(model, runtimes, batch):
    """One file serves every score threshold and detection cap, and refine=False."""
    images, sizes = batch
    runtime = runtimes["onnxruntime"]
    few = runtime.infer(images, sizes, InferenceOptions(0.5, 2))
    many = runtime.infer(images, sizes, InferenceOptions(0.05, 100))
    assert (few.scores > 0.5).all() and len(few.scores) < len(many.scores)
    assert max(np.bincount(few.batch_index.numpy())) <= 2
    coarse = runtime.infer(images, sizes, InferenceOptions(0.5, 2, refine=False))
    assert torch.equal(coarse.mask_probs, few.coarse_probs)
    with pytest.raises(ValueError, match="fixed at export"):
        runtime.infer(images, sizes, InferenceOptions(0.5, 2, max_refined_per_image=3))


def test_graph_is_standard_onnx_within_tensorrt_limits(exports):
    path = exports["onnx"].model_file
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    used = set(graph_operators(graph))
    # The quadtree really is expressed with these standard operators.
    assert {"TopK", "GatherElements", "ScatterElements", "Where", "NonZero", "RoiAlign"} <= used
    checked = set(json.loads(GRAPH_OPERATORS.read_text())["operators"])
    assert used == checked, (
        f"the graph's operators changed: new {sorted(used - checked)}, gone {sorted(checked - used)}; "
        "check them against TensorRT and update export/data/graph_operators.json"
    )
    matrix = support_matrix()
    assert matrix["tensorrt_version"] and matrix["topk_max_k"] == 3840
    unsupported = [op for op in used if not matrix["operators"].get(op, {}).get("supported")]
    assert unsupported == []
    report = check_onnx(path)
    assert report.ok, report.problems
    assert report.topk_bounds and max(report.topk_bounds) < 3840
    # The quadtree's top-k sizes (k = 784 is a plain range: no TopK) are among the bounds.
    assert {49, 16} <= set(report.topk_bounds)


def test_checked_operator_list_is_all_supported():
    matrix = support_matrix()["operators"]
    for op in json.loads(GRAPH_OPERATORS.read_text())["operators"]:
        assert matrix[op]["supported"], op


def test_metadata_describes_the_file(model, exports):
    result = exports["onnx"]
    model_file, metadata = find_export(result.model_file.parent)
    assert model_file == result.model_file
    assert metadata["format"] == "onnx" and metadata["opset"] >= 17
    assert metadata["class_names"] == list(model.cfg.class_names)
    assert metadata["preprocessing"]["min_size_test"] == 256
    assert {"torch", "torchvision", "onnx"} <= set(metadata["exported_by"])
    assert metadata["source"]["sha256_12"]
    # Static caps are stated: these bind wherever a box has more than 49 (16) incoherent cells.
    assert metadata["node_selection"] == {
        "max_cells": [784, 49, 16],
        "tokens_per_box": 196 + 784 + 4 * 49 + 16 * 16,
        "official": False,
    }
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES) == [i["name"] for i in metadata["inputs"]]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES) == [o["name"] for o in metadata["outputs"]]
    images = session.get_inputs()[0]
    assert isinstance(images.shape[0], str) and isinstance(images.shape[2], str) and images.shape[1] == 3
    assert isinstance(session.get_outputs()[4].shape[0], str)
    assert exports["torchscript"].size_bytes > 1e6 and result.size_bytes > 1e6


def test_runtime_errors_are_clear(exports, tmp_path):
    with pytest.raises(ExportError, match="metadata.json"):
        load_backend(tmp_path, "onnxruntime")
    with pytest.raises(ExportError, match="torchscript"):
        load_backend(exports["onnx"].model_file.parent, "torchscript")
    with pytest.raises(ExportError, match="exported model"):
        load_backend(exports["onnx"].model_file.parent, "pytorch")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text((exports["onnx"].model_file.parent / "metadata.json").read_text())
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="is not the file its metadata.json describes"):
        load_backend(broken, "onnxruntime")
    # The file its metadata describes, and still not a graph ONNX Runtime can load.
    described = json.loads((broken / "metadata.json").read_text()) | {"sha256_12": file_digest(broken / "model.onnx")}
    (broken / "metadata.json").write_text(json.dumps(described))
    with pytest.raises(ExportError, match="ONNX Runtime"):
        load_backend(broken, "onnxruntime")
    metadata = json.loads((exports["torchscript"].model_file.parent / "metadata.json").read_text())
    with pytest.raises(ExportError, match="traced on cpu"):
        TorchScriptBackend(exports["torchscript"].model_file, metadata, torch.device("cuda"))


@pytest.mark.slow  # an export of the checkpoint: half a minute or more on 2 cores
def test_checkpoint_is_exported_once_into_the_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFINER_CACHE", str(tmp_path / "cache"))
    checkpoint = tmp_path / "m.pth"
    save_checkpoint(checkpoint, model)
    backend = load_backend(checkpoint, "onnxruntime", device="cpu")
    assert isinstance(backend, OnnxRuntimeBackend)
    folders = list((tmp_path / "cache" / "exports").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.onnx").is_file()
    stamp = (folders[0] / "model.onnx").stat().st_mtime_ns
    load_backend(checkpoint, "onnxruntime", device="cpu")
    assert (folders[0] / "model.onnx").stat().st_mtime_ns == stamp  # reused, not exported again
    # Other caps are another graph (static shapes); an export folder refuses caps it lacks.
    load_backend(checkpoint, "onnxruntime", device="cpu", max_cells=(784, 16, 4))
    metadata = [json.loads((f / "metadata.json").read_text()) for f in (tmp_path / "cache" / "exports").iterdir()]
    assert sorted(m["node_selection"]["max_cells"] for m in metadata) == [[784, 16, 4], [784, 49, 16]]
    with pytest.raises(ValueError, match="exported with max cells"):
        load_backend(folders[0], "onnxruntime", device="cpu", max_cells=(784, 16, 4))
    # Other exporting code (another digest of the model and export sources) exports again: a
    # graph the previous version made is never taken for the current one's.
    monkeypatch.setattr("transfiner.export.backends.graph_code_digest", lambda: "0" * 12)
    load_backend(checkpoint, "onnxruntime", device="cpu")
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 3


@pytest.mark.slow  # an export and two prediction runs of the default model: half a minute or more on 2 cores
def test_cli_export_predict_with_each_backend(tmp_path, capsys):
    """`transfiner export` of the default model passes its own parity check in both formats (as
    the README writes the commands, and as the GPU image's build runs the ONNX one), then
    `transfiner predict --backend ...` gives the eager masks."""
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene(200, 260, seed=3)))
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        out = tmp_path / fmt
        assert main(["export", "--format", fmt, "--model", "default", "--out", str(out)]) == 0, fmt
        summary = json.loads(capsys.readouterr().out)
        assert summary["parity"]["ok"] and (out / name).is_file(), summary
    results = {}
    for backend, model_arg in (("pytorch", "default"), ("torchscript", str(tmp_path / "torchscript"))):
        target = tmp_path / f"{backend}.json"
        assert main(["predict", str(image), "--backend", backend, "--model", model_arg, "--out", str(target)]) == 0
        results[backend] = json.loads(target.read_text())
    assert len(results["pytorch"]) > 0
    assert results["pytorch"] == results["torchscript"]


def test_masks_match_tolerates_a_cells_pixels_not_a_share_of_a_mask():
    """A runtime that refines one more cell than eager moves a few pixels: enough to fail IoU >=
    0.99 on a small mask, not the 16 pixels of a cell. More than that, or 1% of a large mask, is
    a mismatch."""
    eager = torch.zeros(4, 112, 112)
    eager[0, 10:15, 10:21] = 0.9  # 55 pixels
    eager[1, 10:15, 10:21] = 0.9
    eager[2:, 0:100, 0:100] = 0.9  # 10,000 pixels
    got = eager.clone()
    got[0, 15, 10] = 0.9  # one more pixel: IoU 55 / 56
    got[1, 15:17, 10:19] = 0.9  # 18 more
    got[2, 100, 0:100] = 0.9  # 100 more: 1% of 10,100
    got[3, 100:102, 0:100] = 0.9  # 200 more
    assert mask_iou(eager[:1], got[:1]).item() < 0.99
    assert masks_match(eager, got).tolist() == [True, False, True, False]


def test_a_failed_parity_check_removes_the_export(checkpoint, tmp_path, capsys, monkeypatch):
    """An export that does not match eager PyTorch is not left where `--model DIR` would load it."""
    import transfiner.cli.export

    monkeypatch.setattr(transfiner.cli.export, "parity_check", lambda model, fmt, out: {"ok": False})
    out = tmp_path / "ts"
    assert main(["export", "--format", "torchscript", "--model", str(checkpoint), "--out", str(out)]) == 1
    assert "were removed" in capsys.readouterr().err
    assert not (out / "model.ts").exists() and not (out / "metadata.json").exists()
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene(64, 64, seed=1)))
    assert (
        main(
            ["predict", str(image), "--backend", "torchscript", "--model", str(out), "--out", str(tmp_path / "o.json")]
        )
        == 2
    )
    assert "metadata.json" in capsys.readouterr().err


def test_cli_tensorrt_says_how(tmp_path, capsys):
    out = tmp_path / "trt"
    code = main(["export", "--format", "tensorrt", "--model", "default", "--out", str(out), "--no-check"])
    captured = capsys.readouterr()
    assert code == 2
    assert "TensorRT is not installed" in captured.err
    assert f"trtexec --onnx={out / 'model.onnx'}" in captured.err
    # The profile fits the model's own sizes (the default model: 384 short side, 640 long) and the
    # GPU service's batch of 8.
    cfg = load_checkpoint(DEFAULT_WEIGHTS)[0].input
    assert (cfg.min_size_test, cfg.max_size_test) == (384, 640)
    assert "--optShapes=images:8x3x384x640,image_sizes:8x2" in captured.err
    assert "--maxShapes=images:8x3x640x640,image_sizes:8x2" in captured.err
    assert json.loads(captured.out)["tensorrt_operator_check"]["ok"]
    assert (out / "model.onnx").is_file()


def test_cli_errors(tmp_path, capsys):
    assert main(["predict", "x.png", "--backend", "onnxruntime", "--model", str(tmp_path), "--out", "o.json"]) == 2
    assert "metadata.json" in capsys.readouterr().err
    assert main(["export", "--format", "onnx", "--model", str(tmp_path / "nope.pth"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["export", "--format", "onnx", "--opset", "13", "--out", str(tmp_path / "o")]) == 2
    assert "opset" in capsys.readouterr().err
    # Newer than ONNX Runtime's RoiAlign (22) or the exporter (24): one line, before any file.
    for opset in ("22", "24"):
        assert main(["export", "--format", "onnx", "--opset", opset, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: opset {opset}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "model.onnx").exists()
    assert main(["export", "--format", "torchscript", "--opset", "18", "--out", str(tmp_path / "o")]) == 2
    assert "--opset applies to ONNX exports" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["export", "--format", "torchscript", "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file: an export goes into a folder" in capsys.readouterr().err


def test_export_takes_the_node_caps_its_static_graph_keeps(tmp_path, capsys):
    """The advice an export folder gives for other caps (export again with --max-cells) works."""
    out = tmp_path / "ts"
    assert main(["export", "--format", "torchscript", "--max-cells", "784,49,16", "--out", str(out), "--no-check"]) == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["node_selection"]["max_cells"] == [784, 49, 16]
    # Exported again into the folder as the other format: no file of the first export is left.
    assert main(["export", "--format", "onnx", "--max-cells", "784,49,16", "--out", str(out), "--no-check"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx"]
    assert main(["export", "--format", "torchscript", "--max-cells", "784,49,16", "--out", str(out), "--no-check"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.ts"]
    capsys.readouterr()
    image = tmp_path / "a.png"
    image.write_bytes(encode(scene(64, 64, seed=2)))
    predict = [
        "predict",
        str(image),
        "--backend",
        "torchscript",
        "--model",
        str(out),
        "--out",
        str(tmp_path / "o.json"),
    ]
    assert main([*predict, "--max-cells", "784,49,16"]) == 0
    assert main([*predict, "--max-cells", "784,784,784"]) == 2
    assert "export the checkpoint again with `transfiner export --max-cells`" in capsys.readouterr().err


def test_a_failed_export_leaves_no_model_file(model, tmp_path, monkeypatch):
    """An exporter that fails half way (its own error; not one this graph causes) leaves no file
    that a later load would take for an export."""

    def fails_half_way(module, args, path, **kwargs):
        Path(path).write_bytes(b"half a graph")
        raise RuntimeError("exporter failed\ngraph(%images : Float(...)) ...")

    monkeypatch.setattr(torch.onnx, "export", fails_half_way)
    with pytest.raises(ExportError, match="the onnx export failed: RuntimeError: exporter failed$"):
        export_model(model, "onnx", tmp_path / "o")
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_a_mistyped_model_inside_an_export_folder_is_an_error(exports, tmp_path, monkeypatch, capsys):
    """From inside an export folder, --model typo.pth names no file: an error, never that folder's model."""
    monkeypatch.chdir(exports["onnx"].model_file.parent)
    monkeypatch.setenv("TRANSFINER_CACHE", str(tmp_path / "cache"))
    assert find_export("typo.pth") is None and find_export("typo.onnx") is None
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene(64, 64, seed=1)))
    for backend in ("onnxruntime", "torchscript", "pytorch"):
        code = main(
            ["predict", str(image), "--backend", backend, "--model", "typo.pth", "--out", str(tmp_path / "o.json")]
        )
        assert code == 2, backend
        assert "model not found: typo.pth" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
    # The folder, named, is still the export.
    assert find_export(".")[0].resolve() == exports["onnx"].model_file.resolve()


def test_every_backend_reports_the_version_of_the_weights(exports):
    """The version is the source checkpoint's digest (the exports' own files differ), so the
    eager, TorchScript and ONNX Runtime services, CPU or GPU, agree for the same weights."""
    from transfiner.service.engine.loading import build_backends

    weights_version = file_digest(DEFAULT_WEIGHTS)
    assert file_digest(exports["onnx"].model_file) != weights_version
    assert build_backends("default", None, "cpu", 1, "pytorch").version == weights_version
    for fmt, backend in (("onnx", "onnxruntime"), ("torchscript", "torchscript")):
        folder = exports[fmt].model_file.parent
        assert build_backends(str(folder), None, "cpu", 1, backend).version == weights_version, backend
        assert build_backends(str(exports[fmt].model_file), None, "cpu", 1, backend).version == weights_version


def test_service_serves_the_onnx_backend(exports, model):
    """The real server with --backend onnxruntime answers with the ONNX model's masks."""
    folder = exports["onnx"].model_file.parent
    settings = ServiceSettings(model=str(folder), backend="onnxruntime", device="cpu", max_delay_ms=1)
    picture = scene(180, 240, seed=7)
    runtime = load_backend(folder, "onnxruntime", device="cpu")
    expected = Predictor.from_backend(runtime).predict([picture], score_threshold=0.3)[0]
    with running(settings) as server:
        response = httpx.post(
            server.url + "/v1/segment",
            content=encode(picture),
            headers={"Content-Type": "image/png"},
            params={"score_threshold": 0.3},
            timeout=120,
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["backend"] == "onnxruntime"
    assert body["model"]["version"] == file_digest(DEFAULT_WEIGHTS)  # the weights', not the export file's
    instances = body["instances"]
    assert len(instances) == len(expected) > 0
    for instance, mask in zip(instances, expected.masks):
        assert np.array_equal(mask_utils.decode(instance["segmentation"]).astype(bool), mask)


MEASURE_PEAK = """
import resource, sys
import numpy as np
from transfiner.export.backends import load_backend
from transfiner.model.inference.predictor import Predictor
predictor = Predictor.from_backend(load_backend(sys.argv[1], "onnxruntime", device="cpu"))
image = np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8)
found = predictor.predict([image], score_threshold=0.0, max_detections=100)[0]
print(len(found.boxes), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow  # an export of the default model at its own caps and a 100-detection pass: ~20 s
def test_onnx_runtime_memory_at_100_detections_stays_bounded(tmp_path):
    """The default model's graph at 100 refined detections peaked at 6.0 GB with attention in
    blocks of 256 queries (a server with a few such requests was killed for memory); in blocks of
    64, at 2.0 GB in a fresh process, 3.7 GB once inside the full suite (ONNX Runtime's arena
    grows by doubling, so the peak varies with how allocations interleave)."""
    model = build_model(load_checkpoint(DEFAULT_WEIGHTS)[0], DEFAULT_WEIGHTS, "cpu")
    folder = export_model(model, "onnx", tmp_path / "onnx", source=DEFAULT_WEIGHTS).model_file.parent
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, str(folder)], capture_output=True, text=True, timeout=300, check=True
    )
    detections, peak_mb = map(int, done.stdout.split())
    assert detections == 100
    assert peak_mb < 4500, f"peak resident memory {peak_mb} MB"


def test_an_exported_graph_batches_only_requests_of_one_threshold_and_cap(exports):
    """The graph takes one score threshold and one cap a batch: a score_threshold=0 request in a
    batch would make its batch-mates compute every detection, so it runs in a batch of its own."""
    folder = exports["torchscript"].model_file.parent
    settings = ServiceSettings(
        model=str(folder),
        backend="torchscript",
        device="cpu",
        max_batch_size=4,
        max_delay_ms=400,
        max_arrival_wait_ms=400,
    )
    picture = encode(scene(96, 128, seed=3))
    params = [{"score_threshold": 0.5}] * 3 + [{"score_threshold": 0.0, "max_detections": 100}]
    with running(settings) as server:
        before = metric(server.url, "transfiner_batch_size_count")

        def post(query):
            return httpx.post(server.url + "/v1/segment", content=picture, params=query, timeout=120)

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(post, params))
        after = metric(server.url, "transfiner_batch_size_count")
    assert [r.status_code for r in responses] == [200] * 4
    # Three requests alike in one batch (or more, had they not arrived together), the costly one alone.
    assert after - before >= 2
    cheap = {json.dumps(r.json()["instances"]) for r in responses[:3]}
    assert len(cheap) == 1  # same image, same options, same answer


@pytest.mark.slow  # two evaluations: half a minute or more on 2 cores
def test_evaluate_runs_on_the_exported_model(model, runtimes, tmp_path):
    """`transfiner evaluate --backend onnxruntime`: the same AP as eager, up to rounding."""
    from transfiner.model.datasets.shapes import make_shapes
    from transfiner.model.evaluation.evaluate import evaluate

    data = make_shapes(tmp_path / "shapes", num_images=3, seed=11)
    eager = evaluate(Predictor.from_model(model), data, tmp_path / "eager", num_overlays=0)
    exported = evaluate(Predictor.from_backend(runtimes["onnxruntime"]), data, tmp_path / "onnx", num_overlays=0)
    assert exported["backend"] == "onnxruntime" and eager["backend"] == "pytorch"
    assert exported["num_detections"] == eager["num_detections"] > 0
    assert eager["refined"]["AP"] > 0
    assert abs(exported["refined"]["AP"] - eager["refined"]["AP"]) < 1.0
    assert abs(exported["bbox_AP"] - eager["bbox_AP"]) < 0.5
    assert exported["incoherence_recall"] is None  # needs the eager model's features
    assert "an exported graph gives its outputs only" in (tmp_path / "onnx" / "report.md").read_text()
    assert "an exported graph" not in (tmp_path / "eager" / "report.md").read_text()
