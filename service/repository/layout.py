"""What a model repository folder holds: ``DIR/NAME/VERSION/`` with a checkpoint or an export folder.

- ``NAME``: letters, digits, ``_ . -``; ``VERSION``: a positive integer (as Triton's repository),
  so "the newest" means the largest number.
- A version folder holds either a ``transfiner export`` (its ``metadata.json`` and model file) or
  exactly one checkpoint file (``.pth``, ``.pt`` or ``.pkl``).
- ``signature`` changes whenever a version's files change, so a poll can tell a version that was
  replaced in place (or finished copying) from one it has already seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from transfiner.service.repository.config import ConfigError, ModelFileConfig, read_model_config

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# ASCII digits: str.isdigit() also takes "³" (int() raises) and "٣" (int() reads 3).
VERSION_PATTERN = re.compile(r"[0-9]+")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pkl")


class RepositoryError(ValueError):
    """The repository folder itself cannot be used (missing, not a folder)."""


@dataclass
class ModelFolder:
    """One model's folder: its versions on disk and its configuration (or why it has none)."""

    name: str
    versions: dict[int, Path] = field(default_factory=dict)  # version -> its folder
    config: ModelFileConfig | None = None
    error: str | None = None  # a bad config.yaml: the model is not served, the others are

    def wanted(self) -> list[int]:
        """The versions its policy serves, newest first (none while its config is bad)."""
        if self.config is None:
            return []
        return self.config.version_policy.select(list(self.versions))


def scan_repository(root: Path) -> dict[str, ModelFolder]:
    """Every model folder of ``root`` by name (folders with other names are ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"the model repository {root} is not a folder")
    models: dict[str, ModelFolder] = {}
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not NAME_PATTERN.fullmatch(folder.name):
            continue
        model = ModelFolder(folder.name)
        model.versions = {
            int(child.name): child
            for child in folder.iterdir()
            if child.is_dir() and VERSION_PATTERN.fullmatch(child.name) and int(child.name) > 0
        }
        try:
            model.config = read_model_config(folder)
        except ConfigError as error:
            model.error = str(error)
        models[model.name] = model
    return models


def version_model_path(folder: Path) -> Path:
    """What ``--model`` would name for a version folder: the folder itself for an export, else its
    one checkpoint file; raises ``ValueError`` saying what the folder lacks."""
    if (folder / "metadata.json").is_file():
        return folder
    checkpoints = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if len(checkpoints) != 1:
        found = ", ".join(p.name for p in checkpoints) or "none"
        raise ValueError(
            f"{folder} must hold one checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) or a `transfiner export` "
            f"folder's files; found checkpoints: {found}"
        )
    return checkpoints[0]


def signature(folder: Path) -> tuple:
    """The names, sizes and modification times of the files under ``folder`` (raises ``OSError``
    when it changes while it is read: the next poll looks again)."""
    entries = []
    for path in folder.rglob("*"):
        stat = path.stat()
        entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))
