"""Run outputs: results.json, rounds.csv, accuracy.png, atomic checkpoints (and the one before), the summary
table, and the checks before a run: a previous run's files are never overwritten, and the folder is writable.

rounds.csv has the same columns for every method (:data:`ROUND_FIELDS`; a cell is empty where a method has no such
value, e.g. FedDTPT's epsilons or loss): the accuracies, the epsilons spent so far, the mean training loss and
clipped fraction of the round (statistics of the clients' private data, not covered by DP), the clients that dropped
out of the round (``dropped``, ids separated by spaces; --client-drop-rate), and ``seconds_elapsed``,
the run's wall seconds from its start (set-up included, resumes counted) to the end of that round."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import shutil
import signal
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fpl_fast import __version__
from fpl_fast.validation import ConfigError

__all__ = [
    "CURVES",
    "ROUND_FIELDS",
    "atomic_write_bytes",
    "save_figure",
    "check_out_dir",
    "check_writable",
    "default_out_dir",
    "save_checkpoint",
    "load_checkpoint",
    "results_dict",
    "write_json",
    "write_outputs",
    "summary_table",
]

ROUND_FIELDS = (
    "round",
    "local_acc",
    "neighbor_acc",
    "epsilon_local",
    "epsilon_global",
    "epsilon_total",
    "loss",
    "clipped_fraction",
    "clip_norm",
    "dropped",
    "seconds_elapsed",
)
# accuracy.png's curves: a round record's key -> its label. A method plots those of its ``curves``.
CURVES = {"local_acc": "local (own test split)", "neighbor_acc": "neighbour (others' splits)"}
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the last, kept by save_checkpoint


def default_out_dir() -> Path:
    """runs/<timestamp>, with a -2, -3, ... suffix when a run started in the same second already took it."""
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _write_synced_temp(path: Path, data: bytes) -> str:
    """``data`` in a new temporary file next to ``path``, flushed to the disk; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    tmp = _write_synced_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# Test hook: with FPL_FAST_CRASH_IN_CHECKPOINT=N the process SIGKILLs itself inside the N-th checkpoint
# write of this process, after the new file is written and the previous one kept, before the rename.
_CRASH_ENV = "FPL_FAST_CRASH_IN_CHECKPOINT"
_writes = 0


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as a PNG (dpi 100), written atomically, and the figure closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """``state`` to ``out/checkpoint.pt`` atomically; the checkpoint it replaces stays as checkpoint.prev.pt.

    checkpoint.pt exists and is complete at every instant once it has been written once: the old file is
    hard-linked (copied where links are not allowed) to checkpoint.prev.pt before the new one is renamed over it.
    """
    global _writes
    buf = io.BytesIO()
    torch.save(state, buf)
    path = out / CHECKPOINT
    tmp = _write_synced_temp(path, buf.getvalue())
    try:
        if path.is_file():
            keep = Path(f"{tmp}.prev")
            try:
                os.link(path, keep)
            except OSError:
                shutil.copy2(path, keep)
            os.replace(keep, out / PREVIOUS)
        _writes += 1
        if os.environ.get(_CRASH_ENV) == str(_writes):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(out)
    for stale in out.glob(f".{CHECKPOINT}.*"):  # temporary files of writes that a crash cut short
        stale.unlink(missing_ok=True)


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The state in ``out/checkpoint.pt``; None when there is none.

    Raises:
        ValueError: the file cannot be read back (truncated or corrupt); nothing is changed on disk.
    """
    path = out / CHECKPOINT
    if not path.is_file():
        if (out / PREVIOUS).is_file():
            raise ValueError(
                f"{path} is missing but {out / PREVIOUS} exists: copy it to {path} to resume from the round before"
            )
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not {"config", "rounds", "next_round"} <= state.keys():
            raise ValueError("not a fpl_fast checkpoint")
    except Exception as exc:  # torch.load fails with many types (zip, pickle, EOF, runtime) on a damaged file
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            f"{out / PREVIOUS} holds the checkpoint before it: copy it over {path} to resume from there"
            if (out / PREVIOUS).is_file()
            else "no earlier checkpoint is kept: start a new run in another output folder"
        )
        raise ValueError(f"cannot read {path} (truncated or corrupt: {why}); it was left as it is; {hint}") from None
    return state


def check_out_dir(out: Path, *, resume: bool) -> None:
    """Refuse to start a new run over a previous run's files, and to resume where there is nothing to resume.

    Raises:
        ConfigError: ``out`` holds results.json or a checkpoint and ``resume`` is off; or ``resume`` is on and
            ``out`` holds no checkpoint. Worded for the Python API (``resume=True``), and for the CLI (``--resume``).
    """
    if resume:
        if not (out / CHECKPOINT).is_file() and not (out / PREVIOUS).is_file():
            why = f"no {CHECKPOINT} in {out}: nothing to resume"
            raise ConfigError(
                "resume",
                f"resume: {why} (set resume=False to start a new run)",
                others=("out",),
                cli=f"--resume: {why} (leave out --resume to start a new run)",
            )
        return
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"out {out} is a file, not a folder", cli=f"--out {out} is a file, not a folder")
    found = [name for name in ("results.json", CHECKPOINT, PREVIOUS) if (out / name).is_file()]
    if found:
        held = f"{out} holds a previous run ({', '.join(found)})"
        raise ConfigError(
            "out",
            f"out {held}: set resume=True in the settings to continue it, or choose another out folder (nothing was "
            "overwritten)",
            others=("resume",),
            cli=f"--out {held}: pass --resume to continue it, or choose another folder (nothing was overwritten)",
        )


def check_writable(out: Path) -> None:
    """Fail before any work, not after a round, where the run could not write ``out``: a file is created and removed
    in it (a folder, in its nearest existing parent, where ``out`` is still to be made). A real write, not a
    permission bit: root passes any mode check, and a read-only file system fails whatever the mode. Leaves nothing.

    Raises:
        ConfigError: ``out`` cannot be created or written (read-only file system, a file in its path, no
            permission), with the system's reason.
    """
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if where == out and out.is_dir():
            fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check.")
            os.close(fd)
            os.unlink(probe)
        elif not where.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{where} is a file")
        else:
            os.rmdir(tempfile.mkdtemp(dir=where, prefix=".write-check."))
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            "out", f"out {out} is not writable: {why}", cli=f"--out {out} is not writable: {why}"
        ) from None


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _csv_cell(value: Any) -> Any:
    """A list (the clients that dropped out of a round) as its items separated by spaces; anything else as is."""
    return " ".join(str(v) for v in value) if isinstance(value, list) else value


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically (non-finite floats as null / "inf" / "-inf")."""
    atomic_write_bytes(path, json.dumps(_json_safe(obj), indent=2).encode())


def results_dict(
    method: str, config: dict[str, Any], rounds: list[dict[str, Any]], final: dict[str, Any] | None, **extra: Any
) -> dict[str, Any]:
    """The one results.json shape of every method: ``{"method", "config", "rounds", "final", "fpl_fast_version",
    **extra}``, in that order, so that a reader finds which method wrote a file in its first key."""
    return {
        "method": method,
        "config": config,
        "rounds": rounds,
        "final": final,
        "fpl_fast_version": __version__,
        **extra,
    }


def write_outputs(
    out: Path, results: dict[str, Any], *, curves: tuple[str, ...] = tuple(CURVES), columns: tuple[str, ...] = ()
) -> None:
    """results.json, rounds.csv and accuracy.png; ``curves``: the round keys the plot draws (of :data:`CURVES`);
    ``columns``: rounds.csv's columns after :data:`ROUND_FIELDS` (a protocol's metrics)."""
    write_json(out / "results.json", results)
    rows = results["rounds"]
    tmp = out / ".rounds.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=(*ROUND_FIELDS, *columns), extrasaction="ignore")
        w.writeheader()
        w.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    os.replace(tmp, out / "rounds.csv")
    _plot(out / "accuracy.png", rows, results.get("final", {}), curves)


def _plot(path: Path, rows: list[dict[str, Any]], final: dict[str, Any], curves: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # A second panel where the clip norm moved (adaptive clipping): each client's C of its first clipped quantity.
    moving = len({tuple(map(tuple, row["clip_norms"])) for row in rows if row.get("clip_norms")}) > 1
    fig, axes = plt.subplots(1, 2 if moving else 1, figsize=(11 if moving else 6, 4), squeeze=False)
    ax = axes[0, 0]
    r = [row["round"] for row in rows]
    for key, marker in zip(curves, "os^v", strict=False):
        if any(row.get(key) is not None for row in rows):  # a Flower node with its own data has no neighbour's
            ax.plot(
                r, [math.nan if row.get(key) is None else row[key] for row in rows], marker=marker, label=CURVES[key]
            )
    if final.get("zero_shot_acc") is not None:
        ax.axhline(final["zero_shot_acc"], color="grey", ls="--", label="hand-written prompt (zero-shot)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("fpl_fast: accuracy per round")
    if moving:
        cx = axes[0, 1]
        kept = [row for row in rows if row.get("clip_norms")]
        for k in range(len(kept[0]["clip_norms"])):
            cx.plot([row["round"] for row in kept], [row["clip_norms"][k][0] for row in kept], lw=1, alpha=0.7)
        cx.set_yscale("log")
        cx.set_xlabel("round")
        cx.xaxis.set_major_locator(MaxNLocator(integer=True))
        cx.set_ylabel("clip norm C (one line per client)")
        cx.grid(alpha=0.3)
        cx.set_title("adaptive clip norms")
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4g}"
    return str(x)


def _window(rounds: list[int] | None) -> str:
    """The evaluations a "last 5" mean actually averaged: "last 5 evaluations (rounds 16-20)", or after 3 of them
    every 2 rounds "last 3 evaluations (rounds 2, 4, 6)"."""
    if rounds is None:  # a results.json from before the rounds were recorded
        return "last 5 evaluations"
    if not rounds:
        return "no evaluation"
    if len(rounds) == 1:
        return f"last 1 evaluation (round {rounds[0]})"
    consecutive = rounds == list(range(rounds[0], rounds[0] + len(rounds)))
    which = f"{rounds[0]}-{rounds[-1]}" if consecutive else ", ".join(map(str, rounds))
    return f"last {len(rounds)} evaluations (rounds {which})"


def summary_table(final: dict[str, Any], *, extra: bool = False) -> str:
    """The closing table of a run, one metric a line (``extra``: also every other scalar in ``final``)."""
    rows = [
        ("mean local accuracy", final.get("local_acc")),
        ("mean neighbour accuracy", final.get("neighbor_acc")),
    ]
    if "local_acc_mean_last5" in final:  # DP-FPL: also the means over the last 5 evaluated rounds (the authors')
        window = _window(final.get("acc_mean_last5_rounds"))
        rows += [
            (f"mean local accuracy, {window}", final["local_acc_mean_last5"]),
            (f"mean neighbour accuracy, {window}", final.get("neighbor_acc_mean_last5")),
        ]
    metrics = final.get("protocol_metrics") or {}
    if metrics:  # --protocol other than personal: each metric's last value | its mean over the last 5 evaluations
        window = _window(final.get("acc_mean_last5_rounds"))
        rows.append((f"protocol {final.get('protocol')}", f"last round | mean, {window}"))
        for key, what in metrics.items():
            rows.append((what, f"{_fmt(final.get(key))} | {_fmt(final.get(f'{key}_mean_last5'))}"))
    rows += [
        ("zero-shot accuracy (hand-written prompt)", final.get("zero_shot_acc")),
        ("epsilon local (max over clients)", final.get("epsilon_local")),
        ("epsilon global (max over clients)", final.get("epsilon_global")),
        ("epsilon total, both prompts (max)", final.get("epsilon_total")),
        ("delta", final.get("delta")),
        ("accountant", final.get("accountant")),
        ("noise and sampling", (final.get("randomness") or {}).get("noise_and_sampling")),
    ]
    if "text_path" in final:  # DP-FPL: how the class prompts went through the text tower
        rows.append(
            (
                "text path (token rows per client per layer)",
                f"{final['text_path']} ({final['text_rows_per_client']}; full path "
                f"{final['text_full_rows_per_client']})",
            )
        )
    rows.append(("seconds", final.get("seconds")))
    if extra:
        shown = {"local_acc", "neighbor_acc", "zero_shot_acc", "epsilon_local", "epsilon_global", "epsilon_total"}
        shown |= {"local_acc_mean_last5", "neighbor_acc_mean_last5"}
        shown |= {"delta", "accountant", "seconds", "text_path", "text_rows_per_client", "text_full_rows_per_client"}
        rows += [
            (k.replace("_", " "), v)
            for k, v in final.items()
            if k not in shown and isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) < 60
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {_fmt(v)}" for k, v in rows]
    bar = "-" * (width + 14)
    return "\n".join([bar, *lines, bar])
