"""The package's layout: its folders depend on each other in one direction only."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import selfalign

PACKAGE = Path(selfalign.__file__).parent


def _part(module: str) -> str:
    """selfalign.judging.probe -> judging; selfalign.quality -> quality (a top-level module is a part of its own)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "selfalign"


def import_graph() -> dict[str, dict[str, str]]:
    """part -> {part it imports: a file where it does}, counting imports inside functions too (a lazy import is
    still a dependency); the entry point __main__ is left out."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__main__.py":
            continue
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        source = _part(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("selfalign."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("selfalign.")]
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


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ""}, "b": {}, "c": {"a": ""}}) is None
