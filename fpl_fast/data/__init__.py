"""Datasets, client splits and the embedded default data (digits).

``load_dataset(name, data_root)`` returns a :class:`DatasetBundle` (train, test, classnames); every dataset's
items are ``(image, label)`` with images as PIL images or (3, H, W) float tensors in [0, 1] (not normalised: use
``FrozenCLIP.train_transform`` / ``eval_transform``), and it has a numpy ``labels`` attribute for
:func:`partition`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch.utils.data import Dataset

from fpl_fast.data.cifar import load_cifar
from fpl_fast.data.coop import COOP_DATASETS, CoOpSplitDataset, load_coop, load_test_only
from fpl_fast.data.digits import DIGIT_CLASSNAMES, DigitsDataset
from fpl_fast.data.labels import dataset_labels
from fpl_fast.data.layouts import IMAGENET_VARIANTS, TEST_ONLY_DATASETS
from fpl_fast.data.splits import SCHEMES, SHOTS_PROTOCOLS, ClientSplit, coop_shots, partition, sample_shots

__all__ = [
    "DATASETS",
    "DIGIT_CLASSNAMES",
    "IMAGENET_VARIANTS",
    "SCHEMES",
    "SHOTS_PROTOCOLS",
    "TEST_ONLY_DATASETS",
    "ClientSplit",
    "DatasetBundle",
    "DigitsDataset",
    "coop_shots",
    "dataset_labels",
    "load_dataset",
    "partition",
    "sample_shots",
]

DATASETS = ("digits", "digits-tune", *COOP_DATASETS, *TEST_ONLY_DATASETS, "cifar10", "cifar100")
"""Names accepted by :func:`load_dataset` (``"digits"`` ships with the package and is the default; the
:data:`TEST_ONLY_DATASETS`, ImageNet's variants, have an empty training set)."""


@dataclass(frozen=True)
class DatasetBundle:
    """A dataset's train and test sets and class names.

    Attributes:
        name: dataset name.
        train: training set (items ``(image, label)``, attribute ``labels``).
        test: test set.
        classnames: class names indexed by label.
    """

    name: str
    train: Dataset
    test: Dataset
    classnames: list[str]


def load_dataset(
    name: str = "digits", data_root: str | os.PathLike[str] | None = None, *, image_size: int = 32
) -> DatasetBundle:
    """Load a dataset by name.

    Args:
        name: one of :data:`DATASETS`.
        data_root: directory holding the dataset folders (not needed for ``"digits"``; the CoOp datasets in
            CoOp's layouts, see :mod:`fpl_fast.data.layouts`).
        image_size: output size of the digits images (ignored for the others, whose transforms resize).

    Returns:
        The bundle. For ``"digits"``, train/test are the federated parts (the pretraining part of the embedded
        tiny CLIP is never returned here). For a test-only dataset (:data:`TEST_ONLY_DATASETS`), ``train`` is empty
        (its ``labels`` too) and ``test`` is the whole dataset.

    Raises:
        ValueError: unknown name, or a missing data_root for a dataset that needs one.
        FileNotFoundError: dataset files missing under data_root (one line naming the path and the layout).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {list(DATASETS)}")
    if name in ("digits", "digits-tune"):  # digits-tune: the public pretrain part, for tuning (no client data)
        train_part, test_part = ("train", "test") if name == "digits" else ("tune_train", "tune_test")
        return DatasetBundle(
            name,
            DigitsDataset(train_part, image_size=image_size),
            DigitsDataset(test_part, image_size=image_size),
            list(DIGIT_CLASSNAMES),
        )
    if data_root is None:
        raise ValueError(f"dataset {name!r} needs data_root (the directory that holds its folder)")
    if name in COOP_DATASETS:
        splits = load_coop(name, data_root)
        return DatasetBundle(name, splits["train"], splits["test"], splits["train"].classnames)
    if name in TEST_ONLY_DATASETS:
        target = load_test_only(name, data_root)
        return DatasetBundle(name, CoOpSplitDataset([], [], target.classnames), target, target.classnames)
    train, test, classnames = load_cifar(name, data_root)
    return DatasetBundle(name, train, test, classnames)
