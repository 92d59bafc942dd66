"""Fixtures for the whole suite: tiny, seeded pieces of the real model (no mocks). Plain helpers
are in tests/support.py; each folder's conftest.py holds what its own tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support import write_tiny_checkpoint
from transfiner.model.config import small_config
from transfiner.model.modeling.rcnn import MaskTransfiner

torch.set_num_threads(2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the Docker images run last: .ci/run builds the images in the background
    meanwhile, and those tests then find them built (the build is a lock, not a race)."""
    items.sort(key=lambda item: item.get_closest_marker("container") is not None)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The service tests' tiny real checkpoint (``tests.support.tiny_config``, seeded weights),
    written once for the whole session; tests only read it."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint") / "tiny.pth")


@pytest.fixture(scope="session")
def small_model() -> MaskTransfiner:
    """The small preset with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return MaskTransfiner(small_config()).eval()
