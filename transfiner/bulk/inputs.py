"""What ``transfiner predict --engine ray`` reads: INPUTS (files, folders, globs, manifests) -> image locations.

- A location is a local path (kept as given) or a URL of any filesystem fsspec opens (``file://``,
  ``s3://`` with s3fs installed, ...); the same code lists and reads both.
- A manifest is a ``.txt`` file (a location a line; blank lines and ``#`` comments skipped) or a
  ``.json`` list of locations; relative entries are relative to the manifest's folder.
- Folders are searched recursively for image files; folders and globs list in sorted order.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Sequence
from glob import has_magic

import fsspec
from fsspec.core import url_to_fs

IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp"})
MANIFEST_SUFFIXES = frozenset({".json", ".txt"})


class InputError(ValueError):
    """An input that names no image: missing, an empty folder, a glob that matches nothing, a bad manifest."""


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Every image location the inputs name, in the order given, each once."""
    found: list[str] = []
    for item in inputs:
        found.extend(_expand(item, depth=0))
    return list(dict.fromkeys(found))


def read_bytes(location: str) -> bytes:
    """The file at a location (a path or a URL)."""
    with fsspec.open(location, "rb") as file:
        return file.read()


def _suffix(location: str) -> str:
    return posixpath.splitext(location.rstrip("/"))[1].lower()


def _expand(item: str, depth: int) -> list[str]:
    if depth > 8:
        raise InputError(f"{item}: manifests nested more than 8 deep")
    fs, path = url_to_fs(item)
    as_url = "://" in item  # paths found under a URL stay URLs; under a plain path, plain paths

    def located(paths: Iterable[str]) -> list[str]:
        images = sorted(p for p in paths if _suffix(p) in IMAGE_SUFFIXES)
        return [fs.unstrip_protocol(p) if as_url else p for p in images]

    if has_magic(path):
        images = located(p for p in fs.glob(path) if fs.isfile(p))
        if not images:
            raise InputError(f"{item}: matches no image file")
        return images
    if fs.isdir(path):
        images = located(fs.find(path))
        if not images:
            raise InputError(f"{item}: a folder with no image file in it")
        return images
    if not fs.isfile(path):
        raise InputError(f"{item}: not found")
    if _suffix(path) in MANIFEST_SUFFIXES:
        return [image for entry in _manifest_entries(item, fs, path) for image in _expand(entry, depth + 1)]
    return [item]


def _manifest_entries(item: str, fs, path: str) -> list[str]:
    text = fs.cat_file(path).decode("utf-8")
    if _suffix(path) == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{item}: not JSON ({error})") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise InputError(f"{item}: a JSON manifest is a list of paths or URLs")
    else:
        entries = [line.strip() for line in text.splitlines()]
        entries = [line for line in entries if line and not line.startswith("#")]
    folder = item.rstrip("/").rsplit("/", 1)[0] if "/" in item else "."
    return [entry if "://" in entry or entry.startswith("/") else f"{folder}/{entry}" for entry in entries]
