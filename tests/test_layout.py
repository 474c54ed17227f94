"""The architecture's layering, read from the import statements (top-level and inside functions alike)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fpl_fast"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _unit(module: str) -> str:
    """fpl_fast.federated.client -> fpl_fast.federated; fpl_fast.job -> fpl_fast.job."""
    return ".".join(module.split(".")[:2])


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fpl_fast"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and _unit(t) != _unit(name) and _unit(t) != "fpl_fast":
                    graph[_unit(name)].add(_unit(t))
    return graph


def test_no_import_cycle_between_the_packages_and_modules_of_fpl_fast() -> None:
    graph = _import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(u for u in list(graph) if u in reach(u))
    assert not cycles, f"import cycles through {cycles}"


def test_the_layers_point_one_way() -> None:
    graph = _import_graph()
    assert "fpl_fast.job" not in graph["fpl_fast.federated"] and "fpl_fast.attacks" not in graph["fpl_fast.federated"]
    assert "fpl_fast.job" not in graph["fpl_fast.attacks"]
    assert {"fpl_fast.federated", "fpl_fast.attacks"} <= graph["fpl_fast.job"]  # the application layer sits above
    for unit in ("fpl_fast.privacy", "fpl_fast.prompts", "fpl_fast.federated", "fpl_fast.job"):
        assert "fpl_fast.ops.reference" not in graph[unit], f"{unit} imports the test oracle"  # training goes via ops
        assert "fpl_fast.backbone.model" not in graph[unit] or unit == "fpl_fast.job", f"{unit} needs only the protocol"
    # The grid runs jobs: it sits on the application level, above job.py, and nothing imports it.
    assert "fpl_fast.job" in graph["fpl_fast.grid"]
    assert not [unit for unit, deps in graph.items() if "fpl_fast.grid" in deps and unit != "fpl_fast.grid"]
