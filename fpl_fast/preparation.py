"""A run's data path: a config -> the frozen backbone, the class names and the federation's encoded data.

Every run goes through it: :func:`fpl_fast.job.train` (the CLI, the Python API, the grid), a Flower node (its
client's share, :mod:`fpl_fast.flower.node`) and the audit (canaries in the training, :mod:`fpl_fast.audit`).
Images are encoded once by the frozen image encoder (cached in memory, and on disk with a feature cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fpl_fast.backbone.loading import load_backbone
from fpl_fast.backbone.protocol import Backbone
from fpl_fast.config import RunConfig
from fpl_fast.data import DATASETS, DatasetBundle, dataset_labels, load_dataset
from fpl_fast.data.base_novel import base_class_count, base_novel_rows
from fpl_fast.data.clients import client_split
from fpl_fast.data.feature_store import FeatureStore
from fpl_fast.federated.client import ClientData
from fpl_fast.federated.eval_sets import EvalSet
from fpl_fast.validation import ConfigError

__all__ = ["check_device", "check_eval_datasets", "prepare", "prepare_eval_sets"]


def check_device(device: str) -> None:
    """The device exists here: a missing GPU is named as such before anything loads (not as a weights file that
    cannot be read, which is how torch would first meet it).

    Raises:
        ConfigError: a CUDA device and no CUDA device is available, or fewer than its index.
    """
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if ":" in device else 0
    if count == 0:
        why = "no CUDA device is available (torch.cuda.is_available() is False"
        why += f"; this torch {torch.__version__} is built without CUDA)" if torch.version.cuda is None else ")"
    elif index >= count:
        why = f"this machine has {count} CUDA device{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})"
    else:
        return
    raise ConfigError(
        "device", f"device={device!r}: {why}; use device='cpu'", cli=f"--device {device}: {why}; use --device cpu"
    )


def _load_backbone(cfg: RunConfig) -> Backbone:
    torch.manual_seed(cfg.seed)
    try:
        return load_backbone(cfg.model, cfg.pretrained, precision=cfg.precision, device=cfg.device)
    except RuntimeError as exc:  # weights that cannot be had (no network, a broken file): a user problem
        raise ValueError(f"--pretrained: {exc}") from None


def prepare(
    cfg: RunConfig,
    *,
    backbone: Backbone | None = None,
    feature_cache: str | Path | None = None,
    dataset: DatasetBundle | None = None,
    features: ClientData | None = None,
    classnames: list[str] | None = None,
    whole: bool = False,
    reseed: bool = False,
) -> tuple[Backbone, list[str], ClientData]:
    """Backbone, class names and the federation's data: load the backbone (unless given; a given one's cached
    features are reused), attach the disk cache (``feature_cache``), and encode and split the data (or check the
    given ``features`` and ``classnames``).

    ``dataset``: your own torchvision-style datasets instead of ``cfg.dataset``. ``whole``: the dataset is one
    client's own (a Flower node's data folder), not split. ``reseed`` (a training run's path): without a disk
    cache, torch's global generator is seeded again with ``cfg.seed`` after the backbone is there, so augmentation
    draws the same whether the backbone was loaded or handed in."""
    check_device(cfg.device)
    if backbone is None:
        backbone = _load_backbone(cfg)
    if feature_cache is not None:
        backbone.feature_cache.disk = FeatureStore(feature_cache)
    elif reseed:
        torch.manual_seed(cfg.seed)
    if features is None:
        return (backbone, *_encode(cfg, backbone, dataset, whole=whole))
    if classnames is None:
        raise ValueError("features needs classnames (class names in label order)")
    _check_clients(features, cfg)
    return backbone, list(classnames), features


def _check_clients(data: ClientData, cfg: RunConfig) -> None:
    """A split given with ``features``: one entry per client, every client with training data."""
    for name in ("train_idx", "test_idx"):
        n = len(getattr(data, name))
        if n != cfg.num_users:
            raise ValueError(f"the client split has {n} clients in {name} but num_users is {cfg.num_users}")
    empty = [k for k, ix in enumerate(data.train_idx) if len(ix) == 0]
    if empty:
        raise ValueError(f"clients {empty} of the given split have no training examples")


def _bundle(cfg: RunConfig, backbone: Backbone, dataset: DatasetBundle | None) -> tuple[DatasetBundle, str]:
    """The run's dataset (the given one, else ``cfg.dataset``) and its key in the backbone's feature cache."""
    if dataset is not None:
        return dataset, f"{dataset.name}:user:{id(dataset)}"
    ds = load_dataset(cfg.dataset, cfg.data_root, image_size=backbone.image_size[0])
    return ds, f"{cfg.dataset}:{cfg.data_root}"


def _base_classes(ds: DatasetBundle) -> int:
    """How many of ``ds``'s classes are base classes under --protocol base2novel (the first ceil(n/2))."""
    try:
        return base_class_count(len(ds.classnames))
    except ValueError as exc:
        raise ConfigError("protocol", f"protocol='base2novel' on dataset {ds.name!r}: {exc}") from None


def check_eval_datasets(cfg: RunConfig) -> None:
    """Every dataset --protocol xdataset / xdomain evaluates on is one :func:`fpl_fast.data.load_dataset` knows
    (checked before anything loads, as the datasets themselves are loaded after training's data).

    Raises:
        ConfigError: one line naming the first unknown name and the known ones.
    """
    unknown = [name for name in cfg.eval_dataset_names if name not in DATASETS]
    if unknown:
        raise ConfigError(
            "eval_datasets", f"eval_datasets: unknown dataset {unknown[0]!r}; allowed: {', '.join(DATASETS)}"
        )


def prepare_eval_sets(cfg: RunConfig, backbone: Backbone, *, dataset: DatasetBundle | None = None) -> list[EvalSet]:
    """What ``cfg.protocol`` scores the prompts on beyond the clients' splits, encoded once by the frozen image
    encoder (cached as the training data is): base2novel the novel classes' test examples of the run's dataset
    (``dataset``, else ``cfg.dataset``; labels shifted to start at 0, the novel class names); xdataset and xdomain
    each target's whole test split with its class names (a test-only dataset's empty train split is never read);
    the other protocols nothing.

    Raises:
        ConfigError: an unknown target dataset; a dataset of fewer than 2 classes for base2novel.
        ValueError: a target whose test split is empty. FileNotFoundError: a target's files missing.
    """
    check_eval_datasets(cfg)
    if cfg.protocol == "base2novel":
        ds, key = _bundle(cfg, backbone, dataset)
        n_base = _base_classes(ds)
        labels = dataset_labels(ds.test)
        _, novel = base_novel_rows(labels, n_base)
        feats = backbone.image_features(key, "test", ds.test, novel)
        novel_labels = torch.as_tensor(labels[novel] - n_base, dtype=torch.long)
        return [EvalSet("novel", list(ds.classnames)[n_base:], feats.float().cpu(), novel_labels)]
    sets = []
    for name in cfg.eval_dataset_names:
        target = load_dataset(name, cfg.data_root, image_size=backbone.image_size[0])
        labels = dataset_labels(target.test)
        if len(labels) == 0:
            raise ValueError(f"--eval-datasets {name}: its test split under {cfg.data_root} is empty")
        feats = backbone.image_features(f"{name}:{cfg.data_root}", "test", target.test)
        sets.append(EvalSet(name, list(target.classnames), feats.float().cpu(), torch.as_tensor(labels)))
    return sets


def _min_train(cfg: RunConfig) -> int:
    """The fewest training examples a client of a Dirichlet split may get: base2novel's half of the data leaves
    small clients (5 of the embedded default's with seed 1), so its split is redrawn until every client holds an
    expected Poisson batch (q = b / n <= 1); the other protocols keep the split as it always was (at least one)."""
    return cfg.batch_size if cfg.protocol == "base2novel" and cfg.sampling_scheme == "poisson" else 1


def _encode(
    cfg: RunConfig, backbone: Backbone, dataset: DatasetBundle | None, *, whole: bool = False
) -> tuple[list[str], ClientData]:
    """Split the dataset over the clients (``whole``: one client holds all of it) and encode its images once
    (cached by the backbone). --protocol base2novel keeps the base classes' examples and class names only."""
    ds, key = _bundle(cfg, backbone, dataset)
    train_labels, test_labels = dataset_labels(ds.train), dataset_labels(ds.test)
    classnames = list(ds.classnames)
    train_rows: np.ndarray | None = None  # the examples of ds.train and ds.test the run uses (None: all)
    test_rows: np.ndarray | None = None
    if cfg.protocol == "base2novel":
        n_base = _base_classes(ds)
        (train_rows, _), (test_rows, _) = base_novel_rows(train_labels, n_base), base_novel_rows(test_labels, n_base)
        train_labels, test_labels, classnames = train_labels[train_rows], test_labels[test_rows], classnames[:n_base]
    if whole:
        train_idx, test_idx = [np.arange(len(train_labels))], [np.arange(len(test_labels))]
    else:
        split = client_split(
            train_labels,
            cfg.num_users,
            cfg.partition,
            beta=cfg.beta,
            seed=cfg.seed,
            num_shots=cfg.num_shots,
            shots_protocol=cfg.shots_protocol,
            test_labels=test_labels,
            pathological_split=cfg.pathological_split,
            min_train=_min_train(cfg),
        )
        train_idx, test_idx = [np.asarray(ix) for ix in split.train], [np.asarray(ix) for ix in split.test]
    train_feats = backbone.image_features(key, "train", ds.train, train_rows)
    test_feats = backbone.image_features(key, "test", ds.test, test_rows)
    augment_fn = None
    if cfg.augment:

        def augment_fn(indices: np.ndarray) -> torch.Tensor:
            rows = indices if train_rows is None else train_rows[np.asarray(indices)]
            return backbone.image_features(key, "train", ds.train, rows, augment=True)

    data = ClientData(
        train_feats=train_feats.float().cpu(),
        train_labels=torch.as_tensor(train_labels, dtype=torch.long),
        test_feats=test_feats.float().cpu(),
        test_labels=torch.as_tensor(test_labels, dtype=torch.long),
        train_idx=train_idx,
        test_idx=test_idx,
        augment_fn=augment_fn,
    )
    return classnames, data
