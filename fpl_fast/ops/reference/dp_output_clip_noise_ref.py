"""The twin of ``dp_output_clip_noise``: output-space per-example clipping and noise of the logit head's cotangents."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fpl_fast.ops.checks import check_dp_output_clip_noise
from fpl_fast.ops.reference.clip import clip_factor
from fpl_fast.ops.reference.philox import client_normals

__all__ = ["NORM_EPS", "dp_output_clip_noise", "output_noise_numel"]

# Guard of the feature normalisations (as F.normalize).
NORM_EPS = 1e-12


def output_noise_numel(K: int, n_cls: int, D: int) -> int:
    """Normals one ``dp_output_clip_noise`` call draws for K clients (one (n_cls, D) draw each)."""
    return K * n_cls * D


def dp_output_clip_noise(
    image_feats: Tensor,
    text_feats: Tensor,
    labels: Tensor,
    mask: Tensor | None,
    logit_scale: float,
    clip_norm: Tensor,
    noise_multiplier: float,
    seed: Sequence[int],
    offset: Sequence[int],
    denominator: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Output-space per-example clipping and Gaussian noise of the logit head's cotangents, all clients at once.

    Per example i of client k, with x^_i = x_i / ||x_i|| and T^_c = T_c / ||T_c||, the loss
    l_i = CE(s cos(x_i, T_c) over classes c, y_i) has the cotangent (gradient w.r.t. the unnormalised text
    features T, (n_cls, D))

        c_i[c] = s w_ic (x^_i - cos_ic T^_c) / ||T_c||,   w_ic = p_ic - [c == y_i],

    whose norm is closed form: ||c_i||^2 = s^2 sum_c w_ic^2 (||x^_i||^2 - cos_ic^2) / ||T_c||^2. Each c_i is clipped
    with factor f_i = min(1, C_k / (||c_i|| + 1e-6)); the clipped sum is formed per class through its rank-one
    structure, S[c] = s / ||T_c|| (A_c - (T^_c . A_c) T^_c) with A_c = sum_i f_i w_ic x^_i, so the (b, n_cls, D)
    cotangents are never formed; the release is Z = (S + sigma C_k N) / denominator.

    Noise streams: client k draws normals 0 .. n_cls D - 1 of its own stream (seed[k], offset[k]), row-major
    (n_cls, D); no draws when sigma = 0. The CPU kernel below float64 draws them by float32 Box-Muller, within a
    few float ulps of these (csrc/philox.h states the precision per backend). Rows with mask 0 (padding of Poisson
    batches) count for nothing (norm 0, loss 0).

    Args:
        image_feats: (K, b, D) image features (normalised here).
        text_feats: (K, n_cls, D) unnormalised class text features, same dtype and device.
        labels: (K, b) int64 class labels in [0, n_cls).
        mask: (K, b) 1 for real examples, 0 for padding; None: all real.
        logit_scale: s > 0, the exponentiated logit scale.
        clip_norm: (K,) clip norm C_k > 0 per client (inf: no clipping; only without noise).
        noise_multiplier: sigma >= 0.
        seed, offset: the Philox stream of each client, K integers each.
        denominator: b (or the expected batch size under Poisson sampling), finite and > 0.

    Returns:
        release Z (K, n_cls, D) in text_feats' dtype, the unclipped per-example norms ||c_i|| (K, b) float32 and
        the per-example losses l_i (K, b) float32.
    """
    check_dp_output_clip_noise(
        image_feats, text_feats, labels, mask, logit_scale, clip_norm, noise_multiplier, seed, offset, denominator
    )
    K, b, D = image_feats.shape
    n_cls = text_feats.shape[1]
    acc = torch.float64 if text_feats.dtype == torch.float64 else torch.float32
    x, t = image_feats.to(acc), text_feats.to(acc)
    x_hat = x / x.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)
    t_norm = t.norm(dim=-1).clamp(min=NORM_EPS)  # (K, n_cls)
    t_hat = t / t_norm[..., None]
    cos = x_hat @ t_hat.transpose(1, 2)  # (K, b, n_cls)
    logits = logit_scale * cos
    logp = torch.log_softmax(logits, dim=-1)
    w = logp.exp()
    w.scatter_add_(-1, labels[..., None], -torch.ones_like(w[..., :1]))  # p - onehot(y)
    losses = -logp.gather(-1, labels[..., None])[..., 0]
    x_sq = (x_hat * x_hat).sum(-1, keepdim=True)  # 1, or 0 for a zero feature
    sq = (w * w * (x_sq - cos * cos).clamp(min=0) / (t_norm * t_norm)[:, None, :]).sum(-1)
    norms = logit_scale * sq.sqrt()  # (K, b)
    m = torch.ones_like(norms) if mask is None else mask.to(acc)
    norms, losses = norms * m, losses * m
    f = clip_factor(norms, clip_norm.to(acc)[:, None]) * m  # (K, b)
    a = (f[..., None] * w).transpose(1, 2) @ x_hat  # (K, n_cls, D)
    proj = (a * t_hat).sum(-1, keepdim=True)
    s_sum = (logit_scale / t_norm)[..., None] * (a - proj * t_hat)
    if noise_multiplier > 0:
        z = client_normals(seed, offset, n_cls * D, text_feats.device).to(acc).view(K, n_cls, D)
        s_sum = s_sum + z * (noise_multiplier * clip_norm.to(acc))[:, None, None]
    release = s_sum / denominator
    return release.to(text_feats.dtype), norms.float(), losses.float()
