"""CIFAR-10 / CIFAR-100 through torchvision, from a local data root (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

__all__ = ["CIFAR_FOLDERS", "load_cifar"]

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def load_cifar(name: str, data_root: str | os.PathLike[str]) -> tuple[Dataset, Dataset, list[str]]:
    """Load CIFAR-10 or CIFAR-100 (items ``(PIL image, label)``; datasets get a numpy ``labels`` attribute).

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_root: directory containing torchvision's extracted folder (``cifar-10-batches-py`` or
            ``cifar-100-python``).

    Returns:
        (train, test, classnames).

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the extracted folder is missing (one line naming the path and what is expected).
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; allowed: {sorted(_CLASSES)}")
    folder = Path(data_root) / CIFAR_FOLDERS[name]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} not found: expected torchvision's extracted {name} folder {CIFAR_FOLDERS[name]!r} "
            f"under data root {data_root} (downloads are disabled)"
        )
    cls = _CLASSES[name]
    try:
        train = cls(str(data_root), train=True, download=False)
        test = cls(str(data_root), train=False, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(f"{folder} is incomplete or corrupt: {str(err).splitlines()[0]}") from None
    for ds in (train, test):
        ds.labels = np.asarray(ds.targets, dtype=np.int64)
    classnames = [c.replace("_", " ") for c in train.classes]
    return train, test, classnames
