"""Helpers for the service tests (no tests here): a tiny real checkpoint, test images, a real
uvicorn server on a free loopback port, run in a thread of the test process, free ports for
servers in other processes, and /metrics samples."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from transfiner.model.config import ModelConfig, small_config
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.weights.checkpoint import save_checkpoint
from transfiner.service.app import create_app
from transfiner.service.server import uvicorn_config
from transfiner.service.settings import ServiceSettings

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


class ThreadServer:
    """``create_app(settings)`` served by uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, settings: ServiceSettings, **app_args) -> None:
        self.app = create_app(settings, **app_args)
        self.runtime = self.app.state.runtime
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self, ready_timeout: float = 120.0) -> "ThreadServer":
        self._thread.start()
        wait_ready(self.url, ready_timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self._socket.close()


@contextlib.contextmanager
def running(settings: ServiceSettings, **app_args) -> Iterator[ThreadServer]:
    server = ThreadServer(settings, **app_args).start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A loopback port nothing listens on now, for a server in another process (which binds it
    itself; ``ThreadServer`` binds its socket before starting instead)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
