"""CoCoOp's base-to-novel split of a label set: base = the first ceil(n/2) labels, novel = the rest.

CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022) trains on the base half
of every dataset's classes and tests on both halves, each half against its own class names only (its
``subsample_classes``: ``m = math.ceil(n / 2)``, the novel labels shifted down by m).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["base_class_count", "base_novel_rows"]


def base_class_count(n_cls: int) -> int:
    """Number of base classes of ``n_cls``: ceil(n_cls / 2) (37 classes: 19 base, 18 novel).

    Raises:
        ValueError: fewer than 2 classes (no novel class would be left).
    """
    if n_cls < 2:
        raise ValueError(f"a base-to-novel split needs at least 2 classes (a base and a novel half), got {n_cls}")
    return math.ceil(n_cls / 2)


def base_novel_rows(labels: Sequence[int] | np.ndarray, n_base: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the examples of base classes (label < n_base) and of novel classes (the rest), each sorted."""
    lab = np.asarray(labels, dtype=np.int64)
    return np.flatnonzero(lab < n_base), np.flatnonzero(lab >= n_base)
