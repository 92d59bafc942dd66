"""Model repositories for the tests (no tests here): folders of real checkpoints, written the way
an operator would (a version is copied beside the repository, then renamed into it)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from tests.support import tiny_config, write_tiny_checkpoint
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.weights.checkpoint import save_checkpoint

ANIMALS = ("cat", "dog", "bird")


def write_animal_checkpoint(path: Path, seed: int = 5) -> Path:
    """A second tiny model with other classes (three, with other ids) and other weights."""
    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg,
        class_names=ANIMALS,
        category_ids=(11, 12, 15),
        roi_heads=dataclasses.replace(cfg.roi_heads, num_classes=len(ANIMALS)),
    )
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, MaskTransfiner(cfg).eval())
    return path


def add_version(root: Path, name: str, version: int, checkpoint: Path | None = None, seed: int = 0) -> Path:
    """``root/name/version/model.pth`` (a copy of ``checkpoint``, or tiny weights of ``seed``), made
    beside the repository and renamed into it, so a poll never sees half a version."""
    staging = root.parent / f".staging-{name}-{version}"
    staging.mkdir(parents=True)
    if checkpoint is not None:
        shutil.copy(checkpoint, staging / "model.pth")
    else:
        write_tiny_checkpoint(staging / "model.pth", seed=seed)
    target = root / name / str(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, target)
    return target
