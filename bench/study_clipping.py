"""Clipping study (issue 24): fixed C (tuned, the authors') vs adaptive C (Andrew et al.) vs automatic (Bu et al.).

Three phases, each resumable (a cell whose results.json exists is skipped; a killed cell resumes from its checkpoint):

    python bench/study_clipping.py tune   [--workers 2]   # the lr of each variant, on the PUBLIC digits-tune split
    python bench/study_clipping.py study  [--workers 2] [--seeds 3]
    python bench/study_clipping.py report                 # table (CSV, Markdown, JSON), plots, the default decision

Every cell is an ordinary ``python -m fpl_fast.run`` folder under ``--root`` (default runs/study-clipping). Tuning
spends no client's privacy: it runs the default federation's geometry on ``digits-tune`` (the public pretraining
part of digits, which no client holds) at epsilon_total 3, one seed, and picks the learning rate with the best local
accuracy there. Every variant gets the same budget: 9 learning rates, log-spaced (:data:`LR_GRIDS`); the clip
settings themselves are the variant's and are not tuned (adaptive clipping's quantile, step and count budget stay
at their defaults). The study runs the chosen lr on the clients' data: settings x epsilon_total {1, 3, 8} x seeds x
variants, each calibrated with ``--epsilon`` (which counts everything the accountant counts, the adaptive variants'
noisy clip counts included).

``--variants a,b`` restricts any phase to some variants (tuned.json keeps the others' choices); ``--rounds N``
overrides the number of rounds, for smoke tests: its cells then live under ``ROOT/roundsN``, apart from the study's.
"""

from __future__ import annotations

import argparse
import csv
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
}
FIXED_TUNED_C = 0.3  # today's --norm-thresh default, tuned for the embedded model (bench/study_output_dp.py)
VARIANTS: dict[str, dict[str, Any]] = {
    "fixed-tuned": {"norm_thresh": FIXED_TUNED_C},
    "fixed-authors": {"norm_thresh": 10},
    "adaptive-from-10": {"norm_thresh": "adaptive", "clip_init": 10},
    "adaptive-from-0.01": {"norm_thresh": "adaptive", "clip_init": 0.01},
    "automatic": {"clip_style": "automatic"},
}
BASELINE = "fixed-tuned"
CANDIDATES = ("adaptive-from-10", "automatic")  # the variants the decision rule may make the default
ADAPTIVE = ("adaptive-from-10", "adaptive-from-0.01")
EPSILONS = (1.0, 3.0, 8.0)
TUNE_EPSILON = 3.0
PASS_CELLS = 5  # of the 6 (setting, epsilon) cells


def _logspace(lo: float, hi: float, n: int = 9) -> list[float]:
    return [float(f"{lo * (hi / lo) ** (k / (n - 1)):.3g}") for k in range(n)]


# Tuning grids, 9 learning rates each. A fixed C's step and noise both scale with lr * C, so the authors' C = 10 gets
# the tuned C's grid scaled by 0.3 / 10 (the same lr * C range); the adaptive variants' C settles near a quantile
# of the per-example norms whatever it starts from, so they get the tuned C's grid; automatic clipping's per-example
# gradient has norm ~1 (g / (||g|| + gamma)), so it gets a wider grid reaching lower.
LR_GRIDS: dict[str, list[float]] = {
    "fixed-tuned": _logspace(0.01, 3.0),
    "fixed-authors": _logspace(0.01 * FIXED_TUNED_C / 10, 3.0 * FIXED_TUNED_C / 10),
    "adaptive-from-10": _logspace(0.01, 3.0),
    "adaptive-from-0.01": _logspace(0.01, 3.0),
    "automatic": _logspace(0.003, 3.0),
}


def _extra(rounds: int | None) -> dict[str, Any]:
    return {} if rounds is None else {"rounds": rounds}


def _tune_cell(root: Path, variant: str, lr: float, rounds: int | None) -> tuple[Path, dict[str, Any]]:
    settings = {"dataset": "digits-tune", "epsilon": TUNE_EPSILON, "seed": 1, "noise_seed": 1}
    return root / "tune" / variant / f"lr{lr:g}", {**settings, **VARIANTS[variant], "lr": lr, **_extra(rounds)}


def _load_tuned(root: Path) -> dict[str, dict[str, Any]]:
    path = root / "tuned.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def tune(root: Path, workers: int, variants: list[str], rounds: int | None) -> dict[str, dict[str, Any]]:
    """9 runs per variant (its lr grid) on digits-tune; the best local accuracy's lr is chosen."""
    cells = {(v, lr): _tune_cell(root, v, lr, rounds) for v in variants for lr in LR_GRIDS[v]}
    results = dict(zip(cells, run_all(list(cells.values()), workers, "tune"), strict=True))
    chosen = _load_tuned(root)  # other variants' earlier choices are kept
    for v in variants:
        scored = [(results[v, lr]["local_acc"] if results[v, lr] else -1.0, lr) for lr in LR_GRIDS[v]]  # diverged: -1
        best_acc, best_lr = max(scored, key=lambda t: t[0])
        if best_acc < 0:
            print(f"{v}: every tuning run failed (see their failed.txt); not tuned", file=sys.stderr)
            continue
        edge = best_lr in (LR_GRIDS[v][0], LR_GRIDS[v][-1])
        grid = [{"lr": lr, "local_acc": acc} for acc, lr in scored]
        chosen[v] = {"params": {"lr": best_lr}, "tune_local_acc": best_acc, "on_grid_edge": edge, "grid": grid}
    root.mkdir(parents=True, exist_ok=True)
    (root / "tuned.json").write_text(json.dumps(chosen, indent=2))
    for v in (v for v in variants if v in chosen):
        c = chosen[v]
        warn = "  (on the grid's edge)" if c["on_grid_edge"] else ""
        print(f"{v:20s} chosen lr {c['params']['lr']:g} (local acc on digits-tune {c['tune_local_acc']:.3f}){warn}")
    return chosen


def _study_cells(
    root: Path, chosen: dict[str, dict[str, Any]], seeds: int, variants: list[str], rounds: int | None
) -> list[tuple[tuple, Path, dict]]:
    out = []
    for setting, eps, seed, variant in itertools.product(SETTINGS, EPSILONS, range(1, seeds + 1), variants):
        if variant not in chosen:
            continue
        settings = {**SETTINGS[setting], **VARIANTS[variant], **chosen[variant]["params"], **_extra(rounds)}
        settings.update(epsilon=eps, seed=seed, noise_seed=seed)
        path = root / "study" / setting / f"eps{eps:g}" / variant / f"seed{seed}"
        out.append(((setting, eps, variant, seed), path, settings))
    return out


def _chosen(root: Path, variants: list[str]) -> dict[str, dict[str, Any]]:
    chosen = _load_tuned(root)
    missing = [v for v in variants if v not in chosen]
    if not chosen:
        raise SystemExit(f"{root / 'tuned.json'} not found: run the tune phase first")
    if missing:
        print(f"not tuned yet, left out: {missing} (run the tune phase for them)", file=sys.stderr)
    return chosen


def study(root: Path, workers: int, seeds: int, variants: list[str], rounds: int | None) -> None:
    cells = _study_cells(root, _chosen(root, variants), seeds, variants, rounds)
    # Seed first, then epsilon, setting and variant, so that partial results cover every cell early.
    cells.sort(key=lambda c: (c[0][3], c[0][1], list(SETTINGS).index(c[0][0]), list(VARIANTS).index(c[0][2])))
    run_all([(p, s) for _, p, s in cells], workers, "study")


def _pooled_se(a: list[float], b: list[float]) -> float:
    """The standard error of the difference of the two means: sqrt(s_a^2 / n_a + s_b^2 / n_b)."""
    (_, sa, na), (_, sb, nb) = stats(a), stats(b)
    return math.sqrt(sa**2 / na + sb**2 / nb)


def report(root: Path, out_prefix: Path, seeds: int, variants: list[str], rounds: int | None) -> dict[str, Any]:
    chosen = _chosen(root, variants)
    rows: dict[tuple, dict[str, list[float]]] = {}
    paths: dict[tuple, list[Path]] = {}
    for (setting, eps, variant, _), path, _ in _study_cells(root, chosen, seeds, variants, rounds):
        res = path / "results.json"
        if not res.is_file():
            continue
        final = json.loads(res.read_text())["final"]
        r = rows.setdefault((setting, eps, variant), {"local": [], "neighbor": [], "seconds": [], "eps": []})
        r["local"].append(final["local_acc"])
        r["neighbor"].append(final["neighbor_acc"])
        r["seconds"].append(final["seconds"])
        r["eps"].append(final["epsilon_total"])
        paths.setdefault((setting, eps, variant), []).append(path)
    table = []
    order = {k: i for i, k in enumerate(itertools.product(SETTINGS, EPSILONS, VARIANTS))}
    for (setting, eps, variant), r in sorted(rows.items(), key=lambda kv: order[kv[0]]):
        lm, ls, n = stats(r["local"])
        nm, ns, _ = stats(r["neighbor"])
        base = rows.get((setting, eps, BASELINE))
        table.append(
            {
                "setting": setting,
                "epsilon_target": eps,
                "variant": variant,
                "n": n,
                "local_mean": lm,
                "local_std": ls,
                "local_se": ls / math.sqrt(n),
                "diff_vs_fixed_tuned": lm - stats(base["local"])[0] if base else float("nan"),
                "pooled_se_vs_fixed_tuned": _pooled_se(r["local"], base["local"]) if base else float("nan"),
                "neighbor_mean": nm,
                "neighbor_std": ns,
                "epsilon_total_mean": sum(r["eps"]) / n,
                "epsilon_total_max": max(r["eps"]),
                "seconds_mean": sum(r["seconds"]) / n,
            }
        )
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    cols = list(table[0]) if table else []
    with open(out_prefix.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for row in table:
            writer.writerow([f"{row[c]:.4g}" if isinstance(row[c], float) else row[c] for c in cols])
    decision = _decision(rows)
    md = [
        "| setting | eps_total | variant | n | local (mean ± std) | SE | diff vs fixed-tuned ± pooled SE "
        "| eps_total reported (max) | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        md.append(
            f"| {row['setting']} | {row['epsilon_target']:g} | {row['variant']} | {row['n']} | "
            f"{row['local_mean']:.3f} ± {row['local_std']:.3f} | {row['local_se']:.3f} | "
            f"{row['diff_vs_fixed_tuned']:+.3f} ± {row['pooled_se_vs_fixed_tuned']:.3f} | "
            f"{row['epsilon_total_max']:.3f} | {row['seconds_mean']:.1f} |"
        )
    md += ["", "Tuned on digits-tune (public), epsilon_total 3, seed 1 (9 learning rates per variant):"]
    for v, c in chosen.items():
        edge = ", on the grid's edge" if c.get("on_grid_edge") else ""
        md.append(f"- {v}: lr {c['params']['lr']:g} (local {c['tune_local_acc']:.3f}{edge})")
    md += ["", f"Decision rule (issue 24): {decision['rule']}"]
    for v, d in decision["variants"].items():
        complete = d["cells"] == len(SETTINGS) * len(EPSILONS)
        verdict = "passes" if d["passes"] else ("fails" if complete else "incomplete")
        md.append(
            f"- {v}: {d['cells_ok']} of {d['cells']} cells ({verdict}; mean local over the cells {d['mean_local']:.3f})"
        )
    md.append(f"- default: {decision['default'] or 'none'} ({decision['reason']})")
    if rounds is not None:
        md += ["", f"Smoke test: every run's --rounds overridden to {rounds}."]
    out_prefix.with_suffix(".md").write_text("\n".join(md) + "\n")
    norms = _clip_norms(paths)
    out_prefix.with_suffix(".json").write_text(
        json.dumps(
            {
                **provenance(__file__),
                "rounds_override": rounds,
                "table": table,
                "tuned": chosen,
                "lr_grids": {v: LR_GRIDS[v] for v in chosen},
                **decision,
                "clip_norm_columns": norms["columns"],
            },
            indent=2,
        )
    )
    _plot(table, out_prefix.with_suffix(".png"))
    clip_png = out_prefix.parent / f"{out_prefix.name}_clip_norm.png"
    if norms["curves"]:
        _plot_clip_norms(norms["curves"], clip_png)
        print(f"clip norms ({norms['columns']}) plotted in {clip_png}")
    else:
        print("no clip-norm column in the adaptive runs' rounds.csv: no clip-norm figure")
    print("\n".join(md))
    return decision


def _decision(rows: dict[tuple, dict[str, list[float]]]) -> dict[str, Any]:
    """A candidate passes a (setting, epsilon) cell when mean_v >= mean_fixed-tuned - SE, SE the pooled standard
    error of the difference of the two means; it passes the rule in >= PASS_CELLS of the 6 cells. If both pass, the
    one with the higher mean local accuracy over the six cells becomes the default."""
    variants = {}
    for v in CANDIDATES:
        ok, cells, means = 0, [], []
        for setting, eps in itertools.product(SETTINGS, EPSILONS):
            b, o = rows.get((setting, eps, BASELINE)), rows.get((setting, eps, v))
            if not b or not o or len(b["local"]) < 2 or len(o["local"]) < 2:
                continue
            mb, mo = stats(b["local"])[0], stats(o["local"])[0]
            se = _pooled_se(o["local"], b["local"])
            passed = mo >= mb - se
            ok += passed
            means.append(mo)
            cells.append({"setting": setting, "epsilon": eps, BASELINE: mb, v: mo, "se": se, "pass": passed})
        mean = sum(means) / len(means) if means else float("nan")
        variants[v] = {"cells_ok": ok, "cells": len(cells), "passes": ok >= PASS_CELLS, "mean_local": mean}
        variants[v]["detail"] = cells
    passing = [v for v in CANDIDATES if variants[v]["passes"]]
    short = [v for v in CANDIDATES if variants[v]["cells"] < len(SETTINGS) * len(EPSILONS)]
    if short:
        default, reason = None, "undecided: " + ", ".join(f"{v} has {variants[v]['cells']} of 6 cells" for v in short)
    elif not passing:
        default, reason = None, "no candidate passes: fixed C stays"
    elif len(passing) == 1:
        default, reason = passing[0], "the only candidate that passes"
    else:
        default = max(passing, key=lambda v: variants[v]["mean_local"])
        reason = "both pass; the higher mean local accuracy over the cells"
    return {
        "rule": (
            f"{CANDIDATES[0]} reaches {BASELINE}'s mean local accuracy within one pooled standard error "
            f"(sqrt(s1^2/n1 + s2^2/n2)) in at least {PASS_CELLS} of the {len(SETTINGS) * len(EPSILONS)} "
            f"(setting, epsilon) cells, and so does {CANDIDATES[1]}; if both pass, the one with the higher mean "
            "local accuracy over the cells becomes the default"
        ),
        "variants": variants,
        "default": default,
        "reason": reason,
    }


def _clip_norm_columns(header: list[str]) -> list[str]:
    """rounds.csv's clip-norm columns, whatever their name: ``clip_norm`` itself, else every column naming both a
    clip and a norm (one per client, say), else none."""
    if "clip_norm" in header:
        return ["clip_norm"]
    return [c for c in header if "clip" in c.lower() and "norm" in c.lower() and c != "norm_thresh"]


def _clip_norms(paths: dict[tuple, list[Path]]) -> dict[str, Any]:
    """The adaptive runs' clip norm per round, the mean over the clip-norm columns (clients) and the seeds, per
    (setting, epsilon, variant); empty when rounds.csv has no such column."""
    curves: dict[tuple, list[tuple[int, float]]] = {}
    columns: set[str] = set()
    for (setting, eps, variant), runs in paths.items():
        if variant not in ADAPTIVE:
            continue
        per_round: dict[int, list[float]] = {}
        for run in runs:
            try:
                with open(run / "rounds.csv", newline="") as fh:
                    reader = csv.DictReader(fh)
                    cols = _clip_norm_columns(list(reader.fieldnames or []))
                    for rec in reader:
                        vals = [float(rec[c]) for c in cols if rec.get(c) not in (None, "")]
                        if vals:
                            per_round.setdefault(int(rec["round"]), []).append(sum(vals) / len(vals))
            except (OSError, ValueError, KeyError):
                continue
            columns.update(cols)
        if per_round:
            curves[setting, eps, variant] = [(k, sum(v) / len(v)) for k, v in sorted(per_round.items())]
    return {"curves": curves, "columns": sorted(columns)}


def _axes(n: int, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, n), figsize=(4.5 * max(1, n), height), sharey=True)
    return plt, fig, ([axes] if n <= 1 else list(axes))


def _plot(table: list[dict[str, Any]], path: Path) -> None:
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in table)]
    plt, fig, axes = _axes(len(settings))
    for ax, setting in zip(axes, settings, strict=False):
        for variant in VARIANTS:
            pts = [r for r in table if r["setting"] == setting and r["variant"] == variant]
            if not pts:
                continue
            ax.errorbar(
                [r["epsilon_target"] for r in pts],
                [r["local_mean"] for r in pts],
                yerr=[0.0 if math.isnan(r["local_std"]) else r["local_std"] for r in pts],
                marker="o",
                capsize=3,
                label=variant,
            )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(EPSILONS), [f"{e:g}" for e in EPSILONS])
        ax.set_title(setting)
        ax.set_xlabel("epsilon_total")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("local accuracy (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_clip_norms(curves: dict[tuple, list[tuple[int, float]]], path: Path) -> None:
    settings = [s for s in SETTINGS if any(k[0] == s for k in curves)]
    plt, fig, axes = _axes(len(settings))
    styles = {eps: style for eps, style in zip(EPSILONS, ("-", "--", ":"), strict=True)}
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    for ax, setting in zip(axes, settings, strict=False):
        for (s, eps, variant), pts in curves.items():
            if s != setting:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                linestyle=styles.get(eps, "-"),
                color=colors[variant],
                label=f"{variant}, eps {eps:g}",
            )
        ax.axhline(FIXED_TUNED_C, color="grey", linewidth=0.8, label=f"fixed-tuned C = {FIXED_TUNED_C:g}")
        ax.set_yscale("log")
        ax.set_title(setting)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("clip norm C (mean over clients and seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("tune", "study", "report"))
    p.add_argument("--root", type=Path, default=Path("runs/study-clipping"))
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (each with OMP_NUM_THREADS=1)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=None, help="override every run's rounds (smoke tests; own subfolder)")
    p.add_argument("--out", type=Path, default=Path("bench/results/study_clipping"), help="report prefix")
    args = p.parse_args(argv)
    if args.workers < 1 or args.seeds < 1 or (args.rounds is not None and args.rounds < 1):
        p.error("--workers, --seeds and --rounds must be >= 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    variants = [v for v in VARIANTS if v in variants]  # the table's order
    root = args.root if args.rounds is None else args.root / f"rounds{args.rounds}"
    if args.phase == "tune":
        tune(root, args.workers, variants, args.rounds)
    elif args.phase == "study":
        study(root, args.workers, args.seeds, variants, args.rounds)
    else:
        report(root, args.out, args.seeds, variants, args.rounds)


if __name__ == "__main__":
    main()
