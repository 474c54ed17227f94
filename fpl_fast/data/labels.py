"""Reading a dataset's labels without loading its images where it can."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dataset_labels"]


def dataset_labels(dataset: Any) -> np.ndarray:
    """A dataset's labels as (N,) int64: its ``labels`` or ``targets`` attribute (torchvision), else read item by
    item (items ``(image, label)``)."""
    for name in ("labels", "targets"):
        if getattr(dataset, name, None) is not None:
            return np.asarray(getattr(dataset, name), dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)
