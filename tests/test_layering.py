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


def module_imports(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (at module level or inside
    functions; relative imports resolved; ``from pkg import name`` counts ``pkg.name`` when that
    is a module, else ``pkg``)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] if node.level else [])
                module = ".".join(p for p in (base, node.module or "") if p) if node.level else node.module or ""
                for alias in node.names:
                    child = f"{module}.{alias.name}"
                    targets.add(child if child in modules else module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    graph = module_imports(ROOT, ("model", "export", "service", "transfiner"))
    assert len(graph) > 40
    assert import_cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_held_apart_by_an_import_inside_a_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import g\n")
    (tmp_path / "pkg" / "b.py").write_text("def g():\n    from pkg import a\n")
    (tmp_path / "pkg" / "c.py").write_text("from pkg.a import g\n")
    graph = module_imports(tmp_path, ("pkg",))
    assert graph["pkg.c"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]
