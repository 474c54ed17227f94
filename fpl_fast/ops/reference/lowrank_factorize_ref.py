"""The twin of ``lowrank_factorize``: one randomised power iteration L ~ U V with residual R = L - U V."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fpl_fast.ops.checks import check_lowrank_factorize
from fpl_fast.ops.reference.philox import client_normals

__all__ = ["GS_EPS", "factorize_noise_numel", "lowrank_factorize"]

# Gram-Schmidt guard for an all-zero column.
GS_EPS = 1e-12


def factorize_noise_numel(K: int, d: int, rank: int) -> int:
    """Normals one ``lowrank_factorize`` call draws for K clients."""
    return K * d * rank


def _gram_schmidt(m: Tensor) -> Tensor:
    """Column-wise modified Gram-Schmidt of (K, n, r): normalise column j, remove it from later ones."""
    m = m.clone()
    r = m.shape[-1]
    for j in range(r):
        col = m[..., j : j + 1]
        col = col / (col.norm(dim=-2, keepdim=True) + GS_EPS)
        m[..., j : j + 1] = col
        if j + 1 < r:
            rest = m[..., j + 1 :]
            m[..., j + 1 :] = rest - (col * rest).sum(dim=-2, keepdim=True) * col
    return m


def lowrank_factorize(
    l: Tensor,  # noqa: E741
    rank: int,
    seed: Sequence[int],
    offset: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """One randomised power iteration: L ~ U V with residual R = L - U V.

    V0 ~ N(0, 1) of shape (d, r) from client k's Philox stream (seed[k], offset[k]) (normals
    0 .. d r - 1, row-major); U = orth(L V0); W = orth(L^T U); V = W^T; orth is column-wise Gram-Schmidt.

    Args:
        l: (K, n_ctx, d) or (n_ctx, d).
        rank: 1 <= r <= min(n_ctx, d).
        seed, offset: the Philox stream of each client, K integers each (1 when l has no K).

    Returns:
        u (K, n_ctx, r), v (K, r, d), residual (K, n_ctx, d), or without K like l.
    """
    check_lowrank_factorize(l, rank, seed, offset)
    batched = l.dim() == 3
    x = l if batched else l.unsqueeze(0)
    K, n_ctx, d = x.shape
    acc = torch.float64 if l.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    v0 = client_normals(seed, offset, d * rank, l.device).to(acc).view(K, d, rank)
    u = _gram_schmidt(torch.matmul(xa, v0))  # (K, n_ctx, r)
    w = _gram_schmidt(torch.matmul(xa.transpose(-1, -2), u))  # (K, d, r)
    v = w.transpose(-1, -2)  # (K, r, d)
    res = xa - torch.matmul(u, v)
    outs = (u.to(l.dtype), v.contiguous().to(l.dtype), res.to(l.dtype))
    return outs if batched else tuple(t[0] for t in outs)  # type: ignore[return-value]
