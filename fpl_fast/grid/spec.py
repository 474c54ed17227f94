"""A grid spec: ``{"base": {RunConfig fields}, "axes": {field: [values]}, "name", "description", "table"}``,
validated up front and expanded into one :class:`Cell` per point of the axes' cartesian product.

Every cell's RunConfig is built before any runs, so a typo or a bad value in the 30th cell fails at once, in one
line naming the key or the cell."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fpl_fast.config import RunConfig, RunSettings
from fpl_fast.validation import ConfigError, read_json_object

__all__ = ["GridSpec", "Cell", "SpecError", "load_spec", "parse_spec", "parse_axis_flag", "cell_name"]

CONFIG_FIELDS = tuple(f.name for f in fields(RunConfig))
SETTINGS_FIELDS = tuple(f.name for f in fields(RunSettings))
SPEC_KEYS = ("name", "description", "base", "axes", "table")
TABLE_KEYS = ("rows", "columns")
NOISE_FIELDS = ("noise", "noise_local", "noise_global")


class SpecError(ValueError):
    """A bad grid spec (one line: the key or cell and what is allowed)."""


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its folder name, the axis values that make it, and its RunConfig."""

    name: str
    values: dict[str, Any]
    config: RunConfig


@dataclass(frozen=True)
class GridSpec:
    name: str
    description: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    rows: str
    columns: str
    cells: list[Cell] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "base": self.base,
            "axes": self.axes,
            "table": {"rows": self.rows, "columns": self.columns},
        }


def cell_name(values: dict[str, Any]) -> str:
    """A readable folder name from the axis values: ``factorization-dpfpl__noise-0.5__seed-1``."""
    parts = [f"{k}-{v}" for k, v in values.items()]
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", "__".join(parts)) or "base"
    return name[:200]


def load_spec(path: str | Path) -> dict[str, Any]:
    try:
        return read_json_object(path, "grid spec")
    except ValueError as exc:
        raise SpecError(str(exc)) from None


def parse_axis_flag(text: str) -> tuple[str, list[Any]]:
    """``--axis noise=0.5,1.5`` -> ("noise", [0.5, 1.5]); each value read as JSON (numbers, null, true) or else
    taken as a string."""
    key, sep, rest = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise SpecError(f"--axis {text!r}: expected FIELD=V1,V2,... (e.g. --axis noise=0.5,1.5)")
    values: list[Any] = []
    for item in rest.split(","):
        item = item.strip()
        if item == "":
            continue
        try:
            values.append(json.loads(item))
        except json.JSONDecodeError:
            values.append(item)
    return key, values


def _check_field(where: str, key: str) -> None:
    if key in SETTINGS_FIELDS:
        raise SpecError(
            f"{where}: {key!r} is a run setting, not a RunConfig field; the grid sets out, resume, progress, "
            "feature_cache and tensorboard itself (--out DIR, --feature-cache, --tensorboard TB)"
        )
    if key not in CONFIG_FIELDS:
        raise SpecError(f"{where}: unknown field {key!r}; allowed: RunConfig fields {', '.join(CONFIG_FIELDS)}")


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """As ``python -m fpl_fast.run`` does: "none" pretrained is None, "inf" norm_thresh is inf."""
    s = dict(settings)
    if isinstance(s.get("pretrained"), str) and s["pretrained"].lower() == "none":
        s["pretrained"] = None
    if isinstance(s.get("norm_thresh"), str) and s["norm_thresh"] == "inf":
        s["norm_thresh"] = math.inf
    return s


def _cell_config(name: str, settings: dict[str, Any]) -> RunConfig:
    s = _normalise(settings)
    if s.get("epsilon") is not None:
        given = [n for n in NOISE_FIELDS if s.get(n) is not None]
        if given:
            raise SpecError(
                f"cell {name}: epsilon calibrates the noise: leave out {', '.join(given)} (or drop epsilon)"
            )
        s["noise"] = None
    try:
        return RunConfig(**s)
    except (ConfigError, TypeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"cell {name}: {msg}") from None


def parse_spec(data: dict[str, Any], extra_axes: list[tuple[str, list[Any]]] | None = None) -> GridSpec:
    """Validate a spec (plus ``--axis`` flags, which add or replace axes) and build every cell's RunConfig.

    Raises:
        SpecError: one line naming the bad key, value or cell and what is allowed.
    """
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"grid spec: unknown key {unknown[0]!r}; allowed: {', '.join(SPEC_KEYS)}")
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise SpecError(f"grid spec: 'base' must be an object of RunConfig fields, got {type(base).__name__}")
    for key in base:
        _check_field("grid spec base", key)
    axes_in = data.get("axes", {})
    if not isinstance(axes_in, dict):
        raise SpecError(f"grid spec: 'axes' must be an object {{field: [values, ...]}}, got {type(axes_in).__name__}")
    axes: dict[str, list[Any]] = {}
    for key, values in [*axes_in.items(), *(extra_axes or [])]:
        where = "--axis" if extra_axes and (key, values) in extra_axes else "grid spec axes"
        _check_field(where, key)
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: axis {key!r} must be a non-empty list of values, got {values!r}")
        seen = [json.dumps(v, sort_keys=True) for v in values]
        dup = next((v for v, s in zip(values, seen, strict=True) if seen.count(s) > 1), None)
        if dup is not None:
            raise SpecError(f"{where}: axis {key!r} lists the value {dup!r} twice")
        axes.pop(key, None)
        axes[key] = values
    for name in ("name", "description"):
        if name in data and not isinstance(data[name], str):
            raise SpecError(f"grid spec: {name!r} must be a string, got {data[name]!r}")
    table = data.get("table", {})
    if not isinstance(table, dict):
        raise SpecError(f"grid spec: 'table' must be an object with keys {list(TABLE_KEYS)}, got {table!r}")
    bad = sorted(set(table) - set(TABLE_KEYS))
    if bad:
        raise SpecError(f"grid spec table: unknown key {bad[0]!r}; allowed: {', '.join(TABLE_KEYS)}")
    default_columns = "epsilon" if "epsilon" in axes and "noise" not in axes else "noise"
    rows, columns = table.get("rows", "factorization"), table.get("columns", default_columns)
    for key in (rows, columns):
        if not isinstance(key, str):
            raise SpecError(f"grid spec table: rows and columns name a RunConfig field, got {key!r}")
        _check_field("grid spec table", key)
    if rows == columns:
        raise SpecError(f"grid spec table: rows and columns must be different fields, both are {rows!r}")

    cells: list[Cell] = []
    names: dict[str, int] = {}
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        name = cell_name(values)
        if name in names:  # two values that read alike once made a folder name (e.g. "a/b" and "a_b")
            names[name] += 1
            name = f"{name}__{names[name]}"
        names.setdefault(name, 0)
        cells.append(Cell(name, values, _cell_config(name, {**base, **values})))
    return GridSpec(
        name=str(data.get("name", "grid")),
        description=str(data.get("description", "")),
        base=base,
        axes=axes,
        rows=rows,
        columns=columns,
        cells=cells,
    )
