"""The package's shape: imports point one way, private names stay home, units fit on a screen.

Late imports inside functions count as imports: one placed there to dodge a cycle still is one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
#: Units allowed past the limits, each with its reason.
EXCEPTIONS: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every distill import in the file."""
    out: list[tuple[str, str | None]] = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names if alias.name.startswith("distill")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            if base.startswith("distill"):
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    out.append((child, None) if child in MODULES else (base, alias.name))
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the modules importing it runs: the module itself and, since Python runs a
    package's ``__init__`` first, every subpackage above it (not the root package, whose
    ``__init__`` is the public surface and imports the orchestrators)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _ in _imports(name, path):
            parts = target.split(".")
            for end in range(2, len(parts) + 1):
                above = ".".join(parts[:end])
                if above in MODULES and above != name and not name.startswith(above + "."):
                    graph[name].add(above)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                # A package's __init__ re-exporting its own children is not a cycle of design.
                top = min(component, key=len)
                if len(component) > 1 and not all(m.startswith(top) for m in component):
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_private_name_is_imported_from_another_module():
    crossing = [f"{name} imports {target}.{taken}" for name, path in MODULES.items()
                for target, taken in _imports(name, path)
                if taken and taken.startswith("_") and not taken.startswith("__") and target != name]
    assert crossing == []


def test_files_fit_the_limit():
    long = [f"{path.relative_to(PACKAGE.parent)} ({n})" for path in MODULES.values()
            if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES and path.name not in EXCEPTIONS]
    assert long == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_fit_on_a_screen(name):
    tree = ast.parse(MODULES[name].read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and f"{name}:{node.name}" not in EXCEPTIONS]
    assert long == []
