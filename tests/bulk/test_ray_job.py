"""``transfiner predict --engine ray`` on a real two-node Ray cluster, on this machine.

The scenario (tests/bulk/ray_cluster.py) runs in a loopback-only network namespace: 40 make-shapes
images and 2 corrupt files, segmented whole, with the driver SIGKILLed and the job resumed, and with
the second node's raylet killed mid-job. The tests compare the shards with local ``transfiner
predict`` (same threads per forward pass: 1, as each replica has) and decode the RLEs with
pycocotools against the ``Predictor``'s masks.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from tests import ray_namespace
from transfiner.cli.main import main
from transfiner.model.datasets.shapes import ShapesConfig, write_shapes
from transfiner.model.inference.images import load_image_rgb
from transfiner.model.inference.predictor import Predictor

pytestmark = pytest.mark.slow
CORRUPT = {"corrupt-a.png": b"not an image", "corrupt-b.png": None}  # None: a PNG cut short


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bulk-images")
    write_shapes(ShapesConfig(num_images=40, seed=3, width=160, height=128), root / "shapes")
    folder = root / "shapes" / "images"
    for name, data in CORRUPT.items():
        (folder / name).write_bytes(data if data is not None else (folder / "000001.png").read_bytes()[:300])
    return folder


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, checkpoint, images) -> tuple[dict, Path]:
    ray_namespace.require()
    workdir = tmp_path_factory.mktemp("bulk-cluster")
    ray_namespace.run_scenario("tests.bulk.ray_cluster", workdir, str(checkpoint), str(images), timeout=600)
    return json.loads((workdir / "report.json").read_text()), workdir


@pytest.fixture(scope="module")
def local_results(tmp_path_factory, checkpoint, images) -> list[dict]:
    """Local ``transfiner predict`` on the 40 good images, one thread as each replica."""
    out = tmp_path_factory.mktemp("bulk-local") / "results.json"
    good = sorted(str(p) for p in images.glob("*.png") if p.name not in CORRUPT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["predict", *good, "--model", str(checkpoint), "--out", str(out), "--score-threshold", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def _shard_lines(out: Path, errors: bool = False) -> list[dict]:
    pattern = "part-*.errors.jsonl" if errors else "part-[0-9]*[0-9].jsonl"
    return [json.loads(line) for shard in sorted(out.glob(pattern)) for line in shard.read_text().splitlines()]


def _by_image(records: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for record in records:
        found.setdefault(record["image_id"], []).append(record)
    return found


def test_the_job_segments_every_image_as_local_predict_does(scenario, local_results):
    report, workdir = scenario
    assert report["whole"]["exit"] == 0, ray_namespace.logs(workdir)
    merged = json.loads((workdir / "whole.json").read_text())
    assert len(merged) == len(local_results) > 0
    assert _by_image(merged) == _by_image(local_results)  # boxes, scores, classes, RLE: identical


def test_corrupt_files_go_to_errors_and_the_rest_is_segmented(scenario):
    report, workdir = scenario
    out = workdir / "whole"
    lines = _shard_lines(out)
    assert len(lines) == 40 and len({line["image_id"] for line in lines}) == 40
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["image_id"] for e in errors) == sorted(CORRUPT)
    assert all(e["error"].startswith("cannot decode") for e in errors)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["images"], manifest["failed"]) == (40, 2)
    assert manifest["job"]["model"] == "tiny" and len(manifest["job"]["version"]) == 12
    assert "40" in (workdir / "whole.log").read_text().split("segmented", 1)[1].splitlines()[0]


def test_overlays_are_drawn_for_the_images_segmented(scenario, images):
    _, workdir = scenario
    overlays = sorted(p.name for p in (workdir / "overlays").iterdir())
    assert overlays == sorted(p.name for p in images.glob("0*.png"))  # <stem>.png, as local predict
    assert Image.open(workdir / "overlays" / "000003.png").size == Image.open(images / "000003.png").size


def test_replicas_ran_on_both_nodes(scenario):
    report, _ = scenario
    assert report["whole"]["replica_nodes"] == report["nodes"] and len(report["nodes"]) == 2


def test_replicas_the_cluster_cannot_hold_are_refused_up_front(scenario):
    report, workdir = scenario
    assert report["too_small"] == {"exit": 2, "committed": 0}
    assert "the cluster has 4 CPUs" in (workdir / "too-small.log").read_text()


def test_rles_decode_to_the_predictors_masks(scenario, checkpoint, images):
    _, workdir = scenario
    lines = {line["image_id"]: line for line in _shard_lines(workdir / "whole")}
    predictor = Predictor(weights=checkpoint, device="cpu")
    for name in ("000000.png", "000007.png"):
        line = lines[name]
        prediction = predictor(load_image_rgb(images / name), score_threshold=0.0)
        assert (line["height"], line["width"]) == prediction.image_size
        rles = [instance["segmentation"] for instance in line["instances"]]
        assert len(rles) == len(prediction) > 0
        decoded = mask_util.decode(rles).transpose(2, 0, 1).astype(bool)  # [N, H, W]
        assert np.array_equal(decoded, prediction.masks)
        assert [i["category_name"] for i in line["instances"]] == [predictor.class_names[c] for c in prediction.classes]


@pytest.mark.parametrize("out", ["resumed", "node-lost"])
def test_an_interrupted_job_writes_every_image_exactly_once(scenario, out):
    report, workdir = scenario
    lines = _shard_lines(workdir / out)
    errors = _shard_lines(workdir / out, errors=True)
    counts = Counter(line["image_id"] for line in lines + errors)
    assert len(counts) == 42 and set(counts.values()) == {1}, counts.most_common(3)
    assert sorted(e["image_id"] for e in errors) == sorted(CORRUPT)
    whole = {line["image_id"]: line for line in _shard_lines(workdir / "whole")}
    for line in lines:
        _same_answer(line, whole[line["image_id"]])


def _same_answer(got: dict, want: dict) -> None:
    """The same instances: classes and RLE identical, boxes and scores but for their last rounded
    digit. A resumed job pairs the images left into other batches, and a batch's CPU kernels may
    round differently with other batch-mates."""
    assert {k: v for k, v in got.items() if k != "instances"} == {k: v for k, v in want.items() if k != "instances"}
    assert len(got["instances"]) == len(want["instances"])
    for a, b in zip(got["instances"], want["instances"]):
        assert (a["category_id"], a["category_name"], a["segmentation"]) == (
            b["category_id"],
            b["category_name"],
            b["segmentation"],
        )
        assert a["score"] == pytest.approx(b["score"], abs=2e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.011)


def test_the_killed_driver_had_committed_shards_and_resume_skipped_them(scenario):
    report, workdir = scenario
    resumed = report["resumed"]
    assert resumed["killed_while_running"] and resumed["shards_before_kill"] >= 2
    assert resumed["exit"] == 0, ray_namespace.logs(workdir)
    log = (workdir / "resume.log").read_text()
    skipped = int(log.split("skipped (already committed)", 1)[1].split()[0])
    assert skipped >= 4 * resumed["shards_before_kill"] - 2  # a shard holds 4 images (a last one fewer)


def test_a_lost_node_either_finishes_the_job_or_fails_clearly_and_resumes(scenario):
    report, workdir = scenario
    lost = report["node_lost"]
    assert lost["running"] and lost["shards_before"] >= 1
    if lost["exit"] != 0:
        assert "--resume" in (workdir / "node-lost.log").read_text()
        assert lost["resume_exit"] == 0, ray_namespace.logs(workdir)
