"""End to end on CPU with the small preset: Predictor, the raw model, and `transfiner predict`."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

from transfiner.cli.main import main
from transfiner.model.inference.predictor import Predictor
from transfiner.model.inference.preprocess import (
    canvas_shape,
    group_by_canvas,
    prepare_batch,
    resize_image,
    resized_shape,
    to_rgb_tensor,
)
from transfiner.model.modeling.rcnn import InferenceOptions
from transfiner.model.weights.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def small_predictor(small_model) -> Predictor:
    return Predictor.from_model(small_model)  # wrap the seeded session model instead of building another


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((150, 200, 3), np.uint8)
    img[:] = rng.integers(0, 60, size=(1, 1, 3))
    img[30:110, 40:150] = (200, 80, 40)
    img[60:90, 70:120] = (20, 180, 220)
    return img + rng.integers(0, 20, size=img.shape, dtype=np.uint8)


def test_prediction_fields(small_predictor, image):
    pred = small_predictor(image, score_threshold=0.0, max_detections=12)
    n = len(pred)
    assert 0 < n <= 12
    assert pred.image_size == (150, 200)
    assert pred.boxes.shape == (n, 4) and pred.masks.shape == (n, 150, 200) and pred.mask_probs.shape == (n, 112, 112)
    assert np.all(pred.boxes[:, 0] >= 0) and np.all(pred.boxes[:, 2] <= 200) and np.all(pred.boxes[:, 3] <= 150)
    assert np.all(pred.boxes[:, 2] > pred.boxes[:, 0]) and np.all(pred.boxes[:, 3] > pred.boxes[:, 1])
    assert np.all(np.diff(pred.scores) <= 0)
    assert pred.mask_probs.min() >= 0 and pred.mask_probs.max() <= 1
    decoded = mask_util.decode(pred.rles).transpose(2, 0, 1).astype(bool)
    assert np.array_equal(decoded, pred.masks)
    assert all(isinstance(r["counts"], str) for r in pred.rles)


def test_input_formats_give_the_same_result(small_predictor, image):
    results = [
        small_predictor(x, score_threshold=0.0, max_detections=5)
        for x in (image, Image.fromarray(image), torch.from_numpy(image).permute(2, 0, 1))
    ]
    for other in results[1:]:
        np.testing.assert_array_equal(other.boxes, results[0].boxes)
        np.testing.assert_array_equal(other.masks, results[0].masks)
    gray = small_predictor(image.mean(axis=2).astype(np.uint8), score_threshold=0.0, max_detections=3)
    assert gray.masks.shape[1:] == (150, 200)


def test_a_float_image_in_0_to_1_is_warned_about(small_predictor, image):
    """The model takes 0..255; ToTensor-style 0..1 input would quietly find nothing."""
    with pytest.warns(UserWarning, match="0..1: the model expects 0..255"):
        small_predictor(image.astype(np.float32) / 255, score_threshold=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_predictor(image.astype(np.float32), score_threshold=0.5)  # 0..255 floats are fine
        small_predictor(np.zeros_like(image, dtype=np.float32), score_threshold=0.5)  # black is black


def test_no_detections(small_predictor, image):
    pred = small_predictor(image, score_threshold=1.0)
    assert len(pred) == 0
    assert pred.boxes.shape == (0, 4) and pred.masks.shape == (0, 150, 200) and pred.mask_probs.shape == (0, 112, 112)
    assert pred.rles == []


def test_batch_equals_single_images(small_predictor, image):
    other = np.ascontiguousarray(image[::-1])
    batch = small_predictor.predict([image, other], score_threshold=0.0, max_detections=6)
    for img, pred in zip((image, other), batch):
        alone = small_predictor(img, score_threshold=0.0, max_detections=6)
        np.testing.assert_allclose(pred.boxes, alone.boxes, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(pred.mask_probs, alone.mask_probs, atol=1e-4)


def test_refine_off_gives_upsampled_coarse_masks(small_predictor, image):
    model = small_predictor.model
    batch, sizes = prepare_batch([to_rgb_tensor(image)], model.cfg.input, "cpu")
    with torch.no_grad():
        refined = model(batch, sizes, InferenceOptions(score_threshold=0.0, max_detections=8))
        coarse = model(batch, sizes, InferenceOptions(score_threshold=0.0, max_detections=8, refine=False))
        capped = model(batch, sizes, InferenceOptions(score_threshold=0.0, max_detections=8, max_refined_per_image=3))
    assert torch.equal(refined.boxes, coarse.boxes)
    assert (refined.mask_probs - coarse.mask_probs).abs().amax(dim=(1, 2)).min() > 1e-3  # every box refined
    # Only the 3 best boxes are refined under the cap; the others keep the coarse masks exactly.
    torch.testing.assert_close(capped.mask_probs[:3], refined.mask_probs[:3])
    assert torch.equal(capped.mask_probs[3:], coarse.mask_probs[3:])
    # Coarse masks are the 28x28 head output bilinearly upsampled: smooth at 112x112.
    pred = small_predictor(image, score_threshold=0.0, max_detections=8, refine=False)
    np.testing.assert_allclose(pred.mask_probs, coarse.mask_probs.numpy(), atol=1e-6)


def test_preprocessing_matches_detectron2_sizes():
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)
    # Past ~1280:1 detectron2 rounds the short side to 0 (and its resize raises); we keep 1.
    assert resized_shape(1, 1281, 800, 1333) == (1, 1333)
    assert resized_shape(10000, 2, 800, 1333) == (1333, 1)
    cfg = dataclasses.replace(
        __import__("transfiner.model.config", fromlist=["InputConfig"]).InputConfig(),
        min_size_test=64,
        max_size_test=100,
    )
    batch, sizes = prepare_batch(
        [torch.zeros(3, 30, 40, dtype=torch.uint8), torch.zeros(3, 40, 20, dtype=torch.uint8)], cfg, "cpu"
    )
    assert sizes.tolist() == [[64, 85], [100, 50]]
    assert batch.shape == (2, 3, 128, 96)
    # Padding holds the pixel mean (0 after normalisation); a red RGB pixel becomes BGR.
    assert torch.allclose(batch[0, :, 100, 90], torch.tensor(cfg.pixel_mean))
    red = torch.zeros(3, 8, 8, dtype=torch.uint8)
    red[0] = 255
    out, _ = prepare_batch([red], dataclasses.replace(cfg, min_size_test=8), "cpu")
    assert out[0, 2, 0, 0] == 255 and out[0, 0, 0, 0] == 0


def test_predict_cli_writes_coco_results(tmp_path, small_model, image, capsys):
    weights = tmp_path / "small.pth"
    save_checkpoint(weights, small_model)
    paths = []
    for name, img in (("a.png", image), ("b.jpg", image[:, ::-1])):
        Image.fromarray(np.ascontiguousarray(img)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "results.json"
    code = main(
        [
            "predict",
            *paths,
            "--weights",
            str(weights),
            "--out",
            str(out),
            "--overlay",
            str(tmp_path / "overlays"),
            "--score-threshold",
            "0.0",
            "--max-detections",
            "5",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    records = json.loads(out.read_text())
    assert {r["image_id"] for r in records} == {"a.png", "b.jpg"}
    assert all(isinstance(r["segmentation"]["counts"], str) and len(r["bbox"]) == 4 for r in records)
    assert (tmp_path / "overlays" / "a.png").exists() and (tmp_path / "overlays" / "b.png").exists()
    # pycocotools accepts the records as they are.
    gt = COCO()
    gt.dataset = {
        "images": [{"id": "a.png", "height": 150, "width": 200}, {"id": "b.jpg", "height": 150, "width": 200}],
        "annotations": [],
        "categories": [{"id": 1, "name": "object"}],
    }
    gt.createIndex()
    results = gt.loadRes(records)
    assert len(results.anns) == len(records)

    # Bad input: a clear message and status 2, no traceback.
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["predict", str(tmp_path / "broken.png"), "--weights", str(weights), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "cannot identify image file broken.png" in err and " at 0x" not in err
    assert main(["predict", str(tmp_path / "nope.png"), "--weights", str(weights), "--out", str(out)]) == 2
    assert "image file not found" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "overlays"), "--weights", str(weights), "--out", str(out)]) == 2
    assert "a folder, not an image file" in capsys.readouterr().err


def test_predict_cli_keeps_inputs_that_share_a_file_name_apart(tmp_path, small_model, image, capsys):
    """d1/x.png, d2/x.png and x.jpg: three image ids and three overlays, each image's own."""
    weights = tmp_path / "small.pth"
    save_checkpoint(weights, small_model)
    inputs = {"d1/x.png": image, "d2/x.png": image[:100], "x.jpg": image[:, :120]}
    for name, img in inputs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).save(tmp_path / name)
    paths = [str(tmp_path / name) for name in inputs]
    out, overlays = tmp_path / "results.json", tmp_path / "overlays"
    code = main(
        [
            "predict",
            *paths,
            "--weights",
            str(weights),
            "--out",
            str(out),
            "--overlay",
            str(overlays),
            "--score-threshold",
            "0.0",
            "--max-detections",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    ids = [paths[0], paths[1], "x.jpg"]
    records = json.loads(out.read_text())
    assert [r["image_id"] for r in records] == [i for i in ids for _ in range(3)]
    for image_id, img in zip(ids, inputs.values()):
        sizes = {tuple(r["segmentation"]["size"]) for r in records if r["image_id"] == image_id}
        assert sizes == {img.shape[:2]}
    written = sorted(p.name for p in overlays.iterdir())
    assert written == ["d1__x.png.png", "d2__x.png.png", "x.jpg.png"]
    assert Image.open(overlays / "d2__x.png.png").size == (200, 100)
    assert Image.open(overlays / "x.jpg.png").size == (120, 150)

    assert main(["predict", paths[2], paths[2], "--weights", str(weights), "--out", str(out)]) == 2
    assert "x.jpg is given more than once" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--score-threshold", "2"], "score_threshold must be a number from 0 to 1, got 2.0"),
        (["--score-threshold", "nan"], "score_threshold must be a number from 0 to 1, got nan"),
        (["--mask-threshold", "-1"], "mask_threshold must be a number from 0 to 1, got -1.0"),
        (["--max-detections", "0"], "max_detections must be at least 1"),
    ],
)
def test_predict_refuses_thresholds_out_of_range(small_predictor, image, tmp_path, small_model, flags, message, capsys):
    """As the service does: a score threshold of 2 would quietly find nothing."""
    key, value = flags[0].removeprefix("--").replace("-", "_"), float(flags[1])
    with pytest.raises(ValueError, match=message.split(", got")[0]):
        small_predictor.predict([image], **{key: int(value) if key == "max_detections" else value})
    weights = tmp_path / "small.pth"
    save_checkpoint(weights, small_model)
    Image.fromarray(image).save(tmp_path / "a.png")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "a.png"),
                "--weights",
                str(weights),
                "--out",
                str(tmp_path / "o.json"),
                "--device",
                "cpu",
                *flags,
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == f"error: {message}\n"


def test_upsampled_coarse_is_bilinear_of_28(small_predictor, image):
    """The coarse path is exactly the official `F.interpolate(28x28, 112, bilinear)`."""
    model = small_predictor.model
    batch, sizes = prepare_batch([to_rgb_tensor(image)], model.cfg.input, "cpu")
    with torch.no_grad():
        features = model.backbone(model.normalize(batch))[:4]
        out = model(batch, sizes, InferenceOptions(score_threshold=0.0, max_detections=4, refine=False))
        roi = model.mask_head.pooler(features, out.boxes, out.batch_index)
        logits, _ = model.mask_head.coarse(roi)
        probs = logits[torch.arange(len(out.classes)), out.classes].sigmoid()
    expected = F.interpolate(probs[:, None], (112, 112), mode="bilinear")[:, 0]
    torch.testing.assert_close(out.mask_probs, expected)


def test_unavailable_or_malformed_device_is_a_clear_error():
    from transfiner.model.inference.predictor import resolve_device

    with pytest.raises(ValueError, match="not available"):
        resolve_device("cuda:99")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu9")
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_answer_does_not_depend_on_batch_mates_of_other_canvases(small_predictor, image):
    """Padding is decided per image (``canvas_shape``): an image batched with images of other
    sizes gets exactly what it gets alone, and predictions come back in input order."""
    cfg = small_predictor.cfg.input
    wide = np.ascontiguousarray(np.concatenate([image, image[:, ::-1]], axis=1))  # 150x400
    tall = np.ascontiguousarray(image.transpose(1, 0, 2))  # 200x150
    assert len({canvas_shape(*x.shape[:2], cfg) for x in (image, wide, tall)}) == 3
    alone = small_predictor(image, score_threshold=0.0, max_detections=6)
    batch = small_predictor.predict([wide, image, tall], score_threshold=0.0, max_detections=6)
    assert [p.image_size for p in batch] == [(150, 400), (150, 200), (200, 150)]
    mixed = batch[1]
    assert len(alone) > 0
    np.testing.assert_array_equal(mixed.boxes, alone.boxes)
    np.testing.assert_array_equal(mixed.scores, alone.scores)
    np.testing.assert_array_equal(mixed.classes, alone.classes)
    assert mixed.rles == alone.rles
    assert small_predictor(wide, score_threshold=0.0, max_detections=6).rles == batch[0].rles


def test_canvas_is_the_image_own_padded_network_size():
    from transfiner.model.config import InputConfig

    cfg = InputConfig(min_size_test=800, max_size_test=1333)
    assert canvas_shape(480, 640, cfg) == (800, 1088)  # resized to 800x1067, padded to /32
    assert canvas_shape(240, 320, cfg) == canvas_shape(480, 640, cfg)  # same network size
    assert canvas_shape(640, 480, cfg) == (1088, 800)
    assert group_by_canvas([(480, 640), (640, 480), (240, 320)], cfg) == {(800, 1088): [0, 2], (1088, 800): [1]}
    # prepare_batch pads a batch of one canvas to exactly it.
    images = [torch.zeros(3, 480, 640, dtype=torch.uint8), torch.zeros(3, 240, 320, dtype=torch.uint8)]
    batch, sizes = prepare_batch(images, cfg, "cpu")
    assert batch.shape[-2:] == (800, 1088) and sizes.tolist() == [[800, 1067], [800, 1067]]


@pytest.mark.parametrize(
    "source, target",
    [
        ((3000, 2000), (1200, 800)),
        ((500, 700), (800, 1120)),
        ((1281, 1), (800, 1)),
        ((10, 2000), (8, 1333)),
        ((257, 300), (257, 301)),
    ],
)
def test_cpu_resize_in_bands_equals_the_one_call_resize_to_the_bit(source, target):
    """``resize_image`` on the CPU works per channel and in bands of rows (bounded memory); it
    must give exactly what one antialiased interpolate of the whole float image gives."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *source), dtype=torch.uint8, generator=generator)
    whole = F.interpolate(
        image.float().flip(0)[None], size=target, mode="bilinear", align_corners=False, antialias=True
    )
    assert torch.equal(resize_image(image, target, "cpu"), whole[0].clamp(0, 255))
