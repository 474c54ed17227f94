"""Numerical parity of two commits: a fixed set of CLI runs, every results.json value compared.

    python scripts/parity.py commits OLD NEW      # both commits in temporary worktrees, then compare
    python scripts/parity.py run DIR              # the runs of this checkout into DIR/<name>/
    python scripts/parity.py compare DIR_A DIR_B  # every value of every results.json, except wall times and paths

Every run fixes ``--noise-seed`` (reproducible noise and sampling), so two commits that compute the same thing write
the same numbers: a refactor must leave every value identical (``==`` on floats, no tolerance). Wall times
(``seconds``, ``seconds_elapsed``), output paths and the version that wrote the file (``fpl_fast_version``) are left
out of the comparison, and a path into either checkout counts from the package folder on. ``commits`` builds each
worktree's C++ extension (CPU kernels only, ``build_ext --inplace``) unless ``csrc/`` and setup.py are those of this
checkout, whose built extension is then copied. Runs use this interpreter (``sys.executable``) and its installed
dependencies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEED = ["--noise-seed", "7"]  # feddtpt has no noise: its one seed (--seed, fixed by default) decides everything
SHORT = ["--rounds", "3"]

# name -> CLI arguments of `python -m fpl_fast.run`.
RUNS: dict[str, list[str]] = {
    "default": [*SEED],
    **{f"factorization-{f}": [*SHORT, "--factorization", f, *SEED] for f in ("promptfl", "fedotp", "fedpgp", "dplora")},
    "sync-round-fraction": [*SHORT, "--sync", "round", "--client-fraction", "0.5", "--local-epochs", "2", *SEED],
    "output": [*SHORT, "--clip-mode", "output", *SEED],
    "output-auto": [*SHORT, "--clip-mode", "output", "--output-clip", "auto", *SEED],
    "batch-separate": [*SHORT, "--clip-mode", "batch", "--clip-uv", "separate", *SEED],
    "epsilon-pld": [*SHORT, "--epsilon", "4", "--accountant", "pld", *SEED],
    "calibration-paper": [*SHORT, "--epsilon", "4", "--calibration", "paper", *SEED],
    "noise-0": [*SHORT, "--noise", "0", *SEED],
    "mia": [*SHORT, "--mia", "2", *SEED],
    "feddtpt": ["--method", "feddtpt", "--rounds", "2"],
    "rapt": ["--method", "rapt", "--rounds", "2", *SEED],
}

# Keys whose values differ between two identical runs: wall times (a round record's seconds_elapsed, before it the
# round's seconds) and where the files went; and the version that wrote results.json (fpl_fast_version, absent
# before it was recorded), which is no computed value.
IGNORED = {"seconds", "seconds_elapsed", "out", "output", "path", "out_dir", "fpl_fast_version"}


def run_all(repo: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONHASHSEED": "0"}
    for name, args in RUNS.items():
        out = dest / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "fpl_fast.run", *args, "--quiet", "--out", str(out)]
        print(f"[{repo.name}] {name}: {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"parity: run {name} failed in {repo}:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in IGNORED or str(key).endswith("_seconds"):
                continue
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'B' if key not in a else 'A'}")
            else:
                _diff(a[key], b[key], f"{where}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} entries")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _diff(x, y, f"{where}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    elif isinstance(a, str) and isinstance(b, str) and _in_checkout(a) == _in_checkout(b):
        return  # the same file of the two checkouts (e.g. a shipped model's weights)
    elif a != b or type(a) is not type(b):
        out.append(f"{where}: {a!r} vs {b!r}")


def _in_checkout(text: str) -> str:
    """A path into a checkout, from the package folder on (``/x/fpl_fast/a.pt``: ``fpl_fast/a.pt``)."""
    marker = "/fpl_fast/"
    return text[text.index(marker) + 1 :] if text.startswith("/") and marker in text else text


def compare(a_dir: Path, b_dir: Path) -> int:
    problems: list[str] = []
    values = 0
    for name in RUNS:
        files = sorted(p.relative_to(a_dir / name) for p in (a_dir / name).rglob("*.json"))
        if not files:
            problems.append(f"{name}: no results in {a_dir / name}")
        for rel in files:
            b_file = b_dir / name / rel
            if not b_file.exists():
                problems.append(f"{name}/{rel}: missing in {b_dir}")
                continue
            a, b = json.loads((a_dir / name / rel).read_text()), json.loads(b_file.read_text())
            values += _count(a)
            _diff(a, b, f"{name}/{rel}", problems)
    for line in problems:
        print(line)
    print(f"parity: {len(RUNS)} runs, {values} values compared, {len(problems)} differences")
    return 1 if problems else 0


def _count(x: Any) -> int:
    if isinstance(x, dict):
        return sum(_count(v) for k, v in x.items() if k not in IGNORED)
    if isinstance(x, list):
        return sum(_count(v) for v in x)
    return 1


def _kernel_sources_hash(repo: Path, rev: str | None = None) -> str:
    """Hash of csrc/ and setup.py, from a commit (rev) or from the work tree."""
    if rev:
        listing = subprocess.run(
            ["git", "ls-tree", "-r", rev, "csrc", "setup.py"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout
        return hashlib.sha256(listing.encode()).hexdigest()
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "HEAD", "csrc", "setup.py"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "csrc", "setup.py"], cwd=repo, capture_output=True)
    return hashlib.sha256(listing.encode() + dirty.stdout).hexdigest()


def _checkout(rev: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(where), rev], cwd=ROOT, check=True)
    built = sorted(ROOT.glob("fpl_fast/_C*.so"))
    if built and _kernel_sources_hash(ROOT, rev) == _kernel_sources_hash(ROOT):
        shutil.copy2(built[0], where / "fpl_fast" / built[0].name)
    else:
        print(f"parity: building the CPU extension of {rev}", flush=True)
        env = {**os.environ, "FPL_FAST_CUDA": "0"}
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where, env=env, check=True)
    return where


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("commits", help="run both commits in temporary worktrees and compare")
    c.add_argument("old")
    c.add_argument("new")
    c.add_argument("--keep", help="folder to keep the two runs' outputs in (default: a temporary one)")
    r = sub.add_parser("run", help="the runs of this checkout into DIR")
    r.add_argument("dest")
    m = sub.add_parser("compare", help="compare two DIRs written by run")
    m.add_argument("a")
    m.add_argument("b")
    args = p.parse_args()
    if args.cmd == "run":
        run_all(ROOT, Path(args.dest))
        return 0
    if args.cmd == "compare":
        return compare(Path(args.a), Path(args.b))
    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fpl_parity_"))
    trees = []
    try:
        for label, rev in (("old", args.old), ("new", args.new)):
            tree = _checkout(rev, keep / f"tree-{label}")
            trees.append(tree)
            run_all(tree, keep / label)
        return compare(keep / "old", keep / "new")
    finally:
        for tree in trees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


if __name__ == "__main__":
    sys.exit(main())
