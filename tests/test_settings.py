"""One source for every setting: each RunConfig / RunSettings field's metadata (flag, help, section, allowed values)
builds the parser, the --config keys and the CLI reference; the fpl-fast console command; no abbreviations."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fpl_fast
from fpl_fast import cli
from fpl_fast.config import (
    CHOICES,
    SECTIONS,
    RunConfig,
    RunSettings,
    allowed_values,
    load_config_file,
    setting_fields,
    value_kind,
)
from fpl_fast.run import SETTINGS, build_parser, cli_reference_markdown, config_from_args, render_default

ROOT = Path(__file__).resolve().parents[1]


def _help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    return next(a.help for a in parser._actions if flag in a.option_strings) or ""


# ----------------------------------------------------------------------------------------------
# The metadata
# ----------------------------------------------------------------------------------------------
def _problems(f: dataclasses.Field) -> list[str]:
    """What a setting's metadata lacks for the parser, the --config file and the reference."""
    meta, out = f.metadata, []
    if not meta.get("flag"):
        out.append("no flag: declare it with config.setting(default, flag, help, section=...)")
    elif meta["flag"] != ("--quiet" if f.name == "progress" else "--" + f.name.replace("_", "-")):
        out.append(f"flag {meta['flag']} is not the field's name")  # progress: --quiet turns it off
    if not isinstance(meta.get("help"), str) or len(meta["help"].strip()) < 10:
        out.append("no help")
    elif "default" in meta["help"].lower():  # defaults are rendered from the dataclass: a typed one would drift
        out.append(f"its help names a default: {meta['help']!r}")
    if meta.get("section") not in SECTIONS:
        out.append(f"section {meta.get('section')!r} is not one of SECTIONS")
    return out


@pytest.mark.parametrize("f", setting_fields(), ids=lambda f: f.name)
def test_every_setting_has_its_flag_help_and_section(f: dataclasses.Field) -> None:
    assert _problems(f) == []
    value_kind(f)  # its type is one the parser reads


def test_a_field_without_a_flag_or_help_fails_the_check() -> None:
    """Adding a RunConfig field without setting(...), or deleting a help text, fails the test above."""

    @dataclasses.dataclass(frozen=True)
    class Changed(RunConfig):
        brand_new: int = 3
        rank: int = dataclasses.field(default=8, metadata={**SETTINGS["rank"].metadata, "help": ""})

    by_name = {f.name: f for f in dataclasses.fields(Changed)}
    assert _problems(by_name["brand_new"])[0].startswith("no flag")
    assert _problems(by_name["rank"]) == ["no help"]


def test_flags_are_unique_and_the_parser_has_exactly_them() -> None:
    flags = [f.metadata["flag"] for f in setting_fields()]
    assert len(flags) == len(set(flags))
    parser = build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    assert options == {*flags, "-h", "--help", "--method", "--config", "--paper"}


@pytest.mark.parametrize("f", setting_fields(), ids=lambda f: f.name)
def test_each_help_shows_the_dataclass_default(f: dataclasses.Field) -> None:
    text = _help_of(build_parser(), f.metadata["flag"])
    assert text == f"{f.metadata['help']} (default: {render_default(f)})"
    if f.default is None:
        assert render_default(f) == (f.metadata["none"] or "none")
    elif isinstance(f.default, bool) and not f.metadata["switch"]:
        assert render_default(f) == str(f.default).lower()
    elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
        assert float(render_default(f)) == f.default  # the number itself, whatever its spelling


def test_the_allowed_values_are_the_configs_checks() -> None:
    """argparse's choices are the values RunConfig accepts: a value it refuses is refused by the parser too."""
    for f in setting_fields():
        values = allowed_values(f)
        if values is None:
            continue
        action = next(a for a in build_parser()._actions if f.metadata["flag"] in a.option_strings)
        assert tuple(action.choices) == values
        assert f.name in CHOICES or f.name in ("factorization", "engine")
        assert CHOICES.get(f.name, values) == values  # what RunConfig.__post_init__ checks
    assert (
        allowed_values(next(f for f in setting_fields() if f.name == "factorization")) == fpl_fast.factorization_names()
    )


def test_the_dataset_help_names_every_dataset() -> None:
    from fpl_fast.data import DATASETS

    text = SETTINGS["dataset"].metadata["help"]
    assert [d for d in DATASETS if d not in text] == []


def test_the_config_file_keys_are_the_field_names(tmp_path: Path) -> None:
    """A --config file with every RunConfig field at its default gives the default config; a key that no field has
    is refused with the allowed keys."""
    defaults = RunConfig().to_dict()
    path = tmp_path / "all.json"
    path.write_text(json.dumps(defaults))
    assert set(load_config_file(path)) == set(defaults)
    cfg, run = config_from_args(build_parser().parse_args(["--config", str(path)]))
    assert cfg == RunConfig() and run == RunSettings()
    path.write_text(json.dumps({"out": str(tmp_path / "o"), "mia": 1, "rnak": 3}))
    with pytest.raises(ValueError, match=r"unknown settings \['rnak'\]; allowed: \[.*'mia'.*'rank'"):
        load_config_file(path)


# ----------------------------------------------------------------------------------------------
# --help and the reference
# ----------------------------------------------------------------------------------------------
def _sections(text: str) -> dict[str, int]:
    """Lines of each argument group in a --help text."""
    out: dict[str, int] = {}
    name = None
    for line in text.splitlines():
        if re.match(r"^[a-z][\w /-]*:$", line):
            name = line[:-1]
            out[name] = 0
        elif name is not None:
            out[name] += 1
    return out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_fits_a_terminal_page_per_section(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    parser = importlib.import_module(cli.COMMANDS[command][0]).build_parser(f"fpl-fast {command}")
    text = parser.format_help()
    sections = _sections(text)
    if command == "run":
        assert set(SECTIONS) <= set(sections)
    assert max(sections.values()) <= 40, sections
    assert len(text.split("\n\n", 1)[0].splitlines()) <= 6  # the usage line does not list every flag


def test_the_cli_reference_has_a_table_per_section_with_every_flag_once() -> None:
    text = cli_reference_markdown()
    assert text == cli_reference_markdown()  # deterministic
    headings = re.findall(r"^### (\S+)$", text, flags=re.M)
    assert headings == ["method", *SECTIONS]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for line in rows:  # flag, --config key, type / allowed values, default, meaning: pipes in cells are escaped
        assert len(re.findall(r"(?<!\\)\|", line)) == 6, line
    for f in setting_fields():
        row = [line for line in rows if line.startswith(f"| `{f.metadata['flag']}` |")]
        assert len(row) == 1, f.name
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row[0])[1:-1]]
        assert cells[1] == f"`{f.name}`" and cells[3] == render_default(f).replace("|", "\\|")
        assert cells[4] == f.metadata["help"].replace("|", "\\|")
    assert "| `--clip-mode` | `clip_mode` | `sample` \\| `batch` \\| `output` | sample |" in text


def test_the_reference_of_every_command() -> None:
    text = cli.reference_markdown()
    assert text == cli.reference_markdown()
    assert re.findall(r"^## `fpl-fast (\w+)`$", text, flags=re.M) == list(cli.COMMANDS)
    for flag in ("--workers", "--auditor", "--ops", "`folder`"):
        assert flag in text
    assert text.count("| `--rank` |") == 1  # the audit's section lists only its own flags


# ----------------------------------------------------------------------------------------------
# No abbreviations, in any command
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_no_command_takes_an_abbreviated_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = importlib.import_module(cli.COMMANDS[command][0]).build_parser("p")
    assert parser.allow_abbrev is False
    options = {s for a in parser._actions for s in a.option_strings}
    longest = max(options, key=len)
    short = longest[:-1]
    assert short not in options
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([short, "1"] if command != "deploy" else ["folder", short])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and short in err, err


def test_num_user_is_not_num_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--num-user", "3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "fpl-fast run: error: unrecognized arguments: --num-user 3"


# ----------------------------------------------------------------------------------------------
# The console command and the version
# ----------------------------------------------------------------------------------------------
def test_pyproject_declares_the_command_and_reads_the_version_from_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"fpl-fast": "fpl_fast.cli:main"}
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fpl_fast.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", fpl_fast.__version__)
    assert re.search(r'^__version__ = "[^"]+"$', (ROOT / "fpl_fast" / "__init__.py").read_text(), flags=re.M)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_subcommand_hands_its_argv_to_the_modules_main(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module(cli.COMMANDS[command][0])
    seen = {}

    def fake_main(argv, prog):
        seen.update(argv=argv, prog=prog)
        return 7

    monkeypatch.setattr(module, "main", fake_main)
    assert cli.main([command, "--rounds", "2", "x", "--quiet"]) == 7
    assert seen == {"argv": ["--rounds", "2", "x", "--quiet"], "prog": f"fpl-fast {command}"}


def test_version_and_unknown_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fpl-fast {fpl_fast.__version__}"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice: 'train'" in err


def test_the_console_commands_own_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real subcommands, quick paths: their errors carry the subcommand's name; deploy writes its app."""
    assert cli.main(["selftest", "--ops", "nope"]) == 2
    assert capsys.readouterr().err.startswith("fpl-fast selftest: error: unknown op(s) ['nope']")
    assert cli.main(["grid"]) == 2
    assert capsys.readouterr().err.startswith("fpl-fast grid: error: give a grid spec file")
    assert cli.main(["audit", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == "fpl-fast audit: error: --resume does not apply to an audit"
    assert cli.main(["deploy", str(tmp_path / "app")]) == 0
    assert f'version = "{fpl_fast.__version__}"' in (tmp_path / "app" / "pyproject.toml").read_text()


def test_the_console_command_from_a_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "fpl_fast.cli", "run", "--quiet", "--rank", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "fpl-fast run: error: --rank must be an integer >= 1, got 0"


@pytest.mark.slow
def test_fpl_fast_run_and_python_m_give_the_same_config(tmp_path: Path) -> None:
    """``fpl-fast run --rounds 2`` and ``python -m fpl_fast.run --rounds 2``, both in process: the same config in
    results.json, which records the package version."""
    from fpl_fast import run

    assert cli.main(["run", "--quiet", "--rounds", "2", "--out", str(tmp_path / "console")]) == 0
    assert run.main(["--quiet", "--rounds", "2", "--out", str(tmp_path / "module")]) == 0
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("console", "module"))
    assert a["config"] == b["config"] == RunConfig(rounds=2).to_dict()
    assert a["fpl_fast_version"] == b["fpl_fast_version"] == fpl_fast.__version__
    assert list(a)[:5] == ["method", "config", "rounds", "final", "fpl_fast_version"]
