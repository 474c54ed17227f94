"""`python -m fpl_fast.run` (or `fpl-fast run`): a federated DP-FPL job from the command line.

With no arguments it runs the embedded default offline (tiny CLIP pretrained on part of scikit-learn's
digits, the rest split over 10 clients, dpfpl with DP on). Every flag is a field of
:class:`fpl_fast.config.RunConfig` or :class:`fpl_fast.config.RunSettings`, and the parser is built from those
fields' metadata (flag, help, allowed values, default), as is the CLI reference (:func:`cli_reference_markdown`);
``--config FILE`` (JSON, the fields' names as keys) sets a base that flags override. ``--resume --out DIR`` takes
the configuration saved in DIR's checkpoint. Bad input ends with one line on stderr and exit code 2; Ctrl-C with
one line that says how to resume, and exit code 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import Field
from pathlib import Path
from typing import Any, get_type_hints

from fpl_fast.config import (
    METHODS,
    PAPER,
    SECTIONS,
    RunConfig,
    RunSettings,
    allowed_values,
    load_config_file,
    resumed_config,
    setting_fields,
    value_kind,
)
from fpl_fast.validation import CliParser, ConfigError, flag_message

__all__ = ["PROG", "build_parser", "cli_reference_markdown", "config_from_args", "main", "parser_markdown"]

PROG = "python -m fpl_fast.run"
# Every setting by field name: what the parser's flags set (their dest is the field's name).
SETTINGS: dict[str, Field[Any]] = {f.name: f for f in setting_fields()}
_RUN_NAMES = {f.name for f in dataclasses.fields(RunSettings)}


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _number_or(word: str) -> Callable[[str], float | str]:
    """A flag reader of a number or one word (auto, adaptive)."""

    def read(text: str) -> float | str:
        if text.strip().lower() == word:
            return word
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {word}, got {text!r}") from None

    return read


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# How a setting's text is read, by config.value_kind: the reader, its metavar and its name in the reference.
_KINDS: dict[str, tuple[Any, str, str]] = {
    "int": (int, "N", "integer"),
    "float": (_float, "X", "number"),
    "bool": (_bool, "{true,false}", "true/false"),
    "str": (str, "TEXT", "text"),
    "number-or-auto": (_number_or("auto"), "X|auto", "number or auto"),
    "number-or-adaptive": (_number_or("adaptive"), "X|adaptive", "number, inf or adaptive"),
}


def render_default(f: Field[Any]) -> str:
    """A setting's default as --help and the reference show it (None: what the field's metadata says it means)."""
    value = f.default
    if value is None:
        return str(f.metadata.get("none") or "none")
    if f.metadata.get("switch"):
        return "off"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of ``python -m fpl_fast.run``: --method, --config, --paper, then one group per section of
    :data:`fpl_fast.config.SECTIONS` with a flag per setting (left out: None, the config file's or the default)."""
    p = CliParser(
        prog=prog,
        usage="%(prog)s [--FLAG VALUE ...] (every flag below; --resume --out DIR continues a stopped run)",
        description="Private, personalized federated prompt learning on frozen CLIP (DP-FPL and baselines).",
    )
    g = p.add_argument_group("method", "what runs, and from which settings")
    g.add_argument(
        "--method",
        choices=METHODS,
        default="dpfpl",
        help="dpfpl: DP-FPL and its baselines (pick with --factorization) | feddtpt: black-box discrete federated "
        "prompts | rapt: local-DP text privatisation with token reconstruction; the settings of feddtpt and rapt "
        "go in --config FILE (their Config fields) (default: %(default)s)",
    )
    g.add_argument("--config", metavar="FILE", help="JSON object of settings (the names below with underscores)")
    g.add_argument(
        "--paper",
        action="store_true",
        help="start from the DP-FPL authors' settings: " + ", ".join(f"{k} {v}" for k, v in PAPER.items()),
    )
    groups = {name: p.add_argument_group(name, text) for name, text in SECTIONS.items()}
    for f in SETTINGS.values():
        group = groups[f.metadata["section"]]
        text = f"{f.metadata['help']} (default: {render_default(f)})"
        if f.metadata["switch"]:
            group.add_argument(
                f.metadata["flag"], dest=f.name, action="store_const", const=not f.default, default=None, help=text
            )
            continue
        read, metavar, _ = _KINDS[value_kind(f)]
        choices = allowed_values(f)
        group.add_argument(
            f.metadata["flag"],
            dest=f.name,
            type=read,
            default=None,
            choices=choices,
            metavar=f.metadata["metavar"] or ("{" + ",".join(choices) + "}" if choices else metavar),
            help=text,
        )
    return p


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command gives, by field name: --paper's, then the --config file's, then the flags'."""
    settings: dict[str, Any] = {}
    if args.paper:
        settings.update(PAPER)
    if args.config:
        settings.update(load_config_file(args.config))
    settings.update((name, getattr(args, name)) for name in SETTINGS if getattr(args, name) is not None)
    if isinstance(settings.get("pretrained"), str) and settings["pretrained"].lower() == "none":
        settings["pretrained"] = None
    if settings.get("epsilon") is not None:
        given = [SETTINGS[n].metadata["flag"] for n in ("noise", "noise_local", "noise_global") if n in settings]
        if given:
            raise ValueError(f"--epsilon calibrates the noise: leave out {', '.join(given)} (or drop --epsilon)")
        settings["noise"] = None
    if isinstance(settings.get("norm_thresh"), str) and settings["norm_thresh"] != "adaptive":
        settings["norm_thresh"] = math.inf if settings["norm_thresh"] == "inf" else float(settings["norm_thresh"])
    return settings


def _method_module(method: str):
    return importlib.import_module(f"fpl_fast.methods.{method}")


def method_config_from_args(args: argparse.Namespace) -> Any:
    """The Config of --method feddtpt|rapt: shared flags and --config keys that the method knows."""
    mod = _method_module(args.method)
    names = {f.name for f in dataclasses.fields(mod.Config)}
    settings: dict[str, Any] = load_config_file(args.config, allowed=names) if args.config else {}
    for name, f in SETTINGS.items():
        value = getattr(args, name)
        if value is None or name in ("out", "progress", "resume", "tensorboard"):
            continue
        if name not in names:
            raise ValueError(
                f"{f.metadata['flag']} does not apply to --method {args.method} (its settings: "
                f"{', '.join(sorted(names))})"
            )
        settings[name] = value
    if args.paper or args.resume:
        raise ValueError(f"--paper and --resume apply to --method dpfpl only, not {args.method}")
    if isinstance(settings.get("pretrained"), str) and settings["pretrained"].lower() == "none":
        settings["pretrained"] = None
    return _build(mod.Config, settings)


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, RunSettings]:
    """The algorithm's config and the run's settings: defaults <- --paper <- --config FILE <- flags; with --resume,
    the configuration saved in --out's checkpoint, which the given settings may repeat but not contradict."""
    settings = given_settings(args)
    run = _build(RunSettings, {k: v for k, v in settings.items() if k in _RUN_NAMES})
    given = {k: v for k, v in settings.items() if k not in _RUN_NAMES}
    if run.resume:
        assert run.out is not None  # RunSettings refuses resume without out
        try:
            return resumed_config(Path(run.out), given), run
        except ConfigError as exc:
            raise ConfigError(exc.field, flag_message(exc), exc.others, cli=flag_message(exc)) from None
    return _build(RunConfig, given), run


def _build(cls: type, settings: dict[str, Any]):
    """cls(**settings), its ConfigError worded with flags ("rank must be ..." -> "--rank must be ...")."""
    try:
        return cls(**settings)
    except ConfigError as exc:
        text = flag_message(exc)
        raise ConfigError(exc.field, text, exc.others, cli=text) from None


def _fail(exc: BaseException, prog: str = PROG) -> int:
    """A user error: its first line on stderr, exit code 2, no traceback (a config error found after the flags were
    read, e.g. from the data's sizes, worded with flags too)."""
    text = flag_message(exc) if isinstance(exc, ConfigError) else str(exc)
    msg = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def _interrupted(out: Path, prog: str, resumable: bool) -> int:
    """Ctrl-C: one line that says how to go on (the checkpoint of the last finished round stays), exit code 130."""
    from fpl_fast.outputs import CHECKPOINT

    if resumable and (out / CHECKPOINT).is_file():
        how = f"continue with: {prog} --resume --out {shlex.quote(str(out))}"
    else:
        how = f"no checkpoint was written to {out}: run the command again to start over"
    print(f"{prog}: interrupted; {how}", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    out: Path | None = None
    try:
        if args.method == "dpfpl":
            cfg, run = config_from_args(args)
        else:
            cfg = method_config_from_args(args)
            run = RunSettings(out=args.out, progress=args.progress is None, tensorboard=args.tensorboard)
        from fpl_fast import outputs
        from fpl_fast.job import train  # heavy imports after the flags are known good

        out = Path(run.out) if run.out else outputs.default_out_dir()  # named here: Ctrl-C says where to resume
        result = train(cfg, settings=dataclasses.replace(run, out=str(out)))
    except (ValueError, FileNotFoundError) as exc:
        return _fail(exc, prog)
    except KeyboardInterrupt:
        if out is None:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        return _interrupted(out, prog, resumable=args.method == "dpfpl")
    from fpl_fast.outputs import summary_table

    print(summary_table(result.final, extra=args.method != "dpfpl"))
    files = "results.json, rounds.csv, accuracy.png" + (", checkpoint.pt" if args.method == "dpfpl" else "")
    if result.mia is not None:
        m = result.mia
        print(
            f"membership inference ({m['num_shadows']} shadow models): attack accuracy "
            f"{_fmt3(m['attack_accuracy'])}, AUC {_fmt3(m['attack_auc'])} (0.5 = chance)"
        )
        files += ", mia.json"
    print(f"results written to {result.out}/ ({files})")
    return 0


def _fmt3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ----------------------------------------------------------------------------------------------
# The CLI reference (docs), rendered from the parser and the settings' metadata
# ----------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _action_row(action: argparse.Action, settings: Mapping[str, Field[Any]], prog: str) -> list[str]:
    """One table row's cells: flag, --config key (where ``settings`` has the flag's field), type / allowed values,
    default, meaning."""
    flag = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
    f = settings.get(action.dest)
    if action.choices is not None:
        kind = " | ".join(f"`{c}`" for c in action.choices)
    elif action.nargs == 0:
        kind = "switch"
    elif f is not None:
        kind = _KINDS[value_kind(f)][2]
    else:  # a reader function says what it returns
        reader: Any = action.type
        returns = get_type_hints(reader).get("return") if callable(reader) else None
        kind = {int: "integer", float: "number", bool: "true/false"}.get(returns or reader, "text")
    if f is not None:
        return [flag, f"`{f.name}`", kind, render_default(f), f.metadata["help"]]
    default = (
        "-"
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS
        else str(action.default)
    )
    text = (action.help or "").replace(" (default: %(default)s)", "") % {**vars(action), "prog": prog}
    return [flag, *(["-"] if settings else []), kind, default, text]


def parser_markdown(
    parser: argparse.ArgumentParser,
    *,
    settings: Mapping[str, Field[Any]] = SETTINGS,
    only: Iterable[str] | None = None,
    level: int = 3,
) -> str:
    """One Markdown table per argument group of ``parser`` (flag, --config key where ``settings`` are given, type /
    allowed values, default, meaning), in the parser's order; ``settings``: the fields behind the flags (their help
    without the rendered default); ``only``: the titles of the groups to render (None: all). Deterministic: the
    same parser gives the same text."""
    parts: list[str] = []
    titles = None if only is None else set(only)
    header = ["flag", *(["`--config` key"] if settings else []), "type / allowed values", "default", "meaning"]
    for group in parser._action_groups:  # argparse keeps its groups only there
        if titles is not None and group.title not in titles:
            continue
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        parts.append(f"{'#' * level} {group.title}\n")
        if group.description:
            parts.append(f"{group.description[:1].upper()}{group.description[1:]}.\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        for action in actions:
            parts.append("| " + " | ".join(_cell(c) for c in _action_row(action, settings, parser.prog)) + " |")
        parts.append("")
    return "\n".join(parts)


def cli_reference_markdown(level: int = 3) -> str:
    """The reference of ``python -m fpl_fast.run``'s flags as Markdown: one table per section (headings at
    ``level``), rendered from the parser and the settings' metadata."""
    return parser_markdown(build_parser("fpl-fast run"), level=level)


if __name__ == "__main__":
    sys.exit(main())
