"""The per-client accuracies every method reports (DP-FPL's engine, FedDTPT, RAPT): local (a client's own test
split) and neighbour (the union of the other clients' splits)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["local_neighbor", "split_accuracies"]


def _mean(correct: np.ndarray | Tensor, ix: np.ndarray) -> float:
    if len(ix) == 0:
        return float("nan")
    if isinstance(correct, Tensor):  # float32 mean, as the torch callers always computed it
        return float(correct[torch.as_tensor(ix, dtype=torch.long)].float().mean())
    return float(correct[ix].mean())


def split_accuracies(
    correct: np.ndarray | Tensor, test_idx: Sequence[Sequence[int] | np.ndarray], clients: Sequence[int] | None = None
) -> tuple[list[float], list[float]]:
    """Per client k of ``clients``: the accuracy on its own test split (local) and on the others' (neighbour).

    Args:
        correct: (M,) bool, whether each test example was classified correctly, one row shared by every client
            (one global model); or (len(clients), M), row j for ``clients[j]`` (one model per client). Numpy
            (float64 mean) or torch (float32 mean).
        test_idx: per client of the federation, indices into the test set.
        clients: which clients (default: all of ``test_idx``).

    Returns:
        ``(local, neighbor)`` lists, NaN where a split is empty.
    """
    clients = range(len(test_idx)) if clients is None else clients
    local, neighbor = [], []
    for j, k in enumerate(clients):
        row = correct if correct.ndim == 1 else correct[j]
        others = [np.asarray(ix, dtype=np.int64) for i, ix in enumerate(test_idx) if i != k]
        rest = np.concatenate(others) if others else np.zeros(0, dtype=np.int64)
        local.append(_mean(row, np.asarray(test_idx[k], dtype=np.int64)))
        neighbor.append(_mean(row, rest))
    return local, neighbor


def local_neighbor(correct: np.ndarray | Tensor, test_idx: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean over clients of :func:`split_accuracies` (NaN-skipping), for one prediction ``correct`` (M,) shared by
    every client.

    Returns:
        ``(local_acc, neighbor_acc)``.
    """
    local, neighbor = split_accuracies(correct, test_idx)
    return float(np.nanmean(local)), float(np.nanmean(neighbor))
