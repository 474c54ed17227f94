"""The architecture's layering (docs/design.md section 4), read from the import statements (top-level and inside
functions alike): the stages of a run import only from the stages below them, and nothing imports in a cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fpl_fast"

# Lowest first. A module may import from its own unit and from the units of lower layers only. The package root
# (fpl_fast/__init__.py: the public names, loaded lazily) and the compiled fpl_fast._C stand outside the layers.
LAYERS: list[set[str]] = [
    {"validation"},  # checks and their wording (the CLI's too)
    {"outputs", "tracking"},  # the files a run writes, its TensorBoard log (their checks raise validation's errors)
    {"ops"},  # the kernels' Python face, their reference twins
    {"backbone"},  # frozen CLIP
    {"data"},  # datasets, splits (the recipes that pretrain the shipped models use the backbone)
    {"prompts"},  # factorisations, prompt state, class prompts -> text features
    {"config"},  # the settings (names the factorisations and text paths)
    {"privacy"},  # per-sample gradients, mechanisms, accounting
    {"federated"},  # clients, server, the in-process engine, metrics
    {"methods", "preparation"},  # DP-FPL, FedDTPT, RAPT on one skeleton; a run's data path
    {"attacks", "flower"},  # membership inference, canaries; the federation on Flower
    {"job"},  # the one way into a run
    {"grid"},  # grids of runs
    {"run"},  # the CLI
    {"audit", "selftest"},  # CLIs built on the above
    {"cli"},  # the fpl-fast console command: one subcommand per entry point
]
RANK = {f"fpl_fast.{unit}": i for i, layer in enumerate(LAYERS) for unit in layer}
OUTSIDE_LAYERS = {"fpl_fast", "fpl_fast._C"}
# The backbone's heavy modules (open_clip, checkpoint files): the training stages need only its interface and the
# functional text tower.
BACKBONE_LIGHT = {"fpl_fast.backbone", "fpl_fast.backbone.protocol", "fpl_fast.backbone.text_tower"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _unit(module: str) -> str:
    """fpl_fast.federated.client -> fpl_fast.federated; fpl_fast.job -> fpl_fast.job."""
    return ".".join(module.split(".")[:2])


def _imports() -> dict[str, set[str]]:
    """module -> the fpl_fast modules it imports (``from fpl_fast.<pkg> import <name>`` counts <pkg>.<name> when that
    is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fpl_fast"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("fpl_fast"))
    return graph


def _unit_graph() -> dict[str, set[str]]:
    units: dict[str, set[str]] = defaultdict(set)
    for src, targets in _imports().items():
        for t in targets:
            if _unit(t) != _unit(src) and _unit(t) not in OUTSIDE_LAYERS and _unit(src) not in OUTSIDE_LAYERS:
                units[_unit(src)].add(_unit(t))
    return units


def test_every_module_belongs_to_a_layer() -> None:
    units = {_unit(m) for m in _modules()} - OUTSIDE_LAYERS
    assert units <= set(RANK), f"units missing from LAYERS: {sorted(units - set(RANK))}"


def test_the_stages_import_only_from_the_stages_below() -> None:
    upward = [f"{src} -> {dst}" for src, dsts in _unit_graph().items() for dst in dsts if RANK[dst] >= RANK[src]]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_the_units_of_fpl_fast() -> None:
    graph = _unit_graph()

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


def test_what_each_stage_may_know() -> None:
    imports = _imports()

    def users(pred) -> set[str]:
        return {src for src, dsts in imports.items() if any(pred(d) for d in dsts)}

    # privacy knows nothing of CLIP; the training stages see the backbone only through its interface.
    heavy_backbone = users(lambda d: _unit(d) == "fpl_fast.backbone" and d not in BACKBONE_LIGHT)
    allowed = {"fpl_fast.backbone", "fpl_fast.data", "fpl_fast.methods", "fpl_fast.preparation"}
    assert {_unit(m) for m in heavy_backbone} <= allowed, sorted(m for m in heavy_backbone if _unit(m) not in allowed)
    assert not {m for m in users(lambda d: _unit(d) == "fpl_fast.backbone") if _unit(m) == "fpl_fast.privacy"}
    # The reference twins are the ops' spec, fallback and test oracle: training reaches them only through ops.
    oracle_users = users(lambda d: d.startswith("fpl_fast.ops.reference"))
    assert {_unit(m) for m in oracle_users} <= {"fpl_fast.ops"}, sorted(oracle_users)
    # Nothing imports the entry points (the audit's CLI reuses the run's flags; the console command renders the
    # reference with the run's, and runs each entry point through importlib).
    for cli in ("fpl_fast.grid.__main__", "fpl_fast.selftest", "fpl_fast.audit", "fpl_fast.cli"):
        assert not users(lambda d, cli=cli: d == cli), cli
    assert users(lambda d: d == "fpl_fast.run") <= {"fpl_fast.audit", "fpl_fast.cli"}
