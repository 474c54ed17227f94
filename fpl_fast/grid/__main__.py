"""`python -m fpl_fast.grid SPEC.json [--out DIR] [--workers N] [--devices cuda:0,cuda:1] [--metric M]
[--tensorboard TB] [--quiet]`.

Exit code 0: every cell finished; 1: some cells failed (each named on stderr with its one-line error, the
others went on); 2: a bad spec or flag (one line on stderr, nothing run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fpl_fast.grid.spec import SpecError, load_spec, parse_axis_flag, parse_spec
from fpl_fast.grid.table import METRICS
from fpl_fast.tracking import require_tensorboard
from fpl_fast.validation import CliParser

PROG = "python -m fpl_fast.grid"


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = CliParser(
        prog=prog, description="A grid of DP-FPL runs (cartesian product of axes) and its paper-shaped table."
    )
    p.add_argument("spec", nargs="?", help='JSON {"base": {...}, "axes": {field: [values]}, "name", "table"}')
    p.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="an axis (adds to or replaces the spec's); repeatable; values read as JSON, else strings",
    )
    p.add_argument("--out", help="grid folder (default runs/grids/<spec name>); rerun the same command to resume")
    p.add_argument("--workers", type=_workers, default=1, help="cells run in parallel processes (default 1)")
    p.add_argument("--devices", help="comma-separated devices: worker i runs on devices[i %% len] (e.g. cuda:0,cuda:1)")
    p.add_argument("--feature-cache", help="image-feature cache folder (default DIR/features)")
    p.add_argument(
        "--metric",
        choices=list(METRICS),
        default="last",
        help="accuracy read from each results.json: last (final round, default) | mean_last5 | mean_last10",
    )
    p.add_argument(
        "--tensorboard",
        metavar="TB",
        help="TensorBoard logs of every round, one subfolder TB/<cell name> per cell (needs pip install "
        ".[tensorboard]); tensorboard --logdir TB compares the cells",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fail(msg: str, prog: str = PROG) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.spec is None and not args.axis:
            raise SpecError("give a grid spec file (SPEC.json) or at least one --axis FIELD=V1,V2")
        data = load_spec(args.spec) if args.spec else {"name": "grid"}
        spec = parse_spec(data, [parse_axis_flag(a) for a in args.axis])
        devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else []
        if args.devices is not None and not devices:
            raise SpecError("--devices: give one or more devices, e.g. cuda:0,cuda:1")
        out = Path(args.out) if args.out else Path("runs") / "grids" / spec.name.replace("/", "_")
        if out.exists() and not out.is_dir():
            raise SpecError(f"--out {out} is a file, not a folder")
        require_tensorboard(args.tensorboard)
    except ValueError as exc:
        return _fail(str(exc).strip().splitlines()[0], prog)

    from fpl_fast.grid.cells import run_grid  # heavy imports after the spec is known good
    from fpl_fast.grid.table import write_plot, write_tables

    reports = run_grid(
        spec,
        out,
        workers=args.workers,
        devices=devices,
        feature_cache=Path(args.feature_cache) if args.feature_cache else None,
        progress=not args.quiet,
        tensorboard=Path(args.tensorboard) if args.tensorboard else None,
    )
    try:
        text = write_tables(spec, out, args.metric)
        write_plot(spec, out, args.metric)
    except ValueError as exc:
        return _fail(str(exc).strip().splitlines()[0], prog)
    print(text, end="")
    counts = {s: sum(r["status"] == s for r in reports) for s in ("done", "resumed", "skipped", "failed")}
    print(
        f"{len(reports)} cells: {counts['done']} run, {counts['resumed']} resumed, {counts['skipped']} skipped "
        f"(finished before), {counts['failed']} failed; written to {out}/ (table.md, table.csv, "
        "accuracy_vs_epsilon.png, grid.json, cells/)"
    )
    failed = [r for r in reports if r["status"] == "failed"]
    for r in failed:
        print(f"{prog}: cell {r['name']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
