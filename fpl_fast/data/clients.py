"""The client split every method uses: :func:`fpl_fast.data.splits.partition` plus the one clear error for a
client left without training data (a federated round cannot train, weight or average an empty client)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fpl_fast.data.splits import ClientSplit, partition

__all__ = ["client_split"]


def client_split(
    labels: Sequence[int] | np.ndarray,
    num_users: int,
    scheme: str,
    *,
    beta: float,
    seed: int,
    num_shots: int | None = None,
    shots_protocol: str = "per-client",
    test_labels: Sequence[int] | np.ndarray | None = None,
    pathological_split: str = "balanced",
    min_train: int = 1,
) -> ClientSplit:
    """Split the training labels (and the test labels) over ``num_users`` clients, every client getting some.

    Args:
        labels: (N,) training labels.
        num_users: clients K.
        scheme: ``"iid"``, ``"pathological"`` or ``"dirichlet"``.
        beta: Dirichlet concentration (used by ``"dirichlet"`` only).
        seed: seed of the split.
        num_shots: few-shot: training examples per class (None: all), per client or of the whole set as
            ``shots_protocol`` says.
        shots_protocol: ``"per-client"`` or ``"coop"`` (:func:`fpl_fast.data.splits.partition`).
        test_labels: (M,) test labels; each client gets a matching test split.
        pathological_split: ``"balanced"`` or ``"authors"`` class shares (``"pathological"`` only).
        min_train: ``"dirichlet"`` redraws until every client has at least this many training examples.

    Returns:
        The split (indices into ``labels`` and ``test_labels``).

    Raises:
        ValueError: a bad argument (from ``partition``), or a client received no training examples.
    """
    split = partition(
        labels,
        num_users,
        scheme,
        beta=beta,
        seed=seed,
        num_shots=num_shots,
        shots_protocol=shots_protocol,
        test_labels=test_labels,
        pathological_split=pathological_split,
        min_train=min_train,
    )
    for k, ix in enumerate(split.train):
        if len(ix) == 0:
            raise ValueError(
                f"client {k} received no training examples with partition {scheme!r} (beta={beta}, "
                f"{num_users} clients); use fewer clients or a larger beta"
            )
    return split
