"""What the service tests share: the Predictor of the tiny checkpoint they serve, to compare the
service's answers with. The servers and their helpers are in tests/service/support.py."""

from __future__ import annotations

import pytest

from transfiner.model.inference.predictor import Predictor, load_predictor


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return load_predictor(checkpoint, None, "cpu")
