"""CoOp's datasets in their published folder layouts (:mod:`fpl_fast.data.layouts`), read as CoOp's readers read
them: the eleven datasets a federation trains on, and the four ImageNet variants it is tested on.

Each split is a :class:`CoOpSplitDataset` (images opened lazily with PIL, converted to RGB). Loading checks that
the layout is there and that every image a split file names is on disk, so that a missing piece is one line
naming its path and the layout expected, before any image is encoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fpl_fast.data.imagenet import read_imagenet, read_imagenet_variant
from fpl_fast.data.layouts import (
    COOP_DATASETS,
    IMAGENET_VARIANTS,
    LAYOUTS,
    TEST_ONLY_DATASETS,
    CoOpLayout,
    check_listed,
    require,
)

__all__ = [
    "COOP_DATASETS",
    "IMAGENET_VARIANTS",
    "LAYOUTS",
    "TEST_ONLY_DATASETS",
    "CoOpLayout",
    "CoOpSplitDataset",
    "load_coop",
    "load_test_only",
]

_SPLITS = ("train", "val", "test")


class CoOpSplitDataset(Dataset):
    """One split of a CoOp dataset: items are ``(PIL RGB image, label)``.

    Attributes:
        paths: absolute image paths.
        labels: (N,) int64 labels.
        classnames: class names indexed by label.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], classnames: list[str]) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
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


# A reader's parts: split name -> (image paths, labels, the file that lists them).
_Parts = dict[str, tuple[list[Path], list[int], Path]]


def _read_split_json(
    name: str, layout: CoOpLayout, root: Path, data_root: str | os.PathLike[str]
) -> tuple[_Parts, list[str]]:
    split_path = require(name, root / layout.index, data_root)
    with open(split_path, encoding="utf-8") as f:
        split = json.load(f)
    if not isinstance(split, dict) or not all(isinstance(split.get(p, []), list) for p in _SPLITS):
        raise ValueError(f"{split_path} must be a JSON object with lists 'train', 'val', 'test'")
    for part in _SPLITS:
        for item in split.get(part, []):
            if not (isinstance(item, list) and len(item) == 3):
                raise ValueError(f"{split_path}: entries must be [relpath, label, classname], got {item!r}")
    classnames = _classnames(split)
    image_root = require(name, root / layout.image_dir, data_root, folder=True)
    parts: _Parts = {}
    for part in _SPLITS:
        items = split.get(part, [])
        parts[part] = ([image_root / str(item[0]) for item in items], [int(item[1]) for item in items], split_path)
    return parts, classnames


def _read_aircraft(
    name: str, layout: CoOpLayout, root: Path, data_root: str | os.PathLike[str]
) -> tuple[_Parts, list[str]]:
    """FGVC Aircraft: ``variants.txt`` gives the labels, ``images_variant_<part>.txt`` the images
    (``<id> <variant>`` a line)."""
    variants_path = require(name, root / layout.index, data_root)
    classnames = [line.strip() for line in variants_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    label_of = {c: k for k, c in enumerate(classnames)}
    image_root = require(name, root / layout.image_dir, data_root, folder=True)
    parts: _Parts = {}
    for part in _SPLITS:
        listing = require(name, root / f"images_variant_{part}.txt", data_root)
        paths: list[Path] = []
        labels: list[int] = []
        for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            image_id, _, variant = line.strip().partition(" ")
            if not image_id:
                continue
            if variant not in label_of:
                raise ValueError(f"{listing} line {n}: variant {variant!r} is not in {variants_path}")
            paths.append(image_root / f"{image_id}.jpg")
            labels.append(label_of[variant])
        parts[part] = (paths, labels, listing)
    return parts, classnames


def load_coop(name: str, data_root: str | os.PathLike[str]) -> dict[str, CoOpSplitDataset]:
    """Load the train/val/test splits of one of CoOp's eleven training datasets.

    Args:
        name: one of :data:`COOP_DATASETS`.
        data_root: directory that contains the dataset folder.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` (val may be empty; ImageNet has none: its validation set is the
        test set, as in CoOp).

    Raises:
        ValueError: unknown name, or a malformed split or index file.
        FileNotFoundError: a missing folder or split file, or images a split names that are not on disk (one line
            naming the path and the layout expected).
    """
    if name not in COOP_DATASETS:
        if name in TEST_ONLY_DATASETS:
            raise ValueError(f"{name} is a test-only dataset (no training split): use load_test_only")
        raise ValueError(f"unknown CoOp dataset {name!r}; allowed: {sorted(COOP_DATASETS)}")
    layout = COOP_DATASETS[name]
    root = require(name, Path(data_root) / layout.folder, data_root, folder=True)
    if layout.reader == "imagenet":
        train, test, classnames = read_imagenet(data_root)
        return {
            "train": CoOpSplitDataset(*train, classnames),
            "val": CoOpSplitDataset([], [], classnames),
            "test": CoOpSplitDataset(*test, classnames),
        }
    reader = _read_aircraft if layout.reader == "aircraft" else _read_split_json
    parts, classnames = reader(name, layout, root, data_root)
    for paths, _, listed_in in parts.values():
        check_listed(name, paths, listed_in, data_root)
    return {part: CoOpSplitDataset(paths, labels, classnames) for part, (paths, labels, _) in parts.items()}


def load_test_only(name: str, data_root: str | os.PathLike[str]) -> CoOpSplitDataset:
    """The test set of an ImageNet variant (:data:`IMAGENET_VARIANTS`).

    Raises:
        ValueError: not a test-only dataset, or a class folder that its ``classnames.txt`` does not name.
        FileNotFoundError: a missing folder or ``classnames.txt`` (one line naming the path and the layout).
    """
    if name not in TEST_ONLY_DATASETS:
        raise ValueError(f"{name!r} is not a test-only dataset; allowed: {list(TEST_ONLY_DATASETS)}")
    (paths, labels), classnames = read_imagenet_variant(name, data_root)
    return CoOpSplitDataset(paths, labels, classnames)
