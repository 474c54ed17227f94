"""Datasets in the CoOp folder layouts, read through CoOp's split files.

Each dataset lives in ``<data_root>/<folder>/`` with an image directory and a split JSON
``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}`` (CoOp's ``split_zhou_*.json``);
``relpath`` is relative to the image directory. Images are opened lazily with PIL (converted to RGB).

Layouts (name: folder / image directory / split file):

* ``caltech101``: ``caltech-101/101_ObjectCategories``, ``split_zhou_Caltech101.json``
* ``oxford_pets``: ``oxford_pets/images``, ``split_zhou_OxfordPets.json``
* ``oxford_flowers``: ``oxford_flowers/jpg``, ``split_zhou_OxfordFlowers.json``
* ``food101``: ``food-101/images``, ``split_zhou_Food101.json``
* ``dtd``: ``dtd/images``, ``split_zhou_DescribableTextures.json``
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["COOP_DATASETS", "CoOpLayout", "CoOpSplitDataset", "load_coop"]


@dataclass(frozen=True)
class CoOpLayout:
    """Where a CoOp dataset lives under the data root."""

    folder: str
    image_dir: str
    split_file: str


COOP_DATASETS: dict[str, CoOpLayout] = {
    "caltech101": CoOpLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": CoOpLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": CoOpLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": CoOpLayout("food-101", "images", "split_zhou_Food101.json"),
    "dtd": CoOpLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
}
_SPLITS = ("train", "val", "test")


class CoOpSplitDataset(Dataset):
    """One split of a CoOp dataset: items are ``(PIL RGB image, label)``.

    Attributes:
        paths: absolute image paths.
        labels: (N,) int64 labels.
        classnames: class names indexed by label.
    """

    def __init__(self, image_root: Path, items: list[list[Any]], classnames: list[str]) -> None:
        self.paths = [image_root / str(item[0]) for item in items]
        self.labels = np.asarray([int(item[1]) for item in items], dtype=np.int64)
        self.classnames = classnames

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[i]) as img:
            return img.convert("RGB"), int(self.labels[i])


def _classnames(split: dict[str, list[list[Any]]]) -> list[str]:
    names: dict[int, str] = {}
    for part in _SPLITS:
        for _, label, name in split.get(part, []):
            names.setdefault(int(label), str(name))
    n = max(names, default=-1) + 1
    missing = [k for k in range(n) if k not in names]
    if missing:
        raise ValueError(f"split file has no class name for labels {missing[:10]}")
    return [names[k] for k in range(n)]


def load_coop(name: str, data_root: str | os.PathLike[str]) -> dict[str, CoOpSplitDataset]:
    """Load the train/val/test splits of a CoOp dataset.

    Args:
        name: one of :data:`COOP_DATASETS`.
        data_root: directory that contains the dataset folder.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` (val may be empty).

    Raises:
        ValueError: unknown name, or a malformed split file.
        FileNotFoundError: missing folder or split file (one line naming the path and what is expected).
    """
    if name not in COOP_DATASETS:
        raise ValueError(f"unknown CoOp dataset {name!r}; allowed: {sorted(COOP_DATASETS)}")
    layout = COOP_DATASETS[name]
    root = Path(data_root) / layout.folder
    split_path = root / layout.split_file
    if not split_path.is_file():
        raise FileNotFoundError(
            f"{split_path} not found: expected the CoOp layout {layout.folder}/{layout.image_dir}/ and "
            f"{layout.folder}/{layout.split_file} under data root {data_root}"
        )
    with open(split_path, encoding="utf-8") as f:
        split = json.load(f)
    if not isinstance(split, dict) or not all(isinstance(split.get(p, []), list) for p in _SPLITS):
        raise ValueError(f"{split_path} must be a JSON object with lists 'train', 'val', 'test'")
    for part in _SPLITS:
        for item in split.get(part, []):
            if not (isinstance(item, list) and len(item) == 3):
                raise ValueError(f"{split_path}: entries must be [relpath, label, classname], got {item!r}")
    classnames = _classnames(split)
    image_root = root / layout.image_dir
    return {part: CoOpSplitDataset(image_root, split.get(part, []), classnames) for part in _SPLITS}
