"""The model configs shipped with fpl_fast (``fpl_fast/configs``), registered with open_clip on import.

:mod:`fpl_fast.backbone.model` and :mod:`fpl_fast.backbone.loading` import this module, so the shipped names are
known to ``open_clip.create_model`` and ``open_clip.get_tokenizer`` wherever a backbone is built.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

__all__ = ["CONFIG_DIR", "EMBEDDED_MODEL", "EMBEDDED_WEIGHTS", "shipped_configs"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""Directory of the JSON model configs shipped with fpl_fast (registered with open_clip on import)."""

EMBEDDED_MODEL = "tiny-digits-clip"
"""Name of the embedded tiny CLIP config (``fpl_fast/configs/tiny-digits-clip.json``)."""

EMBEDDED_WEIGHTS = CONFIG_DIR / "tiny-digits-clip.pt"
"""Weights of the embedded tiny CLIP, written by ``python -m fpl_fast.data.pretrain_tiny_clip``."""

open_clip.add_model_config(CONFIG_DIR)


def shipped_configs() -> list[str]:
    """Names of the JSON configs in :data:`CONFIG_DIR`, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
