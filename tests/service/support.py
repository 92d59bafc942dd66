"""Helpers for the service tests (no tests here): a real uvicorn server on a free loopback port,
run in a thread of the test process, free ports for servers in other processes (the load test's
own ``free_port``), readiness polling, and /metrics samples. The tiny checkpoint and the test
pictures are in tests/support.py."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from transfiner.service.app import create_app
from transfiner.service.loadtest.servers import free_port
from transfiner.service.server import ServiceServer, uvicorn_config
from transfiner.service.settings import ServiceSettings

__all__ = ["ThreadServer", "assert_same", "free_port", "metric", "running", "wait_ready"]


class ThreadServer:
    """``create_app(settings)`` served by uvicorn on 127.0.0.1:<free port> in a daemon thread;
    with ``grpc=True`` also the gRPC server (``ServiceServer``) on another free loopback port,
    ``grpc_target``, else none (the settings' default port would clash between servers)."""

    def __init__(self, settings: ServiceSettings, *, grpc: bool = False, **app_args) -> None:
        settings = settings.model_copy(update={"grpc_port": free_port() if grpc else 0})
        self.grpc_target = f"127.0.0.1:{settings.grpc_port}" if grpc else None
        self.app = create_app(settings, **app_args)
        self.runtime = self.app.state.runtime
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = ServiceServer(uvicorn_config(self.app, settings, log_level="warning"), self.runtime)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self, ready_timeout: float = 120.0) -> ThreadServer:
        self._thread.start()
        wait_ready(self.url, ready_timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self._socket.close()


@contextlib.contextmanager
def running(settings: ServiceSettings, **app_args) -> Iterator[ThreadServer]:
    """A started ``ThreadServer`` (``grpc=True``: with gRPC), stopped at the end."""
    server = ThreadServer(settings, **app_args).start()
    try:
        yield server
    finally:
        server.stop()


def wait_ready(url: str, timeout: float) -> list[int]:
    """Polls /health/ready until 200; returns every status seen (None for refused connections)."""
    seen: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = httpx.get(url + "/health/ready", timeout=5).status_code
        except httpx.TransportError:
            status = None
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout} s (saw {seen})")


def metric(url: str, metric_name: str, **labels: str) -> float:
    """The sum of the samples called ``metric_name`` (``_total``, ``_count``... included) on
    ``url``'s /metrics whose labels include ``labels``, read with Prometheus' own text parser."""
    text = httpx.get(url + "/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric_name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def assert_same(instances: list[dict], expected: list[dict], score_tolerance: float = 0.0) -> None:
    """Masks to the byte; scores and boxes exactly, or within ``score_tolerance`` for an image
    that shared its forward pass (a batched convolution may round the last bit of a float
    differently from a single image's, which can move the fifth decimal of a score)."""
    assert len(instances) == len(expected) > 0
    for got, want in zip(instances, expected):
        assert got["segmentation"] == want["segmentation"]
        assert got["category_id"] == want["category_id"]
        assert got["score"] == pytest.approx(want["score"], abs=score_tolerance, rel=0)
        assert got["bbox"] == pytest.approx(want["bbox"], abs=100 * score_tolerance, rel=0)
