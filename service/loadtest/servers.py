"""Running a server to benchmark: a free loopback port, waiting until it answers ready, and stopping
it with what it started (the benchmark scripts start ``transfiner serve``, or a peer, in a subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# `transfiner serve` in this interpreter, whether or not the console script is on the PATH.
SERVE_COMMAND = (sys.executable, "-m", "transfiner", "serve")


def free_port() -> int:
    """A loopback port nothing listens on now, for a server the caller starts next."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(
    process: subprocess.Popen,
    url: str,
    log: Path,
    timeout: float,
    path: str = "/health/ready",
) -> None:
    """Returns once ``url + path`` answers 200. A server that exits first, or is not ready within
    ``timeout`` seconds, raises ``RuntimeError`` with the end of its ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_process_group(process: subprocess.Popen, timeout: float = 120.0) -> None:
    """SIGTERM to a server started in a session of its own (``start_new_session=True``), then to
    whatever it started that outlived it (Ray's or LitServe's worker processes)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(3)
    process.wait()
