"""The service's settings: the environment, the defaults resolved for the device, and the limits
that must fit together."""

from __future__ import annotations

import pytest
import torch

from transfiner.service.engine.loading import max_batch_size_for, uses_worker_process
from transfiner.service.settings import ServiceSettings


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("TRANSFINER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TRANSFINER_API_KEY", "abc")
    monkeypatch.setenv("TRANSFINER_HOST", "0.0.0.0")
    settings = ServiceSettings()
    assert (settings.max_batch_size, settings.api_key.get_secret_value(), settings.host) == (7, "abc", "0.0.0.0")
    assert "abc" not in repr(settings)  # the key never lands in logs
    assert ServiceSettings(max_batch_size=2).max_batch_size == 2  # explicit values beat the environment
    monkeypatch.setenv("TRANSFINER_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        ServiceSettings()


def test_worker_process_by_default_on_cuda_only(monkeypatch):
    """Unset, the model worker gets a process of its own where its device is a GPU; the
    environment and explicit values decide otherwise; the runtime holds the resolved value."""
    from transfiner.service.engine.runtime import ServiceRuntime

    assert uses_worker_process(None, "cpu", None) is False
    assert uses_worker_process(None, "auto", 2) is torch.cuda.is_available()
    assert uses_worker_process(True, "cpu", None) is True
    assert uses_worker_process(False, "auto", None) is False
    monkeypatch.setenv("TRANSFINER_WORKER_PROCESS", "false")
    assert ServiceSettings().worker_process is False
    monkeypatch.delenv("TRANSFINER_WORKER_PROCESS")
    assert ServiceSettings().worker_process is None
    assert ServiceRuntime(ServiceSettings(device="cpu")).settings.worker_process is False


def test_max_batch_size_by_default_8_on_gpus_4_on_the_cpu(monkeypatch):
    """Unset, a batch holds 8 images where a model worker is on a GPU and 4 on the CPU; the
    environment and explicit values decide otherwise; the runtime holds the resolved value."""
    from transfiner.service.engine.runtime import ServiceRuntime

    assert max_batch_size_for(None, "cpu", None) == 4
    assert max_batch_size_for(None, "cuda", None) == 8  # told to use a GPU, whether or not one is here
    assert max_batch_size_for(None, "auto", 2) == (8 if torch.cuda.is_available() else 4)
    assert max_batch_size_for(3, "cuda", None) == 3
    assert ServiceSettings().max_batch_size is None
    runtime = ServiceRuntime(ServiceSettings(device="cpu", workers=2))
    assert runtime.settings.max_batch_size == 4
    monkeypatch.setenv("TRANSFINER_MAX_BATCH_SIZE", "16")
    assert ServiceRuntime(ServiceSettings(device="cuda")).settings.max_batch_size == 16


def test_a_body_budget_smaller_than_one_body_is_refused():
    """Else an upload of an allowed size would get 503 memory_budget for ever."""
    with pytest.raises(ValueError, match="max_body_bytes_total must be at least max_body_bytes"):
        ServiceSettings(max_body_bytes=200_000, max_body_bytes_total=100_000)
    assert ServiceSettings(max_body_bytes=200_000, max_body_bytes_total=200_000).max_body_bytes_total == 200_000


def test_thread_pools_default_to_the_cores(monkeypatch):
    from transfiner.service.settings import available_cores

    settings = ServiceSettings()
    assert settings.decode_threads == settings.postprocess_threads == available_cores() >= 1
    monkeypatch.setenv("TRANSFINER_DECODE_THREADS", "3")
    assert (ServiceSettings().decode_threads, ServiceSettings(postprocess_threads=5).postprocess_threads) == (3, 5)


def test_grpc_needs_a_port_of_its_own_and_defaults_to_the_body_limit():
    with pytest.raises(ValueError, match="grpc_port and port are both 9000"):
        ServiceSettings(port=9000, grpc_port=9000)
    assert ServiceSettings(port=0, grpc_port=0).grpc_port == 0  # 0 and 0: any free port, and no gRPC
    settings = ServiceSettings(max_body_bytes=4096)
    assert settings.grpc_message_bytes == 4096
    assert ServiceSettings(max_body_bytes=4096, grpc_max_message_bytes=2048).grpc_message_bytes == 2048
