"""``fpl-fast``: the console command (pyproject's ``[project.scripts]``), one subcommand per entry point.

``fpl-fast run ...`` is ``python -m fpl_fast.run ...``, and likewise ``grid``, ``audit``, ``selftest`` and ``deploy``
(``python -m fpl_fast.flower.deploy``): the subcommand's module's ``main`` gets the rest of the command line, and
only that module is imported. :func:`reference_markdown` renders every subcommand's flags for the docs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fpl_fast import __version__
from fpl_fast.validation import CliParser

__all__ = ["COMMANDS", "build_parser", "main", "reference_markdown"]

PROG = "fpl-fast"
# subcommand -> (its module, whose main(argv, prog) and build_parser(prog) it runs; what it does).
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("fpl_fast.run", "train and evaluate one federated job (DP-FPL, its baselines, FedDTPT, RAPT)"),
    "grid": ("fpl_fast.grid.__main__", "a grid of runs and its paper-shaped table"),
    "audit": ("fpl_fast.audit", "an empirical lower bound on epsilon from one training run with canaries"),
    "selftest": ("fpl_fast.selftest", "check every compiled kernel against its reference"),
    "deploy": (
        "fpl_fast.flower.deploy",
        "write the Flower app folder that flwr run ships, or a deployment's TLS certificates and node keys",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog=PROG,
        description="Private, personalized federated prompt learning on frozen CLIP. "
        + "; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items())
        + ". Each command's own flags: fpl-fast COMMAND --help.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("command", choices=COMMANDS, help="the command to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own flags and arguments")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fpl-fast COMMAND ARGS...``; the exit code is the command's."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(list(args.args), prog=f"{PROG} {args.command}"))


def reference_markdown(level: int = 2) -> str:
    """Every command's flags as Markdown: a heading per command (at ``level``), a table per argument group
    (flag, ``--config`` key, type / allowed values, default, meaning), rendered from the parsers and the settings'
    metadata; the same text every time."""
    from fpl_fast.run import SETTINGS, parser_markdown

    parts = []
    for name, (module_name, text) in COMMANDS.items():
        parser = importlib.import_module(module_name).build_parser(f"{PROG} {name}")
        parts.append(f"{'#' * level} `{PROG} {name}`\n\n{text[:1].upper()}{text[1:]}.\n")
        if name == "audit":  # the audited run takes run's flags: only the audit's own are new
            parts.append(f"Every flag of `{PROG} run` (the audited run), and:\n")
            parts.append(parser_markdown(parser, settings={}, only=("audit",), level=level + 1))
        else:
            parts.append(parser_markdown(parser, settings=SETTINGS if name == "run" else {}, level=level + 1))
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
