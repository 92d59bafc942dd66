"""Packages only look down: transfiner (the command) -> service -> export -> model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package and the project packages it must never import, at module level or inside functions.
FORBIDDEN = {
    "model": {"export", "service", "transfiner"},
    "export": {"service", "transfiner"},
    "service": {"transfiner"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_only_import_downwards(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found for {package}"
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in imported_packages(path)
        if name in FORBIDDEN[package]
    ]
    assert not upward, "\n".join(upward)


def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from service.cli import main\n    import export.runtimes\n")
    assert imported_packages(source) == [(2, "service"), (3, "export")]
