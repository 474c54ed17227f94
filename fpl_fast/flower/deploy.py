"""``python -m fpl_fast.flower.deploy [app] DIR``: write the Flower app folder that ``flwr run DIR CONNECTION`` ships;
``certs DIR``: a CA and the SuperLink's TLS certificate; ``node-key FILE``: a SuperNode's authentication key pair
(:mod:`fpl_fast.flower.credentials`; private keys 0600, never overwritten).

The app folder holds only a pyproject.toml: its components name the ServerApp and ClientApp of the *installed* fpl_fast
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
from fpl_fast.flower.credentials import CA_CERT, DEFAULT_HOSTS, make_certs, make_node_key, superlink_tls_args
from fpl_fast.flower.protocol import AppSettings
from fpl_fast.validation import CliParser

__all__ = ["app_config", "build_parser", "main", "write_app"]

PROG = "python -m fpl_fast.flower.deploy"
COMMANDS = ("app", "certs", "node-key")


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
    p.add_argument(
        "command",
        nargs="?",
        choices=COMMANDS,
        help="app (the default): the app folder for flwr run FOLDER CONNECTION; certs: a CA (ca.pem, ca.key) and the "
        "SuperLink's certificate (server.pem, server.key) in FOLDER; node-key: a SuperNode's key pair (FOLDER is the "
        "private key's file, FOLDER.pub its public key for flwr supernode register)",
    )
    p.add_argument("folder", type=Path, help="the folder (or, for node-key, the key file) to write")
    p.add_argument(
        "--host",
        action="append",
        default=None,
        help="certs: an IP address or DNS name the SuperLink is reached at (repeat for several; default: "
        + " and ".join(DEFAULT_HOSTS)
        + ")",
    )
    p.add_argument("--days", type=int, default=365, help="certs: days the certificates are valid")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    command = args.command or "app"
    if args.command is None and str(args.folder) in COMMANDS[1:]:
        parser.error(f"{args.folder} needs a folder: {prog} {args.folder} FOLDER")
    if command != "certs" and (args.host is not None or args.days != 365):
        parser.error(f"--host and --days apply to certs only, not to {command}")
    try:
        if command == "app":
            print(write_app(args.folder))
        elif command == "certs":
            paths = make_certs(args.folder, tuple(args.host or DEFAULT_HOSTS), args.days)
            print(f"wrote {', '.join(str(p) for p in paths.values())} (keys 0600)")
            print("flower-superlink " + " ".join(superlink_tls_args(args.folder)) + " --enable-supernode-auth ...")
            print(f"flower-supernode --root-certificates {paths[CA_CERT]} ...; flwr: root-certificates in config.toml")
        else:
            private, public = make_node_key(args.folder)
            print(f"wrote {private} (0600) and {public}")
            print(f"enrol it: flwr supernode register {public} CONNECTION")
            print(f"start the node with: flower-supernode --auth-supernode-private-key {private} ...")
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
