"""Output-space DP (``--clip-mode output``): per-example clipping and noise of the logit head's cotangents.

Each example's cotangent dl_i/dT w.r.t. the class text features is clipped to C_o, summed, noised once with
N(0, (sigma C_o)^2) on the client and divided by b (:func:`privatize_output`); every prompt gradient is one vjp of
that release, so the local prompt, the global prompt and both together are covered by this one Gaussian mechanism
(multiplier sigma; docs/design.md section 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops.checks import check_denominator, check_dim, check_noise_multiplier
from fpl_fast.privacy.noise_stream import NoiseStream, take_each
from fpl_fast.validation import check

__all__ = ["OUTPUT_HEADS", "OutputDP", "OutputDPResult", "output_clip_bound", "privatize_output"]

OUTPUT_HEADS = ("cosine",)
"""Heads the ``auto`` output clip bound holds for: cross-entropy of s cos(x_i, T_c) (image features normalised)."""


def _check_auto_head(head: str) -> None:
    check(
        head in OUTPUT_HEADS,
        f"--output-clip auto holds only for the cosine-similarity cross-entropy head with normalised image "
        f"features (bound sqrt(2) s / min_c ||T_c||), got head {head!r}; give a number for --output-clip",
    )


def output_clip_bound(text_feats: Tensor, logit_scale: float, *, head: str = "cosine") -> Tensor:
    """The data-independent bound on every example's cotangent norm, one per client: sqrt(2) s / min_c ||T_c||.

    It holds for the cosine-similarity cross-entropy head with normalised image features, where
    c_i[c] = s (p_ic - y_ic) (I - T^_c T^_c^T) x^_i / ||T_c||: each class row has norm <= s |p_ic - y_ic| / ||T_c||
    and sum_c (p_ic - y_ic)^2 <= 2 (1 - p_iy)^2 <= 2. It depends on the text features only (theta at this step),
    never on the batch, so using it as C_o clips nothing and the sensitivity is still exactly C_o.

    Args:
        text_feats: (K, n_cls, D) unnormalised class text features.
        logit_scale: s.
        head: the logit head in use; only ``"cosine"`` has this bound.

    Returns:
        (K,) float32 bounds.
    """
    _check_auto_head(head)
    check_dim(text_feats, "text_feats", (3,), "3-D (K, n_cls, D)")
    smallest = text_feats.float().norm(dim=-1).amin(dim=-1)  # (K,)
    check(
        bool((smallest > ops.NORM_EPS).all()) and bool(torch.isfinite(smallest).all()),
        "--output-clip auto needs every class text feature to have a finite, non-zero norm; give a number",
    )
    return (math.sqrt(2.0) * float(logit_scale) / smallest).float()


@dataclass(frozen=True)
class OutputDP:
    """Output-space clipping and noise of one step.

    Attributes:
        clip_norm: C_o > 0 for every client, a (K,) tensor of each client's C_o (adaptive clipping), or ``"auto"``
            (:func:`output_clip_bound`, one per client per step).
        noise_multiplier: sigma >= 0: the noise on the clipped sum has std sigma C_o.
        denominator: b, or the expected batch size under Poisson sampling.
        head: the logit head (``"auto"`` needs one of :data:`OUTPUT_HEADS`).
    """

    clip_norm: float | str | Tensor
    noise_multiplier: float
    denominator: float
    head: str = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.clip_norm, Tensor):
            check(
                self.clip_norm.dim() == 1 and bool(torch.isfinite(self.clip_norm).all() and (self.clip_norm > 0).all()),
                "output clip norms must be a (K,) tensor of finite numbers > 0",
            )
        elif isinstance(self.clip_norm, str):
            check(self.clip_norm == "auto", f"output clip norm must be a number > 0 or 'auto', got {self.clip_norm!r}")
            _check_auto_head(self.head)
        else:
            check(
                math.isfinite(self.clip_norm) and self.clip_norm > 0,
                f"output clip norm must be a finite number > 0 or 'auto', got {self.clip_norm}",
            )
        check_noise_multiplier(self.noise_multiplier)
        check_denominator(self.denominator)


@dataclass(frozen=True)
class OutputDPResult:
    """What :func:`privatize_output` releases and measures.

    Attributes:
        release: (K, n_cls, D) Z = (clipped sum of cotangents + noise) / denominator: the cotangent of one vjp.
        norms: (K, b) unclipped per-example cotangent norms (0 on padding rows).
        clip_norms: (K,) the C_o of each client in force.
        clip_fraction: (K,) fraction of each client's real examples that were clipped.
        losses: (K, b) per-example losses (0 on padding rows).
        noise_std: (K,) std of the noise on each entry of Z (sigma C_o / denominator).
    """

    release: Tensor
    norms: Tensor
    clip_norms: Tensor
    clip_fraction: Tensor
    losses: Tensor
    noise_std: Tensor


def privatize_output(
    image_feats: Tensor,
    text_feats: Tensor,
    labels: Tensor,
    mask: Tensor | None,
    logit_scale: float,
    cfg: OutputDP,
    streams: Sequence[NoiseStream],
) -> OutputDPResult:
    """Clip each example's cotangent dl_i/dT to C_o, sum, add N(0, (sigma C_o)^2) once per client, divide by b.

    All clients in one ``ops.dp_output_clip_noise`` call; client k's noise comes from its own ``streams[k]`` (n_cls D
    normals, which the stream then skips). ``text_feats`` must be detached: the release is a cotangent, and what is
    done with it (one vjp of the text encoder) is post-processing.

    Args:
        image_feats: (K, b, D) image features; labels (K, b); mask (K, b) (1 real, 0 padding) or None.
        text_feats: (K, n_cls, D) unnormalised class text features at the current prompts.
        logit_scale: s.
        cfg: the clip norm, noise and denominator.
        streams: one noise stream per client.
    """
    K, n_cls, D = text_feats.shape
    check(len(streams) == K, f"streams must hold one noise stream per client ({K}), got {len(streams)}")
    if isinstance(cfg.clip_norm, Tensor):
        check(cfg.clip_norm.shape == (K,), f"output clip norms must be ({K},), got {tuple(cfg.clip_norm.shape)}")
        clip = cfg.clip_norm.to(torch.float32).to(text_feats.device)
    elif cfg.clip_norm == "auto":
        clip = output_clip_bound(text_feats, logit_scale, head=cfg.head).to(text_feats.device)
    else:
        clip = torch.full((K,), float(cfg.clip_norm), dtype=torch.float32, device=text_feats.device)
    numel = n_cls * D if cfg.noise_multiplier > 0 else 0
    seed, offset = take_each(streams, numel)
    release, norms, losses = ops.dp_output_clip_noise(
        image_feats,
        text_feats,
        labels,
        mask,
        logit_scale=float(logit_scale),
        clip_norm=clip,
        noise_multiplier=float(cfg.noise_multiplier),
        seed=seed,
        offset=offset,
        denominator=float(cfg.denominator),
    )
    real = torch.ones_like(norms) if mask is None else mask.to(norms.dtype)
    # The clip factor min(1, C / (norm + eps)) is below 1 exactly where norm + eps > C.
    clipped = ((norms + ops.CLIP_EPS > clip[:, None]) & (real > 0)).float().sum(1) / real.sum(1).clamp(min=1)
    return OutputDPResult(
        release=release,
        norms=norms,
        clip_norms=clip,
        clip_fraction=clipped,
        losses=losses,
        noise_std=clip * (cfg.noise_multiplier / cfg.denominator),
    )
