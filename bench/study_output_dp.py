"""Utility study of output-space per-example DP (issue 10): per-sample vs output (fixed C_o) vs output (auto).

Three phases, each resumable (a cell whose results.json exists is skipped; a killed cell resumes from its checkpoint):

    python bench/study_output_dp.py tune   [--workers 2]   # clip norm and lr per mode, on the PUBLIC digits-tune split
    python bench/study_output_dp.py study  [--workers 2] [--seeds 3]
    python bench/study_output_dp.py report                 # table (CSV, Markdown), plot, the default decision

Every cell is an ordinary ``python -m fpl_fast.run`` folder under ``--root`` (default runs/study). Tuning spends no
client's privacy: it runs the default federation's geometry on ``digits-tune`` (the public pretraining part of
digits, which no client holds) at epsilon_total 3, one seed, and picks by local accuracy there; every mode gets the
same number of tuning runs: a 3 x 3 grid of clip norm x lr (9 learning rates for ``auto``, which has no clip norm),
then 9 more around the best of those (a best on the grid's edge is searched beyond it).
The study runs the chosen values on the clients' data: settings x epsilon_total {1, 3, 8} x seeds x modes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402
from study_runs import run_all, stats  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},  # the embedded default: 10 clients, Dirichlet 0.5, dpfpl
    "pathological-5": {"partition": "pathological", "num_users": 5},  # 2 classes per client
    "fedotp": {"factorization": "fedotp"},
    "default-sync-round": {"sync": "round"},  # no trusted server in either mode
}
MODES: dict[str, dict[str, Any]] = {
    "per-sample": {"clip_mode": "sample"},
    "output": {"clip_mode": "output"},
    "output-auto": {"clip_mode": "output", "output_clip": "auto"},
}
ROUND_MODES = ("per-sample", "output")  # the sync-round comparison
EPSILONS = (1.0, 3.0, 8.0)
TUNE_EPSILON = 3.0
# Tuning grids (same budget for every mode: 9 runs).
GRIDS: dict[str, list[dict[str, Any]]] = {
    "per-sample": [{"norm_thresh": c, "lr": lr} for c in (0.3, 1.0, 3.0) for lr in (0.03, 0.1, 0.3)],
    "output": [{"output_clip": c, "lr": lr} for c in (0.03, 0.1, 0.3) for lr in (0.3, 1.0, 3.0)],
    "output-auto": [{"lr": lr} for lr in (0.03, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)],
}


def _refined(best: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage 2: 9 points around stage 1's best (x sqrt(3) steps on a 3 x 3 grid; x 3^(1/4) steps for lr alone),
    so that a best on the edge of the first grid is searched beyond it."""
    if len(best) == 1:
        return [{"lr": float(f"{best['lr'] * 3 ** (j / 4):.4g}")} for j in range(-4, 5)]
    (k1, v1), (k2, v2) = best.items()
    steps = (3**-0.5, 1.0, 3**0.5)
    return [{k1: float(f"{v1 * a:.4g}"), k2: float(f"{v2 * c:.4g}")} for a in steps for c in steps]


def _tune_cell(root: Path, mode: str, params: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    name = "-".join(f"{k}{v}" for k, v in params.items())
    settings = {"dataset": "digits-tune", "epsilon": TUNE_EPSILON, "seed": 1, "noise_seed": 1}
    return root / "tune" / mode / name, {**settings, **MODES[mode], **params}


def _scored(root: Path, mode: str, grid: list[dict[str, Any]], results: dict[str, Any]) -> list[tuple[float, dict]]:
    out = []
    for params in grid:
        final = results[str(_tune_cell(root, mode, params)[0])]
        out.append((final["local_acc"] if final else -1.0, params))  # a diverged run loses
    return out


def tune(root: Path, workers: int) -> dict[str, dict[str, Any]]:
    """Two stages of 9 runs per mode (18 each): the fixed grid, then a 3 x 3 refinement around its best."""
    results: dict[str, Any] = {}
    grids = {mode: list(grid) for mode, grid in GRIDS.items()}
    for stage in (1, 2):
        if stage == 2:
            for mode, grid in GRIDS.items():
                best = max(_scored(root, mode, grid, results), key=lambda t: t[0])[1]
                grids[mode] += [p for p in _refined(best) if p not in grids[mode]][: len(grid)]
        flat = [_tune_cell(root, mode, p) for mode, grid in grids.items() for p in grid]
        todo = [c for c in flat if str(c[0]) not in results]
        results.update(zip([str(p) for p, _ in todo], run_all(todo, workers, f"tune stage {stage}"), strict=True))
    chosen: dict[str, dict[str, Any]] = {}
    for mode, grid in grids.items():
        scored = _scored(root, mode, grid, results)
        best_acc, best = max(scored, key=lambda t: t[0])
        chosen[mode] = {"params": best, "tune_local_acc": best_acc, "grid": [[a, p] for a, p in scored]}
    (root / "tuned.json").write_text(json.dumps(chosen, indent=2))
    for mode, c in chosen.items():
        print(f"{mode:12s} chosen {c['params']} (local acc on digits-tune {c['tune_local_acc']:.3f})")
    return chosen


def _study_cells(root: Path, chosen: dict[str, dict[str, Any]], seeds: int) -> list[tuple[tuple, Path, dict]]:
    out = []
    for setting, eps, seed in itertools.product(SETTINGS, EPSILONS, range(1, seeds + 1)):
        modes = ROUND_MODES if setting == "default-sync-round" else tuple(MODES)
        for mode in modes:
            settings = {**SETTINGS[setting], **MODES[mode], **chosen[mode]["params"]}
            settings.update(epsilon=eps, seed=seed, noise_seed=seed)
            key = (setting, eps, mode, seed)
            out.append((key, root / "study" / setting / f"eps{eps:g}" / mode / f"seed{seed}", settings))
    return out


def _chosen(root: Path) -> dict[str, dict[str, Any]]:
    path = root / "tuned.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run the tune phase first")
    return json.loads(path.read_text())


def study(root: Path, workers: int, seeds: int) -> None:
    cells = _study_cells(root, _chosen(root), seeds)
    # Interleave settings and modes so that partial results cover every cell early.
    cells.sort(key=lambda c: (c[0][3], c[0][1], c[0][0], c[0][2]))
    run_all([(p, s) for _, p, s in cells], workers, "study")


def report(root: Path, out_prefix: Path, seeds: int) -> dict[str, Any]:
    chosen = _chosen(root)
    rows: dict[tuple, dict[str, list[float]]] = {}
    for (setting, eps, mode, _), path, _ in _study_cells(root, chosen, seeds):
        res = path / "results.json"
        if not res.is_file():
            continue
        final = json.loads(res.read_text())["final"]
        r = rows.setdefault((setting, eps, mode), {"local": [], "neighbor": [], "seconds": [], "eps": []})
        r["local"].append(final["local_acc"])
        r["neighbor"].append(final["neighbor_acc"])
        r["seconds"].append(final["seconds"])
        r["eps"].append(final["epsilon_total"])
    table = []
    for (setting, eps, mode), r in sorted(rows.items(), key=lambda kv: (list(SETTINGS).index(kv[0][0]), kv[0][1])):
        lm, ls, n = stats(r["local"])
        nm, ns, _ = stats(r["neighbor"])
        table.append(
            {
                "setting": setting,
                "epsilon_target": eps,
                "mode": mode,
                "n": n,
                "local_mean": lm,
                "local_std": ls,
                "neighbor_mean": nm,
                "neighbor_std": ns,
                "seconds_mean": sum(r["seconds"]) / n,
                "epsilon_total_max": max(r["eps"]),
            }
        )
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    cols = list(table[0]) if table else []
    with open(out_prefix.with_suffix(".csv"), "w") as fh:
        fh.write(",".join(cols) + "\n")
        for row in table:
            fh.write(",".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols) + "\n")
    md = ["| setting | eps_total | mode | n | local | neighbour | s/run |", "|---|---|---|---|---|---|---|"]
    for row in table:
        md.append(
            f"| {row['setting']} | {row['epsilon_target']:g} | {row['mode']} | {row['n']} | "
            f"{row['local_mean']:.3f} ± {row['local_std']:.3f} | {row['neighbor_mean']:.3f} ± {row['neighbor_std']:.3f}"
            f" | {row['seconds_mean']:.1f} |"
        )
    decision = _decision(rows)
    md += ["", "Tuned on digits-tune (public), epsilon_total 3, seed 1:"]
    md += [f"- {mode}: {c['params']} (local {c['tune_local_acc']:.3f})" for mode, c in chosen.items()]
    md += ["", f"Decision rule (issue 10): {decision['rule']}"]
    md += [f"- {v}: {d['cells_ok']} of {d['cells']} cells" for v, d in decision["variants"].items()]
    out_prefix.with_suffix(".md").write_text("\n".join(md) + "\n")
    out_prefix.with_suffix(".json").write_text(
        json.dumps({**provenance(__file__), "table": table, "tuned": chosen, **decision}, indent=2)
    )
    _plot(table, out_prefix.with_suffix(".png"))
    print("\n".join(md))
    return decision


def _decision(rows: dict[tuple, dict[str, list[float]]]) -> dict[str, Any]:
    """Output variant v passes a (setting, epsilon) cell of the synchronised settings when mean_v >= mean_per-sample
    - SE, SE = sqrt(sd_v^2 / n_v + sd_s^2 / n_s) (the standard error of the difference of the two means)."""
    variants = {}
    for v in ("output", "output-auto"):
        ok, total, cells = 0, 0, []
        for setting, eps in itertools.product(("default", "pathological-5", "fedotp"), EPSILONS):
            s, o = rows.get((setting, eps, "per-sample")), rows.get((setting, eps, v))
            if not s or not o or len(s["local"]) < 2 or len(o["local"]) < 2:
                continue
            ms, ss, ns = stats(s["local"])
            mo, so, no = stats(o["local"])
            se = math.sqrt(ss**2 / ns + so**2 / no)
            passed = mo >= ms - se
            ok += passed
            total += 1
            cells.append({"setting": setting, "epsilon": eps, "per_sample": ms, v: mo, "se": se, "pass": passed})
        variants[v] = {"cells_ok": ok, "cells": total, "detail": cells}
    return {
        "rule": "output becomes the default if mean local >= per-sample's - one pooled SE in >= 7 of the 9 cells",
        "variants": variants,
    }


def _plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in table)]
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(4 * max(1, len(settings)), 3.4), sharey=True)
    axes = [axes] if len(settings) <= 1 else list(axes)
    for ax, setting in zip(axes, settings, strict=False):
        for mode in MODES:
            pts = [r for r in table if r["setting"] == setting and r["mode"] == mode]
            if not pts:
                continue
            xs = [r["epsilon_target"] for r in pts]
            ax.errorbar(
                xs,
                [r["local_mean"] for r in pts],
                yerr=[r["local_std"] for r in pts],
                marker="o",
                capsize=3,
                label=mode,
            )
        ax.set_xscale("log")
        ax.set_xticks(list(EPSILONS), [f"{e:g}" for e in EPSILONS])
        ax.set_title(setting)
        ax.set_xlabel("epsilon_total")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("local accuracy (mean ± std over seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("tune", "study", "report"))
    p.add_argument("--root", type=Path, default=Path("runs/study"))
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (each with OMP_NUM_THREADS=1)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/study_output_dp"), help="report prefix")
    args = p.parse_args(argv)
    if args.workers < 1 or args.seeds < 1:
        p.error(f"--workers and --seeds must be >= 1, got {args.workers} and {args.seeds}")
    if args.phase == "tune":
        tune(args.root, args.workers)
    elif args.phase == "study":
        study(args.root, args.workers, args.seeds)
    else:
        report(args.root, args.out, args.seeds)


if __name__ == "__main__":
    main()
