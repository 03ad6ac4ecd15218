"""The rules of the house (docs/architecture.md), checked on the code itself.

The import graph is read from the sources (every ``import`` statement, also
those inside functions; ``if TYPE_CHECKING:`` blocks excluded): no module
imports from a layer above its own, the two paths do not import each other,
and there is no circle. The loader is a facade that never asks which path it
runs on.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "zarrdali"

# Lowest first: a module may import from its own layer and the layers below.
LAYERS: list[set[str]] = [
    {"errors", "trace"},
    {"io"},
    {"store"},
    {"sampling"},
    {"batch"},
    {"cpu", "gpu"},
    {"paths", "options", "prep", "sample_data", "sample_wb2"},
    {"lifetime", "loader"},
    {"bench", "cli", "__main__", "__init__"},
]
# Parts of one layer that must not import each other.
SIBLINGS = [{"cpu", "gpu"}]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def room(module: str) -> str:
    """The package or top-level module a module belongs to (``zarrdali.cpu.ring`` -> ``cpu``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{module}: relative import (the house uses absolute ones)"
                if node.module and node.module.split(".")[0] == "zarrdali":
                    for alias in node.names:
                        full = f"{node.module}.{alias.name}"
                        targets.append(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "zarrdali"]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    graph[module].add(target)
    return graph


def layer_of(module: str) -> int:
    name = room(module)
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"{module} belongs to no layer: add {name!r} to LAYERS")


GRAPH = import_graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_no_module_imports_from_a_layer_above_it():
    upward = [
        f"{src} -> {dst}"
        for src, targets in GRAPH.items()
        for dst in targets
        if layer_of(dst) > layer_of(src)
    ]
    assert upward == []


def test_the_paths_do_not_import_each_other():
    crossing = [
        f"{src} -> {dst}"
        for src, targets in GRAPH.items()
        for dst in targets
        for pair in SIBLINGS
        if room(src) in pair and room(dst) in pair and room(src) != room(dst)
    ]
    assert crossing == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_the_checks_can_fail():
    """The search finds a circle and the layer rule an upward arrow when there is one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("zarrdali.loader") > layer_of("zarrdali.cpu.ring")


def test_layers_name_every_room_that_exists():
    rooms = {room(m) for m in GRAPH}
    named = set().union(*LAYERS)
    assert rooms <= named
    assert {"sampling", "store", "io", "batch", "cpu", "gpu"} <= rooms


LOADER = (PACKAGE / "loader.py").read_text()


@pytest.mark.parametrize(
    "probe",
    [
        r"getattr\((self\.)?backend",
        r"device\s*==",
        r"device\s*!=",
        r"dali_device",
        r"host_ring",
        r"finishes_in_gather",
        r"isinstance\([^)]*Backend",
    ],
)
def test_the_loader_never_asks_which_path_it_runs_on(probe):
    assert re.search(probe, LOADER) is None, f"loader.py probes its backend: {probe}"


def test_the_loader_imports_no_path_module_but_through_the_contract():
    """The loader reaches the GPU path only through paths.py (a backend made
    there) and the Backend contract; it imports nothing from gpu/."""
    assert not any(room(dst) == "gpu" for dst in GRAPH["zarrdali.loader"])
