"""The package's modules form layers: no import cycle, type-checking imports included."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "wsbroadcast")


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package modules it imports anywhere (top level, functions, TYPE_CHECKING)."""
    mods = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py")}
    graph: Dict[str, Set[str]] = {}
    for mod in mods:
        with open(os.path.join(PKG, mod + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        deps: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wsbroadcast."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("wsbroadcast."))
        graph[mod] = deps & mods
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in sorted(graph[node]):
                if dep == start:
                    found.append(path + [dep])
                elif dep not in path and dep > start:
                    stack.append((dep, path + [dep]))
    return found


def test_the_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "server" in graph and "http" in graph["server"]  # the graph is really read
    assert cycles(graph) == [], cycles(graph)
