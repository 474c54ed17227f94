"""``python -m fpl_fast.selftest``: check every compiled kernel against the reference on every device.

One row per op and device type (cpu; cuda when a GPU is visible and the CUDA kernels are built): the max error
of the kernel against the reference on the op's fixed self-check input (:mod:`fpl_fast.ops.first_use_check`), the
tolerance and pass/fail. Exit code 0 when all pass, 1 on any failure or when the compiled ops are not loaded
(nothing to check), 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from fpl_fast import ops
from fpl_fast.ops import first_use_check
from fpl_fast.validation import CliParser

PROG = "python -m fpl_fast.selftest"


def devices() -> list[str]:
    """Device types whose kernels can run here."""
    out = ["cpu"]
    if ops.has_cuda_kernels() and torch.cuda.is_available():
        out.append("cuda")
    return out


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = CliParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(first_use_check.CHECKS), help="comma-separated ops (default: all)")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all", help="device types to check")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    names = [n for n in args.ops.split(",") if n]
    bad = [n for n in names if n not in first_use_check.CHECKS]
    if bad or not names:
        print(f"{prog}: error: unknown op(s) {bad}; choose from {', '.join(first_use_check.CHECKS)}", file=sys.stderr)
        return 2
    if not ops.has_cpp_ops():
        print("fpl_fast._C is not loaded (see the warning above): the reference ops run, no kernel to check")
        return 1
    devs = devices() if args.device == "all" else [args.device]
    if "cuda" in devs and "cuda" not in devices():
        print(f"{prog}: error: no CUDA kernels or no GPU here", file=sys.stderr)
        return 2
    print(f"{'op':<24}{'device':<8}{'max error':>12}{'tolerance':>12}  result")
    failed = 0
    for name in names:
        for dev in devs:
            r = first_use_check.run_check(name, dev)
            failed += not r.ok
            verdict = "pass" if r.ok else "FAIL" + (f" ({r.error})" if r.error else "")
            print(f"{name:<24}{dev:<8}{r.err:>12.3g}{r.tol:>12.3g}  {verdict}")
    print(f"{failed} failed" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
