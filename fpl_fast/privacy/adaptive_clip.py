"""Adaptive clipping (Andrew et al. 2021): each client's clip norm follows a private quantile of its per-example norms.

Per step, for each quantity q its clip mode clips (joint (g_U, g_V) and g_G; with separate clipping g_U, g_V, g_G;
fedotp g_L and g_G; promptfl g_G; output mode the cotangent), client k (docs/design.md section 2):

    count_kq    = sum over its real examples i of (1[norm_iq <= C_kq] - 1/2)      (centred)
    fraction_kq = (count_kq + N(0, sigma_b^2)) / b + 1/2                          (noise from k's secret stream)
    C_kq       <- clamp(C_kq exp(-eta (fraction_kq - gamma)), C_min, C_max)

b is the expected batch size (public); the realised Poisson batch size is not, so it never divides. Adding or
removing one example moves the centred count by exactly 1/2, so each count is a Gaussian mechanism of multiplier
2 sigma_b on the step's own Poisson sample, and the step's releases together are one Gaussian of multiplier z_eff,
z_eff^-2 = sigma_L^-2 + sigma_G^-2 + Q (2 sigma_b)^-2 (:func:`with_counts`). sigma_b is set so the Q counts take the
share ``budget`` of z_eff^-2 (:func:`count_noise_std`). Opacus' AdaClip noises the raw count and divides by the
realised batch size, which under-counts its privacy cost; pfl-research folds the count in as here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fpl_fast.privacy.noise_stream import NoiseStream
from fpl_fast.validation import check

__all__ = [
    "AdaptiveClipping",
    "Quantities",
    "centred_counts",
    "count_noise_std",
    "noised_fractions",
    "quantities",
    "updated_clip_norms",
    "with_counts",
]

# Columns of the fused op's norms (K, b, 3) that each clipped quantity spans: U, V, G (U holds fedotp's L).
Quantities = tuple[tuple[int, ...], ...]


def quantities(*, clips_factors: bool, has_local: bool, joint_uv: bool, output_mode: bool = False) -> Quantities:
    """The quantities a clip mode clips, each as the norm columns it spans (output mode: its one cotangent norm)."""
    if output_mode:
        return ((0,),)
    if not has_local:
        return ((2,),)
    if clips_factors:
        return ((0, 1), (2,)) if joint_uv else ((0,), (1,), (2,))
    return ((0,), (2,))


def quantity_norms(norms: Tensor, qs: Quantities) -> Tensor:
    """(K, b, Q) the norm each quantity is clipped by, from the op's per-column norms (K, b, 3) (or (K, b) output)."""
    if norms.dim() == 2:
        return norms[..., None]
    return torch.stack([norms[..., list(cols)].square().sum(-1).sqrt() for cols in qs], dim=-1)


def op_clip_columns(clip: Tensor, qs: Quantities) -> Tensor:
    """(K, 3) the fused op's clip norm per column (U, V, G) from the quantities' (K, Q); a column no quantity spans
    (promptfl's U, V; fedotp's V) takes the first quantity's, which clips nothing there."""
    out = clip[:, :1].expand(clip.shape[0], 3).clone()
    for j, cols in enumerate(qs):
        for c in cols:
            out[:, c] = clip[:, j]
    return out


@dataclass(frozen=True)
class AdaptiveClipping:
    """The geometric update of the clip norms.

    Attributes:
        target_quantile: gamma in (0, 1), the fraction of per-example norms to leave unclipped.
        lr: eta > 0 of the geometric update.
        clip_min, clip_max: the bounds every C stays in.
        count_noise: sigma_b >= 0, the std of the noise on each centred count.
        expected_batch_size: b, the public denominator of the counts.
    """

    target_quantile: float
    lr: float
    clip_min: float
    clip_max: float
    count_noise: float
    expected_batch_size: float

    def __post_init__(self) -> None:
        check(0 < self.target_quantile < 1, f"target_quantile must be in (0, 1), got {self.target_quantile}")
        check(math.isfinite(self.lr) and self.lr > 0, f"clip lr must be finite and > 0, got {self.lr}")
        check(
            0 < self.clip_min < self.clip_max < math.inf,
            f"clip bounds must satisfy 0 < clip_min < clip_max < inf, got {self.clip_min} and {self.clip_max}",
        )
        check(
            math.isfinite(self.count_noise) and self.count_noise >= 0,
            f"count noise must be finite and >= 0, got {self.count_noise}",
        )
        check(
            math.isfinite(self.expected_batch_size) and self.expected_batch_size > 0,
            f"expected_batch_size must be finite and > 0, got {self.expected_batch_size}",
        )


def centred_counts(norms: Tensor, clip: Tensor, mask: Tensor) -> Tensor:
    """(K, Q) sum over each client's real examples of 1[norm <= C] - 1/2.

    Args:
        norms: (K, b, Q) per-example norms of each quantity.
        clip: (K, Q) the clip norms in force.
        mask: (K, b) 1 for a real example, 0 for padding.
    """
    check(norms.dim() == 3, f"norms must be (K, b, Q), got shape {tuple(norms.shape)}")
    check(clip.shape == (norms.shape[0], norms.shape[2]), f"clip must be (K, Q), got shape {tuple(clip.shape)}")
    check(mask.shape == norms.shape[:2], f"mask must be (K, b), got shape {tuple(mask.shape)}")
    unclipped = (norms <= clip[:, None, :]).to(torch.float64) - 0.5
    return (unclipped * mask.to(torch.float64)[..., None]).sum(1)


def noised_fractions(counts: Tensor, cfg: AdaptiveClipping, streams: Sequence[NoiseStream]) -> Tensor:
    """(K, Q) the private estimate of each unclipped fraction: (count + N(0, sigma_b^2)) / b + 1/2, client k's noise
    from its own stream ``streams[k]`` (Q normals per call; none when sigma_b is 0)."""
    check(len(streams) == counts.shape[0], f"streams must hold one stream per client ({counts.shape[0]})")
    noised = counts.double()
    if cfg.count_noise > 0:
        z = torch.stack([s.normal(counts.shape[1], "cpu") for s in streams]).to(noised)
        noised = noised + cfg.count_noise * z
    return noised / cfg.expected_batch_size + 0.5


def updated_clip_norms(clip: Tensor, fractions: Tensor, cfg: AdaptiveClipping) -> Tensor:
    """C <- clamp(C exp(-eta (fraction - gamma)), C_min, C_max), elementwise; in clip's dtype and device."""
    step = torch.exp(-cfg.lr * (fractions.double() - cfg.target_quantile))
    return (clip.double() * step.to(clip.device)).clamp(cfg.clip_min, cfg.clip_max).to(clip.dtype)


def count_noise_std(release_multiplier: float, n_counts: int, budget: float) -> float:
    """sigma_b such that the Q counts take the share ``budget`` of the step's z_eff^-2.

    With the releases' multiplier z_r (z_r^-2 = sigma_L^-2 + sigma_G^-2): Q (2 sigma_b)^-2 = budget z_eff^-2 and
    z_r^-2 = (1 - budget) z_eff^-2, so sigma_b = (z_r / 2) sqrt(Q (1 - budget) / budget). 0 without noise.
    """
    check(0 < budget < 1, f"count budget must be in (0, 1), got {budget}")
    check(n_counts >= 1, f"n_counts must be >= 1, got {n_counts}")
    if release_multiplier <= 0:
        return 0.0
    return 0.5 * release_multiplier * math.sqrt(n_counts * (1.0 - budget) / budget)


def with_counts(multiplier: float, count_noise: float, n_counts: int) -> float:
    """One Gaussian of a release of multiplier ``multiplier`` and Q counts of multiplier 2 sigma_b on the same
    sample: (multiplier^-2 + Q (2 sigma_b)^-2)^(-1/2); 0 (no privacy) when either is noiseless."""
    if multiplier <= 0 or count_noise <= 0:
        return 0.0
    return (multiplier**-2 + n_counts * (2.0 * count_noise) ** -2) ** -0.5
