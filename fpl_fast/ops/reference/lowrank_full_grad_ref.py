"""The twin of ``lowrank_full_grad``: the full local prompt's gradient from its factors' gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from fpl_fast.ops.checks import check_lowrank_full_grad

__all__ = ["lowrank_full_grad"]


def lowrank_full_grad(grad_u: Tensor, grad_v: Tensor, u: Tensor, v: Tensor, scale: float = 0.1) -> Tensor:
    """Gradient for the full local prompt L from the gradients of its factors.

    g_L = scale * (g_U V + U g_V + U U^T g_U V), computed as U ((U^T g_U) V) for the last term.

    Args:
        grad_u, u: (K, n_ctx, r) or (n_ctx, r).
        grad_v, v: (K, r, d) or (r, d).
        scale: 0.1 in the DP-FPL authors' code.

    Returns:
        (K, n_ctx, d) or (n_ctx, d).
    """
    check_lowrank_full_grad(grad_u, grad_v, u, v, scale)
    ut = u.transpose(-1, -2)
    inner = torch.matmul(ut, grad_u)  # (K, r, r)
    out = torch.matmul(grad_u, v) + torch.matmul(u, grad_v) + torch.matmul(u, torch.matmul(inner, v))
    return scale * out
