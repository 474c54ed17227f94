"""Tests of the datasets and client splits."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fpl_fast.config import CHOICES
from fpl_fast.data import DATASETS, load_dataset, partition, sample_shots
from fpl_fast.data.cifar import load_cifar
from fpl_fast.data.coop import load_coop
from fpl_fast.data.digits import PART_SIZES, TUNE_SIZES, DigitsDataset, digits_indices
from fpl_fast.data.splits import AUTHORS_CLASS_SEED, PATHOLOGICAL_SPLITS

LABELS = np.repeat(np.arange(10), 30)  # 300 samples, 10 classes
TEST_LABELS = np.repeat(np.arange(10), 7)


def test_digits_parts_are_disjoint_and_cover_the_data() -> None:
    parts = {p: digits_indices(p) for p in PART_SIZES}
    assert {p: len(v) for p, v in parts.items()} == PART_SIZES
    union = np.concatenate(list(parts.values()))
    assert len(np.unique(union)) == len(union) == 1797
    assert np.array_equal(digits_indices("train"), digits_indices("train"))  # fixed split
    data = DigitsDataset("pretrain", image_size=32)
    image, label = data[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert isinstance(label, int) and set(np.unique(data.labels)) == set(range(10))
    with pytest.raises(ValueError, match="'val'"):
        digits_indices("val")


def test_digits_tune_splits_the_public_pretrain_part_only() -> None:
    tune = {p: set(digits_indices(p).tolist()) for p in TUNE_SIZES}
    assert {p: len(v) for p, v in tune.items()} == TUNE_SIZES
    assert tune["tune_train"] | tune["tune_test"] == set(digits_indices("pretrain").tolist())
    assert not tune["tune_train"] & tune["tune_test"]
    bundle = load_dataset("digits-tune")
    assert set(bundle.train.indices.tolist()) == tune["tune_train"] and len(bundle.test) == TUNE_SIZES["tune_test"]
    assert set(np.unique(bundle.train.labels)) == set(range(10))


def test_load_dataset_digits_is_federated_part() -> None:
    bundle = load_dataset("digits")
    assert len(bundle.train) == PART_SIZES["train"] and len(bundle.test) == PART_SIZES["test"]
    assert bundle.classnames[0] == "zero" and len(bundle.classnames) == 10
    with pytest.raises(ValueError, match=r"'mnist'.*caltech101.*imagenet_r.*cifar100"):
        load_dataset("mnist")
    for name in ("dtd", "imagenet", "imagenet_a"):
        with pytest.raises(ValueError, match="data_root"):
            load_dataset(name)
    assert DATASETS[0] == "digits"


def _check_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    union = np.concatenate(parts)
    assert len(union) == len(np.unique(union)) == n


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_splits_disjoint_and_cover(scheme: str) -> None:
    split = partition(LABELS, 7, scheme, test_labels=TEST_LABELS, seed=0)
    assert split.num_users == 7
    _check_disjoint_cover(split.train, len(LABELS))
    _check_disjoint_cover(split.test, len(TEST_LABELS))
    assert all(len(p) > 0 for p in split.train)


def test_pathological_classes_disjoint_and_test_matches() -> None:
    split = partition(LABELS, 5, "pathological", test_labels=TEST_LABELS, classes_per_user=2, seed=3)
    _check_disjoint_cover(split.train, len(LABELS))
    _check_disjoint_cover(split.test, len(TEST_LABELS))
    seen: set[int] = set()
    for train, test, classes in zip(split.train, split.test, split.classes, strict=True):
        assert len(classes) == 2 and not seen & set(classes.tolist())
        seen |= set(classes.tolist())
        assert set(np.unique(LABELS[train])) == set(classes) == set(np.unique(TEST_LABELS[test]))
    fewer = partition(LABELS, 3, "pathological", test_labels=TEST_LABELS, classes_per_user=2, seed=3)
    assert sum(len(p) for p in fewer.train) == 6 * 30  # 4 classes belong to no client


def _class_labels(n_cls: int, per_class: int = 3) -> np.ndarray:
    return np.repeat(np.arange(n_cls), per_class)


def _check_class_shares(split, labels: np.ndarray, test_labels: np.ndarray, n_cls: int) -> list[int]:
    """Every class goes to exactly one client, train and test by the same classes; returns the share sizes."""
    shares = [set(c.tolist()) for c in split.classes]
    assert sorted(k for s in shares for k in s) == list(range(n_cls))  # disjoint and covering every class
    _check_disjoint_cover(split.train, len(labels))
    _check_disjoint_cover(split.test, len(test_labels))
    for train, test, share in zip(split.train, split.test, shares, strict=True):
        assert set(np.unique(labels[train]).tolist()) == share == set(np.unique(test_labels[test]).tolist())
    return [len(s) for s in shares]


@pytest.mark.parametrize(("n_cls", "users"), [(37, 10), (102, 10), (10, 3), (11, 4), (7, 7), (100, 10), (13, 5)])
@pytest.mark.parametrize("seed", [0, 4])
def test_balanced_pathological_split_gives_every_class_to_a_client(n_cls: int, users: int, seed: int) -> None:
    labels, test_labels = _class_labels(n_cls), _class_labels(n_cls, 2)
    split = partition(labels, users, "pathological", test_labels=test_labels, seed=seed)
    sizes = _check_class_shares(split, labels, test_labels, n_cls)
    assert max(sizes) - min(sizes) <= 1  # balanced: at most one class apart
    assert sizes == sorted(sizes, reverse=True) and sizes.count(n_cls // users + 1) == n_cls % users  # first ones


def _authors_order(n_cls: int) -> list[int]:
    """Their shuffle as their code runs it: the global generator seeded with 2023 (restored afterwards)."""
    saved = random.getstate()
    try:
        random.seed(AUTHORS_CLASS_SEED)
        classes = list(range(n_cls))
        random.shuffle(classes)
    finally:
        random.setstate(saved)
    return classes


@pytest.mark.parametrize(
    ("n_cls", "users", "sizes"), [(37, 10, [4] * 9 + [1]), (102, 10, [10] * 9 + [12]), (10, 3, [3, 3, 4])]
)
def test_authors_pathological_split_is_their_fixed_seed_shares(n_cls: int, users: int, sizes: list[int]) -> None:
    labels, test_labels = _class_labels(n_cls), _class_labels(n_cls, 2)
    runs = [
        partition(labels, users, "pathological", test_labels=test_labels, seed=s, pathological_split="authors")
        for s in (0, 1, 77)
    ]
    for split in runs[1:]:  # independent of the run's seed
        assert all(
            np.array_equal(a, b) for a, b in zip(runs[0].train + runs[0].test, split.train + split.test, strict=True)
        )
    assert _check_class_shares(runs[0], labels, test_labels, n_cls) == sizes  # round(n / K) each, the last the rest
    order = _authors_order(n_cls)
    per = round(n_cls / users)
    for c, classes in enumerate(runs[0].classes):
        want = order[c * per : (c + 1) * per] if c < users - 1 else order[(users - 1) * per :]
        assert classes.tolist() == sorted(want)
    state = random.getstate()
    partition(labels, users, "pathological", seed=0, pathological_split="authors")
    assert random.getstate() == state  # the global generator is left alone


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"num_users": 10, "labels": _class_labels(15)},
            r"leaves a client without classes: 9 clients take round\(15 / 10\)",
        ),
        ({"classes_per_user": 2}, "classes_per_user applies to pathological_split 'balanced' only"),
        ({"pathological_split": "shuffled"}, r"pathological_split must be one of \('balanced', 'authors'\)"),
    ],
)
def test_authors_pathological_split_refusals(kwargs: dict, match: str) -> None:
    args = {"labels": LABELS, "num_users": 3, "pathological_split": "authors", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        partition(args.pop("labels"), args.pop("num_users"), "pathological", **args)


def test_balanced_pathological_split_needs_a_class_per_client() -> None:
    with pytest.raises(ValueError, match="at least one class per client: 10 classes for 11 users"):
        partition(LABELS, 11, "pathological", seed=0)
    assert CHOICES["pathological_split"] == PATHOLOGICAL_SPLITS  # the config's choices are the splitter's


def test_dirichlet_reproducible_and_skewed() -> None:
    a = partition(LABELS, 4, "dirichlet", test_labels=TEST_LABELS, beta=0.1, seed=5)
    b = partition(LABELS, 4, "dirichlet", test_labels=TEST_LABELS, beta=0.1, seed=5)
    c = partition(LABELS, 4, "dirichlet", test_labels=TEST_LABELS, beta=0.1, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train, strict=True))
    counts = np.stack([np.bincount(LABELS[p], minlength=10) for p in a.train])  # (users, classes)
    assert (counts.max(0) / counts.sum(0)).mean() > 0.6  # beta=0.1: most of each class goes to one client
    iid = partition(LABELS, 4, "iid", seed=5)
    assert all(len(p) == 0 for p in iid.test)


def test_num_shots() -> None:
    split = partition(LABELS, 2, "iid", num_shots=3, seed=0)
    for part in split.train:
        assert np.bincount(LABELS[part]).max() <= 3
    kept = sample_shots(LABELS, np.arange(len(LABELS)), 2, seed=1)
    assert np.array_equal(np.bincount(LABELS[kept]), np.full(10, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_users": 0}, "num_users must be an int >= 1, got 0"),
        ({"num_users": 1000}, "num_users=1000"),
        ({"scheme": "noniid"}, r"scheme must be one of .*'noniid'"),
        ({"scheme": "dirichlet", "beta": -1.0}, "beta must be a finite number > 0, got -1.0"),
        ({"scheme": "dirichlet", "beta": float("nan")}, "beta must be"),
        ({"scheme": "pathological", "classes_per_user": 4}, r"classes_per_user must be .*got 4"),
        ({"scheme": "pathological", "classes_per_user": 0}, "got 0"),
        ({"scheme": "iid", "classes_per_user": 2}, "pathological"),
        ({"num_shots": 0}, "num_shots must be None or an int >= 1, got 0"),
    ],
)
def test_partition_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"num_users": 3, "scheme": "iid", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        partition(LABELS, **args)


def test_partition_bad_labels() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition(np.zeros((3, 2), dtype=np.int64), 2, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        partition(np.array([0, -1, 2]), 2, seed=0)


def test_coop_loader_reads_fake_folder(tmp_path: Path) -> None:
    root = tmp_path / "dtd"
    for cls in ("banded", "dotted"):
        (root / "images" / cls).mkdir(parents=True)
    split = {"train": [], "val": [], "test": []}
    for i, (cls, label) in enumerate([("banded", 0), ("dotted", 1), ("banded", 0)]):
        rel = f"{cls}/{cls}_{i}.jpg"
        Image.new("RGB", (20 + i, 16), color=(10 * i, 0, 0)).save(root / "images" / rel)
        split["train" if i < 2 else "test"].append([rel, label, cls])
    (root / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    bundle = load_dataset("dtd", tmp_path)
    assert bundle.classnames == ["banded", "dotted"]
    assert len(bundle.train) == 2 and len(bundle.test) == 1
    image, label = bundle.train[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (21, 16) and label == 1
    assert np.array_equal(bundle.train.labels, [0, 1])
    assert len(load_coop("dtd", tmp_path)["val"]) == 0


def test_coop_missing_split_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="split_zhou_Caltech101.json") as info:
        load_dataset("caltech101", tmp_path)
    assert "\n" not in str(info.value)


def test_cifar_missing_folder_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_cifar("cifar10", tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "cifar-10-batches-py") in message and "expected" in message
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)
