"""Every module of minilm and losses imports, and no two import each other, directly or in a circle: a reader can
follow the imports down from any file, and no import order can break (fast_paths, onednn and quantize once did)."""

import ast
import importlib
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("minilm", "losses")


def module_names() -> list:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports_of(name: str, known: set) -> set:
    """The modules of minilm and losses that `name` imports anywhere in it (inside functions too: a deferred
    import still closes a circle)."""
    path = REPO / Path(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(name.split(".")[:-node.level] + [node.module])
            # `from package import module` imports the module; `from module import name` the module itself
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {module for module in found if module in known and module != name}


def find_cycle(graph: dict):
    """A list of modules that import each other in a circle, or None."""
    state = {}  # name -> "open" while on the current path, "done" after

    def visit(name, path):
        state[name] = "open"
        for child in sorted(graph[name]):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child, path + [child])):
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_no_import_cycle():
    names = module_names()
    graph = {name: imports_of(name, set(names)) for name in names}
    assert graph["minilm.onednn"] == {"minilm.swap"}  # the graph sees imports (a check of the check)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("name", module_names())
def test_every_module_imports(name):
    if name.startswith("minilm.kernels."):
        pytest.importorskip("triton")
    importlib.import_module(name)
