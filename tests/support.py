"""What tests all over the suite share (no tests here): where the repository and the test data
are, the tiny model every service test serves, and the pictures it is shown."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import tomllib
import torch
from PIL import Image

from transfiner.model.config import ModelConfig, small_config
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.weights.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
# Import name -> the folder it installs from, as pyproject.toml's package-dir maps them.
PACKAGE_FOLDERS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"
]

CLASS_NAMES = ("circle", "square")
CATEGORY_IDS = (3, 7)  # sparse on purpose: responses must map contiguous classes to these


def tiny_config() -> ModelConfig:
    """The small preset shrunk for CPU tests: 96-128 px inputs, 10 detections, few refined cells."""
    cfg = small_config(CLASS_NAMES, CATEGORY_IDS)
    return dataclasses.replace(
        cfg,
        input=dataclasses.replace(cfg.input, min_size_test=96, max_size_test=128),
        rpn=dataclasses.replace(cfg.rpn, pre_nms_topk_test=200, post_nms_topk_test=50),
        roi_heads=dataclasses.replace(cfg.roi_heads, detections_per_image=10),
        transfiner=dataclasses.replace(cfg.transfiner, max_cells=(64, 16, 4)),
    )


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, MaskTransfiner(tiny_config()).eval())
    return path


def scene(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A small RGB picture with a few coloured shapes (something for the model to find)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), rng.integers(0, 60, size=3), dtype=np.uint8)
    img[height // 5 : height // 2, width // 6 : width // 2] = (200, 80, 40)
    yy, xx = np.mgrid[:height, :width]
    disk = (yy - 0.65 * height) ** 2 + (xx - 0.7 * width) ** 2 < (0.2 * height) ** 2
    img[disk] = (30, 170, 220)
    return img + rng.integers(0, 20, size=img.shape, dtype=np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **save_args)
    return buffer.getvalue()
