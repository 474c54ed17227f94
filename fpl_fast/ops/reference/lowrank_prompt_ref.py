"""The twin of ``lowrank_prompt`` and its backward: class prompts [prefix | G + U V (+ R) | suffix]."""

from __future__ import annotations

import torch
from torch import Tensor

from fpl_fast.ops.checks import check_lowrank_prompt, check_lowrank_prompt_backward

__all__ = ["lowrank_prompt", "lowrank_prompt_backward"]


def lowrank_prompt(
    prefix: Tensor,
    suffix: Tensor,
    g: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """Assemble class prompts with context ctx = G + U V (+ R).

    Args:
        prefix: (n_cls, 1, d) frozen SOT embeddings.
        suffix: (n_cls, S, d) frozen embeddings of "classname ." EOT and padding.
        g: (n_ctx, d) shared global prompt, or (K, n_ctx, d) one per client.
        u: (n_ctx, r) or (K, n_ctx, r); given together with v, or neither.
        v: (r, d) or (K, r, d).
        residual: (n_ctx, d) or (K, n_ctx, d); dpfpl's R, or fedotp's full local prompt.

    Returns:
        (K, n_cls, 1 + n_ctx + S, d) when any of g, u, v, residual has a client dimension, else
        (n_cls, 1 + n_ctx + S, d): [prefix | ctx | suffix] for every class.
    """
    check_lowrank_prompt(prefix, suffix, g, u, v, residual)
    n_cls, _, d = prefix.shape
    n_ctx = g.shape[-2]
    leading = [t.shape[0] for t in (g, u, v, residual) if t is not None and t.dim() == 3]
    batched = len(leading) > 0
    K = leading[0] if batched else 1

    ctx = g if g.dim() == 3 else g.unsqueeze(0)  # (K or 1, n_ctx, d)
    if u is not None and v is not None:
        ctx = ctx + torch.matmul(u, v)
    if residual is not None:
        ctx = ctx + residual
    ctx = ctx.expand(K, n_ctx, d)
    S = suffix.shape[1]
    out = torch.cat(
        [
            prefix.unsqueeze(0).expand(K, n_cls, 1, d),
            ctx.unsqueeze(1).expand(K, n_cls, n_ctx, d),
            suffix.unsqueeze(0).expand(K, n_cls, S, d),
        ],
        dim=2,
    )
    return out if batched else out[0]


def lowrank_prompt_backward(
    grad_out: Tensor, u: Tensor | None, v: Tensor | None, n_ctx: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``lowrank_prompt`` at the context positions.

    Args:
        grad_out: (K, n_cls, L, d) or (n_cls, L, d), the gradient of the assembled prompts.
        u, v: as given to the forward (2-D ones broadcast over K), or None.
        n_ctx: number of context tokens (positions 1 .. n_ctx of L).

    Returns:
        grad_ctx (K, n_ctx, d) summed over classes; grad_u = grad_ctx V^T (K, n_ctx, r) and
        grad_v = U^T grad_ctx (K, r, d) per client (empty (K, 0, 0) tensors when u, v are None).
        The K dimension is 1 when grad_out has none; reducing over K for shared inputs is the
        caller's job.
    """
    check_lowrank_prompt_backward(grad_out, n_ctx)
    go = grad_out if grad_out.dim() == 4 else grad_out.unsqueeze(0)
    acc = torch.float64 if go.dtype == torch.float64 else torch.float32
    grad_ctx = go[:, :, 1 : 1 + n_ctx, :].to(acc).sum(dim=1)  # (K, n_ctx, d)
    K = go.shape[0]
    if u is None or v is None:  # two distinct empty tensors: outputs must not alias each other
        return grad_ctx.to(go.dtype), go.new_zeros(K, 0, 0), go.new_zeros(K, 0, 0)
    grad_u = torch.matmul(grad_ctx, v.to(acc).transpose(-1, -2))  # (K, n_ctx, r)
    grad_v = torch.matmul(u.to(acc).transpose(-1, -2), grad_ctx)  # (K, r, d)
    return grad_ctx.to(go.dtype), grad_u.to(go.dtype), grad_v.to(go.dtype)
