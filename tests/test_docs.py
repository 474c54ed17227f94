"""The documentation: the README is short and keeps its set-up commands, the generated pages are up to date, the
references name every flag and every output key, the site builds with `mkdocs build --strict`, and every code block
marked `<!-- runnable -->` runs as written (docs/how-to/develop.md describes the marker)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNNABLE = re.compile(r"^<!-- runnable -->\n```(python|bash)\n(.*?)^```", re.M | re.S)


def _build_docs_pages() -> Any:
    spec = importlib.util.spec_from_file_location("build_docs_pages", ROOT / "scripts" / "build_docs_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runnable_blocks() -> list[tuple[str, str, str]]:
    """(page, language, code) of every marked block of docs/ (not the examples of the marker inside ```` fences)."""
    return [
        (str(page.relative_to(ROOT)), m.group(1), m.group(2))
        for page in sorted(DOCS.rglob("*.md"))
        for m in RUNNABLE.finditer(re.sub(r"^````.*?^````", "", page.read_text(), flags=re.M | re.S))
    ]


BLOCKS = _runnable_blocks()


def test_the_readme_is_short_says_what_fpl_fast_is_first_and_keeps_the_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_paragraph = text.split("\n\n")[1]
    assert first_paragraph.startswith("fpl_fast is private, personalized federated prompt learning")
    for line in (
        "bash scripts/setup.sh && .venv/bin/python -m fpl_fast.run          # the embedded default job (offline, "
        "~20 s on 2 CPU cores)",
        "bash scripts/setup.sh && .venv/bin/python -m pytest -q             # the tests",
    ):
        assert line in text.splitlines()


def test_every_page_the_readme_links_to_exists() -> None:
    links = re.findall(r"\]\(((?:docs/|CHANGELOG|LICENSE)[^)#]*)", (ROOT / "README.md").read_text())
    assert links and [link for link in links if not (ROOT / link).is_file()] == []


def test_the_generated_pages_are_what_the_script_writes_now() -> None:
    """A stale page (a flag or a benchmark file changed, the page not regenerated) fails here, not on the site."""
    script = _build_docs_pages()
    stale = [rel for rel, render in script.PAGES.items() if (ROOT / rel).read_text() != render()]
    assert stale == [], f"run python scripts/build_docs_pages.py to regenerate {stale}"


def test_the_page_script_check_mode_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    assert _build_docs_pages().main(["--check"]) == 0


def test_every_flag_of_the_three_commands_has_a_row_in_the_cli_reference() -> None:
    from fpl_fast import audit
    from fpl_fast.grid import __main__ as grid_cli
    from fpl_fast.run import build_parser

    page = (DOCS / "reference" / "cli.md").read_text()
    rows = set(re.findall(r"^\| `(--[a-z0-9-]+)", page, flags=re.M))
    flags = {
        s
        for parser in (build_parser(), audit.build_parser(), grid_cli.build_parser())
        for action in parser._actions
        for s in action.option_strings
        if s.startswith("--") and s != "--help"
    }
    assert flags - rows == set(), "flags missing from docs/reference/cli.md"
    assert rows - flags == set(), "rows of no flag in docs/reference/cli.md"


def test_a_benchmark_table_shows_the_ratio_and_where_it_came_from() -> None:
    page = (DOCS / "benchmarks" / "results.md").read_text()
    sections = re.split(r"^## ", page, flags=re.M)[1:]
    assert len(sections) >= len(list((ROOT / "bench" / "results").glob("*.json")))
    for section in sections:
        assert "- date: " in section and "command" in section, section[:80]
    for section in (s for s in sections if "speed-up" in s or "/ fused" in s):
        assert "- CPU model: " in section and re.search(r"\| \d+\.\d\dx \|", section), section[:80]


def test_the_runnable_blocks_are_found() -> None:
    """The marker is matched (a typo in it would silently run nothing)."""
    pages = {page for page, _, _ in BLOCKS}
    assert {"docs/tutorials/own-data.md", "docs/tutorials/default-job.md", "docs/how-to/audit.md"} <= pages
    assert all(lang in ("python", "bash") for _, lang, _ in BLOCKS)


def _check_own_data(scope: dict[str, Any], out: str, cwd: Path) -> None:
    """The tutorial trained its own factorisation on its own dataset, in under 30 lines."""
    result = scope["result"]
    assert result.method == "dpfpl" and result.config["factorization"] == "halved"
    assert 0.1 < result.local_acc <= 1 and 0 <= result.neighbor_acc <= 1  # above chance (0.1) on 10 classes
    assert math.isfinite(result.epsilon) and result.epsilon > 0 and len(result.rounds) == 3
    assert set(result.federation.learner.local) == {"l"}  # the custom factorisation's parameters were trained
    assert (cwd / "runs" / "api-demo" / "results.json").is_file()
    assert "local " in out


def _check_outputs_reference(scope: dict[str, Any], stdout: str, cwd: Path) -> None:
    """Every key the default job's block wrote into results.json, and every rounds.csv column, is described in the
    outputs page."""
    out = cwd / "runs" / "first"
    page = (DOCS / "reference" / "outputs.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", page))
    # "accountant_multiplier_local, `_global`, `_total`" names the last two by their suffix
    documented |= {f"accountant_multiplier{s}" for s in ("_global", "_total") if f"`{s}`" in page}
    results = json.loads((out / "results.json").read_text())
    keys = set(results) | set(results["final"]) | {k for r in results["rounds"] for k in r}
    keys |= set((out / "rounds.csv").read_text().splitlines()[0].split(","))
    assert keys - documented == set(), "keys missing from docs/reference/outputs.md"


# Page -> what its runnable block must have done, beyond exiting without an error.
CHECKS = {"docs/tutorials/own-data.md": _check_own_data, "docs/tutorials/default-job.md": _check_outputs_reference}


@pytest.mark.slow
@pytest.mark.parametrize(("page", "lang", "code"), BLOCKS, ids=[f"{p}:{i}" for i, (p, _, _) in enumerate(BLOCKS)])
def test_a_runnable_block_runs_as_written(
    page: str, lang: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    if lang == "python":
        if page == "docs/tutorials/own-data.md":
            assert len([line for line in code.splitlines() if line.strip()]) < 30  # "in under 30 lines"
        scope: dict[str, Any] = {}
        exec(compile(code, f"{page} (runnable block)", "exec"), scope)
        if page in CHECKS:
            CHECKS[page](scope, capsys.readouterr().out, tmp_path)
        return
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the blocks call .venv/bin/python, as a reader's checkout has
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{page}:\n{code}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
    if page in CHECKS:
        CHECKS[page]({}, proc.stdout, tmp_path)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """Broken links, missing pages or references and pages left out of the nav fail `mkdocs build --strict`."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install mkdocs-material ...)")
    pytest.importorskip("mkdocstrings")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "explanation" / "privacy" / "index.html").is_file()
