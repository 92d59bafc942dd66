"""The built wheel installs one import name, transfiner, with its package data, and works on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support import PACKAGE_FOLDERS, REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the files git tracks or would track: an in-tree build/ folder keeps the
    # modules of earlier builds, which would then ship in the wheel.
    source = tmp_path_factory.mktemp("source")
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)], check=True, timeout=600
    )
    (path,) = out.glob("transfiner-*.whl")
    return path


def source_files(suffixes: tuple[str, ...]) -> set[str]:
    """Every file of the four folders with one of ``suffixes``, as the wheel should name it."""
    names = set()
    for name, folder in PACKAGE_FOLDERS.items():
        for path in (REPO / folder).rglob("*"):
            if path.suffix in suffixes and "__pycache__" not in path.parts:
                names.add("/".join((*name.split("."), *path.relative_to(REPO / folder).parts)))
    return names


@pytest.mark.slow
def test_the_wheel_installs_transfiner_alone_with_every_module_and_its_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["transfiner"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"transfiner"}
    # A sub-package missing from pyproject's list would be left out of the wheel.
    assert {n for n in names if n.endswith(".py")} == source_files((".py",))
    data = {
        "transfiner/model/weights/default_model/model.pth",
        "transfiner/service/static/index.html",
        "transfiner/export/data/tensorrt_onnx_operators.json",
        "transfiner/export/data/graph_operators.json",
    }
    assert data <= names


@pytest.mark.slow
def test_the_public_api_imports_from_a_fresh_environment_holding_the_wheel(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    # The dependencies come from the test environment's site-packages, added as a plain path: its
    # editable install of this repository is a .pth hook, which a plain path does not run.
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    code = (
        "import transfiner, transfiner.model\n"
        "from transfiner import Predictor, load_model\n"
        "from transfiner.model.weights.default import DEFAULT_WEIGHTS\n"
        "assert DEFAULT_WEIGHTS.is_file(), DEFAULT_WEIGHTS\n"
        "print(transfiner.model.__file__)"
    )
    found = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(site / "transfiner")
