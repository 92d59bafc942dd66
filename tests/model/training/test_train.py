"""Training: matcher and sampling, ground-truth targets, and a real few-iteration run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from transfiner.cli.main import main
from transfiner.model.config import InputConfig, small_config
from transfiner.model.datasets.coco import CocoDataset, DatasetError
from transfiner.model.datasets.shapes import make_shapes
from transfiner.model.datasets.targets import crop_masks, gt_incoherence, incoherence_maps, mask_boundary
from transfiner.model.inference.predictor import Predictor
from transfiner.model.inference.preprocess import pad_batch
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.training.losses import Matcher, TrainingLosses, dice_loss, subsample_labels
from transfiner.model.training.train import TRAIN_STATE_FORMAT, SolverConfig, canvas_losses, train
from transfiner.model.weights.files import CheckpointError


def test_matcher_thresholds_and_low_quality_matches():
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.2], [0.1, 0.65, 0.25, 0.0]])
    matcher = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=False)
    matches, labels = matcher(iou)
    assert matches.tolist() == [0, 1, 1, 0]
    assert labels.tolist() == [1, -1, 0, 0]
    # With low-quality matches, ground truth 1's best prediction (0.65) becomes foreground.
    _, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [1, 1, 0, 0]
    # No ground truth: everything is background.
    matches, labels = matcher(torch.zeros(0, 3))
    assert labels.tolist() == [0, 0, 0]


def test_subsample_labels_respects_fraction():
    labels = torch.tensor([1] * 50 + [0] * 200 + [-1] * 10)
    torch.manual_seed(0)
    pos, neg = subsample_labels(labels, 64, 0.25, 0)
    assert len(pos) == 16 and len(neg) == 48
    assert torch.all(labels[pos] == 1) and torch.all(labels[neg] == 0)
    assert len(set(pos.tolist())) == 16
    pos, neg = subsample_labels(torch.tensor([1, 1, 0, 0, 0]), 64, 0.5, 0)
    assert len(pos) == 2 and len(neg) == 3


def test_dice_loss():
    target = torch.zeros(2, 4, 4)
    target[:, 1:3, 1:3] = 1
    assert dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(1 - target, target).item() == pytest.approx(1 - 1 / 17, abs=1e-6)


def test_incoherence_of_known_masks():
    masks = torch.zeros(3, 64, 64)
    masks[0, 16:48, 16:48] = 1  # a square on even coordinates survives 2x down/up sampling inside
    masks[1, :, 31] = 1  # a 1-pixel line cannot survive
    maps = incoherence_maps(masks)
    assert maps.shape == (3, 32, 32)
    assert maps[2].sum() == 0  # empty mask: nothing incoherent
    assert maps[0, 12:20, 12:20].max() == 0  # deep inside the square: coherent
    assert maps[0, 8, 12:20].max() == 1  # on the square's edge: incoherent
    assert maps[1, :, 15].min() == 1  # the whole thin line is incoherent
    # On the 28x28 box grid the square's border cells are incoherent, its centre is not.
    boxes = torch.tensor([[8.0, 8.0, 56.0, 56.0]])
    inc = gt_incoherence(masks, boxes, torch.tensor([0]))
    assert inc.shape == (1, 28, 28)
    assert not inc[0, 12:16, 12:16].any() and inc[0, 4:24, 4:6].any()
    area = inc.float().mean()
    assert 0.05 < area < 0.5


def test_crop_masks_and_boundary():
    masks = torch.zeros(1, 40, 40)
    masks[0, 10:30, 10:30] = 1
    crop = crop_masks(masks, torch.tensor([[10.0, 10.0, 30.0, 30.0]]), torch.tensor([0]), 28)
    assert crop.all()  # the box is exactly the mask
    crop = crop_masks(masks, torch.tensor([[0.0, 0.0, 40.0, 40.0]]), torch.tensor([0]), 4)
    assert crop[0].tolist() == [[False] * 4, [False, True, True, False], [False, True, True, False], [False] * 4]
    square = torch.zeros(1, 8, 8, dtype=torch.bool)
    square[0, 2:6, 2:6] = True
    boundary = mask_boundary(square)
    # Dilation adds the 4-neighbour ring, erosion removes the square's own border.
    assert boundary[0, 2, 2] and boundary[0, 1, 3] and not boundary[0, 3, 3] and not boundary[0, 0, 0]
    full = torch.ones(1, 5, 5, dtype=torch.bool)
    assert not mask_boundary(full).any()  # skimage's erosion keeps the grid edge


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes(root, num_images=4, seed=3, size=(160, 160))


def shapes_config(annotations):
    """The small preset at the data's own 160 px, with fewer refinement nodes: fast on 2 cores."""
    categories = json.loads(annotations.read_text())["categories"]
    cfg = small_config(tuple(c["name"] for c in categories), tuple(c["id"] for c in categories))
    return dataclasses.replace(
        cfg,
        input=InputConfig(min_size_test=160, max_size_test=160, min_size_train=(160,), max_size_train=160),
        transfiner=dataclasses.replace(cfg.transfiner, max_cells=(784, 64, 16), train_nodes_per_level=48),
    )


@pytest.mark.slow  # a real training run of 24 + 4 iterations: minutes on 2 cores
def test_training_reduces_loss_and_resumes(tiny_data, tmp_path):
    solver = SolverConfig(iters=24, batch_size=2, lr=0.01, warmup_iters=4, log_period=4, checkpoint_period=12)
    out = tmp_path / "run"
    torch.manual_seed(0)
    final = train(shapes_config(tiny_data), tiny_data, out, solver, device="cpu")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [4, 8, 12, 16, 20, 24]
    expected = {
        "loss_rpn_cls",
        "loss_rpn_loc",
        "loss_cls",
        "loss_box_reg",
        "loss_mask",
        "loss_mask_uncertain",
        "loss_mask_refine",
        "loss_bound",
        "loss_semantic",
    }
    assert expected <= set(records[0])
    first, last = records[0], records[-1]
    assert last["total"] < 0.8 * first["total"], (first["total"], last["total"])
    assert last["loss_rpn_cls"] < first["loss_rpn_cls"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "last.pth").exists()

    # Resume continues from the saved iteration and appends to the log.
    train(
        shapes_config(tiny_data),
        tiny_data,
        out,
        SolverConfig(**{**solver.__dict__, "iters": 28}),
        resume=True,
        device="cpu",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records][-2:] == [24, 28]

    # The final checkpoint is a self-describing inference model.
    predictor = Predictor(weights=final, device="cpu")
    assert predictor.cfg == shapes_config(tiny_data)
    assert len(predictor(torch.zeros(3, 160, 160, dtype=torch.uint8), max_detections=3).masks) <= 3
    # So is the training state, all a run stopped early leaves: it holds the same weights here.
    image = torch.randint(0, 255, (3, 160, 160), dtype=torch.uint8)
    from_state = Predictor(weights=out / "last.pth", device="cpu")(image, score_threshold=0.0)
    from_final = predictor(image, score_threshold=0.0)
    torch.testing.assert_close(from_state.boxes, from_final.boxes, rtol=0, atol=0)
    assert from_state.rles == from_final.rles


def test_train_cli_errors(tiny_data, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--iters", "0"]) == 2
    assert "--iters" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "resume" in capsys.readouterr().err


def _crowd_only(annotations: Path, tmp_path: Path) -> Path:
    data = json.loads(annotations.read_text())
    for ann in data["annotations"]:
        ann["iscrowd"] = 1
    path = annotations.parent / f"crowd-only-{tmp_path.name}.json"  # beside the images
    path.write_text(json.dumps(data))
    return path


def _other_categories(annotations: Path, tmp_path: Path) -> Path:
    data = json.loads(annotations.read_text())
    for cat in data["categories"]:
        cat["id"] += 100
    for ann in data["annotations"]:
        ann["category_id"] += 100
    path = annotations.parent / f"other-ids-{tmp_path.name}.json"
    path.write_text(json.dumps(data))
    return path


def test_train_refuses_before_the_first_iteration_what_would_fail_or_hang_later(tiny_data, tmp_path, capsys):
    """Each of these used to train first (or forever) and fail at the end, or go on silently."""

    def refused(*extra: str) -> str:
        out = tmp_path / "run"
        argv = ["train", "--data", str(tiny_data), "--out", str(out), "--iters", "2", "--batch-size", "1", *extra]
        assert main(argv) == 2
        assert not (out / "last.pth").exists() and not (out / "metrics.jsonl").exists()
        return capsys.readouterr().err

    # Only crowd regions: no sample to draw, the loader used to wait forever.
    assert "no image has an instance" in refused("--data", str(_crowd_only(tiny_data, tmp_path)))
    # A validation set that cannot be read or has other categories: found after training before.
    assert "missing.json" in refused("--val", str(tmp_path / "missing.json"))
    assert "category ids" in refused("--val", str(_other_categories(tiny_data, tmp_path)))
    assert "image file not found" in refused("--val", str(tiny_data), "--val-image-root", str(tmp_path))
    assert "--warmup-iters" in refused("--warmup-iters", "-1")
    # An earlier run is neither overwritten nor mixed into silently.
    (tmp_path / "run").mkdir()
    torch.save({}, tmp_path / "run" / "model_final.pth")
    assert "--resume it, --overwrite it" in refused()
    assert "give one of them" in refused("--resume", "--weights", "default")
    # --overwrite replaces it, the earlier run's report included.
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "report.md").write_text("the earlier model's")
    solver = SolverConfig(iters=1, batch_size=1, lr=1e-9, warmup_iters=0, log_period=1, checkpoint_period=100)
    train(shapes_config(tiny_data), tiny_data, tmp_path / "run", solver, device="cpu", overwrite=True)
    assert not (tmp_path / "run" / "eval").exists()
    assert (tmp_path / "run" / "model_final.pth").stat().st_size > 1000


def test_resume_keeps_its_categories_and_its_schedule(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    solver = SolverConfig(iters=4, batch_size=1, lr=0.001)
    other = dataclasses.replace(shapes_config(tiny_data), class_names=("a",) * 7, category_ids=tuple(range(101, 108)))
    state = {"format": TRAIN_STATE_FORMAT, "config": other.to_dict(), "solver": dataclasses.asdict(solver), "iter": 2}
    torch.save(state, out / "last.pth")
    with pytest.raises(DatasetError, match="trained on categories .*101 a"):
        train(shapes_config(tiny_data), tiny_data, out, solver, resume=True, device="cpu")
    state["config"] = shapes_config(tiny_data).to_dict()
    torch.save(state, out / "last.pth")
    with pytest.raises(ValueError, match="finished 2 iterations; give --iters above"):
        train(shapes_config(tiny_data), tiny_data, out, dataclasses.replace(solver, iters=2), resume=True, device="cpu")


def test_a_diverging_run_stops_with_one_line_that_says_what_to_change(tiny_data, tmp_path, capsys):
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "run"),
        "--iters",
        "6",
        "--batch-size",
        "1",
        "--lr",
        "1e8",
        "--warmup-iters",
        "0",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the loss became" in err and "lower --lr" in err and "Traceback" not in err, err


class _Trap:
    """Unpickling this runs code (touches a file): what a tampered last.pth could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_reads_only_plain_data(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "code-ran"
    solver = SolverConfig(iters=1, batch_size=1)
    torch.save(
        {"format": TRAIN_STATE_FORMAT, "solver": dataclasses.asdict(solver), "trap": _Trap(marker)}, out / "last.pth"
    )
    with pytest.raises(CheckpointError, match="not a plain weights file"):
        train(shapes_config(tiny_data), tiny_data, out, solver, resume=True, device="cpu")
    assert not marker.exists()


def test_resume_refuses_another_state_format(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    solver = SolverConfig(iters=1, batch_size=1)
    torch.save({"format": "transfiner-train/0", "solver": dataclasses.asdict(solver)}, out / "last.pth")
    with pytest.raises(CheckpointError, match="transfiner-train/0.*start a new --out"):
        train(shapes_config(tiny_data), tiny_data, out, solver, resume=True, device="cpu")
    torch.save({"model": {}}, out / "last.pth")  # an inference checkpoint, say
    with pytest.raises(CheckpointError, match="format None"):
        train(shapes_config(tiny_data), tiny_data, out, solver, resume=True, device="cpu")


def test_fine_tune_from_a_checkpoint_with_other_classes(tiny_data, tmp_path):
    """As from a converted 80-class official checkpoint: shared weights load, class heads start fresh."""
    from transfiner.model.config import COCO_CATEGORY_IDS, COCO_CLASSES
    from transfiner.model.modeling.rcnn import MaskTransfiner
    from transfiner.model.weights.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(5)
    coco_cfg = dataclasses.replace(
        shapes_config(tiny_data),
        roi_heads=dataclasses.replace(shapes_config(tiny_data).roi_heads, num_classes=80),
        class_names=COCO_CLASSES,
        category_ids=COCO_CATEGORY_IDS,
    )
    source = MaskTransfiner(coco_cfg)
    save_checkpoint(tmp_path / "coco.pth", source)
    solver = SolverConfig(iters=1, batch_size=1, lr=1e-9, warmup_iters=1, log_period=1, checkpoint_period=100)
    final = train(
        shapes_config(tiny_data), tiny_data, tmp_path / "ft", solver, init_weights=tmp_path / "coco.pth", device="cpu"
    )
    _, tuned = load_checkpoint(final)
    before = source.state_dict()
    # A backbone weight and a refiner weight came from the checkpoint (lr ~ 0 keeps them)...
    for name in ("backbone.bottom_up.res3.0.conv1.weight", "mask_head.refiner.node_encoder.fuse.weight"):
        torch.testing.assert_close(tuned[name], before[name], rtol=0, atol=1e-6)
    # ...the class-specific heads have the data set's 7 classes.
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape[0] == 8
    assert tuned["mask_head.coarse.predictor.weight"].shape[0] == 7


def test_each_sample_is_trained_on_its_own_canvas(tiny_data):
    """A batch of two canvases gives the losses of each sample padded alone, weighted by share:
    the padding a sample is trained with is the padding the Predictor gives it."""
    cfg = shapes_config(tiny_data)
    small = CocoDataset(tiny_data, input_cfg=dataclasses.replace(cfg.input, min_size_train=(128,)), seed=1)
    large = CocoDataset(tiny_data, input_cfg=cfg.input, seed=1)
    samples = [small[0], large[1], small[2]]
    assert {tuple(s.image.shape[1:]) for s in samples} == {(128, 128), (160, 160)}
    torch.manual_seed(0)
    model = MaskTransfiner(cfg).train()
    losses_fn = TrainingLosses(model, True, True)

    torch.manual_seed(1)
    expected: dict[str, torch.Tensor] = {}
    for group in ([samples[0], samples[2]], [samples[1]]):  # canvases in order of first appearance
        images, sizes = pad_batch([s.image for s in group], cfg.input)
        assert images.shape[-2:] == group[0].image.shape[1:]
        for name, value in losses_fn(model, images, sizes, group).items():
            expected[name] = expected.get(name, 0) + value * len(group) / 3
    torch.manual_seed(1)
    got = canvas_losses(losses_fn, model, samples, torch.device("cpu"))
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)

    # Padding both to the larger canvas, as one batch, gives other losses.
    torch.manual_seed(1)
    images, sizes = pad_batch([s.image for s in samples], cfg.input)
    together = losses_fn(model, images, sizes, samples)
    assert max(abs(float(together[name] - got[name])) for name in got) > 1e-3
