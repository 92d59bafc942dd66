"""INPUTS of a bulk job -> image locations: files, folders, globs, manifests, file:// URLs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import encode, scene
from transfiner.bulk.decode import decode_images
from transfiner.bulk.inputs import InputError, read_bytes, resolve_inputs


@pytest.fixture
def tree(tmp_path):
    """a/1.png, a/2.jpg, a/notes.txt, a/deep/3.png, b/1.png, empty/."""
    for name in ("a/1.png", "a/2.jpg", "a/deep/3.png", "b/1.png"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(scene(32, 48, seed=len(name))))
    (tmp_path / "a" / "notes.txt").write_text("not a manifest of images, and not under a folder's images\n")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_folders_are_searched_recursively_for_images_in_sorted_order(tree):
    assert resolve_inputs([str(tree / "a")]) == [str(tree / p) for p in ("a/1.png", "a/2.jpg", "a/deep/3.png")]


def test_globs_and_files_in_the_order_given_each_once(tree):
    found = resolve_inputs([str(tree / "b/1.png"), str(tree / "a/*.png"), str(tree / "a/1.png")])
    assert found == [str(tree / "b/1.png"), str(tree / "a/1.png")]
    assert resolve_inputs([str(tree / "**/3.png")]) == [str(tree / "a/deep/3.png")]


def test_manifests_list_paths_relative_to_themselves(tree):
    (tree / "list.txt").write_text("# two images\na/2.jpg\n\nb/1.png\n")
    (tree / "list.json").write_text(json.dumps([str(tree / "a/deep"), "a/1.png"]))
    assert resolve_inputs([str(tree / "list.txt")]) == [str(tree / "a/2.jpg"), str(tree / "b/1.png")]
    assert resolve_inputs([str(tree / "list.json")]) == [str(tree / "a/deep/3.png"), str(tree / "a/1.png")]


def test_file_urls_list_and_read_as_urls(tree):
    found = resolve_inputs([f"file://{tree}/b"])
    assert found == [f"file://{tree}/b/1.png"]
    assert read_bytes(found[0]) == (tree / "b/1.png").read_bytes()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("missing.png", "not found"),
        ("empty", "a folder with no image file"),
        ("a/*.gif", "matches no image file"),
    ],
)
def test_inputs_that_name_no_image_are_errors(tree, given, message):
    with pytest.raises(InputError, match=message):
        resolve_inputs([str(tree / given)])


def test_a_bad_json_manifest_is_an_error(tree):
    (tree / "bad.json").write_text('{"images": ["a/1.png"]}')
    with pytest.raises(InputError, match="a list of paths"):
        resolve_inputs([str(tree / "bad.json")])


def test_decoding_marks_unreadable_and_corrupt_files_and_keeps_the_rest(tree):
    (tree / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    paths = [str(tree / "a/1.png"), str(tree / "broken.png"), str(tree / "gone.png")]
    decoded = decode_images({"path": paths, "image_id": ["x", "y", "z"]})
    assert decoded["image"][0].shape == (32, 48, 3) and decoded["error"][0] == ""
    assert decoded["error"][1].startswith("cannot decode: OSError")
    assert decoded["error"][2].startswith("cannot read: FileNotFoundError")
    assert decoded["image_id"] == ["x", "y", "z"]


def test_decode_tasks_import_no_torch():
    """A Ray Data decode task imports its module in a fresh worker: without torch, in a fraction of a second."""
    code = "import sys, transfiner.bulk.decode; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
