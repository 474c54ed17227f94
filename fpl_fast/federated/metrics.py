"""The per-client accuracies every method reports: local (a client's own test split) and neighbour (the union of
the other clients' splits), as ``fpl_fast.federated.engine.evaluate`` defines them for DP-FPL."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["local_neighbor"]


def _mean(correct: np.ndarray | Tensor, ix: np.ndarray) -> float:
    if len(ix) == 0:
        return float("nan")
    if isinstance(correct, Tensor):  # float32 mean, as the torch callers always computed it
        return float(correct[torch.as_tensor(ix, dtype=torch.long)].float().mean())
    return float(correct[ix].mean())


def local_neighbor(correct: np.ndarray | Tensor, test_idx: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean over clients of the accuracy on their own test split and on the others' (NaN-skipping).

    Args:
        correct: (M,) bool, whether each test example was classified correctly (numpy or torch; every client
            holds the same global model, so one prediction per test example serves all of them).
        test_idx: per client, indices into the test set.

    Returns:
        ``(local_acc, neighbor_acc)``.
    """
    local, neighbor = [], []
    for k, own in enumerate(test_idx):
        others = [np.asarray(ix, dtype=np.int64) for j, ix in enumerate(test_idx) if j != k]
        rest = np.concatenate(others) if others else np.zeros(0, dtype=np.int64)
        local.append(_mean(correct, np.asarray(own, dtype=np.int64)))
        neighbor.append(_mean(correct, rest))
    return float(np.nanmean(local)), float(np.nanmean(neighbor))
