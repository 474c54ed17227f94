"""The repository is self-contained: no file names a document outside it, and the paths and module names that code,
comments and docs name exist (a user of the package has only the repository; a moved module must not leave stale
references behind)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = (".py", ".pyi", ".md", ".sh", ".toml", ".cpp", ".h", ".cu", ".cuh", ".txt", ".json", ".cfg")

# Documents of the project's private design folder that earlier comments pointed at.
OUTSIDE = re.compile(
    r"\.\./shared|\bshared/(?:notes|specs|seeds)|\bDESIGN\.md|\bSTYLE\.md|authors-code\.md|feddtpt-rapt\.md"
    r"|output-space-dp\.md"
)
# A repository path: a top-level folder, then path parts, then a file name with an extension.
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:csrc|fpl_fast|tests|scripts|bench|docs|\.ci)/[\w./-]*\.(?:py|md|sh|cpp|h|cu|cuh))"
)
MODULE = re.compile(r"(?<![\w.])fpl_fast(?:\.[A-Za-z_]\w*)+(?!\.(?:cpp|py|pyi|so)\b)")
NOT_MODULES = ("fpl_fast.cpp", "fpl_fast.compact_clip")  # the op-schema file; a checkpoint format's tag


def _files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist): walk the tree
        listed = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    keep = [ROOT / f for f in listed if f.endswith(TEXT_SUFFIXES) or f == ".ci/run"]
    return [p for p in keep if p.is_file() and "results" not in p.relative_to(ROOT).parts[:2]]


FILES = _files()


def _defined_names(module_file: Path) -> set[str]:
    """Top-level names a module defines or imports (enough to resolve ``fpl_fast.x.Name`` references)."""
    text = module_file.read_text()
    names = set(re.findall(r"^(?:def|class|async def)\s+(\w+)", text, re.M))
    names |= set(re.findall(r"^(\w+)\s*[:=]", text, re.M))
    names |= set(re.findall(r'^\s+"(\w+)":', text, re.M))  # a lazy-import table (fpl_fast/__init__.py)
    for imported in re.findall(r"^from\s+\S+\s+import\s+\(?([^)]*?)\)?$", text, re.M | re.S):
        names |= {n.split(" as ")[-1].strip() for n in imported.replace("\n", " ").split(",") if n.strip()}
    return names


def _module_exists(dotted: str) -> bool:
    """``fpl_fast.a.b.Name``: the longest prefix that is a module of the package, then at most one defined name."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = ROOT.joinpath(*parts[:cut])
        module = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            return not rest or rest[0] in _defined_names(module) or rest[0] in ("_C",)
    return False


def test_no_file_names_a_document_outside_the_repository() -> None:
    found = [
        f"{p.relative_to(ROOT)}:{n}: {m.group(0)}"
        for p in FILES
        if p.name != Path(__file__).name
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        for m in [OUTSIDE.search(line)]
        if m
    ]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_every_repository_path_named_in_a_file_exists() -> None:
    missing = []
    for p in FILES:
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in REPO_PATH.finditer(line):
                path = m.group(1).rstrip(".")
                if "<" in path or "*" in path:
                    continue
                if not (ROOT / path).exists():
                    missing.append(f"{p.relative_to(ROOT)}:{n}: {path}")
    assert not missing, "paths that do not exist in the repository:\n" + "\n".join(missing)


def test_every_fpl_fast_module_named_in_a_file_exists() -> None:
    missing = []
    for p in FILES:
        if p.name == Path(__file__).name:
            continue
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in MODULE.finditer(line):
                dotted = m.group(0).rstrip(".")
                if dotted.startswith(NOT_MODULES) or dotted.split(".")[-1].startswith("__"):
                    continue
                if not _module_exists(dotted):
                    missing.append(f"{p.relative_to(ROOT)}:{n}: {dotted}")
    assert not missing, "fpl_fast modules or names that do not exist:\n" + "\n".join(sorted(set(missing)))


@pytest.mark.parametrize("dotted", ["fpl_fast.ops", "fpl_fast.backbone.protocol"])
def test_the_module_resolver_finds_real_modules(dotted: str) -> None:
    assert _module_exists(dotted) and importlib.util.find_spec(dotted) is not None
    assert not _module_exists(dotted + ".no_such_name_here")
