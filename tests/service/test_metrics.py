"""The service's metrics registry."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_no_gpu_metrics_without_a_gpu():
    from transfiner.service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    assert metrics.enable_gpu_metrics() is False
    assert b"transfiner_gpu" not in metrics.render()
