"""A bulk job's output folder: shards committed atomically, resumed exactly, merged into COCO results."""

from __future__ import annotations

import json

import pytest

from transfiner.bulk.shards import OutputError, ShardStore

JOB = {"model": "tiny", "version": "0123456789ab", "score_threshold": 0.0}


def _line(image_id: str, score: float = 0.5) -> dict:
    instance = {"bbox": [1.0, 2.0, 3.0, 4.0], "score": score, "category_id": 7, "category_name": "square"}
    instance["segmentation"] = {"size": [8, 8], "counts": "0"}
    return {"image_id": image_id, "path": f"/data/{image_id}", "height": 8, "width": 8, "instances": [instance]}


def _error(image_id: str) -> dict:
    return {"image_id": image_id, "path": f"/data/{image_id}", "error": "cannot decode: OSError: truncated"}


def test_commits_are_read_back_by_a_resumed_store(tmp_path):
    store = ShardStore(tmp_path, JOB)
    assert store.open(resume=False).image_ids == set()
    store.commit([_line("a"), _line("b")], [_error("c")])
    store.commit([_line("d")], [])
    store.close()
    again = ShardStore(tmp_path, JOB).open(resume=True)
    assert again.image_ids == {"a", "b", "c", "d"} and (again.images, again.failed) == (3, 1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.jsonl", "part-00001.jsonl"]
    assert manifest["job"] == JOB and (manifest["images"], manifest["failed"]) == (3, 1)
    assert [json.loads(x)["image_id"] for x in (tmp_path / "errors.jsonl").read_text().splitlines()] == ["c"]


def test_a_commit_cut_short_leaves_nothing_behind(tmp_path):
    """A driver killed between writing a shard's errors and its results: neither counts."""
    store = ShardStore(tmp_path, JOB)
    store.open(resume=False)
    store.commit([_line("a")], [])
    (tmp_path / "part-00001.errors.jsonl").write_text(json.dumps(_error("b")) + "\n")
    (tmp_path / "part-00001.jsonl.tmp").write_text(json.dumps(_line("c")) + "\n")
    resumed = ShardStore(tmp_path, JOB)
    assert resumed.open(resume=True).image_ids == {"a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.jsonl", "manifest.json", "part-00000.jsonl"]
    resumed.commit([_line("c")], [_error("b")])  # numbered after the last committed shard
    assert (tmp_path / "part-00001.jsonl").exists() and (tmp_path / "part-00001.errors.jsonl").exists()


def test_a_folder_with_results_needs_resume_and_the_same_job(tmp_path):
    store = ShardStore(tmp_path, JOB)
    store.open(resume=False)
    store.commit([_line("a")], [])
    with pytest.raises(OutputError, match="--resume"):
        ShardStore(tmp_path, JOB).open(resume=False)
    with pytest.raises(OutputError, match="differs in score_threshold"):
        ShardStore(tmp_path, {**JOB, "score_threshold": 0.5}).open(resume=True)


def test_coco_results_are_the_committed_instances_without_their_class_names(tmp_path):
    store = ShardStore(tmp_path, JOB)
    store.open(resume=False)
    store.commit([_line("a", 0.9), _line("b", 0.4)], [_error("c")])
    records = store.coco_results()
    assert [(r["image_id"], r["score"]) for r in records] == [("a", 0.9), ("b", 0.4)]
    assert set(records[0]) == {"image_id", "bbox", "score", "category_id", "segmentation"}
