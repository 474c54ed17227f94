"""`python -m fpl_fast.audit [run flags] [--auditor white-box|black-box] [--canaries M] ...`: an empirical lower bound
on epsilon from one training run with canaries (fpl_fast.privacy.audit_bound), beside the accountant's upper bound.

Takes every flag of ``python -m fpl_fast.run`` (the audited run is that run, with canaries in one client's data) and
writes audit.json (scores, membership, guesses, bounds) and audit_scores.png (score distributions) to --out. Bad input
ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from fpl_fast.run import _fail, _float, config_from_args
from fpl_fast.run import build_parser as run_parser

__all__ = ["audit_line", "build_parser", "main"]

PROG = "python -m fpl_fast.audit"
_NOT_HERE = {"mia": "--mia", "resume": "--resume", "tensorboard": "--tensorboard"}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """``python -m fpl_fast.run``'s parser with the audit's own group."""
    p = run_parser(prog)
    p.usage = "%(prog)s [--FLAG VALUE ...] (the audited run's flags, and the audit's at the end)"
    p.description = "Privacy audit with one training run (Steinke, Nasr and Jagielski 2023) of a DP-FPL run."
    a = p.add_argument_group("audit")
    a.add_argument(
        "--auditor",
        choices=("white-box", "black-box"),
        default="white-box",
        help="white-box: crafted gradients where the mechanism clips, every release observed (default) | "
        "black-box: canary images with wrong labels, scored by the final prompt's loss",
    )
    a.add_argument("--canaries", type=int, help="m (default: white-box min(1000, coordinates observed), black-box 200)")
    a.add_argument("--audit-client", type=int, default=0, help="the client whose data gets the canaries (default 0)")
    a.add_argument("--confidence", type=_float, default=0.95, help="confidence of the lower bound (default 0.95)")
    a.add_argument(
        "--canary-norm",
        type=_float,
        help="white-box canary norm over the clip norm (default 2 where each example is clipped; 1000 where none is: "
        "--clip-mode batch, whose batch-mean clip bounds no single example, or no noise)",
    )
    a.add_argument("--design-seed", type=int, default=0, help="seed of the public canary design (default 0)")
    return p


def audit_line(report: dict[str, Any]) -> str:
    """The one line of the result: lower bound, confidence, the accountant's upper bound and their ratio."""
    ub, ratio = report["upper_bound"], report["ratio"]
    ub_text = "inf" if not math.isfinite(ub) else f"{ub:.3f}"
    line = (
        f"empirical epsilon >= {report['epsilon_lower_bound']:.3f} at {report['confidence']:.0%} confidence "
        f"({report['auditor']}, {report['correct']}/{report['guesses']} guesses right, m={report['canaries']}); "
        f"accountant {report['upper_bound_name']} <= {ub_text}" + (f" (ratio {ratio:.3f})" if ratio is not None else "")
    )
    if report.get("claimed_epsilon") is not None:
        line += f"; epsilon claimed by the authors' formula: {report['claimed_epsilon']:g}"
    return line


def plot_scores(report: dict[str, Any], path: Path) -> None:
    """Histograms of the included and the excluded canaries' scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fpl_fast.outputs import save_figure

    scores, inc = np.asarray(report["scores"]), np.asarray(report["included"], dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(scores, bins=40).tolist()
    ax.hist(scores[inc], bins=bins, alpha=0.6, label=f"included ({inc.sum()})")
    ax.hist(scores[~inc], bins=bins, alpha=0.6, label=f"excluded ({(~inc).sum()})")
    ax.set_xlabel(
        "canary score"
        + (" (sum of observed releases, canary units)" if report["auditor"] == "white-box" else " (-loss)")
    )
    ax.set_ylabel("canaries")
    ax.set_title(
        f"{report['auditor']} audit: eps >= {report['epsilon_lower_bound']:.2f} "
        f"({report['upper_bound_name']} <= {report['upper_bound']:.3g})",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.method != "dpfpl":
            raise ValueError(f"the audit runs --method dpfpl (its mechanisms), not {args.method}")
        for name, flag in _NOT_HERE.items():
            if getattr(args, name):
                raise ValueError(f"{flag} does not apply to an audit")
        cfg, run = config_from_args(args)
        if run.engine != "inprocess":
            raise ValueError(f"the audit runs in process, not on --engine {run.engine}")
        from fpl_fast import outputs

        out = Path(run.out) if run.out else outputs.default_out_dir()
        if (out / "audit.json").exists():  # before the heavy imports below (seconds)
            raise ValueError(f"{out} already holds an audit (audit.json): give another --out")
        from fpl_fast.attacks.canaries import run_audit
        from fpl_fast.preparation import prepare
        from fpl_fast.privacy.audit_bound import AuditConfig

        audit = AuditConfig(
            auditor=args.auditor,
            canaries=args.canaries,
            client=args.audit_client,
            confidence=args.confidence,
            canary_norm=args.canary_norm,
            design_seed=args.design_seed,
        )
        outputs.check_writable(out)  # writable, before the training
        backbone, classnames, data = prepare(cfg, feature_cache=run.feature_cache)
        report = run_audit(cfg, audit, backbone, classnames, data, progress=run.progress)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(exc, prog=prog)
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_json(out / "audit.json", {"config": cfg.to_dict(), **report})
    plot_scores(report, out / "audit_scores.png")
    print(audit_line(report))
    print(f"written to {out}/ (audit.json, audit_scores.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
