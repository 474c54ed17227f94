"""mkdocs hook: the figures in bench/results/ join the site at the same path, so that the benchmark pages show them
without a second copy in docs/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config: Any) -> Files:
    for png in sorted((ROOT / "bench" / "results").glob("*.png")):
        files.append(File(f"bench/results/{png.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
