"""Build the service's images from docker/Dockerfile.cpu and docker/Dockerfile.gpu.

    make images                                   # both images
    python -m scripts.build_images --image cpu    # one

- Docker where its engine answers, else buildah (as root: `--isolation chroot`, the host's network).
- Bases: the Dockerfiles' official ones. Where one cannot be pulled (no registry access), both
  images build on a local base made from Debian 12 packages with mmdebstrap: Python 3.11 with
  `python` and `pip` on the PATH as in the official image, and this machine's CA bundle, so pip
  inside the build trusts what it trusts here.
- torch for the CPU image from PyTorch's CPU index where it answers, else from pip's default index
  (the CUDA build: larger, the same answers).
- The Dockerfiles keep pip's cache in a cache mount: wheels download once per machine.
- One build at a time per machine (a lock), so a build started in the background and a test that
  needs the image share the work.
- Prints each image's build time and size; writes them to build/images/images.json and .md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.results import markdown_table, write_report

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "images"
LOCK = Path(tempfile.gettempdir()) / "transfiner-images.lock"

LOCAL_BASE = "localhost/transfiner-base:debian12-python3.11"
# What the official python:3.11-slim image sets, and what the Dockerfiles rely on: /usr/sbin (useradd).
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_PACKAGES = "python3.11,python3.11-venv,python3-pip,ca-certificates,netbase,tzdata,passwd"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class BuildError(RuntimeError):
    """A tool the build needs is missing."""


@dataclass(frozen=True)
class ImageSpec:
    """One image: its Dockerfile, tag and the build arguments for the local base."""

    name: str
    dockerfile: str
    tag: str
    local_base_args: dict[str, str]

    @property
    def official_base(self) -> str:
        """The Dockerfile's own default for BASE_IMAGE."""
        return re.search(r"^ARG BASE_IMAGE=(\S+)$", (REPO / self.dockerfile).read_text(), re.MULTILINE).group(1)


IMAGES = {
    "cpu": ImageSpec("cpu", "docker/Dockerfile.cpu", "localhost/transfiner:cpu", {}),
    # The local base's Python, where the official GPU base installs python3.12 with apt.
    "gpu": ImageSpec("gpu", "docker/Dockerfile.gpu", "localhost/transfiner:gpu", {"PYTHON": "python3.11"}),
}


@dataclass
class BuiltImage:
    name: str
    tag: str
    engine: str
    base: str
    build_args: dict[str, str]
    seconds: float
    bytes: int


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


def _quiet(command: list[str]) -> bool:
    """Whether ``command`` succeeds; its output is dropped."""
    return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


class Engine:
    """The few commands the build needs, for Docker or buildah."""

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def find() -> Engine | None:
        if shutil.which("docker") and _quiet(["docker", "info"]):
            return Engine("docker")
        if shutil.which("buildah"):
            return Engine("buildah")
        return None

    def has_image(self, tag: str) -> bool:
        if self.name == "docker":
            return _quiet(["docker", "image", "inspect", tag])
        return _quiet(["buildah", "inspect", "--type", "image", tag])

    def pull(self, image: str) -> bool:
        return self.has_image(image) or _quiet([self.name, "pull", "--quiet", image])

    def build(self, dockerfile: str, tag: str, build_args: dict[str, str]) -> None:
        args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
        if self.name == "docker":
            command = ["docker", "build", *args, "-f", dockerfile, "-t", tag, "."]
            _run(command, cwd=REPO, env=dict(os.environ, DOCKER_BUILDKIT="1"))
            return
        # --format docker keeps HEALTHCHECK (the OCI format has no field for it); --layers caches steps.
        command = ["buildah", "bud", "--layers", "--format", "docker", "--isolation", "chroot", "--network", "host"]
        _run([*command, *args, "-f", dockerfile, "-t", tag, "."], cwd=REPO)

    def remove(self, tags: list[str]) -> None:
        """Removes ``tags`` (those that exist) and the untagged images of cached build steps."""
        present = [tag for tag in tags if self.has_image(tag)]
        if present:  # --force: buildah also removes containers left from them
            _run([self.name, "rmi", "--force", *present], stdout=subprocess.DEVNULL)
        prune = ["docker", "image", "prune", "--force"] if self.name == "docker" else ["buildah", "rmi", "--prune"]
        _run(prune, stdout=subprocess.DEVNULL)

    def size(self, tag: str) -> int:
        if self.name == "docker":
            output = _run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True)
            return int(output.stdout)
        # buildah gives the size in decimal units, three significant digits ("6.3 GB").
        output = _run(["buildah", "images", "--json", tag], capture_output=True, text=True)
        number, unit = json.loads(output.stdout)[0]["size"].split()
        return round(float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit])

    def import_rootfs(self, rootfs: Path, tag: str) -> None:
        """An image of ``rootfs`` (a tar) with the official Python image's PATH and locale."""
        if self.name == "docker":
            changes = ["--change", f"ENV PATH={BASE_PATH}", "--change", "ENV LANG=C.UTF-8"]
            _run(["docker", "import", *changes, "--change", 'CMD ["python3"]', str(rootfs), tag])
            return
        container = _run(["buildah", "from", "scratch"], capture_output=True, text=True).stdout.strip()
        try:
            _run(["buildah", "add", "--quiet", container, str(rootfs), "/"])
            config = ["--env", f"PATH={BASE_PATH}", "--env", "LANG=C.UTF-8", "--cmd", "python3"]
            _run(["buildah", "config", *config, container])
            _run(["buildah", "commit", "--quiet", container, tag], stdout=subprocess.DEVNULL)
        finally:
            _quiet(["buildah", "rm", container])


def make_local_base(engine: Engine) -> None:
    """LOCAL_BASE from Debian 12 packages: what the official python:3.11-slim image offers the
    Dockerfiles (python, pip, venv, useradd), with this machine's CA bundle."""
    if shutil.which("mmdebstrap") is None:
        raise BuildError("no registry access and no mmdebstrap to make a local base: apt-get install mmdebstrap")
    hooks = [
        'ln -s /usr/bin/python3 "$1/usr/local/bin/python"',
        'ln -s /usr/bin/pip3 "$1/usr/local/bin/pip"',
        f'cp {CA_BUNDLE} "$1{CA_BUNDLE}"',
    ]
    with tempfile.TemporaryDirectory(prefix="transfiner-base-") as folder:
        rootfs = Path(folder) / "rootfs.tar"
        command = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}"]
        command += [f"--customize-hook={hook}" for hook in hooks]
        _run([*command, "bookworm", str(rootfs)])
        engine.import_rootfs(rootfs, LOCAL_BASE)


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except OSError:
        return False


def build_args_for(spec: ImageSpec, engine: Engine) -> tuple[str, dict[str, str]]:
    """The base to build on and the build arguments: the Dockerfile's defaults where they work."""
    args: dict[str, str] = {}
    base = spec.official_base
    if not engine.pull(base):
        if not engine.has_image(LOCAL_BASE):
            print(f"{base} cannot be pulled: making the local base {LOCAL_BASE} from Debian packages", flush=True)
            make_local_base(engine)
        base = LOCAL_BASE
        args = {"BASE_IMAGE": LOCAL_BASE, **spec.local_base_args}
    if spec.name == "cpu" and not reachable(TORCH_CPU_INDEX + "/"):
        args["TORCH_INDEX_URL"] = ""  # pip's default index
    return base, args


@contextmanager
def one_build_at_a_time() -> Iterator[None]:
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_image(name: str, engine: Engine | None = None) -> BuiltImage:
    """Builds one image (cached steps are reused); -> what was built, how long it took, its size."""
    engine = engine or Engine.find()
    if engine is None:
        raise BuildError("neither a Docker engine nor buildah: install one (apt-get install buildah)")
    spec = IMAGES[name]
    with one_build_at_a_time():
        base, args = build_args_for(spec, engine)
        start = time.perf_counter()
        engine.build(spec.dockerfile, spec.tag, args)
        seconds = time.perf_counter() - start
        return BuiltImage(name, spec.tag, engine.name, base, args, round(seconds, 1), engine.size(spec.tag))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", choices=sorted(IMAGES), action="append", help="default: every image")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--remove", action="store_true", help="remove the images, the local base and cached steps")
    args = parser.parse_args(argv)
    if args.remove:
        engine = Engine.find()
        if engine is not None:
            with one_build_at_a_time():
                engine.remove([IMAGES[name].tag for name in args.image or sorted(IMAGES)] + [LOCAL_BASE])
        return
    try:
        built = [build_image(name) for name in args.image or sorted(IMAGES)]
    except BuildError as error:
        sys.exit(str(error))
    rows = [
        (
            b.name,
            b.tag,
            b.engine,
            b.base,
            " ".join(f"{k}={v}" for k, v in b.build_args.items()) or "-",
            f"{b.seconds:.0f}",
            f"{b.bytes / 1e9:.2f}",
        )
        for b in built
    ]
    columns = ["image", "tag", "engine", "base", "build args", "build s", "size GB"]
    table = "\n".join(markdown_table(columns, rows, align="lllllrr"))
    print(table)
    write_report(args.out, "images", {"images": [asdict(b) for b in built]}, table)


if __name__ == "__main__":
    main()
