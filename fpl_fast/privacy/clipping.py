"""Local DP on the client: per-sample clipping of the prompt gradients and the local Gaussian noise.

Glue between the fused op ``ops.dp_lowrank_clip_noise`` and each client's noise stream; nothing here knows about
CLIP: it gets per-sample context gradients and the prompt factors as tensors. Per step (docs/design.md section 2;
unit of privacy: one example of one client, add/remove): per-sample g_U,i, g_V,i (or fedotp's g_L,i) clipped to C,
summed, plus N(0, (sigma_l C)^2), divided by b; per-sample g_G,i clipped to C and averaged on the client for the
server (:mod:`fpl_fast.privacy.global_noise`). What the accountant is told: :mod:`fpl_fast.privacy.sensitivity`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops.checks import check_noise_multiplier, check_positive_clip_norm
from fpl_fast.privacy.noise_stream import NoiseStream, take_each
from fpl_fast.validation import check

__all__ = ["ClipMode", "LocalDP", "LocalDPResult", "privatize_local"]

ClipMode = Literal["sample", "batch"]


@dataclass(frozen=True)
class LocalDP:
    """Local clipping and noise of the prompt factors.

    Attributes:
        clip_norm: C > 0 (inf disables clipping).
        noise_multiplier: sigma_l >= 0, the std of the noise on the clipped sum over C.
        clip_mode: "sample" (per-example clipping, the default and the only per-example guarantee)
            or "batch" (the DP-FPL authors' clipping of the batch-mean gradient; paper-compatible).
        joint_uv: clip (g_U,i, g_V,i) jointly to C (True) or each to C as the authors do (False).
        expected_batch_size: divide by this instead of the realised batch size (Poisson sampling);
            None divides by the realised b.
        normalize: automatic clipping (Bu et al.): each per-example gradient scaled by C / (norm + stability)
            instead of min(1, C / norm); per-example sensitivity below C ("sample" mode only).
        stability: the constant added to each norm with ``normalize``.
    """

    clip_norm: float
    noise_multiplier: float
    clip_mode: ClipMode = "sample"
    joint_uv: bool = True
    expected_batch_size: float | None = None
    normalize: bool = False
    stability: float = 0.01

    def __post_init__(self) -> None:
        check_positive_clip_norm(self.clip_norm)
        check_noise_multiplier(self.noise_multiplier)
        check(
            self.noise_multiplier == 0 or math.isfinite(self.clip_norm),
            f"clip_norm must be finite when noise_multiplier > 0 (the noise std is sigma C), got {self.clip_norm}",
        )
        check(self.clip_mode in ("sample", "batch"), f"clip_mode must be 'sample' or 'batch', got {self.clip_mode!r}")
        check(
            not self.normalize or self.clip_mode == "sample",
            "normalize (automatic clipping) needs clip_mode 'sample' (per-example gradients)",
        )
        check(
            math.isfinite(self.stability) and self.stability > 0,
            f"stability must be finite and > 0, got {self.stability}",
        )
        check(
            self.expected_batch_size is None
            or (math.isfinite(self.expected_batch_size) and self.expected_batch_size > 0),
            f"expected_batch_size must be None or finite and > 0, got {self.expected_batch_size}",
        )


@dataclass(frozen=True)
class LocalDPResult:
    """What :func:`privatize_local` releases and measures.

    Attributes:
        grad_u: (K, n_ctx, r) noisy local gradient of U, or None without factors.
        grad_v: (K, r, d) noisy local gradient of V, or None without factors.
        grad_local: (K, n_ctx, d) noisy gradient of fedotp's full local prompt L, or None.
        grad_global: (K, n_ctx, d) clipped (not noised) average gradient of G, for the server.
        norms: (K, b, 3) float32 unclipped per-sample norms of (g_U, g_V, g_G) ((K, 1, 3) of the batch
            mean in batch mode; g_V's column is 0 and g_U's holds g_L's norm without factors).
        clip_fraction: (K, 3) fraction of the rows of ``norms`` that were clipped, per column
            (U and V share the joint norm's decision with ``joint_uv``).
        noise_std: std of the noise added to each entry of the local gradients (sigma C / b; with per-client clip
            norms, the largest client's).
        batch_size: the denominator b used.
    """

    grad_u: Tensor | None
    grad_v: Tensor | None
    grad_local: Tensor | None
    grad_global: Tensor
    norms: Tensor
    clip_fraction: Tensor
    noise_std: float
    batch_size: float


def privatize_local(
    grad_ctx: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    cfg: LocalDP,
    streams: NoiseStream | Sequence[NoiseStream],
    *,
    sum_classes: bool = False,
    batch_size: float | None = None,
    local: bool = True,
    clip_norms: Tensor | None = None,
) -> LocalDPResult:
    """Clip per-sample gradients, noise the local ones, all clients in one fused op call.

    Calls ``ops.dp_lowrank_clip_noise`` with ``per_sample = (clip_mode == "sample")`` and
    ``joint_uv``; client k draws its noise from its own stream ``streams[k]`` (which advances by what the
    call consumes), so its noise never depends on which other clients take part.

    Args:
        grad_ctx: (K, b, n_ctx, d) per-sample context gradients (or (K, b, n_cls, n_ctx, d) with
            ``sum_classes``); K may be omitted. In batch mode a single batch-mean gradient
            (b = 1) may be passed with ``batch_size`` set to the real b.
        u: (K, n_ctx, r) or None (fedotp's full local prompt, or no local prompt).
        v: (K, r, d) or None.
        cfg: the local-DP configuration.
        streams: one noise stream per client (K of them; a single stream when grad_ctx has no K).
        sum_classes: grad_ctx carries a class dimension to sum over.
        batch_size: the b that divides the noisy sum when ``cfg.expected_batch_size`` is None
            (default: grad_ctx's b).
        local: False when there is no local prompt (promptfl): no local noise is drawn and only
            ``grad_global`` is meaningful.
        clip_norms: (K, 3) each client's clip norm of g_U (or g_L), g_V and g_G (adaptive clipping), in place of
            ``cfg.clip_norm`` for every client; with ``joint_uv`` the pair is clipped to column 0.

    Returns:
        A :class:`LocalDPResult` (without K when grad_ctx has none).
    """
    batched = grad_ctx.dim() == (5 if sum_classes else 4)  # the op checks the shapes
    K = grad_ctx.shape[0] if batched else 1
    b_dim = grad_ctx.shape[1] if batched else grad_ctx.shape[0]
    n_ctx, d = grad_ctx.shape[-2], grad_ctx.shape[-1]
    if cfg.expected_batch_size is not None:
        denom = float(cfg.expected_batch_size)
    elif batch_size is not None:
        check(math.isfinite(batch_size) and batch_size > 0, f"batch_size must be finite and > 0, got {batch_size}")
        denom = float(batch_size)
    else:
        denom = float(max(b_dim, 1))
    if isinstance(streams, NoiseStream):
        streams = [streams]
    check(
        len(streams) == K,
        f"streams must hold one noise stream per client ({K}), got {len(streams)}",
    )
    sigma = cfg.noise_multiplier if local else 0.0
    rank = None if u is None else u.shape[-1]
    numel = ops.dp_noise_numel(1, n_ctx, d, rank) if sigma > 0 else 0
    seed, offset = take_each(streams, numel)
    clip: float | Tensor = cfg.clip_norm
    if clip_norms is not None:
        check(
            clip_norms.shape == (K, 3) if batched else clip_norms.shape in ((3,), (1, 3)),
            f"clip_norms must be (K, 3) = ({K}, 3), got shape {tuple(clip_norms.shape)}",
        )
        clip = clip_norms if batched else clip_norms.reshape(3)
    out_a, out_b, grad_g, norms = ops.dp_lowrank_clip_noise(
        grad_ctx,
        u,
        v,
        clip_norm=clip,
        noise_multiplier=sigma,
        seed=seed,
        offset=offset,
        expected_batch_size=denom,
        joint_uv=cfg.joint_uv,
        per_sample=cfg.clip_mode == "sample",
        sum_classes=sum_classes,
        normalize=cfg.normalize,
        stability=cfg.stability,
    )
    # C per column of norms: (K, 1, 3) with per-client clip norms (joint: the pair's in column 0), else a float.
    C: float | Tensor = cfg.clip_norm
    if isinstance(clip, Tensor):
        cols = clip.to(norms).reshape(*norms.shape[:-2], 1, 3)
        C = torch.cat([cols[..., :1], cols[..., :1], cols[..., 2:]], -1) if u is not None and cfg.joint_uv else cols
    if u is not None and cfg.joint_uv:
        joint = torch.sqrt(norms[..., 0] ** 2 + norms[..., 1] ** 2)
        clipped = torch.stack([joint, joint, norms[..., 2]], dim=-1) > C
    else:
        clipped = norms > C
    fraction = clipped.float().mean(dim=-2) if norms.shape[-2] > 0 else norms.new_zeros(*norms.shape[:-2], 3)
    has_factors = u is not None
    return LocalDPResult(
        grad_u=out_a if has_factors and local else None,
        grad_v=out_b if has_factors and local else None,
        grad_local=out_a if not has_factors and local else None,
        grad_global=grad_g,
        norms=norms,
        clip_fraction=fraction,
        noise_std=sigma * (float(clip[..., :2].max()) if isinstance(clip, Tensor) else clip) / denom,
        batch_size=denom,
    )
