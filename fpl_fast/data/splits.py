"""Client splits of a labelled dataset: iid, pathological (disjoint class shares) and Dirichlet label skew.

Every scheme returns, per client, indices into the training set and matching indices into the test set:

* ``iid``: both sets shuffled and cut into ``num_users`` near-equal disjoint shares.
* ``pathological``: the classes are shuffled and each client gets ``classes_per_user`` of them, disjoint across
  clients; its train and test indices are all samples of its classes (classes left over when
  ``num_users * classes_per_user < n_cls`` belong to no client).
* ``dirichlet``: for every class, client proportions ``p ~ Dir(beta * 1)``; that class's train samples and its
  test samples are cut in those proportions (so each client's test labels follow its train labels). Smaller
  ``beta`` means more skew. Proportions are redrawn (up to 100 times) until every client has a train sample.

``num_shots`` then keeps at most that many train samples per class per client (few-shot, as CoOp).
All randomness comes from ``numpy.random.default_rng(seed)``: the same seed gives the same split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SCHEMES", "ClientSplit", "partition", "sample_shots"]

SCHEMES = ("iid", "pathological", "dirichlet")


@dataclass(frozen=True)
class ClientSplit:
    """Per-client index arrays.

    Attributes:
        train: ``train[c]`` indices into the training set of client c (sorted).
        test: ``test[c]`` indices into the test set of client c (sorted; empty arrays if no test labels given).
        classes: ``classes[c]`` the sorted class ids present in client c's training share.
    """

    train: list[np.ndarray]
    test: list[np.ndarray]
    classes: list[np.ndarray]

    @property
    def num_users(self) -> int:
        """Number of clients."""
        return len(self.train)


def _labels(labels: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D sequence of integer class ids, got shape {arr.shape} {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative class ids, got minimum {arr.min()}")
    return arr.astype(np.int64)


def _cut(idx: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    bounds = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
    return np.split(idx, bounds)


def sample_shots(labels: Sequence[int] | np.ndarray, indices: np.ndarray, num_shots: int, *, seed: int) -> np.ndarray:
    """Keep at most ``num_shots`` random samples per class among ``indices``.

    Args:
        labels: labels of the whole set.
        indices: candidate indices.
        num_shots: samples per class to keep, >= 1.
        seed: RNG seed.

    Returns:
        Sorted kept indices.
    """
    if not isinstance(num_shots, int) or num_shots < 1:
        raise ValueError(f"num_shots must be an int >= 1, got {num_shots!r}")
    lab = _labels(labels, "labels")
    rng = np.random.default_rng(seed)
    kept = []
    for cls in np.unique(lab[indices]):
        members = indices[lab[indices] == cls]
        kept.append(rng.permutation(members)[:num_shots])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def partition(
    labels: Sequence[int] | np.ndarray,
    num_users: int,
    scheme: str = "iid",
    *,
    test_labels: Sequence[int] | np.ndarray | None = None,
    beta: float = 0.5,
    classes_per_user: int | None = None,
    num_shots: int | None = None,
    seed: int,
) -> ClientSplit:
    """Split a training set (and optionally its test set) over ``num_users`` clients.

    Args:
        labels: (N,) training labels.
        num_users: number of clients, >= 1.
        scheme: ``"iid"``, ``"pathological"`` or ``"dirichlet"``.
        test_labels: (M,) test labels; each client gets a matching test split.
        beta: Dirichlet concentration (> 0), only for ``"dirichlet"``.
        classes_per_user: classes per client for ``"pathological"``, 1 <= value <= n_cls // num_users
            (default n_cls // num_users).
        num_shots: keep at most this many train samples per class per client (None: all).
        seed: RNG seed.

    Returns:
        The per-client splits.

    Raises:
        ValueError: for a bad scheme, num_users, beta, classes_per_user or num_shots, naming the value.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    train = _labels(labels, "labels")
    test = _labels([] if test_labels is None else test_labels, "test_labels")
    if not isinstance(num_users, int) or isinstance(num_users, bool) or num_users < 1:
        raise ValueError(f"num_users must be an int >= 1, got {num_users!r}")
    if num_users > len(train):
        raise ValueError(f"num_users={num_users} exceeds the {len(train)} training samples")
    if num_shots is not None and (not isinstance(num_shots, int) or num_shots < 1):
        raise ValueError(f"num_shots must be None or an int >= 1, got {num_shots!r}")
    n_cls = int(max(train.max(initial=-1), test.max(initial=-1))) + 1
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        if classes_per_user is not None:
            raise ValueError(f"classes_per_user applies to scheme 'pathological' only, got {classes_per_user!r}")
        train_parts = np.array_split(rng.permutation(len(train)), num_users)
        test_parts = np.array_split(rng.permutation(len(test)), num_users)
    elif scheme == "pathological":
        if classes_per_user is None:
            classes_per_user = n_cls // num_users
        max_cpu = n_cls // num_users
        if not isinstance(classes_per_user, int) or not 1 <= classes_per_user <= max(max_cpu, 0):
            raise ValueError(
                f"classes_per_user must be an int in [1, n_cls // num_users = {max_cpu}] so that class shares are "
                f"disjoint ({n_cls} classes, {num_users} users), got {classes_per_user!r}"
            )
        order = rng.permutation(n_cls)
        shares = [order[c * classes_per_user : (c + 1) * classes_per_user] for c in range(num_users)]
        train_parts = [np.flatnonzero(np.isin(train, s)) for s in shares]
        test_parts = [np.flatnonzero(np.isin(test, s)) for s in shares]
    else:
        if classes_per_user is not None:
            raise ValueError(f"classes_per_user applies to scheme 'pathological' only, got {classes_per_user!r}")
        if not isinstance(beta, int | float) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        for _ in range(100):
            props = rng.dirichlet(np.full(num_users, float(beta)), size=n_cls)  # (n_cls, num_users)
            train_bins: list[list[np.ndarray]] = [[] for _ in range(num_users)]
            test_bins: list[list[np.ndarray]] = [[] for _ in range(num_users)]
            for cls in range(n_cls):
                for c, part in enumerate(_cut(rng.permutation(np.flatnonzero(train == cls)), props[cls])):
                    train_bins[c].append(part)
                for c, part in enumerate(_cut(rng.permutation(np.flatnonzero(test == cls)), props[cls])):
                    test_bins[c].append(part)
            train_parts = [np.concatenate(b) for b in train_bins]
            test_parts = [np.concatenate(b) for b in test_bins]
            if min(len(p) for p in train_parts) > 0:
                break

    train_out = [np.sort(p).astype(np.int64) for p in train_parts]
    if num_shots is not None:
        train_out = [sample_shots(train, p, num_shots, seed=seed + 1 + c) for c, p in enumerate(train_out)]
    return ClientSplit(
        train=train_out,
        test=[np.sort(p).astype(np.int64) for p in test_parts],
        classes=[np.unique(train[p]) for p in train_out],
    )
