"""A serving process keeps the memory an image freed for the next image (``service.engine.host_memory``).

Through the real ``transfiner serve`` in its own process, its model in a worker process: once
warm, answering more 1333x800 uploads must not make the server's process fault its buffers in
again, page by page, for each image, as it does when told not to keep freed memory (glibc's
defaults: a few thousand pages a request).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.service.support import free_port, wait_ready
from tests.support import REPO, encode, scene
from transfiner.service.engine import host_memory
from transfiner.service.engine.runtime import keeps_freed_memory
from transfiner.service.loadtest.servers import SERVE_COMMAND
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(300)

# 4 KB pages of one decoded 1333x800 RGB image; an upload passes through several such buffers.
PAGES_PER_IMAGE = 1333 * 800 * 3 // 4096


def minor_faults(pid: int) -> int:
    """Page faults a process has taken that needed no disk read (Linux ``/proc``)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def faults_per_request(checkpoint: Path, log: Path, **env: str) -> float:
    """Page faults of the server's process per answered 1333x800 PNG, once warm, behind
    ``transfiner serve`` with its model in a worker process (so that the server's process only
    receives, decodes and answers)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *SERVE_COMMAND,
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
        "--port",
        str(port),
        "--grpc-port",
        "0",
        "--worker-process",
        "--max-batch-size",
        "4",
        "--log-level",
        "warning",
    ]
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            env={**os.environ, "TRANSFINER_TORCH_THREADS": "1", **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    uploads = [encode(scene(800, 1333, seed=seed)) for seed in range(4)]

    def answer(index: int) -> int:
        return httpx.post(url + "/v1/segment", content=uploads[index % 4], timeout=120).status_code

    try:
        wait_ready(url, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert set(pool.map(answer, range(8))) == {200}  # warm-up
            before = minor_faults(process.pid)
            assert set(pool.map(answer, range(24))) == {200}
            return (minor_faults(process.pid) - before) / 24
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_a_warm_server_does_not_fault_in_each_uploads_buffers_again(checkpoint, tmp_path):
    kept = faults_per_request(checkpoint, tmp_path / "kept.log")  # the default with a worker process
    not_kept = faults_per_request(checkpoint, tmp_path / "not-kept.log", TRANSFINER_KEEP_FREED_MEMORY="false")
    assert kept < PAGES_PER_IMAGE / 4 < PAGES_PER_IMAGE < not_kept


def test_freed_memory_is_kept_by_default_only_without_a_cpu_model_in_the_servers_process():
    def keeps(**fields) -> bool:
        return keeps_freed_memory(ServiceSettings(device="cpu", **fields))

    assert keeps(worker_process=True) and not keeps(worker_process=False)
    assert keeps(worker_process=False, keep_freed_memory=True)
    assert not keeps(worker_process=True, keep_freed_memory=False)


def test_glibc_settings_given_by_the_operator_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert host_memory.keep_freed_memory_for_reuse() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert host_memory.keep_freed_memory_for_reuse() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert host_memory.keep_freed_memory_for_reuse() is True  # glibc: mallopt takes both settings
