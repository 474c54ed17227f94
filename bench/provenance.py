"""Where and when a benchmark ran, recorded in its JSON: the docs' benchmark pages (scripts/build_docs_pages.py) show
each table with its command, date and machine model, read from these fields rather than typed by hand."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "provenance"]


def cpu_model() -> str | None:
    """The CPU's model name as ``lscpu`` prints it (from /proc/cpuinfo), else the platform's word; None if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_model() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA set-up must not lose the benchmark's numbers
        return None


def provenance(script: str, argv: list[str] | None = None) -> dict[str, Any]:
    """``{"date", "command", "cpu_model", "gpu_model"}`` for the JSON of ``script`` (its ``__file__``) run with
    ``argv`` (default: this process's arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "command": shlex.join(["python", f"bench/{Path(script).name}", *args]),
        "cpu_model": cpu_model(),
        "gpu_model": _gpu_model(),
    }
