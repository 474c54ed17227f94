"""Membership inference against a trained federation (Shokri et al. 2017, as the DP-FPL paper uses it).

The question: given client k's personalised model (global + local prompt) and an example with its label, can an
attacker tell whether the example was in k's training set? Differential privacy bounds how well anyone can.

* A **record** is the softmax prediction vector of client k's model (its own text features) on one example,
  with the example's true label and whether it is a member. Members are client k's training examples;
  non-members the same number of its test examples (its classes, trained on by no client), subsampled so the
  two kinds are balanced (0.5 accuracy is chance).
* **Shadow models** imitate the target: the attacker knows the algorithm and the configuration and holds data
  from the same distribution, disjoint from the target's (the *shadow pool*). Each shadow splits the pool into
  an "in" and an "out" half, partitions "in" over the same number of clients with the same scheme (the "out"
  half becomes the clients' test examples), trains with the same RunConfig and a different seed, and gives
  in/out records per client exactly as the target does.
* **Attack models**: one binary classifier per class trained on the shadow records of that class (the
  prediction vector as features), applied to the target records of that class. A class whose shadow records
  are of one kind only is scored by one classifier trained on the records of all classes (reported).

Shadow pools: digits uses its ``pretrain`` part (797 images; the embedded tiny CLIP was pretrained on it, so the
backbone has seen the pool but never the federated train/test parts: shadow in and out records share that
advantage, the target's records have neither); the CoOp datasets use their ``val`` split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import Tensor

from fpl_fast.config import RunConfig
from fpl_fast.federated.engine import ClientData, Federation
from fpl_fast.methods.dpfpl import build_federation, eval_seed, progress_bar, train_rounds

__all__ = [
    "Records",
    "ShadowPool",
    "AttackModels",
    "ATTACK_MODEL",
    "check_pool",
    "shadow_pool",
    "balanced_pairs",
    "prediction_vectors",
    "federation_records",
    "split_pool",
    "shadow_data",
    "shadow_seed",
    "train_shadow",
    "shadow_records",
    "fit_attack_models",
    "membership_scores",
    "attack_metrics",
    "auc_standard_error",
    "prediction_gap",
    "membership_inference",
    "mia_summary",
]

ATTACK_MODEL = "sklearn GradientBoostingClassifier, one per class"


@dataclass(frozen=True)
class Records:
    """Attack records: one row per (client, example).

    Attributes:
        probs: (n, n_cls) float64 softmax prediction vectors of the client's model.
        labels: (n,) true labels.
        member: (n,) bool, True for the client's training examples.
        client: (n,) the client whose model produced the row.
    """

    probs: np.ndarray
    labels: np.ndarray
    member: np.ndarray
    client: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: list[Records], n_cls: int) -> Records:
        if not parts:
            return Records(np.zeros((0, n_cls)), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64))
        return Records(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("probs", "labels", "member", "client"))
        )

    def select(self, mask: np.ndarray) -> Records:
        return Records(self.probs[mask], self.labels[mask], self.member[mask], self.client[mask])


@dataclass(frozen=True)
class ShadowPool:
    """The attacker's data: same distribution as the target's, disjoint from its train and test examples.

    Attributes:
        feats: (N, D) frozen image features (float32, CPU).
        labels: (N,) labels.
        ids: identifiers of the examples in their source (digits: indices into ``load_digits()``; CoOp: image
            paths), to check disjointness.
        source: what the pool is, in words (goes into mia.json).
        augment_fn: pool indices -> freshly augmented features (with --augment), else None.
    """

    feats: Tensor
    labels: np.ndarray
    ids: list
    source: str
    augment_fn: Callable[[np.ndarray], Tensor] | None = None


@dataclass
class AttackModels:
    """Per-class attack classifiers, and the all-classes one that scores the classes without their own."""

    per_class: dict[int, GradientBoostingClassifier]
    fallback: GradientBoostingClassifier | None
    fallback_classes: list[int]


# ----------------------------------------------------------------------------------------------
# The shadow pool
# ----------------------------------------------------------------------------------------------
def check_pool(dataset: str) -> None:
    """Fail early (before any training) for a dataset that has no shadow pool.

    Raises:
        ValueError: one line naming what is supported.
    """
    from fpl_fast.data.coop import COOP_DATASETS

    if dataset != "digits" and dataset not in COOP_DATASETS:
        raise ValueError(
            f"--mia supports --dataset digits (its pretrain part) and the CoOp datasets "
            f"({', '.join(COOP_DATASETS)}; their val split) as the shadow pool, got {dataset!r}"
        )


def shadow_pool(cfg: RunConfig, backbone) -> ShadowPool:
    """The attacker's data for ``cfg.dataset``, encoded by the frozen backbone (cached like the target's).

    Raises:
        ValueError: a dataset without a part disjoint from the federated data (see :func:`check_pool`).
    """
    from fpl_fast.data.coop import CoOpSplitDataset, load_coop
    from fpl_fast.data.digits import PART_SIZES, DigitsDataset

    check_pool(cfg.dataset)
    ds: DigitsDataset | CoOpSplitDataset
    ids: list[int] | list[str]
    if cfg.dataset == "digits":
        ds = DigitsDataset("pretrain", image_size=backbone.image_size[0])
        ids = [int(i) for i in ds.indices]
        source = (
            f"digits 'pretrain' part ({PART_SIZES['pretrain']} images; the embedded tiny CLIP was pretrained on it)"
        )
        split = "pretrain"
    else:
        ds = load_coop(cfg.dataset, cfg.data_root)["val"]
        if len(ds) == 0:
            raise ValueError(f"--mia: {cfg.dataset} has no 'val' examples for the shadow models")
        ids = [str(p) for p in ds.paths]
        source = f"{cfg.dataset} 'val' split ({len(ds)} images)"
        split = "val"
    key = f"{cfg.dataset}:{cfg.data_root}"
    feats = backbone.image_features(key, split, ds).float().cpu()
    augment_fn = None
    if cfg.augment:

        def augment_fn(indices: np.ndarray) -> Tensor:
            return backbone.image_features(key, split, ds, indices, augment=True)

    return ShadowPool(feats, np.asarray(ds.labels, dtype=np.int64), ids, source, augment_fn)


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def balanced_pairs(n_members: int, n_non_members: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions of as many members as non-members (the smaller count), drawn without replacement, so that
    guessing is worth exactly 0.5 accuracy."""
    n = min(n_members, n_non_members)
    return np.sort(rng.choice(n_members, n, replace=False)), np.sort(rng.choice(n_non_members, n, replace=False))


@torch.no_grad()
def prediction_vectors(fed: Federation, text: Tensor, k: int, feats: Tensor) -> np.ndarray:
    """Softmax over classes of client k's personalised logits (what the attacker observes), float64 so
    confident predictions keep their tail. text: (K, n_cls, D); feats: (n, D) -> (n, n_cls)."""
    if len(feats) == 0:
        return np.zeros((0, text.shape[1]))
    logits = fed.text.logits(text[k : k + 1], feats[None].to(text.device))[0]  # (n, n_cls)
    return torch.softmax(logits.double(), dim=-1).cpu().numpy()


def federation_records(fed: Federation, data: ClientData, *, eval_seed: int, seed: int) -> Records:
    """Balanced member / non-member records of every client of ``fed`` (members: its training examples;
    non-members: its test examples). ``eval_seed`` fixes the low-rank factorisation of the prompts (the one
    the run's final evaluation used), ``seed`` the subsampling."""
    text = fed.client_text_features(eval_seed)  # (K, n_cls, D)
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(len(data.train_idx)):
        train_ix, test_ix = np.asarray(data.train_idx[k]), np.asarray(data.test_idx[k])
        a, b = balanced_pairs(len(train_ix), len(test_ix), rng)
        for ix, feats, labels, is_member in (
            (train_ix[a], data.train_feats, data.train_labels, True),
            (test_ix[b], data.test_feats, data.test_labels, False),
        ):
            t = torch.as_tensor(ix, dtype=torch.long)
            parts.append(
                Records(
                    prediction_vectors(fed, text, k, feats[t]),
                    labels[t].numpy().astype(np.int64),
                    np.full(len(ix), is_member),
                    np.full(len(ix), k, dtype=np.int64),
                )
            )
    return Records.concat(parts, text.shape[1])


# ----------------------------------------------------------------------------------------------
# Shadow models
# ----------------------------------------------------------------------------------------------
def shadow_seed(cfg: RunConfig, j: int) -> int:
    """Seed of shadow model j: never the target's (the attacker does not know its randomness)."""
    return cfg.seed + 1000 * (j + 1)


def split_pool(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool indices of the "in" and the "out" half, stratified by class (plain random when a class has fewer
    than two examples)."""
    idx = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(counts) and counts.min() >= 2 else None
    a, b = train_test_split(idx, test_size=0.5, stratify=stratify, random_state=seed)
    return np.sort(a), np.sort(b)


def shadow_data(cfg: RunConfig, pool: ShadowPool, seed: int) -> ClientData:
    """A shadow federation's data: the pool's "in" half partitioned over ``cfg.num_users`` clients with
    ``cfg``'s scheme (and --num-shots, --shots-protocol), the "out" half as the clients' test examples."""
    from fpl_fast.data.splits import partition

    in_ix, out_ix = split_pool(pool.labels, seed)
    split = partition(
        pool.labels[in_ix],
        cfg.num_users,
        cfg.partition,
        beta=cfg.beta,
        seed=seed,
        num_shots=cfg.num_shots,
        shots_protocol=cfg.shots_protocol,
        test_labels=pool.labels[out_ix],
        pathological_split=cfg.pathological_split,
    )
    if min(len(ix) for ix in split.train) == 0:
        raise ValueError(
            f"--mia: a shadow client received no training examples from the {len(in_ix)}-example 'in' half of "
            f"the shadow pool ({cfg.partition}, {cfg.num_users} clients); use fewer clients or a larger --beta"
        )
    augment_fn = None
    if pool.augment_fn is not None:
        pool_augment = pool.augment_fn

        def augment_fn(indices: np.ndarray) -> Tensor:
            return pool_augment(in_ix[indices])

    return ClientData(
        train_feats=pool.feats[torch.as_tensor(in_ix)],
        train_labels=torch.as_tensor(pool.labels[in_ix], dtype=torch.long),
        test_feats=pool.feats[torch.as_tensor(out_ix)],
        test_labels=torch.as_tensor(pool.labels[out_ix], dtype=torch.long),
        train_idx=[np.asarray(ix) for ix in split.train],
        test_idx=[np.asarray(ix) for ix in split.test],
        augment_fn=augment_fn,
    )


def train_shadow(
    cfg: RunConfig, backbone, classnames: list[str], data: ClientData, *, progress: bool = True, desc: str = "mia"
) -> Federation:
    """A federation trained ``cfg.rounds`` rounds as a run trains it (same blocks, same draws), with nothing
    evaluated or written in between: a shadow model."""
    fed, _, _ = build_federation(cfg, backbone, classnames, data)
    bar = progress_bar(cfg.rounds * fed.steps_per_round, desc=desc, enabled=progress)
    for _ in train_rounds(fed, 0, cfg.rounds, on_step=bar.update):
        pass
    bar.close()
    return fed


def shadow_records(
    cfg: RunConfig, backbone, classnames: list[str], pool: ShadowPool, j: int, *, progress: bool = True
) -> Records:
    """Train shadow model j with the target's configuration (its own seed) on the pool; its records."""
    seed = shadow_seed(cfg, j)
    # The attacker's own shadows: reproducible only when the target's noise is (--noise-seed), with other keys.
    noise_seed = None if cfg.noise_seed is None else cfg.noise_seed + 1000 * (j + 1)
    shadow_cfg = cfg.replace(seed=seed, noise_seed=noise_seed)
    data = shadow_data(shadow_cfg, pool, seed)
    fed = train_shadow(shadow_cfg, backbone, classnames, data, progress=progress, desc=f"mia shadow {j + 1}")
    return federation_records(fed, data, eval_seed=eval_seed(shadow_cfg, cfg.rounds - 1), seed=seed)


# ----------------------------------------------------------------------------------------------
# Attack models and metrics
# ----------------------------------------------------------------------------------------------
def _classifier(seed: int) -> GradientBoostingClassifier:
    # Trees do not care about the scale of the (very peaked) probabilities, only their order.
    return GradientBoostingClassifier(random_state=seed)


def fit_attack_models(shadow: Records, *, seed: int) -> AttackModels:
    """One member/non-member classifier per class on the shadow records of that class; the classes whose
    records are of one kind only (or absent) get the classifier over all classes."""
    if len(np.unique(shadow.member)) < 2:
        raise ValueError("the shadow records hold members only or non-members only: no attack model can be trained")
    n_cls = shadow.probs.shape[1]
    per_class: dict[int, GradientBoostingClassifier] = {}
    fallback_classes = []
    for c in range(n_cls):
        rec = shadow.select(shadow.labels == c)
        if len(np.unique(rec.member)) < 2:
            fallback_classes.append(c)
            continue
        per_class[c] = _classifier(seed).fit(rec.probs, rec.member)
    fallback = _classifier(seed).fit(shadow.probs, shadow.member) if fallback_classes else None
    return AttackModels(per_class, fallback, fallback_classes)


def membership_scores(models: AttackModels, records: Records) -> np.ndarray:
    """P(member) of each record from the attack model of its class."""
    scores = np.zeros(len(records))
    for c in np.unique(records.labels):
        sel = records.labels == c
        model = models.per_class.get(int(c), models.fallback)
        if model is None:  # fit_attack_models leaves fallback None only when every class has its own model
            raise ValueError(f"no attack model for class {int(c)}: the shadow records have no such class")
        proba = model.predict_proba(records.probs[sel])
        scores[sel] = proba[:, list(model.classes_).index(True)]
    return scores


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Mann-Whitney statistic) measured on ``n_pos`` positives and ``n_neg`` negatives
    (Hanley & McNeil 1982). At auc = 0.5 it is close to the exact null sd sqrt((n_pos + n_neg + 1) / (12 n_pos
    n_neg)): ~0.04 for 100 + 100 records, so an attack AUC of 0.55 there is no evidence of a leak."""
    if n_pos < 1 or n_neg < 1:
        raise ValueError(f"an AUC needs positives and negatives, got {n_pos} and {n_neg}")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def _binary_metrics(member: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Accuracy of the 0.5 threshold and the AUC (None with one kind of record only)."""
    both = len(np.unique(member)) == 2
    return {
        "members": int(member.sum()),
        "non_members": int((~member).sum()),
        "accuracy": float(((scores >= 0.5) == member).mean()) if len(member) else None,
        "auc": float(roc_auc_score(member, scores)) if both else None,
    }


def attack_metrics(records: Records, scores: np.ndarray, num_clients: int) -> dict[str, Any]:
    """Attack accuracy and AUC per client, their means over the clients, and over all records pooled."""
    per_client = [
        _binary_metrics(records.member[sel], scores[sel]) for sel in (records.client == k for k in range(num_clients))
    ]

    def mean(key: str) -> float | None:
        vals = [m[key] for m in per_client if m[key] is not None]
        return float(np.mean(vals)) if vals else None

    pooled = _binary_metrics(records.member, scores)
    return {
        "attack_accuracy": mean("accuracy"),
        "attack_auc": mean("auc"),
        "attack_accuracy_pooled": pooled["accuracy"],
        "attack_auc_pooled": pooled["auc"],
        "members": pooled["members"],
        "non_members": pooled["non_members"],
        "per_client": [{"client": k, **m} for k, m in enumerate(per_client)],
    }


def prediction_gap(records: Records) -> dict[str, float | None]:
    """Accuracy of the models on their members (train) and non-members (test) among the records: the
    overfitting the attack feeds on."""

    def acc(sel: np.ndarray) -> float | None:
        return float((records.probs[sel].argmax(1) == records.labels[sel]).mean()) if sel.any() else None

    train, test = acc(records.member), acc(~records.member)
    gap = None if train is None or test is None else train - test
    return {"train_acc": train, "test_acc": test, "gap": gap}


# ----------------------------------------------------------------------------------------------
# The whole attack
# ----------------------------------------------------------------------------------------------
def membership_inference(
    cfg: RunConfig,
    backbone,
    classnames: list[str],
    data: ClientData,
    target: Federation,
    *,
    pool: ShadowPool,
    num_shadows: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack ``target`` (trained with ``cfg`` on ``data``) with ``num_shadows`` shadow models trained on ``pool``.

    Returns:
        The report written to mia.json: the means and per-client attack accuracy / AUC, the record counts,
        the target's and each shadow's train/test accuracy gap, the classes scored by the fallback model.
    """
    if num_shadows < 1:
        raise ValueError(f"--mia must be >= 1 to run the attack, got {num_shadows}")
    t0 = time.perf_counter()
    n_cls = len(classnames)
    target_rec = federation_records(target, data, eval_seed=eval_seed(cfg, cfg.rounds - 1), seed=cfg.seed)
    shadows, shadow_info = [], []
    for j in range(num_shadows):
        rec = shadow_records(cfg, backbone, classnames, pool, j, progress=progress)
        shadows.append(rec)
        shadow_info.append({"seed": shadow_seed(cfg, j), "records": len(rec), **prediction_gap(rec)})
    models = fit_attack_models(Records.concat(shadows, n_cls), seed=cfg.seed)
    scores = membership_scores(models, target_rec)
    gaps = [s["gap"] for s in shadow_info if s["gap"] is not None]
    fb = models.fallback_classes
    return {
        "num_shadows": num_shadows,
        "attack_model": ATTACK_MODEL,
        "shadow_pool": {"source": pool.source, "size": len(pool.labels)},
        **attack_metrics(target_rec, scores, cfg.num_users),
        "chance": 0.5,
        "fallback_classes": fb,
        "fallback_note": (
            f"classes {fb} had shadow records of one kind only: scored by one attack model over all classes"
            if fb
            else None
        ),
        "target_gap": prediction_gap(target_rec),
        "shadow_gap_mean": float(np.mean(gaps)) if gaps else None,
        "shadows": shadow_info,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def mia_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a report that go into results.json."""
    keys = ("num_shadows", "attack_accuracy", "attack_auc", "members", "non_members", "shadow_gap_mean")
    out = {k: report[k] for k in keys}
    out["target_gap"] = report["target_gap"]["gap"]
    out["fallback_classes"] = report["fallback_classes"]
    return out
