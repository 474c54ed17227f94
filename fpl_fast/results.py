"""Run outputs: results.json, rounds.csv, accuracy.png, atomic checkpoints, and the summary table."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ROUND_FIELDS",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "write_json",
    "write_outputs",
    "summary_table",
]

ROUND_FIELDS = ("round", "local_acc", "neighbor_acc", "epsilon_local", "epsilon_global", "epsilon_total", "seconds")
CHECKPOINT = "checkpoint.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out / CHECKPOINT, buf.getvalue())


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically (non-finite floats as null / "inf" / "-inf")."""
    atomic_write_bytes(path, json.dumps(_json_safe(obj), indent=2).encode())


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    """results.json, rounds.csv and accuracy.png (the plot only when matplotlib imports)."""
    write_json(out / "results.json", results)
    rows = results["rounds"]
    tmp = out / ".rounds.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROUND_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "rounds.csv")
    _plot(out / "accuracy.png", rows, results.get("final", {}))


def _plot(path: Path, rows: list[dict[str, Any]], final: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    r = [row["round"] for row in rows]
    ax.plot(r, [row["local_acc"] for row in rows], marker="o", label="local (own classes)")
    ax.plot(r, [row["neighbor_acc"] for row in rows], marker="s", label="neighbour (others' splits)")
    if final.get("zero_shot_acc") is not None:
        ax.axhline(final["zero_shot_acc"], color="grey", ls="--", label="hand-written prompt (zero-shot)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("fpl_fast: accuracy per round")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4g}"
    return str(x)


def summary_table(final: dict[str, Any], *, extra: bool = False) -> str:
    """The closing table of a run, one metric a line (``extra``: also every other scalar in ``final``)."""
    rows = [
        ("mean local accuracy", final.get("local_acc")),
        ("mean neighbour accuracy", final.get("neighbor_acc")),
        ("zero-shot accuracy (hand-written prompt)", final.get("zero_shot_acc")),
        ("epsilon local (max over clients)", final.get("epsilon_local")),
        ("epsilon global (max over clients)", final.get("epsilon_global")),
        ("epsilon total, both prompts (max)", final.get("epsilon_total")),
        ("delta", final.get("delta")),
        ("accountant", final.get("accountant")),
        ("noise and sampling", (final.get("randomness") or {}).get("noise_and_sampling")),
        ("seconds", final.get("seconds")),
    ]
    if extra:
        shown = {"local_acc", "neighbor_acc", "zero_shot_acc", "epsilon_local", "epsilon_global", "epsilon_total"}
        shown |= {"delta", "accountant", "seconds"}
        rows += [
            (k.replace("_", " "), v)
            for k, v in final.items()
            if k not in shown and isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) < 60
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {_fmt(v)}" for k, v in rows]
    bar = "-" * (width + 14)
    return "\n".join([bar, *lines, bar])
