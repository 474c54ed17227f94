"""Running a grid's cells: each an ordinary run folder ``DIR/cells/<name>/`` written by :func:`fpl_fast.job.train`
(the one way into a run; its Result also hands back the backbone's encoded-image counter), skipped when finished,
resumed from its checkpoint when stopped, in parallel worker processes.

Workers are a ``concurrent.futures.ProcessPoolExecutor`` with the spawn start method: torch is imported once per
worker rather than once per cell, a cell's result (and its ``encoded_images`` counter) and its error come back as
Python objects, and spawn (not fork) never copies a parent's torch threads or CUDA context into a child. A SIGKILL
of the process group ends the workers with the parent; the next run of the same command finds every cell's folder
as the kill left it (checkpoints and results.json are written atomically).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fpl_fast import outputs
from fpl_fast.config import RunConfig, RunSettings
from fpl_fast.grid.spec import Cell, GridSpec

__all__ = ["cell_state", "run_cell", "run_grid", "worker_threads"]

# Files a run writes into its folder; a folder without a checkpoint holding only these (and temporary files) is
# a run cut short before its first checkpoint, cleared before the cell starts afresh.
_RUN_FILES = {"results.json", "rounds.csv", "accuracy.png", "mia.json"}

_WORKER: dict[str, Any] = {"device": None}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else ""
    return msg if isinstance(exc, (ValueError, FileNotFoundError)) and msg else f"{type(exc).__name__}: {msg}"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as results.json stores it (JSON round trip), without the device (a cell may move between GPUs)."""
    safe = json.loads(json.dumps(outputs._json_safe(config)))
    safe.pop("device", None)
    return safe


def read_final(out: Path) -> dict[str, Any] | None:
    """results.json of a run folder, when it holds a final result (None otherwise)."""
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}): remove the cell's folder to run it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("final"), dict):
        return None
    return data


def cell_state(out: Path, cfg: RunConfig) -> str:
    """ "done" (results.json holds a final result of this config), "resume" (a checkpoint, no final result) or
    "fresh" (neither: what a run cut short before its first checkpoint left is cleared).

    Raises:
        ValueError: the folder holds another configuration's run, or files that no run writes.
    """
    done = read_final(out)
    if done is not None:
        if _comparable(done.get("config", {})) != _comparable(cfg.to_dict()):
            theirs, ours = _comparable(done.get("config", {})), _comparable(cfg.to_dict())
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise ValueError(
                f"{out} holds a finished run of another configuration (differs in {', '.join(diff)}): "
                "use another --out, or remove that cell's folder"
            )
        return "done"
    if (out / outputs.CHECKPOINT).is_file() or (out / outputs.PREVIOUS).is_file():
        return "resume"
    if out.is_dir():
        entries = list(out.iterdir())
        foreign = sorted(p.name for p in entries if p.name not in _RUN_FILES and not p.name.startswith("."))
        if foreign:
            raise ValueError(f"{out} holds files no run writes ({', '.join(foreign)}): remove them to run the cell")
        for p in entries:
            if p.is_file() or p.is_symlink():
                p.unlink()
    return "fresh"


def worker_threads(workers: int) -> int:
    """torch threads per worker: the cores this process may use, shared out."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def _init_worker(counter: Any, devices: list[str], threads: int) -> None:
    """Each worker takes the next index: worker i runs its cells on devices[i % len(devices)]."""
    import torch

    torch.set_num_threads(threads)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER["device"] = devices[index % len(devices)] if devices else None


def run_cell(name: str, cfg: RunConfig, out: str, feature_cache: str, tensorboard: str | None = None) -> dict[str, Any]:
    """Run (or resume) one cell; never raises: a failure comes back as ``{"status": "failed", "error": line}``.
    ``tensorboard``: the cell's TensorBoard folder (None: no log)."""
    t0 = time.perf_counter()
    folder = Path(out)
    report: dict[str, Any] = {"name": name, "status": "failed", "error": None, "encoded_images": None}
    try:
        from fpl_fast.job import train  # heavy: in the worker, after the spec is known good

        state = cell_state(folder, cfg)
        if state == "done":
            report.update(status="skipped", encoded_images=0)
            return report
        device = _WORKER["device"]
        if state == "resume":  # a checkpoint resumes with its own configuration's device
            saved = outputs.load_checkpoint(folder)
            device = saved["config"].get("device", cfg.device) if saved else device
        if device is not None and device != cfg.device:
            cfg = cfg.replace(device=device)
        settings = RunSettings(
            out=str(folder),
            resume=state == "resume",
            progress=False,
            feature_cache=feature_cache,
            tensorboard=tensorboard,
        )
        result = train(cfg, settings=settings)
        assert result.federation is not None  # an in-process run
        report.update(
            status="resumed" if state == "resume" else "done",
            encoded_images=result.federation.backbone.feature_cache.encoded_images,
            device=cfg.device,
        )
    except Exception as exc:  # a failed cell is reported, the grid goes on
        report["error"] = _one_line(exc)
    finally:
        report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def run_grid(
    spec: GridSpec,
    out: Path,
    *,
    workers: int = 1,
    devices: list[str] | None = None,
    feature_cache: Path | None = None,
    progress: bool = True,
    on_report: Callable[[dict[str, Any]], None] | None = None,
    tensorboard: Path | None = None,
) -> list[dict[str, Any]]:
    """Run every cell of ``spec`` under ``out/cells/`` (finished ones skipped, stopped ones resumed) and write
    ``out/grid.json`` (the spec and each cell's status in this run). Returns the cells' reports in spec order.
    ``tensorboard``: each cell that runs logs its rounds to ``tensorboard/<cell name>`` (None: no logs)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    cache = str(feature_cache if feature_cache is not None else out / "features")
    devices = list(devices or [])
    reports: dict[str, dict[str, Any]] = {}
    todo: list[Cell] = []
    for cell in spec.cells:  # skipping needs no worker: a finished cell's results.json is read here
        try:
            if cell_state(_cell_dir(out, cell), cell.config) == "done":
                reports[cell.name] = {"name": cell.name, "status": "skipped", "error": None, "encoded_images": 0}
                continue
        except ValueError as exc:
            reports[cell.name] = {"name": cell.name, "status": "failed", "error": _one_line(exc)}
            continue
        todo.append(cell)

    bar = tqdm(total=len(spec.cells), desc=spec.name, unit="cell", disable=not progress, dynamic_ncols=True)

    def record(rep: dict[str, Any]) -> None:
        reports[rep["name"]] = rep
        bar.update()
        counts = {s: sum(r["status"] == s for r in reports.values()) for s in ("done", "resumed", "skipped", "failed")}
        bar.set_postfix({k: v for k, v in counts.items() if v})
        if rep["status"] == "failed":
            bar.write(f"cell {rep['name']} failed: {rep['error']}")
        _write_status(out, spec, reports, cache)
        if on_report is not None:
            on_report(rep)

    try:
        for rep in list(reports.values()):
            del reports[rep["name"]]
            record(rep)
        if workers <= 1 or len(todo) <= 1:
            import torch

            torch.set_num_threads(worker_threads(1))
            _WORKER["device"] = devices[0] if devices else None
            for cell in todo:
                record(run_cell(cell.name, cell.config, str(_cell_dir(out, cell)), cache, _tb_dir(tensorboard, cell)))
        else:
            ctx = mp.get_context("spawn")
            counter = ctx.Value("i", 0)
            n = min(workers, len(todo))
            with cf.ProcessPoolExecutor(
                n, mp_context=ctx, initializer=_init_worker, initargs=(counter, devices, worker_threads(n))
            ) as pool:
                futures = {
                    pool.submit(
                        run_cell, c.name, c.config, str(_cell_dir(out, c)), cache, _tb_dir(tensorboard, c)
                    ): c.name
                    for c in todo
                }
                for fut in cf.as_completed(futures):
                    try:
                        record(fut.result())
                    except Exception as exc:  # the worker died (killed, out of memory): its cell failed
                        record({"name": futures[fut], "status": "failed", "error": f"worker died: {_one_line(exc)}"})
    finally:
        bar.close()
    return [reports[c.name] for c in spec.cells if c.name in reports]


def _cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.name


def _tb_dir(tensorboard: Path | None, cell: Cell) -> str | None:
    return str(tensorboard / cell.name) if tensorboard is not None else None


def _write_status(out: Path, spec: GridSpec, reports: dict[str, dict[str, Any]], cache: str) -> None:
    order = {c.name: i for i, c in enumerate(spec.cells)}
    cells = sorted(reports.values(), key=lambda r: order.get(r["name"], len(order)))
    outputs.write_json(out / "grid.json", {"spec": spec.to_dict(), "feature_cache": cache, "cells": cells})
