"""Packages only look down: cli -> service and bulk -> export -> model; the network below the rest of model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import PACKAGE_FOLDERS, REPO

# Each package and the project packages it must never import, at module level or inside functions.
FORBIDDEN = {
    "transfiner.model": ("transfiner.export", "transfiner.service", "transfiner.cli"),
    "transfiner.export": ("transfiner.service", "transfiner.cli"),
    "transfiner.service": ("transfiner.cli", "transfiner.bulk"),
    "transfiner.bulk": ("transfiner.cli", "transfiner.service"),
    # The network knows nothing of inference, weights files, data sets, training or evaluation.
    "transfiner.model.modeling": (
        "transfiner.model.inference",
        "transfiner.model.weights",
        "transfiner.model.datasets",
        "transfiner.model.training",
        "transfiner.model.evaluation",
    ),
    # What is on disk knows nothing of what is loaded from it, nor of HTTP.
    "transfiner.service.repository": ("transfiner.service.engine", "transfiner.service.routes"),
    # Evaluation is used by training, never the reverse.
    "transfiner.model.evaluation": ("transfiner.model.training",),
}


def project_modules(root: Path, folders: dict[str, str]) -> dict[str, Path]:
    """Import name -> source file of every module of the project."""
    modules: dict[str, Path] = {}
    for name, folder in folders.items():
        for path in (root / folder).rglob("*.py"):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((name, *parts))] = path
    return modules


def imported_modules(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


MODULES = project_modules(REPO, PACKAGE_FOLDERS)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_only_import_downwards(package):
    files = {name: path for name, path in MODULES.items() if within(name, package)}
    assert files, f"no sources found for {package}"
    upward = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for name, path in sorted(files.items())
        for line, module in imported_modules(name, path)
        if any(within(module, forbidden) for forbidden in FORBIDDEN[package])
    ]
    assert not upward, "\n".join(upward)


def test_only_the_command_line_parses_arguments():
    parsers = [
        f"{path.relative_to(REPO)}:{line}"
        for name, path in sorted(MODULES.items())
        if not within(name, "transfiner.cli")
        for line, module in imported_modules(name, path)
        if module.split(".")[0] == "argparse"
    ]
    assert not parsers, "argparse outside transfiner.cli:\n" + "\n".join(parsers)


def test_the_layering_check_sees_relative_imports_inside_functions(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    source = tmp_path / "pkg" / "sub" / "m.py"
    source.write_text("def f():\n    from ..service import main\n    import pkg.export.backends\n")
    assert imported_modules("pkg.sub.m", source) == [(2, "pkg.service.main"), (3, "pkg.export.backends")]


def module_imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (``from pkg import name`` counts
    ``pkg.name`` when that is a module, else ``pkg``)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, module in imported_modules(name, path):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module:
                targets.add(module)
        graph[name] = targets - {name}
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
    graph = module_imports(MODULES)
    assert len(graph) > 40
    assert import_cycles(graph) == []


def test_the_library_never_imports_the_public_api():
    # transfiner/__init__.py imports the library; the library importing it back would be a cycle.
    graph = module_imports(MODULES)
    users = sorted(name for name, targets in graph.items() if "transfiner" in targets)
    assert users == []


def test_the_cycle_check_finds_a_cycle_held_apart_by_an_import_inside_a_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import g\n")
    (tmp_path / "pkg" / "b.py").write_text("def g():\n    from pkg import a\n")
    (tmp_path / "pkg" / "c.py").write_text("from pkg.a import g\n")
    graph = module_imports(project_modules(tmp_path, {"pkg": "pkg"}))
    assert graph["pkg.c"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]
