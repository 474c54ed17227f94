"""The twin of ``nn_map``: RAPT's nearest-token search, blockwise over the vocabulary."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fpl_fast.ops.checks import check_nn_map

__all__ = ["NN_MAP_CHUNK", "nn_map"]

NN_MAP_CHUNK = 4096
"""Default number of vocabulary rows per block of ``nn_map``."""


def nn_map(y: Tensor, emb: Tensor, allowed: Tensor | None = None, chunk: int = NN_MAP_CHUNK) -> Tensor:
    """Nearest embedding row of every query: ids[i] = argmin_w ||emb[w] - y[i]||_2 over allowed w.

    Computed as argmin_w (||emb[w]||^2 - 2 emb[w] . y[i]) (the ||y[i]||^2 term does not change the argmin) in
    blocks of ``chunk`` vocabulary rows with a running minimum, so the (B, V) distance matrix is never built.
    Ties go to the smaller id. Arithmetic is in float32 (float64 for float64 inputs).

    Args:
        y: (B, d) queries (noisy embeddings).
        emb: (V, d) embedding table, same dtype and device as y.
        allowed: optional (V,) bool mask; ids where it is False are never returned.
        chunk: vocabulary rows per block, >= 1.

    Returns:
        (B,) int64 ids.

    Raises:
        ValueError: bad shapes, dtypes or devices, chunk < 1, or no allowed id.
    """
    check_nn_map(y, emb, allowed, chunk)
    V = emb.shape[0]
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    B = y.shape[0]
    ya = y.to(acc)
    best_val = torch.full((B,), math.inf, dtype=acc, device=y.device)
    best_id = torch.full((B,), -1, dtype=torch.int64, device=y.device)
    for start in range(0, V, chunk):
        e = emb[start : start + chunk].to(acc)  # (c, d)
        sq = (e * e).sum(dim=1)  # (c,)
        if allowed is not None:
            sq = sq.masked_fill(~allowed[start : start + chunk], math.inf)
        score = sq[None, :] - 2.0 * (ya @ e.T)  # (B, c)
        idx = score.argmin(dim=1)  # first minimum: the smaller id
        val = score.gather(1, idx[:, None]).squeeze(1)
        better = val < best_val  # strict: earlier blocks (smaller ids) win ties
        best_val = torch.where(better, val, best_val)
        best_id = torch.where(better, idx + start, best_id)
    return best_id
