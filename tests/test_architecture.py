"""The house as it is built: no import circle among minild's modules (function-level imports
included, ``if TYPE_CHECKING:`` imports aside), the wings import one way, and the top level stays small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minild"

# Which wings each wing may import (the core is every module at the package's top level).
# cli is the one consumer of everything; nothing imports it.
ALLOWED = {
    "core": {"core"},
    "training": {"core", "training"},
    "pipeline": {"core", "training", "pipeline"},
    "evaluation": {"core", "training", "pipeline", "evaluation"},
    "lab": {"core", "pipeline", "lab"},
    "testing": {"core", "pipeline", "testing"},
    "cli": {"core", "training", "pipeline", "evaluation", "lab", "cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_modules(name: str, path: Path) -> set[str]:
    """The minild modules that ``name`` imports anywhere in its body, TYPE_CHECKING blocks aside."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if is_type_checking_block(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    # Importing minild.wing.module runs minild/wing/__init__.py first (the root package's own
    # __init__ is left out: it only re-exports, and its one wing import is a lazy attribute).
    # A module inside the wing is imported after that __init__ has started, so it adds no edge.
    own_wing = ".".join(name.split(".")[:2])
    found |= {".".join(module.split(".")[:2]) for module in found if module.count(".") >= 2} - {own_wing}
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return parts[1] if len(parts) > 2 else "core"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_import_graph_sees_the_known_edges():
    assert "minild.plugins" in GRAPH["minild.pipeline.pipeline"]
    assert "minild.training.trainer" in GRAPH["minild.pipeline.pipeline"]
    assert "minild.pipeline" in GRAPH["minild"]  # the lazy ``minild.Pipeline``, inside a function
    assert "minild.training" in GRAPH["minild.pipeline.pipeline"]  # a wing's __init__ runs first
    assert "minild.training.trainer" not in GRAPH["minild.training.checkpoint"]  # a TYPE_CHECKING import


def test_find_cycle_finds_a_circle_through_function_level_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_among_minild_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " → ".join(cycle)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_wings_import_one_way(module):
    if module == "minild":
        return  # the public API re-exports from the wings
    source = wing(module)
    wrong = sorted(target for target in GRAPH[module] if target != "minild" and wing(target) not in ALLOWED[source])
    assert not wrong, f"{module} ({source}) imports {wrong}; the {source} wing may import {sorted(ALLOWED[source])}"


def test_nothing_imports_the_cli():
    importers = sorted(name for name, targets in GRAPH.items()
                       if wing(name) != "cli" and any(wing(target) == "cli" for target in targets))
    assert not importers


def test_the_top_level_holds_the_core_only():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 12, f"{len(top)} modules at minild/'s top level: {top}"
