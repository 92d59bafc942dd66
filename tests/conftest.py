"""Shared fixtures: tiny, seeded pieces of the real model (no mocks), and the tiny checkpoint the
service tests serve (the servers and helpers themselves are in test_service_support.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from transfiner.model.config import TransfinerConfig, small_config
from transfiner.model.modeling.rcnn import MaskTransfiner

torch.set_num_threads(2)


def tiny_transfiner_config(**overrides) -> TransfinerConfig:
    base = TransfinerConfig(d_model=16, num_heads=4, num_layers=2, dim_feedforward=32, dropout=0.0)
    return dataclasses.replace(base, **overrides)


def random_boxes(generator: torch.Generator, count: int, image_size: int, min_side: float = 6.0) -> torch.Tensor:
    """Boxes of very different sizes (so they land on every FPN level) inside the image."""
    sides = torch.exp(torch.empty(count, 2).uniform_(torch.log(torch.tensor(min_side)).item(),
                                                     torch.log(torch.tensor(image_size * 0.95)).item(),
                                                     generator=generator))
    x0 = torch.rand(count, generator=generator) * (image_size - sides[:, 0])
    y0 = torch.rand(count, generator=generator) * (image_size - sides[:, 1])
    return torch.stack((x0, y0, x0 + sides[:, 0], y0 + sides[:, 1]), dim=1)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The service tests' tiny real checkpoint (``test_service_support.tiny_config``, seeded
    weights), written once for the whole session; tests only read it."""
    from .test_service_support import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint") / "tiny.pth")


@pytest.fixture(scope="session")
def small_model() -> MaskTransfiner:
    """The small preset with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return MaskTransfiner(small_config()).eval()
