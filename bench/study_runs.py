"""What the studies share: one study cell is an ordinary ``python -m fpl_fast.run`` folder, run (or resumed from its
checkpoint, or skipped when finished) in a subprocess; a failed one leaves failed.txt with its command and stderr."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["flags", "run_all", "run_cell", "stats"]


def flags(settings: dict[str, Any]) -> list[str]:
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def run_cell(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """One ``fpl_fast.run`` in ``out`` (skipped when finished, resumed when killed); its final results or None."""
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text()).get("final")
    resume = (out / "checkpoint.pt").is_file()
    if out.exists() and not resume:
        shutil.rmtree(out)  # started but never checkpointed (or failed): start again
    cmd = [sys.executable, "-m", "fpl_fast.run", "--quiet", "--out", str(out), *flags(settings)]
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "failed.txt").write_text(" ".join(cmd) + "\n\n" + proc.stderr[-4000:])
        return None
    return json.loads(done.read_text())["final"]


def run_all(cells: list[tuple[Path, dict[str, Any]]], workers: int, desc: str) -> list[dict[str, Any] | None]:
    bar = tqdm(total=len(cells), desc=desc, unit="run")

    def one(cell):
        res = run_cell(*cell)
        bar.update()
        return res

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, cells))
    bar.close()
    failed = [str(p) for (p, _), r in zip(cells, results, strict=True) if r is None]
    if failed:
        print(f"{len(failed)} run(s) failed (their failed.txt says why): {failed[:5]}", file=sys.stderr)
    return results


def stats(xs: list[float]) -> tuple[float, float, int]:
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mean, sd, n
