"""``transfiner predict``'s engines: what each accepts, and the errors a bulk job gives before Ray starts."""

from __future__ import annotations

import json

import pytest

from tests.support import encode, scene
from transfiner.cli.main import main


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(scene(32, 48)))
    return path


@pytest.mark.parametrize("flags", [["--resume"], ["--replicas", "2"], ["--coco-results", "x.json"]])
def test_the_local_engine_refuses_the_bulk_jobs_flags(tmp_path, image, capsys, flags):
    assert main(["predict", str(image), "--out", str(tmp_path / "r.json"), *flags]) == 2
    assert f"{flags[0]}: only with --engine ray" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "2", "--max-replicas", "3"], "not both"),
        (["--min-replicas", "3", "--max-replicas", "2"], "may not exceed"),
        (["--replica-cpus", "0"], "--replica-cpus must be above 0"),
        (["--replicas", "0"], "--replicas must be at least 1"),
    ],
)
def test_bad_scaling_is_refused_before_ray_starts(tmp_path, image, capsys, flags, message):
    assert main(["predict", str(image), "--engine", "ray", "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_inputs_that_name_nothing_are_refused_before_ray_starts(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "*.png"), "--engine", "ray", "--out", str(tmp_path / "out")]) == 2
    assert "matches no image file" in capsys.readouterr().err


def test_a_folder_with_another_jobs_results_is_refused(tmp_path, image, capsys, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.jsonl").write_text(json.dumps({"image_id": "a.png", "instances": []}) + "\n")
    command = ["predict", str(image), "--engine", "ray", "--model", str(checkpoint), "--out", str(out)]
    assert main(command) == 2
    assert "add --resume to continue it" in capsys.readouterr().err
