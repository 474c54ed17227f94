"""Client splits of a labelled dataset: iid, pathological (disjoint class shares) and Dirichlet label skew.

Every scheme returns, per client, indices into the training set and matching indices into the test set:

* ``iid``: both sets shuffled and cut into ``num_users`` near-equal disjoint shares.
* ``pathological``: disjoint class shares; a client's train and test indices are all samples of its classes.
  ``pathological_split="balanced"`` (default): the classes are shuffled with the run's seed and every class goes to
  some client, the first ``n_cls mod num_users`` clients taking one class more than the others (so no data is
  left unused: OxfordPets' 37 classes over 10 clients are shares of 4, 4, 4, 4, 4, 4, 4, 3, 3, 3). With an explicit
  ``classes_per_user`` every client gets exactly that many and the classes left over belong to no client.
  ``pathological_split="authors"``: the DP-FPL authors' scheme (their base_dataset.py), see :func:`authors_shares`.
* ``dirichlet``: for every class, client proportions ``p ~ Dir(beta * 1)``; that class's train samples and its
  test samples are cut in those proportions (so each client's test labels follow its train labels). Smaller
  ``beta`` means more skew. Proportions are redrawn (up to 100 times) until every client has a train sample.

Few-shot training sets (``num_shots``), two protocols (``shots_protocol``):

* ``"per-client"`` (default): after the split, each client keeps at most ``num_shots`` of its train samples per
  class (seeded per client, so the shots depend on the split).
* ``"coop"``: CoOp's few-shot set first: ``num_shots`` train samples per class of the whole training set (all of
  a class that has fewer, as CoOp's ``generate_fewshot_dataset`` without repeats), drawn from ``seed`` alone on a
  stream of their own, so the same seed gives the same shots whatever the number of clients, the scheme or its
  parameters; that set is then split (:func:`coop_shots`).

All randomness comes from ``numpy.random.default_rng(seed)``: the same seed gives the same split (the authors'
pathological shares use their fixed seed instead, whatever ``seed``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SCHEMES",
    "PATHOLOGICAL_SPLITS",
    "AUTHORS_CLASS_SEED",
    "ClientSplit",
    "SHOTS_PROTOCOLS",
    "authors_shares",
    "balanced_shares",
    "coop_shots",
    "partition",
    "sample_shots",
]

SCHEMES = ("iid", "pathological", "dirichlet")
PATHOLOGICAL_SPLITS = ("balanced", "authors")
AUTHORS_CLASS_SEED = 2023  # the authors' fixed random.seed(2023), whatever the run's seed
SHOTS_PROTOCOLS = ("per-client", "coop")
# The stream of CoOp's few-shot draw, apart from the split's (both come from the run's seed).
_COOP_SHOTS_STREAM = 0xC00F


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
    return _draw_shots(_labels(labels, "labels"), indices, num_shots, np.random.default_rng(seed))


def coop_shots(labels: Sequence[int] | np.ndarray, num_shots: int, *, seed: int) -> np.ndarray:
    """CoOp's few-shot training set: ``num_shots`` random samples of every class of the whole set (all of a class
    that has fewer), drawn from ``seed`` alone: the same seed and labels give the same indices.

    Args:
        labels: labels of the whole training set.
        num_shots: samples per class, >= 1.
        seed: the run's seed.

    Returns:
        Sorted kept indices.
    """
    lab = _labels(labels, "labels")
    rng = np.random.default_rng([_COOP_SHOTS_STREAM, seed])
    return _draw_shots(lab, np.arange(len(lab)), num_shots, rng)


def _draw_shots(lab: np.ndarray, indices: np.ndarray, num_shots: int, rng: np.random.Generator) -> np.ndarray:
    if not isinstance(num_shots, int) or isinstance(num_shots, bool) or num_shots < 1:
        raise ValueError(f"num_shots must be an int >= 1, got {num_shots!r}")
    indices = np.asarray(indices, dtype=np.int64)
    kept = []
    for cls in np.unique(lab[indices]):
        members = indices[lab[indices] == cls]
        kept.append(rng.permutation(members)[:num_shots])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def balanced_shares(order: np.ndarray, num_users: int) -> list[np.ndarray]:
    """Cut the shuffled classes ``order`` into ``num_users`` contiguous shares whose sizes differ by at most one
    (the first ``len(order) mod num_users`` take one more): every class belongs to some client."""
    if len(order) < num_users:
        raise ValueError(
            f"pathological split needs at least one class per client: {len(order)} classes for {num_users} users"
        )
    return np.array_split(order, num_users)


def authors_shares(n_cls: int, num_users: int) -> list[np.ndarray]:
    """The DP-FPL authors' class shares (their base_dataset.py:345-390 at linhhtran/DP-FPL cce74b4):
    the class list is shuffled by Python's ``random`` seeded with 2023 whatever the run's seed, each of the first
    ``num_users - 1`` clients takes the next ``round(n_cls / num_users)`` classes and the last client the rest.

    Details the notes leave open, decided here: the list shuffled is the class ids ``0 .. n_cls - 1`` in label order;
    ``round`` is Python's (half to even: 25 classes over 10 clients give nine shares of 2 and the last 7); a private
    ``random.Random(2023)`` replays the same shuffle as their ``random.seed(2023); random.shuffle(...)`` without
    touching the global generator; and a split where the last client would get no class
    (``round(n / K) * (K - 1) >= n``, e.g. 15 classes over 10 clients) is refused rather than guessed at.
    """
    per = round(n_cls / num_users)
    if per < 1 or per * (num_users - 1) >= n_cls:
        raise ValueError(
            f"pathological_split='authors' leaves a client without classes: {num_users - 1} clients take "
            f"round({n_cls} / {num_users}) = {per} classes each of {n_cls}; use pathological_split='balanced' "
            "or fewer users"
        )
    classes = list(range(n_cls))
    random.Random(AUTHORS_CLASS_SEED).shuffle(classes)
    order = np.asarray(classes, dtype=np.int64)
    return [order[c * per : (c + 1) * per] for c in range(num_users - 1)] + [order[(num_users - 1) * per :]]


def _pathological_shares(
    n_cls: int, num_users: int, classes_per_user: int | None, split: str, rng: np.random.Generator
) -> list[np.ndarray]:
    """The disjoint class shares of the pathological scheme (see the module docstring)."""
    if split not in PATHOLOGICAL_SPLITS:
        raise ValueError(f"pathological_split must be one of {PATHOLOGICAL_SPLITS}, got {split!r}")
    if split == "authors":
        if classes_per_user is not None:
            raise ValueError(
                f"classes_per_user applies to pathological_split 'balanced' only (the authors' scheme fixes the "
                f"shares), got {classes_per_user!r}"
            )
        return authors_shares(n_cls, num_users)
    order = rng.permutation(n_cls)
    if classes_per_user is None:
        return balanced_shares(order, num_users)
    max_cpu = n_cls // num_users
    if not isinstance(classes_per_user, int) or not 1 <= classes_per_user <= max(max_cpu, 0):
        raise ValueError(
            f"classes_per_user must be an int in [1, n_cls // num_users = {max_cpu}] so that class shares are "
            f"disjoint ({n_cls} classes, {num_users} users), got {classes_per_user!r}"
        )
    return [order[c * classes_per_user : (c + 1) * classes_per_user] for c in range(num_users)]


def partition(
    labels: Sequence[int] | np.ndarray,
    num_users: int,
    scheme: str = "iid",
    *,
    test_labels: Sequence[int] | np.ndarray | None = None,
    beta: float = 0.5,
    classes_per_user: int | None = None,
    pathological_split: str = "balanced",
    num_shots: int | None = None,
    shots_protocol: str = "per-client",
    seed: int,
    min_train: int = 1,
) -> ClientSplit:
    """Split a training set (and optionally its test set) over ``num_users`` clients.

    Args:
        labels: (N,) training labels.
        num_users: number of clients, >= 1.
        scheme: ``"iid"``, ``"pathological"`` or ``"dirichlet"``.
        test_labels: (M,) test labels; each client gets a matching test split.
        beta: Dirichlet concentration (> 0), only for ``"dirichlet"``.
        classes_per_user: classes per client for ``"pathological"``, 1 <= value <= n_cls // num_users (default
            None: every class goes to some client, shares differing by at most one class).
        pathological_split: ``"balanced"`` (default) or ``"authors"`` (the DP-FPL authors' shares,
            :func:`authors_shares`), for ``"pathological"`` only.
        num_shots: few-shot: train samples per class (None: all), per client or of the whole set as
            ``shots_protocol`` says.
        shots_protocol: ``"per-client"`` (at most ``num_shots`` per class of each client's share, after the split)
            or ``"coop"`` (``num_shots`` per class of the whole set, :func:`coop_shots`, then the split).
        seed: RNG seed.
        min_train: ``"dirichlet"`` redraws its proportions (up to 100 times) until every client has at least this
            many training samples (1: any; a draw that already has them is kept, so a larger value changes only
            the splits that had a smaller client).

    Returns:
        The per-client splits.

    Raises:
        ValueError: for a bad scheme, num_users, beta, classes_per_user, pathological_split, num_shots or
            shots_protocol, naming the value.
    """
    if shots_protocol not in SHOTS_PROTOCOLS:
        raise ValueError(f"shots_protocol must be one of {SHOTS_PROTOCOLS}, got {shots_protocol!r}")
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
    if shots_protocol == "coop" and num_shots is not None:
        kept = coop_shots(train, num_shots, seed=seed)
        sub = partition(
            train[kept],
            num_users,
            scheme,
            test_labels=test_labels,
            beta=beta,
            classes_per_user=classes_per_user,
            pathological_split=pathological_split,
            seed=seed,
        )
        return ClientSplit(train=[kept[ix] for ix in sub.train], test=sub.test, classes=sub.classes)
    n_cls = int(max(train.max(initial=-1), test.max(initial=-1))) + 1
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        if classes_per_user is not None:
            raise ValueError(f"classes_per_user applies to scheme 'pathological' only, got {classes_per_user!r}")
        train_parts = np.array_split(rng.permutation(len(train)), num_users)
        test_parts = np.array_split(rng.permutation(len(test)), num_users)
    elif scheme == "pathological":
        shares = _pathological_shares(n_cls, num_users, classes_per_user, pathological_split, rng)
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
            if min(len(p) for p in train_parts) >= max(min_train, 1):
                break

    train_out = [np.sort(p).astype(np.int64) for p in train_parts]
    if num_shots is not None:
        train_out = [sample_shots(train, p, num_shots, seed=seed + 1 + c) for c, p in enumerate(train_out)]
    return ClientSplit(
        train=train_out,
        test=[np.sort(p).astype(np.int64) for p in test_parts],
        classes=[np.unique(train[p]) for p in train_out],
    )
