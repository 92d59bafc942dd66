"""Running a Ray cluster scenario in a network namespace with nothing but loopback (no tests here).

Ray binds some of its ports to every interface (``*:port``), and tests may only send traffic on
loopback: a scenario module runs as ``python -m MODULE ARGS`` under ``unshare --net`` (as root),
with its own ``ray.cluster_utils.Cluster`` inside. Without root, ``unshare``, ``ip`` or Ray the
tests skip, unless TRANSFINER_REQUIRE_RAY=1 (.ci/run sets it), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO

REQUIRE_ENV = "TRANSFINER_REQUIRE_RAY"


def missing() -> str | None:
    """Why a scenario cannot run here, or None."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as error:
        return f"Ray is not installed ({error})"
    if os.geteuid() != 0:
        return "creating a network namespace (unshare -n) needs root"
    for tool in ("unshare", "ip", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def require() -> None:
    """Skips the test where a scenario cannot run (fails it where TRANSFINER_REQUIRE_RAY=1)."""
    reason = missing()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires the Ray cluster tests to run")
        pytest.skip(reason)


def wait_for(predicate, timeout: float, step: float = 0.2):
    """``predicate()``'s first true value, polled every ``step`` s; None after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def logs(workdir: Path) -> str:
    """The tail of every log the scenario left in its folder."""
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(workdir.glob("*.log")))


def run_scenario(module: str, workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module workdir args...`` in a loopback-only namespace; fails the test with the
    scenario's output and logs if it times out or exits non-zero."""
    # The namespace's loopback starts down; exec keeps the scenario the namespace's only process tree.
    command = [f'ip link set lo up && exec "$0" -m {module} "$@"', sys.executable, str(workdir), *args]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(
            ["unshare", "--net", "sh", "-c", *command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{module} did not finish in {timeout:g} s:\n{(error.stderr or '')[-3000:]}\n{logs(workdir)}")
    if done.returncode != 0:
        pytest.fail(f"{module} failed ({done.returncode}):\n{done.stderr[-4000:]}\n{logs(workdir)}")
    return done
