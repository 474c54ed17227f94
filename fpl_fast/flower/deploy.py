"""``python -m fpl_fast.flower.deploy DIR``: write the Flower app folder that ``flwr run DIR CONNECTION`` ships.

The folder holds only a pyproject.toml: its components name the ServerApp and ClientApp of the *installed* fpl_fast
(a copy of the package in the folder would shadow it on every node, without its compiled ops), and its
``[tool.flwr.app.config]`` lists every setting with its default, because ``flwr run --run-config`` may only
override keys listed there. Settings are RunConfig's and AppSettings' fields with '-' for '_'; None is "none".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from fpl_fast import __version__
from fpl_fast.config import RunConfig
from fpl_fast.flower.protocol import AppSettings
from fpl_fast.validation import CliParser

__all__ = ["app_config", "build_parser", "main", "write_app"]

PROG = "python -m fpl_fast.flower.deploy"


def _toml(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # TOML spells infinity "inf", as repr does
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def app_config() -> dict[str, Any]:
    """Every run config key with its default (the algorithm's, then the ServerApp's own)."""
    out: dict[str, Any] = {}
    for cls in (RunConfig, AppSettings):
        for f in dataclasses.fields(cls):
            out[f.name.replace("_", "-")] = f.default
    return out


def write_app(folder: Path, **overrides: Any) -> Path:
    """Write ``folder/pyproject.toml`` (defaults, with ``overrides`` by key); returns its path."""
    config = app_config()
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; allowed: {', '.join(config)}")
    config.update(overrides)
    lines = [
        "# Written by python -m fpl_fast.flower.deploy: the code comes from the installed fpl_fast.",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fpl-fast-flower"',
        f'version = "{__version__}"',
        'description = "fpl_fast DP-FPL as a Flower app (ServerApp and ClientApp of the installed fpl_fast)"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fplfast"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fpl_fast.flower.server_app:app"',
        'clientapp = "fpl_fast.flower.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml(v)}" for k, v in config.items()),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = CliParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="the app folder to write (for flwr run FOLDER CONNECTION)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    print(write_app(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
