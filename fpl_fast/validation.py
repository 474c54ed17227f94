"""Input validation shared by the package: one ``check``, the config checks, and the CLI's flag wording.

``check(cond, msg)`` raises ValueError (the ops, the privacy code). Config dataclasses raise :class:`ConfigError`,
a ValueError that names the field it is about (``"rank must be an integer >= 1, got 0"``); the CLI rewords it with
:func:`flag_message` (``"--rank must be an integer >= 1, got 0"``).

The wording rule: a ConfigError's message starts with its field, and every other field it names is listed in
``others``. The CLI turns each of those names, where it stands as a word, into its flag (``n_ctx`` -> ``--n-ctx``)
and ``name='value'`` into ``--flag value``; nothing else in the message changes. A message that quotes a path (where
a field's name may stand as a word) or that tells the caller what to do differently (``resume=True`` against
``--resume``) carries its CLI wording itself (``cli``).

:class:`CliParser` is the argparse parser of every command: a bad flag is one line and exit code 2, and a flag is
never guessed from its abbreviation.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "CliParser",
    "ConfigError",
    "check",
    "check_choice",
    "check_finite",
    "check_int",
    "flag",
    "flag_message",
    "is_int",
]


class ConfigError(ValueError):
    """A bad configuration value. ``field``: the field the message starts with (or None); ``others``: the other
    fields the message names; ``cli``: the message as the command line says it, where the flag wording of
    :func:`flag_message` would not do (None: that wording)."""

    def __init__(self, field: str | None, msg: str, others: Iterable[str] = (), *, cli: str | None = None) -> None:
        super().__init__(msg)
        self.field = field
        self.others = tuple(others)
        self.cli = cli


class CliParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump), exits 2, and takes no abbreviations
    (``--num-user`` is an error, not ``--num-users``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless cond."""
    if not cond:
        raise ValueError(msg)


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(cfg: Any, *names: str, low: int = 1, note: str = "") -> None:
    """Each field is an integer >= low (``note``: an explanation after the bound)."""
    for name in names:
        value = getattr(cfg, name)
        if not is_int(value) or value < low:
            raise ConfigError(name, f"{name} must be an integer >= {low}{note}, got {value!r}")


def check_choice(cfg: Any, name: str, allowed: Iterable[str]) -> None:
    """The field is one of allowed."""
    allowed = tuple(allowed)
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(name, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def check_finite(cfg: Any, *names: str, positive: bool = True) -> None:
    """Each field is a finite number > 0 (positive) or >= 0."""
    for name in names:
        value = getattr(cfg, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (ok and (value > 0 if positive else value >= 0)):
            raise ConfigError(name, f"{name} must be a finite number {'>' if positive else '>='} 0, got {value}")


def flag(name: str) -> str:
    """The CLI flag of a field: n_ctx -> --n-ctx."""
    return "--" + name.replace("_", "-")


def flag_message(exc: ConfigError) -> str:
    """The message of exc with its fields spelled as CLI flags (see the module docstring)."""
    if exc.cli is not None:
        return exc.cli
    msg = str(exc)
    names = [n for n in (exc.field, *exc.others) if n]
    for name in sorted(set(names), key=len, reverse=True):  # longest first: noise_local before noise
        pattern = rf"(?<![\w\-']){re.escape(name)}(?:='([^']*)')?(?![\w\-])"

        def repl(m: re.Match[str], n: str = name) -> str:
            return flag(n) + (f" {m.group(1)}" if m.group(1) is not None else "")

        msg = re.sub(pattern, repl, msg)
    return msg


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; one-line ValueErrors for a missing file, bad JSON or another JSON type
    (``what`` names the file in them, e.g. "--config" or "grid spec")."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {p} must hold a JSON object, got {type(data).__name__}")
    return data
