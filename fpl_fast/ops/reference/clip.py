"""The clip factor the two clipping ops share."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CLIP_EPS", "clip_factor"]

# Clip factor min(1, C / (norm + CLIP_EPS)), as Opacus and the DP-FPL authors' code.
CLIP_EPS = 1e-6


def clip_factor(norm: Tensor, clip_norm: float | Tensor) -> Tensor:
    """min(1, C / (norm + CLIP_EPS)) elementwise."""
    return torch.clamp(clip_norm / (norm + CLIP_EPS), max=1.0)
