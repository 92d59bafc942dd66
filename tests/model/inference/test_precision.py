"""Mixed precision, the refiner's chunking and its key-masked attention, and CUDA smoke tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from tests.model.support import build_refiner, make_inputs, run
from transfiner.cli.main import main
from transfiner.model.inference.backend import TorchBackend
from transfiner.model.inference.precision import resolve_precision
from transfiner.model.inference.predictor import Predictor
from transfiner.model.modeling.refiner import layer_norm
from transfiner.model.weights.checkpoint import save_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def scene(seed: int = 0) -> np.ndarray:
    """A textured background with a few solid shapes the small model detects."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 50, size=(160, 224, 3), dtype=np.uint8)
    img[20:120, 30:130] = (210, 90, 40)
    img[60:140, 140:210] = (30, 170, 220)
    return img


def matched_iou(boxes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each box's best IoU with any reference box."""
    return box_iou(torch.from_numpy(boxes), torch.from_numpy(reference)).max(dim=1).values.numpy()


def test_auto_precision_is_fp32_on_the_cpu_and_names_are_checked():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")


def test_bf16_gives_the_fp32_detections_with_float32_outputs(small_model):
    """bf16 autocast moves scores and masks a little, never the dtype of what leaves the model."""
    image = scene()
    fp32 = Predictor.from_backend(TorchBackend(small_model, "fp32"))(image, score_threshold=0.0, max_detections=16)
    bf16_backend = TorchBackend(small_model, "bf16")
    bf16 = Predictor.from_backend(bf16_backend)(image, score_threshold=0.0, max_detections=16)
    assert bf16_backend.precision == "bf16" and len(fp32) == len(bf16) == 16
    # The same boxes (float32 decoding and NMS; bf16 features move them a little). Near-tied
    # scores of a random model may swap places, also across a cut: each top 8 is among the
    # other's top 16, matched by boxes, not rows.
    assert (matched_iou(bf16.boxes[:8], fp32.boxes) > 0.9).all()
    assert (matched_iou(fp32.boxes[:8], bf16.boxes) > 0.9).all()
    np.testing.assert_allclose(np.sort(bf16.scores)[-8:], np.sort(fp32.scores)[-8:], atol=0.05)
    assert bf16.mask_probs.dtype == np.float32
    assert np.abs(bf16.mask_probs - fp32.mask_probs).mean() < 0.05
    # And the stage that ran in bf16 really ran in bf16: the outputs are not the fp32 ones.
    assert not np.array_equal(bf16.mask_probs, fp32.mask_probs)


def test_refining_in_chunks_equals_one_pass():
    refiner = build_refiner((1e-6, 0.125, 0.8), (784, 196, 64))
    inputs = make_inputs(seed=3, count=11)
    refiner.boxes_per_chunk = 100
    whole = run(refiner, *inputs)
    refiner.boxes_per_chunk = 4  # 4 + 4 + 3
    chunked = run(refiner, *inputs)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_encoder_keeps_a_half_precision_stream_under_autocast():
    """LayerNorm under CUDA autocast returns float32; the encoder's own LayerNorm keeps bf16
    tokens bf16 (computing in float32 inside) and is nn.LayerNorm itself in float32."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(32)
    x = torch.randn(5, 7, 32) * 3 + 1
    assert torch.equal(layer_norm(norm, x), norm(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer_norm(norm, x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(x.bfloat16().float()), rtol=0.02, atol=0.02)
    # Parameters in the input's dtype: CUDA's kernel refuses float32 ones with bf16 input (the
    # CPU's takes them), so this pins what the GPU can run.
    bf16 = F.layer_norm(x.bfloat16(), (32,), norm.weight.bfloat16(), norm.bias.bfloat16(), norm.eps)
    assert torch.equal(out, bf16)


def test_cli_precision_flag(tmp_path, small_model):
    from PIL import Image

    checkpoint = tmp_path / "small.pth"
    save_checkpoint(checkpoint, small_model)
    Image.fromarray(scene()).save(tmp_path / "a.png")
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        code = main(
            [
                "predict",
                str(tmp_path / "a.png"),
                "--model",
                str(checkpoint),
                "--device",
                "cpu",
                "--precision",
                precision,
                "--score-threshold",
                "0",
                "--out",
                str(out),
            ]
        )
        assert code == 0 and len(json.loads(out.read_text())) > 0
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "a.png"), "--precision", "fp8", "--out", str(tmp_path / "x.json")])


def test_exported_backends_refuse_reduced_precision(tmp_path, small_model):
    from transfiner.export.backends import load_backend

    checkpoint = tmp_path / "small.pth"
    save_checkpoint(checkpoint, small_model)
    with pytest.raises(ValueError, match="float32 export"):
        load_backend(checkpoint, "onnxruntime", device="cpu", precision="bf16")


# ------------------------------------------------------------------------------------------------
# CUDA smoke tests: skipped without a GPU, run on the GPU machine.


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_predictor_matches_cpu(small_model, precision):
    import copy

    image = scene()
    cpu = Predictor.from_backend(TorchBackend(small_model, "fp32"))(image, score_threshold=0.0, max_detections=12)
    gpu_model = copy.deepcopy(small_model).to("cuda")
    gpu = Predictor.from_backend(TorchBackend(gpu_model, precision))(image, score_threshold=0.0, max_detections=6)
    assert len(gpu) == 6 and gpu.mask_probs.dtype == np.float32
    if precision == "fp32":
        np.testing.assert_allclose(gpu.boxes, cpu.boxes[:6], atol=0.5)
    else:
        # A random model's lower-ranked boxes are tiny near-ties that bf16 moves and reorders
        # (on an H200 the 5th, 5x9 px, overlapped its CPU twin by IoU 0.46): the best four must
        # be among the CPU's first dozen.
        assert (matched_iou(gpu.boxes[:4], cpu.boxes) > 0.9).all()
