"""A finished grid's summary in the paper's shape: rows = one axis (the factorisation), columns = another (the
noise level or the target epsilon), each entry the mean +- std over the remaining axes (seeds) of local and
neighbour accuracy, with the mean epsilon spent; ``table.csv``, ``table.md`` and ``accuracy_vs_epsilon.png``.
Cells run under a ``protocol`` other than personal also report that protocol's metrics (results.json's
``final["protocol_metrics"]``): a second table of them, one line per (row, column), and their columns in table.csv."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fpl_fast.grid.spec import GridSpec
from fpl_fast.outputs import atomic_write_bytes, save_figure

__all__ = ["METRICS", "Entry", "collect", "protocol_metrics", "write_tables", "write_plot"]

# --metric -> the suffix of the final-result keys it reads (local_acc<suffix>, neighbor_acc<suffix>).
METRICS = {"last": "", "mean_last5": "_mean_last5", "mean_last10": "_mean_last10"}


def _num(x: Any) -> float:
    """A results.json number (inf is stored as "inf", a missing value as null) as a float (nan when missing)."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return math.nan
    return math.nan if x is None or isinstance(x, bool) else float(x)


class Entry:
    """The cells of one (row, column) of the table and their statistics."""

    def __init__(self) -> None:
        self.local: list[float] = []
        self.neighbor: list[float] = []
        self.epsilon: list[float] = []
        self.protocol: dict[str, list[float]] = {}  # a protocol metric -> its value in each cell that reports it
        self.expected = 0

    @staticmethod
    def _stat(xs: list[float]) -> tuple[float, float]:
        a = np.asarray([x for x in xs if not math.isnan(x)], dtype=float)
        return (float(a.mean()), float(a.std())) if a.size else (math.nan, math.nan)

    @property
    def n(self) -> int:
        return len(self.local)

    def local_stat(self) -> tuple[float, float]:
        return self._stat(self.local)

    def neighbor_stat(self) -> tuple[float, float]:
        return self._stat(self.neighbor)

    def protocol_stat(self, key: str) -> tuple[float, float]:
        return self._stat(self.protocol.get(key, []))

    def epsilon_mean(self) -> float:
        if any(math.isinf(e) for e in self.epsilon):
            return math.inf
        return self._stat(self.epsilon)[0]


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _values(spec: GridSpec, field: str) -> list[Any]:
    if field in spec.axes:
        return list(spec.axes[field])
    seen: dict[str, Any] = {}
    for cell in spec.cells:  # not an axis: the one value every cell has (from the base or the default)
        seen.setdefault(_key(getattr(cell.config, field)), getattr(cell.config, field))
    return list(seen.values())


def collect(
    spec: GridSpec, out: Path, metric: str = "last"
) -> tuple[list[Any], list[Any], dict[tuple[str, str], Entry]]:
    """The table's row values, column values and entries from the cells' results.json (cells without a final
    result count as missing).

    Raises:
        ValueError: a finished cell's results.json lacks the metric's keys (one line naming the cell and the key).
    """
    if metric not in METRICS:
        raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    suffix = METRICS[metric]
    rows, cols = _values(spec, spec.rows), _values(spec, spec.columns)
    entries: dict[tuple[str, str], Entry] = {(_key(r), _key(c)): Entry() for r in rows for c in cols}
    for cell in spec.cells:
        entry = entries[(_key(getattr(cell.config, spec.rows)), _key(getattr(cell.config, spec.columns)))]
        entry.expected += 1
        path = out / "cells" / cell.name / "results.json"
        try:
            final = json.loads(path.read_text()).get("final")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if not isinstance(final, dict):
            continue
        for key in (f"local_acc{suffix}", f"neighbor_acc{suffix}"):
            if key not in final:
                raise ValueError(
                    f"--metric {metric}: {path} has no final[{key!r}] (written before that metric existed?): "
                    "use --metric last, or rerun that cell"
                )
        entry.local.append(_num(final[f"local_acc{suffix}"]))
        entry.neighbor.append(_num(final[f"neighbor_acc{suffix}"]))
        entry.epsilon.append(_num(final.get("epsilon_total")))
        for key in final.get("protocol_metrics") or {}:
            entry.protocol.setdefault(key, []).append(_num(final.get(f"{key}{suffix}")))
    return rows, cols, entries


def protocol_metrics(entries: dict[tuple[str, str], Entry]) -> list[str]:
    """Every protocol metric some cell reports, in the order the cells first report them (none: a grid of the
    personal protocol only)."""
    seen: dict[str, None] = {}
    for entry in entries.values():
        seen.update(dict.fromkeys(entry.protocol))
    return list(seen)


def _pct(stat: tuple[float, float]) -> str:
    mean, std = stat
    return "-" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _eps(e: float) -> str:
    return "-" if math.isnan(e) else ("inf" if math.isinf(e) else f"{e:.3g}")


def _label(field: str, value: Any) -> str:
    return f"{field}={value}"


def write_tables(spec: GridSpec, out: Path, metric: str = "last") -> str:
    """``out/table.csv`` (fractions, one line per row value, five numbers per column value) and ``out/table.md``
    (percent); returns the markdown."""
    rows, cols, entries = collect(spec, out, metric)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    stats = ("local_mean", "local_std", "neighbor_mean", "neighbor_std", "epsilon_total", "n")
    extra = protocol_metrics(entries)  # after the columns above: mean and std of each, per column value
    w.writerow(
        [
            spec.rows,
            *[f"{_label(spec.columns, c)} {s}" for c in cols for s in stats],
            *[f"{_label(spec.columns, c)} {m} {s}" for c in cols for m in extra for s in ("mean", "std")],
        ]
    )
    for r in rows:
        line: list[Any] = [r]
        for c in cols:
            e = entries[(_key(r), _key(c))]
            (lm, ls), (nm, ns) = e.local_stat(), e.neighbor_stat()
            line += [*(("" if math.isnan(x) else f"{x:.6g}") for x in (lm, ls, nm, ns, e.epsilon_mean())), e.n]
        for c in cols:
            e = entries[(_key(r), _key(c))]
            line += [("" if math.isnan(x) else f"{x:.6g}") for m in extra for x in e.protocol_stat(m)]
        w.writerow(line)
    atomic_write_bytes(out / "table.csv", buf.getvalue().encode())

    others = [k for k in spec.axes if k not in (spec.rows, spec.columns)]
    over = f"over {', '.join(others)}" if others else "(one cell each)"
    which = "final round" if metric == "last" else f"mean of the last {metric.removeprefix('mean_last')} rounds"
    md = [f"# {spec.name}", ""]
    if spec.description:
        md += [spec.description, ""]
    md += [
        f"Accuracy in % ({which}), mean ± std {over}; ε: mean epsilon_total spent. "
        "An entry with fewer finished cells than planned shows (n/planned).",
        "",
    ]
    header = [spec.rows] + [f"{_label(spec.columns, c)} {s}" for c in cols for s in ("local", "neighbour", "ε")]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        line = [str(r)]
        for c in cols:
            e = entries[(_key(r), _key(c))]
            short = f" ({e.n}/{e.expected})" if e.n < e.expected else ""
            line += [_pct(e.local_stat()) + short, _pct(e.neighbor_stat()), _eps(e.epsilon_mean())]
        md.append("| " + " | ".join(line) + " |")
    if extra:
        md += [
            "",
            f"Protocol metrics in % ({which}), mean ± std {over}; - where a cell's protocol does not report the "
            "metric (docs/explanation/protocols.md).",
            "",
            "| " + " | ".join([spec.rows, spec.columns, *extra]) + " |",
            "|" + "---|" * (2 + len(extra)),
        ]
        for r in rows:
            for c in cols:
                e = entries[(_key(r), _key(c))]
                md.append("| " + " | ".join([str(r), str(c), *(_pct(e.protocol_stat(m)) for m in extra)]) + " |")
    text = "\n".join(md) + "\n"
    atomic_write_bytes(out / "table.md", text.encode())
    return text


def write_plot(spec: GridSpec, out: Path, metric: str = "last") -> Path:
    """``out/accuracy_vs_epsilon.png``: local (solid) and neighbour (dashed) accuracy against the epsilon spent,
    one colour per row value (method), error bars the std; points without a finite epsilon are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols, entries = collect(spec, out, metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite_x: list[float] = []
    for i, r in enumerate(rows):
        pts = []
        for c in cols:
            e = entries[(_key(r), _key(c))]
            x = e.epsilon_mean()
            if e.n and math.isfinite(x) and x > 0:
                pts.append((x, e.local_stat(), e.neighbor_stat()))
        if not pts:
            continue
        pts.sort(key=lambda p: p[0])
        xs = [p[0] for p in pts]
        finite_x += xs
        colour = f"C{i % 10}"
        local, neigh = [p[1] for p in pts], [p[2] for p in pts]
        for series, marker, ls, alpha, what in ((local, "o", "-", 1.0, "local"), (neigh, "s", "--", 0.7, "neighbour")):
            ax.errorbar(
                xs,
                [m for m, _ in series],
                yerr=[sd for _, sd in series],
                color=colour,
                marker=marker,
                ls=ls,
                capsize=3,
                alpha=alpha,
                label=f"{r} {what}",
            )
    if finite_x and max(finite_x) / min(finite_x) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("epsilon_total spent")
    ax.set_ylabel("accuracy" + ("" if metric == "last" else f" ({metric})"))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if finite_x:
        ax.legend(loc="lower right", fontsize=7, ncol=2)
    ax.set_title(f"{spec.name}: accuracy against epsilon")
    fig.tight_layout()
    path = out / "accuracy_vs_epsilon.png"
    save_figure(fig, path)
    return path
