"""Build a job from a RunConfig: frozen backbone, dataset, client splits, cached features; then run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fpl_fast.config import RunConfig
from fpl_fast.federated.runner import default_out_dir, load_federation, run_job
from fpl_fast.federated.simulation import ClientData
from fpl_fast.results import check_out_dir, load_checkpoint

__all__ = ["prepare", "prepare_and_run"]


def prepare(cfg: RunConfig) -> tuple[Any, list[str], ClientData]:
    """Backbone, class names and the federation's data (image features encoded once, cached)."""
    from fpl_fast.backbone import load_backbone
    from fpl_fast.data import load_dataset
    from fpl_fast.data.splits import partition

    torch.manual_seed(cfg.seed)
    try:
        backbone = load_backbone(cfg.model, cfg.pretrained, precision=cfg.precision, device=cfg.device)
    except RuntimeError as exc:  # weights that cannot be had (no network, a broken file): a user problem
        raise ValueError(f"--pretrained: {exc}") from None
    ds = load_dataset(cfg.dataset, cfg.data_root, image_size=backbone.image_size[0])
    train_labels = np.asarray(ds.train.labels)
    test_labels = np.asarray(ds.test.labels)
    split = partition(
        train_labels,
        cfg.num_users,
        cfg.partition,
        beta=cfg.beta,
        seed=cfg.seed,
        num_shots=cfg.num_shots,
        test_labels=test_labels,
    )
    key = f"{cfg.dataset}:{cfg.data_root}"
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
        train_idx=[np.asarray(ix) for ix in split.train],
        test_idx=[np.asarray(ix) for ix in split.test],
        augment_fn=augment_fn,
    )
    for k, ix in enumerate(data.train_idx):
        if len(ix) == 0:
            raise ValueError(
                f"client {k} received no training examples with --partition {cfg.partition}"
                f" (beta={cfg.beta}, {cfg.num_users} clients); use fewer clients or a larger --beta"
            )
    return backbone, list(ds.classnames), data


def prepare_and_run(cfg: RunConfig, *, progress: bool = True, **kwargs: Any) -> tuple[dict[str, Any], Path]:
    """prepare() then run_job(), then with --mia N the membership-inference attack (mia.json, and its summary
    under "mia" in results.json); returns the results and the output folder."""
    out = Path(cfg.out) if cfg.out else default_out_dir()
    # Before the backbone loads (run_job checks again): a previous run's files, no or a damaged checkpoint.
    check_out_dir(out, resume=cfg.resume)
    if cfg.resume:
        load_checkpoint(out)
    if cfg.mia:
        from fpl_fast.attacks.membership import check_pool

        check_pool(cfg.dataset)  # before anything is loaded or trained
    backbone, classnames, data = prepare(cfg)
    pool = None
    if cfg.mia:
        from fpl_fast.attacks.membership import shadow_pool

        pool = shadow_pool(cfg, backbone)  # before training: a missing or empty val split fails at once
    result = run_job(cfg, backbone, classnames, data, out=out, progress=progress, **kwargs)
    if pool is not None and result["final"] is not None:
        from fpl_fast import results as io
        from fpl_fast.attacks.membership import membership_inference, mia_summary

        target = load_federation(cfg, backbone, classnames, data, out)
        report = membership_inference(cfg, backbone, classnames, data, target, pool=pool, progress=progress)
        io.write_json(out / "mia.json", report)
        result["mia"] = mia_summary(report)
        io.write_json(out / "results.json", result)
    return result, out
