"""The one way into a run: a config -> backbone, data, cached features -> a trained, evaluated run.

:func:`train` runs an in-process job for every caller: the Python API (``fpl_fast.train``), the CLI
(``python -m fpl_fast.run``), the grid's cells and the tests. :func:`prepare` is its data path alone (backbone,
class names, encoded client data) for the callers that drive the federation themselves: the audit (canaries in the
training) and a Flower node (its client's share). This layer sits above federated/, methods/ and attacks/ (membership
inference after training), so none of those imports another's entry.

Bring your own data through one of two seams:
- ``dataset=DatasetBundle(name, train, test, classnames)``: torchvision-style datasets of ``(image, label)``
  (labels from a ``labels`` or ``targets`` attribute); they are split over clients by ``partition`` and encoded
  once by the frozen image encoder.
- ``features=ClientData(...)`` with ``classnames``: image features already computed, with your own client split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fpl_fast import outputs
from fpl_fast.attacks.membership import check_pool, membership_inference, mia_summary, shadow_pool
from fpl_fast.backbone.loading import load_backbone
from fpl_fast.backbone.protocol import Backbone
from fpl_fast.config import RunConfig, RunSettings
from fpl_fast.data import DatasetBundle, dataset_labels, load_dataset
from fpl_fast.data.clients import client_split
from fpl_fast.data.feature_store import FeatureStore
from fpl_fast.federated.client import ClientData
from fpl_fast.federated.engine import Federation
from fpl_fast.methods.dpfpl import DPFPL, default_out_dir
from fpl_fast.methods.skeleton import run_method

__all__ = ["Result", "train", "prepare"]


@dataclass
class Result:
    """What a run gives back: its accuracies and epsilons, per-round records and the trained federation.

    ``final`` and ``rounds`` are results.json's; ``federation`` holds the trained prompts (``federation.server.
    global_ctx``, ``federation.learner.local``) and can be evaluated further; ``out`` is the run's folder; ``mia``
    the attack's summary (with ``settings.mia``).
    """

    method: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    final: dict[str, Any]
    out: Path
    federation: Federation
    mia: dict[str, Any] | None = None

    @classmethod
    def of(cls, result: dict[str, Any], out: Path, federation: Federation) -> Result:
        """From results.json's dict."""
        return cls(
            result["method"], result["config"], result["rounds"], result["final"], out, federation, result.get("mia")
        )

    @property
    def local_acc(self) -> float:
        return float(self.final["local_acc"])

    @property
    def neighbor_acc(self) -> float:
        return float(self.final["neighbor_acc"])

    @property
    def epsilon(self) -> float:
        """epsilon_total: what one example of one client loses to an observer of everything released."""
        return float(self.final["epsilon_total"])


def _as_config(config: Any, cls: type) -> Any:
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings {unknown}; allowed: {sorted(known)}")
        return cls(**config)
    raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(config).__name__}")


def train(
    config: RunConfig | dict[str, Any] | None = None,
    *,
    settings: RunSettings | dict[str, Any] | None = None,
    dataset: DatasetBundle | None = None,
    features: ClientData | None = None,
    classnames: list[str] | None = None,
    backbone: Backbone | None = None,
    stop_after_round: int | None = None,
) -> Result:
    """Run one federated job and return its :class:`Result` (and write results.json etc. to ``settings.out``).

    Loads the backbone, encodes the data, trains and evaluates round by round (results.json, rounds.csv,
    accuracy.png and a checkpoint each round) and, with ``settings.mia``, runs the membership-inference attack
    (mia.json, its summary under "mia" in results.json).

    Args:
        config: the algorithm's settings (a RunConfig or a dict of its fields; None: the embedded default).
        settings: where and how it runs (output folder, resume, membership inference, progress bar, engine).
        dataset: your own torchvision-style datasets instead of ``config.dataset``.
        features: your own precomputed image features and client split (needs ``classnames``).
        classnames: class names in label order (with ``features``).
        backbone: an already loaded frozen CLIP (default: ``load_backbone`` of ``config.model``).
        stop_after_round: end early after this round, as if interrupted (tests of ``resume``).
    """
    cfg = _as_config(config, RunConfig)
    run = _as_config(settings, RunSettings)
    if run.engine != "inprocess":  # the Flower engine returns no in-process federation to hand back
        raise ValueError(
            f"engine={run.engine!r} runs through fpl_fast.flower.simulation.run_flower_simulation or "
            "python -m fpl_fast.run --engine flower-sim; train() runs in process"
        )
    out = Path(run.out) if run.out else default_out_dir()
    # Before the backbone loads (the driver checks again): a previous run's files, no or a damaged checkpoint.
    outputs.check_out_dir(out, resume=run.resume)
    if run.resume:
        outputs.load_checkpoint(out)
    if run.mia:
        check_pool(cfg.dataset)  # before anything is loaded or trained
    backbone, names, data = _prepare(
        cfg,
        backbone,
        run.feature_cache or None,
        dataset=dataset,
        features=features,
        classnames=classnames,
        reseed=True,
    )
    pool = shadow_pool(cfg, backbone) if run.mia else None  # before training: a missing val split fails at once
    method = DPFPL(backbone, names, data, out=out)
    result = run_method(
        method, cfg, out=out, progress=run.progress, resume=run.resume, stop_after_round=stop_after_round
    )
    fed = method.fed
    assert fed is not None  # set up by run_method
    if pool is not None and result["final"] is not None:
        report = membership_inference(
            cfg, backbone, names, data, fed, pool=pool, num_shadows=run.mia, progress=run.progress
        )
        outputs.write_json(out / "mia.json", report)
        result["mia"] = mia_summary(report)
        outputs.write_json(out / "results.json", result)
    return Result.of(result, out, fed)


def _load_backbone(cfg: RunConfig) -> Backbone:
    torch.manual_seed(cfg.seed)
    try:
        return load_backbone(cfg.model, cfg.pretrained, precision=cfg.precision, device=cfg.device)
    except RuntimeError as exc:  # weights that cannot be had (no network, a broken file): a user problem
        raise ValueError(f"--pretrained: {exc}") from None


def prepare(
    cfg: RunConfig,
    *,
    feature_cache: str | Path | None = None,
    whole: bool = False,
    backbone: Backbone | None = None,
) -> tuple[Backbone, list[str], ClientData]:
    """A run's data path without the run: backbone, class names and the federation's data (image features
    encoded once, cached; on disk too with ``feature_cache``). ``whole``: the dataset is one client's own (a Flower
    node's data folder), not split. ``backbone``: one already loaded (its cached features are reused)."""
    return _prepare(cfg, backbone, feature_cache, whole=whole)


def _prepare(
    cfg: RunConfig,
    backbone: Backbone | None,
    feature_cache: str | Path | None,
    *,
    dataset: DatasetBundle | None = None,
    features: ClientData | None = None,
    classnames: list[str] | None = None,
    whole: bool = False,
    reseed: bool = False,
) -> tuple[Backbone, list[str], ClientData]:
    """Load (unless given) the backbone, attach the disk cache, and encode and split the data (or check the given
    features). ``reseed`` (a run's own path): without a disk cache, torch's global generator is seeded again with
    ``cfg.seed`` after the backbone is there, so augmentation draws the same whether it was loaded or handed in."""
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


def _encode(
    cfg: RunConfig, backbone: Backbone, dataset: DatasetBundle | None, *, whole: bool = False
) -> tuple[list[str], ClientData]:
    """Split the dataset over the clients (``whole``: one client holds all of it) and encode its images once
    (cached by the backbone)."""
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, image_size=backbone.image_size[0])
    train_labels, test_labels = dataset_labels(ds.train), dataset_labels(ds.test)
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
            test_labels=test_labels,
            pathological_split=cfg.pathological_split,
        )
        train_idx, test_idx = [np.asarray(ix) for ix in split.train], [np.asarray(ix) for ix in split.test]
    key = f"{cfg.dataset}:{cfg.data_root}" if dataset is None else f"{ds.name}:user:{id(ds)}"
    train_feats = backbone.image_features(key, "train", ds.train)
    test_feats = backbone.image_features(key, "test", ds.test)
    augment_fn = None
    if cfg.augment:

        def augment_fn(indices: np.ndarray) -> torch.Tensor:
            return backbone.image_features(key, "train", ds.train, indices, augment=True)

    data = ClientData(
        train_feats=train_feats.float().cpu(),
        train_labels=torch.as_tensor(train_labels, dtype=torch.long),
        test_feats=test_feats.float().cpu(),
        test_labels=torch.as_tensor(test_labels, dtype=torch.long),
        train_idx=train_idx,
        test_idx=test_idx,
        augment_fn=augment_fn,
    )
    return list(ds.classnames), data
