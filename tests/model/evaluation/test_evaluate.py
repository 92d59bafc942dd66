"""`transfiner evaluate`: COCO metrics, incoherence statistics, and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from tests.model.support import tiny_transfiner_config
from transfiner.cli.evaluate import add_evaluate_arguments, cmd_evaluate
from transfiner.model.config import small_config
from transfiner.model.datasets.coco import CocoDataset, DatasetError
from transfiner.model.datasets.shapes import CATEGORIES, make_shapes
from transfiner.model.datasets.targets import gt_incoherence
from transfiner.model.evaluation.evaluate import (
    METRIC_NAMES,
    IncoherenceStats,
    check_categories,
    coco_metrics,
    evaluate,
)
from transfiner.model.inference.images import load_image_rgb
from transfiner.model.inference.predictor import Predictor
from transfiner.model.inference.preprocess import pad_batch, prepare_batch, to_rgb_tensor
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.weights.checkpoint import save_checkpoint

IMAGE_IDS = (10, 20)  # not 1, 2: results must carry the json's own ids


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory):
    """Two 96x96 make-shapes images, renumbered to image ids 10 and 20."""
    out = tmp_path_factory.mktemp("shapes")
    path = make_shapes(out, num_images=2, seed=3, size=(96, 96))
    data = json.loads(path.read_text())
    new_id = {img["id"]: IMAGE_IDS[k] for k, img in enumerate(data["images"])}
    for img in data["images"]:
        img["id"] = new_id[img["id"]]
    for ann in data["annotations"]:
        ann["image_id"] = new_id[ann["image_id"]]
    path.write_text(json.dumps(data))
    return path


def gt_results(data: dict) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
            "segmentation": a["segmentation"],
        }
        for a in data["annotations"]
    ]


def shapes_model() -> MaskTransfiner:
    names = tuple(c["name"] for c in CATEGORIES)
    cfg = small_config(names, tuple(c["id"] for c in CATEGORIES))
    cfg = dataclasses.replace(
        cfg,
        input=dataclasses.replace(cfg.input, min_size_test=128, max_size_test=128),
        transfiner=tiny_transfiner_config(),
    )
    torch.manual_seed(0)
    return MaskTransfiner(cfg).eval()


def wrap(model: MaskTransfiner) -> Predictor:
    return Predictor.from_model(model)


# ------------------------------------------------------------------------------ COCO metrics


def test_ground_truth_against_itself_gives_ap_100(shapes_json):
    data = json.loads(shapes_json.read_text())
    results = gt_results(data)
    before = copy.deepcopy(results)
    for iou_type in ("segm", "boundary", "bbox"):
        metrics = coco_metrics(shapes_json, results, iou_type)
        assert metrics["AP"] == pytest.approx(100.0), iou_type
        assert metrics["AP50"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)
        assert set(metrics) == set(METRIC_NAMES)
    assert results == before  # the caller's records are not written into


def test_boundary_ap_is_stricter_than_mask_ap_on_dilated_masks(shapes_json):
    """Grown masks keep a high mask IoU but lose boundary IoU: proves "boundary" is really AP^B."""
    data = json.loads(shapes_json.read_text())
    results = gt_results(data)
    for record in results:
        mask = mask_util.decode(record["segmentation"]).astype(bool)
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        rle = mask_util.encode(np.asfortranarray(grown.astype(np.uint8)))
        record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    segm = coco_metrics(shapes_json, results, "segm")["AP"]
    boundary = coco_metrics(shapes_json, results, "boundary")["AP"]
    assert boundary < segm < 100.0


def test_metrics_of_part_of_the_images(shapes_json):
    data = json.loads(shapes_json.read_text())
    first = [r for r in gt_results(data) if r["image_id"] == IMAGE_IDS[0]]
    assert coco_metrics(shapes_json, first, "segm", image_ids=[IMAGE_IDS[0]])["AP"] == pytest.approx(100.0)
    assert coco_metrics(shapes_json, first, "segm")["AP"] < 100.0  # the other image's objects are missed


# ------------------------------------------------------------------------------ incoherence


def test_incoherence_stats_perfect_prediction():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 10:40, 12:50] = True
    masks[1, 20:60, 5:30] = True
    masks[1, 30:35, 10:20] = False  # a hole
    boxes = torch.tensor([[8.0, 6.0, 54.0, 44.0], [2.0, 16.0, 34.0, 63.0]])
    target = gt_incoherence(masks, boxes, torch.arange(2))
    assert target.any() and not target.all()

    stats = IncoherenceStats()
    stats.update(target.float(), target)  # probabilities 1.0 / 0.0 equal to the ground truth
    assert stats.recall == 1.0 and stats.accuracy == 1.0
    assert stats.cells == 2 * 28 * 28 and stats.instances == 2
    share = target.flatten(1).float().mean(1).mean().item()
    assert stats.area_share == pytest.approx(share)

    missed = IncoherenceStats()
    missed.update(torch.full(target.shape, 0.49), target)  # below 0.5: nothing predicted
    assert missed.recall == 0.0 and missed.accuracy == pytest.approx(1 - share)
    assert math.isnan(IncoherenceStats().recall) and math.isnan(IncoherenceStats().accuracy)


def test_incoherence_stats_counts():
    target = torch.tensor([[[True, True], [False, False]]])
    predicted = torch.tensor([[[0.9, 0.1], [0.5, 0.2]]])  # TP, FN, FP, TN
    stats = IncoherenceStats()
    stats.update(predicted, target)
    assert (stats.true_positive, stats.false_negative, stats.false_positive, stats.true_negative) == (1, 1, 1, 1)
    assert stats.recall == 0.5 and stats.accuracy == 0.5 and stats.area_share == 0.5


# ------------------------------------------------------------------------------ categories


def test_category_mismatch_is_a_clear_error(shapes_json, tmp_path):
    torch.manual_seed(0)
    one_class = wrap(MaskTransfiner(small_config()).eval())  # "object", id 1
    with pytest.raises(DatasetError, match=r"category ids \[1, 2, 3, 4, 5, 6, 7\] but the model predicts \[1\]"):
        evaluate(one_class, shapes_json, tmp_path / "report")
    names = tuple(c["name"] for c in CATEGORIES)
    with pytest.raises(DatasetError, match="names its categories differently"):
        check_categories(CATEGORIES, ("dot",) + names[1:], [c["id"] for c in CATEGORIES])
    check_categories(list(reversed(CATEGORIES)), names, [c["id"] for c in CATEGORIES])  # order is free


def test_dataset_batch_equals_predictor_preprocessing(shapes_json):
    """The evaluation feeds CocoDataset's test-time images; they must be the Predictor's input."""
    model_cfg = shapes_model().cfg
    dataset = CocoDataset(shapes_json, train=False, input_cfg=model_cfg.input, filter_empty=False)
    sample = dataset[0]
    rgb = load_image_rgb(dataset.image_root / "000000.png")
    expected, sizes = prepare_batch([to_rgb_tensor(rgb)], model_cfg.input, "cpu")
    batch, batch_sizes = pad_batch([sample.image], model_cfg.input)
    assert torch.equal(batch_sizes, sizes)
    torch.testing.assert_close(batch, expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ end to end


def test_cmd_evaluate_end_to_end(shapes_json, tmp_path, capsys):
    model = shapes_model()
    weights = tmp_path / "model.pth"
    save_checkpoint(weights, model)
    out = tmp_path / "report"
    parser = add_evaluate_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--weights",
            str(weights),
            "--data",
            str(shapes_json),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--max-detections",
            "4",
        ]
    )
    assert cmd_evaluate(args) == 0
    assert "refined" in capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    keys = {
        "coarse",
        "refined",
        "bbox_AP",
        "incoherence_recall",
        "incoherence_accuracy",
        "incoherent_area_share",
        "num_images",
        "config",
        "weights",
    }
    assert keys <= set(report)
    assert report["num_images"] == 2 and report["config"] == "small" and report["weights"] == str(weights)
    for name in ("coarse", "refined"):
        assert set(report[name]) == {*METRIC_NAMES, "boundary_AP"}
        for key, value in report[name].items():
            assert value is None or (math.isfinite(value) and 0 <= value <= 100), (name, key, value)
        # 96x96 images hold only small objects: AP and APs are defined, APm / APl have no ground truth.
        assert report[name]["AP"] is not None and report[name]["boundary_AP"] is not None
    for key in ("bbox_AP", "incoherence_recall", "incoherence_accuracy", "incoherent_area_share"):
        assert isinstance(report[key], float) and math.isfinite(report[key]), key
    for key in ("incoherence_recall", "incoherence_accuracy", "incoherent_area_share"):
        assert 0 <= report[key] <= 1
    assert 0 < report["incoherent_area_share"] < 1

    table = (out / "report.md").read_text()
    for row in ("| coarse |", "| refined |", "| delta |"):
        assert row in table
    overlays = sorted((out / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["000000.png", "000001.png"]
    with open(overlays[0], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments(shapes_json, tmp_path):
    predictor = wrap(shapes_model())
    with pytest.raises(ValueError, match="batch size"):
        evaluate(predictor, shapes_json, tmp_path, batch_size=0)
    with pytest.raises(DatasetError, match="annotation file not found"):
        evaluate(predictor, tmp_path / "missing.json", tmp_path)
    args = add_evaluate_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(tmp_path / "nope.pth"), "--data", str(shapes_json), "--out", str(tmp_path)]
    )
    from transfiner.model.weights.files import CheckpointError

    with pytest.raises(CheckpointError, match="model not found"):
        cmd_evaluate(args)
