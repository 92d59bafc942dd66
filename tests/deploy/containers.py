"""The service's images, built with scripts/build_images.py and run with buildah as `docker run`
runs them: the image's own entrypoint, user, working directory and environment (plus what a test
adds, as `-e` does), on the host's network (tests bind loopback only).

Without buildah the tests that need an image skip, unless TRANSFINER_REQUIRE_CONTAINERS=1 (set by
.ci/run, which installs buildah and mmdebstrap): then they fail.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from scripts.build_images import BuiltImage, Engine, build_image
from tests.deploy.support import skip_unless_required, wait_http

REQUIRE_CONTAINERS_ENV = "TRANSFINER_REQUIRE_CONTAINERS"
# What buildah needs to run as root inside an unprivileged machine: no namespaces of its own.
RUN_OPTIONS = ["--isolation", "chroot", "--network", "host"]


@functools.cache
def built_image(name: str) -> BuiltImage:
    """The ``name`` image ("cpu" or "gpu"), built once a session (steps already built are reused)."""
    if shutil.which("buildah") is None:
        skip_unless_required("buildah is not installed (apt-get install buildah mmdebstrap)", REQUIRE_CONTAINERS_ENV)
    return build_image(name, Engine("buildah"))


def image_config(tag: str) -> dict:
    """The image's Docker configuration: Entrypoint, Env, User, WorkingDir, Healthcheck."""
    inspected = subprocess.run(["buildah", "inspect", "--type", "image", tag], check=True, capture_output=True)
    return json.loads(inspected.stdout)["Docker"]["config"]


class Container:
    """One container of ``tag`` running its entrypoint, logging to ``log``."""

    def __init__(self, tag: str, log: Path, env: dict[str, str]) -> None:
        self.config = image_config(tag)
        self.log = log
        self.id = Container.create(tag)
        self.env = env
        options = [f"--env={key}={value}" for key, value in env.items()]
        command = ["buildah", "run", *RUN_OPTIONS, *options, self.id, "--", *self.config["Entrypoint"]]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @staticmethod
    def create(tag: str) -> str:
        """A new container of ``tag`` (nothing runs yet); -> its id."""
        created = subprocess.run(["buildah", "from", "--quiet", tag], check=True, capture_output=True, text=True)
        return created.stdout.strip()

    @staticmethod
    def run_once(
        container_id: str, command: list[str], volumes: dict[Path, str] | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """``command`` in the container as the image's user, host folders mounted read-only."""
        options = [f"--volume={host}:{inside}:ro" for host, inside in (volumes or {}).items()]
        options += [f"--env={key}={value}" for key, value in (env or {}).items()]
        return subprocess.run(
            ["buildah", "run", *RUN_OPTIONS, *options, container_id, "--", *command], capture_output=True, text=True
        )

    @staticmethod
    def delete(container_id: str) -> None:
        subprocess.run(["buildah", "rm", container_id], capture_output=True)

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        """``command`` inside the running container (as `docker exec`: the image's user, the
        container's environment)."""
        return Container.run_once(self.id, list(command), env=self.env)

    def healthcheck(self) -> subprocess.CompletedProcess:
        """The image's own HEALTHCHECK command, run inside the container."""
        kind, *command = self.config["Healthcheck"]["Test"]
        assert kind == "CMD", self.config["Healthcheck"]
        return self.exec(*command)

    def wait_ready(self, url: str, timeout: float) -> None:
        wait_http(url + "/health/ready", timeout, self.process, self.log)

    @staticmethod
    def listener(port: int) -> int:
        """The pid of the process listening on ``port``: the entrypoint, PID 1 of a Docker container."""
        sockets = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], check=True, capture_output=True, text=True)
        (pid,) = set(re.findall(r"pid=(\d+)", sockets.stdout))
        return int(pid)

    def stop(self, port: int, timeout: float = 60) -> int:
        """SIGTERM to the entrypoint, as `docker stop` sends to PID 1; -> the container's exit code.
        (Signalling `buildah run` itself would kill the process instead of forwarding the signal.)"""
        if self.process.poll() is None:
            os.kill(Container.listener(port), signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def remove(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        Container.delete(self.id)
