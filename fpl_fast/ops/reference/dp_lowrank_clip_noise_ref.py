"""The twin of ``dp_lowrank_clip_noise``: per-sample clipping and local Gaussian noise of the prompt factors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fpl_fast.ops.checks import check_dp_lowrank_clip_noise
from fpl_fast.ops.reference.clip import CLIP_EPS
from fpl_fast.ops.reference.philox import client_normals

__all__ = ["dp_clip_norms", "dp_lowrank_clip_noise", "dp_noise_numel"]


def dp_noise_numel(K: int, n_ctx: int, d: int, rank: int | None) -> int:
    """Normals one ``dp_lowrank_clip_noise`` call draws for K clients (rank None: full local prompt)."""
    per_client = n_ctx * d if rank is None else n_ctx * rank + rank * d
    return K * per_client


def dp_clip_norms(clip_norm: float | Tensor, grad: Tensor, sum_classes: bool = False) -> Tensor:
    """The op's clip-norm table from what the Python face accepts: a float (every client, every quantity), a (K,)
    or (K, 1) tensor (one C per client for all its quantities) or the full (K, 3) tensor ((3,) without K), as
    float64 on grad's device (exact for any Python float). Any other shape is returned as it is, for the op's check
    to name."""
    plain = 4 if sum_classes else 3
    batched = grad.dim() == plain + 1
    want = (grad.shape[0], 3) if batched else (3,)
    if not isinstance(clip_norm, Tensor):
        return torch.full(want, float(clip_norm), dtype=torch.float64, device=grad.device)
    c = clip_norm.to(device=grad.device, dtype=torch.float64)
    K = want[0] if batched else 1
    if c.dim() == 0 or (batched and tuple(c.shape) in ((K,), (K, 1))) or (not batched and tuple(c.shape) == (1,)):
        c = c.reshape(-1, 1).expand(K, 3).reshape(want).contiguous()
    return c


def dp_lowrank_clip_noise(
    grad: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    clip_norm: Tensor | float,
    noise_multiplier: float,
    seed: Sequence[int],
    offset: Sequence[int],
    expected_batch_size: float = 0.0,
    joint_uv: bool = True,
    per_sample: bool = True,
    sum_classes: bool = False,
    normalize: bool = False,
    stability: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample clipping and Gaussian noise for the prompt factors, for all clients at once.

    Per sample i of client k, with grad_i the context gradient (summed over classes if
    ``sum_classes``): g_U,i = grad_i V^T, g_V,i = U^T grad_i, g_G,i = grad_i. Each is clipped with
    factor min(1, C / (norm + 1e-6)), C the client's clip norm of that quantity (``joint_uv``: g_U,i and
    g_V,i share one factor from their joint norm and C of g_U), the clipped terms are summed,
    N(0, (sigma C)^2) is added to the U and V sums (local DP, C of each; the global prompt's noise is the
    server's), and everything is divided by ``expected_batch_size`` if > 0 (Poisson sampling) else by
    max(b, 1).

    ``normalize`` (automatic clipping, Bu et al.) scales each per-example term by C / (norm + stability)
    instead, norm being the one the clipping would use; every example then contributes norm < C whatever
    its size (the sensitivity stays C). It needs ``per_sample``.

    With ``per_sample=False`` (the DP-FPL authors' batch-mean clipping, not a per-example guarantee)
    the batch mean of grad_i is clipped instead, and the result is clip(mean) + noise / denominator.

    Without u and v (fedotp's full local prompt L) the per-sample context gradient itself is clipped
    and noised: the first output is the noisy L gradient (K, n_ctx, d) and the second is empty.

    Noise streams: client k draws normals 0 .. P - 1 of its own stream (seed[k], offset[k]), with
    P = n_ctx r + r d (U row-major, then V row-major) or n_ctx d without u, v, so a client's noise
    never depends on which other clients share the call. No draws when sigma = 0.

    Args:
        grad: (K, b, n_ctx, d) or (b, n_ctx, d); with ``sum_classes`` (K, b, n_cls, n_ctx, d) or
            (b, n_cls, n_ctx, d).
        u: (K, n_ctx, r) or (n_ctx, r), batched like grad; or None.
        v: (K, r, d) or (r, d); or None.
        clip_norm: (K, 3) float64 on grad's device ((3,) without K): per client k the clip norm C of g_U
            (of g_L without u, v), of g_V and of g_G; with ``joint_uv`` column 1 is ignored (g_U and g_V are
            clipped jointly to column 0, and both take column 0's noise). Entries > 0; inf disables clipping,
            only without noise and without ``normalize``. A float, a (K,) or a (K, 1) tensor is broadcast
            (:func:`dp_clip_norms`).
        noise_multiplier: sigma >= 0.
        seed, offset: the Philox stream of each client, K integers each (1 when grad has no K).
        normalize: automatic clipping, C / (norm + stability), per-sample mode only.
        stability: the automatic clipping's stability constant, finite and > 0 (read only with ``normalize``).

    Returns:
        grad_u (K, n_ctx, r), grad_v (K, r, d), grad_g (K, n_ctx, d) in grad's dtype, and
        norms (K, b, 3) float32 with the unclipped per-sample norms of (g_U, g_V, g_G)
        ((K, 1, 3) of the batch mean when ``per_sample=False``). K is absent when grad has none.
    """
    clip_norm = dp_clip_norms(clip_norm, grad, sum_classes)
    check_dp_lowrank_clip_noise(
        grad,
        u,
        v,
        clip_norm,
        noise_multiplier,
        seed,
        offset,
        expected_batch_size,
        joint_uv,
        per_sample,
        sum_classes,
        normalize,
        stability,
    )
    batched = grad.dim() == (5 if sum_classes else 4)
    x = grad if batched else grad.unsqueeze(0)
    K, b = x.shape[0], x.shape[1]
    n_ctx, d = x.shape[-2], x.shape[-1]
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    xs = x.to(acc)
    if sum_classes:
        xs = xs.sum(dim=2)  # (K, b, n_ctx, d)
    denom = float(expected_batch_size) if expected_batch_size > 0 else float(max(b, 1))
    C = (clip_norm if batched else clip_norm.unsqueeze(0)).to(acc)  # (K, 3)
    c_u, c_v, c_g = C[:, 0:1], C[:, 1:2], C[:, 2:3]  # (K, 1): broadcast over samples

    def factor(norm: Tensor, c: Tensor) -> Tensor:
        if normalize:
            return c / (norm + stability)
        # clip_factor's min(1, C / (norm + CLIP_EPS)) in the rounding a float C had (float / tensor multiplies
        # by the reciprocal), so that a float clip norm gives the same bits as before clip norms were tensors.
        return torch.clamp((norm + CLIP_EPS).reciprocal() * c, max=1.0)

    if per_sample:
        xg = xs
    else:
        xg = xs.mean(dim=1, keepdim=True) if b > 0 else xs.new_zeros(K, 1, n_ctx, d)

    norm_g = xg.flatten(2).norm(dim=2)  # (K, b')
    if u is not None and v is not None:
        uu = (u if batched else u.unsqueeze(0)).to(acc)
        vv = (v if batched else v.unsqueeze(0)).to(acc)
        a = torch.einsum("kind,krd->kinr", xg, vv)  # g_U,i (K, b', n_ctx, r)
        bb = torch.einsum("knr,kind->kird", uu, xg)  # g_V,i (K, b', r, d)
        norm_u = a.flatten(2).norm(dim=2)
        norm_v = bb.flatten(2).norm(dim=2)
        if joint_uv:
            cu = cv = factor(torch.sqrt(norm_u**2 + norm_v**2), c_u)
        else:
            cu, cv = factor(norm_u, c_u), factor(norm_v, c_v)
        local_a = (cu[..., None, None] * a).sum(dim=1)  # (K, n_ctx, r)
        local_b = (cv[..., None, None] * bb).sum(dim=1)  # (K, r, d)
        norms = torch.stack([norm_u, norm_v, norm_g], dim=-1)
    else:
        local_a = (factor(norm_g, c_u)[..., None, None] * xg).sum(dim=1)  # (K, n_ctx, d), C of g_L
        local_b = xs.new_zeros(K, 0, d)
        norms = torch.stack([norm_g, torch.zeros_like(norm_g), norm_g], dim=-1)
    glob = (factor(norm_g, c_g)[..., None, None] * xg).sum(dim=1)  # (K, n_ctx, d)

    if per_sample:
        scale = 1.0 / denom
    else:
        scale = 1.0  # clip(mean) itself; only the noise is divided by the denominator

    if noise_multiplier > 0:
        numel_a, numel_b = local_a[0].numel(), local_b[0].numel()
        z = client_normals(seed, offset, numel_a + numel_b, grad.device).to(acc)  # (K, P)
        # std sigma C / denom per client, formed in float64 (as the kernels do): C of g_U (g_L), and of g_V.
        c64 = C.double()
        std_a = (noise_multiplier * c64[:, 0:1] / denom).to(acc)
        col_b = 0 if joint_uv else 1
        std_b = (noise_multiplier * c64[:, col_b : col_b + 1] / denom).to(acc)
        local_a = local_a * scale + (z[:, :numel_a] * std_a).view_as(local_a)
        local_b = local_b * scale + (z[:, numel_a:] * std_b).view_as(local_b)
    else:
        local_a, local_b = local_a * scale, local_b * scale
    glob = glob * scale

    outs = (local_a.to(grad.dtype), local_b.to(grad.dtype), glob.to(grad.dtype), norms.float())
    return outs if batched else tuple(t[0] for t in outs)  # type: ignore[return-value]
