"""Mixed precision, the refiner's chunking and its key-masked attention, and CUDA smoke tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.backend import TorchBackend
from model.checkpoint import save_checkpoint
from model.cli import main
from model.precision import resolve_precision
from model.predictor import Predictor
from model.transfiner import key_bias_attention, key_masked_attention

from .test_transfiner import build_refiner, make_inputs, run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def scene(seed: int = 0) -> np.ndarray:
    """A textured background with a few solid shapes the small model detects."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 50, size=(160, 224, 3), dtype=np.uint8)
    img[20:120, 30:130] = (210, 90, 40)
    img[60:140, 140:210] = (30, 170, 220)
    return img


def test_auto_precision_is_fp32_on_the_cpu_and_names_are_checked():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")


def test_bf16_gives_the_fp32_detections_with_float32_outputs(small_model):
    """bf16 autocast moves scores and masks a little, never the dtype of what leaves the model."""
    image = scene()
    fp32 = Predictor.from_backend(TorchBackend(small_model, "fp32"))(image, score_threshold=0.0, max_detections=8)
    bf16_backend = TorchBackend(small_model, "bf16")
    bf16 = Predictor.from_backend(bf16_backend)(image, score_threshold=0.0, max_detections=8)
    assert bf16_backend.precision == "bf16" and len(fp32) == len(bf16) == 8
    # The same boxes (float32 decoding and NMS; bf16 features move them by a fraction of a pixel).
    np.testing.assert_allclose(bf16.boxes, fp32.boxes, atol=3.0)
    np.testing.assert_allclose(bf16.scores, fp32.scores, atol=0.05)
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


def test_key_bias_attention_equals_masked_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 200, 16, generator=g) for _ in range(3))
    padding = torch.rand(3, 200, generator=g) < 0.4
    padding[:, :20] = False  # every sequence keeps its context tokens
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :])
    torch.testing.assert_close(key_bias_attention(q, k, v, padding), expected, rtol=1e-5, atol=1e-6)
    # What padded keys hold never matters.
    k2, v2 = k.clone(), v.clone()
    k2[padding[:, None, :, None].expand_as(k2)] = 1e3
    v2[padding[:, None, :, None].expand_as(v2)] = -1e3
    torch.testing.assert_close(key_bias_attention(q, k2, v2, padding), expected, rtol=1e-5, atol=1e-6)
    half = key_bias_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), padding).float()
    assert (half - expected).abs().max() < 0.05


def test_cli_precision_flag(tmp_path, small_model):
    from PIL import Image

    checkpoint = tmp_path / "small.pth"
    save_checkpoint(checkpoint, small_model)
    Image.fromarray(scene()).save(tmp_path / "a.png")
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        code = main(["predict", str(tmp_path / "a.png"), "--model", str(checkpoint), "--device", "cpu",
                     "--precision", precision, "--score-threshold", "0", "--out", str(out)])
        assert code == 0 and len(json.loads(out.read_text())) > 0
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "a.png"), "--precision", "fp8", "--out", str(tmp_path / "x.json")])


def test_exported_backends_refuse_reduced_precision(tmp_path, small_model):
    from export.runtimes import load_backend

    checkpoint = tmp_path / "small.pth"
    save_checkpoint(checkpoint, small_model)
    with pytest.raises(ValueError, match="float32 export"):
        load_backend(checkpoint, "onnxruntime", device="cpu", precision="bf16")


# ------------------------------------------------------------------------------------------------
# CUDA smoke tests: skipped without a GPU, run on the GPU machine.


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_predictor_matches_cpu(small_model, precision):
    image = scene()
    cpu = Predictor.from_backend(TorchBackend(small_model, "fp32"))(image, score_threshold=0.0, max_detections=6)
    import copy

    gpu_model = copy.deepcopy(small_model).to("cuda")
    gpu = Predictor.from_backend(TorchBackend(gpu_model, precision))(image, score_threshold=0.0, max_detections=6)
    assert len(gpu) == len(cpu)
    np.testing.assert_allclose(gpu.boxes, cpu.boxes, atol=0.5 if precision == "fp32" else 3.0)
    assert gpu.mask_probs.dtype == np.float32


@needs_cuda
def test_cuda_key_masked_attention_uses_the_key_bias_kernel_correctly():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 700, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    padding = torch.rand(2, 700, device="cuda", generator=g) < 0.3
    padding[:, :196] = False
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=~padding[:, None, None, :])
    assert (key_masked_attention(q, k, v, padding).float() - expected).abs().max() < 0.05
