"""The package's layout: its folders depend on each other in one direction only."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import selfalign

PACKAGE = Path(selfalign.__file__).parent
REGISTERED = re.compile(r"selfalign(\.\w+)+:\w+")  # a registry entry, e.g. "selfalign.backends.scripted:create"


def _part(module: str) -> str:
    """selfalign.judging.probe -> judging; selfalign.quality -> quality (a top-level module is a part of its own)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "selfalign"


def _absolute(node: ast.ImportFrom, module: str) -> str:
    """The module a relative import (`from ..data import jsonl`) names, from the importing module's own name
    (a package's is its `__init__` module's)."""
    package = module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, dict[str, str]]:
    """part -> {part it imports: a file where it does}, counting imports inside functions too (a lazy import is
    still a dependency), relative imports, and modules named in a registry as "selfalign.module:attribute" (imported
    by name when used); the entry point __main__ is left out."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__main__.py":
            continue
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        source = _part(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                name = (node.module or "") if node.level == 0 else _absolute(node, module)
                targets = [name] if name.startswith("selfalign.") else []
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("selfalign.")]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and REGISTERED.fullmatch(node.value):
                targets = [node.value.partition(":")[0]]
            else:
                continue
            for target in targets:
                if _part(target) != source:
                    graph[source].setdefault(_part(target), str(path.relative_to(PACKAGE)))
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the graph as a list of parts, or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for neighbour in graph.get(node, {}):
            if state.get(neighbour) == "open":
                return stack[stack.index(neighbour) :] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in list(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_cycle_between_the_package_folders():
    graph = import_graph()
    cycle = find_cycle(graph)
    where = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle: " + "; ".join(where)


def test_models_and_backends_do_not_import_each_other_both_ways():
    graph = import_graph()
    assert "backends" not in graph.get("models", {}), graph["models"]


def test_relative_and_registered_imports_are_resolved():
    tree = ast.parse("from ..data import jsonl\nfrom . import base\n")
    relative, sibling = tree.body
    assert _absolute(relative, "selfalign.pipeline.stages") == "selfalign.data"
    assert _absolute(sibling, "selfalign.backends.__init__") == "selfalign.backends"
    assert REGISTERED.fullmatch("selfalign.backends.scripted:create_scripted_backend")
    assert not REGISTERED.fullmatch("selfalign.backends.scripted")


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ""}, "b": {}, "c": {"a": ""}}) is None
