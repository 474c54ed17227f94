"""The input checks of every fpl_fast op: the one place that words the ValueError for a bad op input.

``check_<op>`` takes the op's arguments (as the public function passes them on) and raises a ValueError naming the
first bad one. The plain-PyTorch twins (:mod:`fpl_fast.ops.reference`) call it first, the Python face
(:mod:`fpl_fast.ops`) calls it before a compiled kernel and the fake kernels call it while tracing, so a bad input
reads the same on every path. The C++ kernels keep only the checks that protect memory.

Checks that read tensor values (label range, clip norm entries, an allowed id) take ``values=False`` where the
tensors carry no data (fake tensors under tracing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fpl_fast.validation import check

__all__ = [
    "check_clip_entries",
    "check_denominator",
    "check_dim",
    "check_dp_lowrank_clip_noise",
    "check_dp_output_clip_noise",
    "check_lowrank_factorize",
    "check_lowrank_full_grad",
    "check_lowrank_prompt",
    "check_lowrank_prompt_backward",
    "check_nn_map",
    "check_noise_multiplier",
    "check_positive_clip_norm",
    "check_same",
    "check_streams",
]


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
def check_dim(t: Tensor, name: str, dims: tuple[int, ...], what: str) -> None:
    check(t.dim() in dims, f"{name} must be {what}, got shape {tuple(t.shape)}")


def check_same(ref: Tensor, t: Tensor | None, name: str) -> None:
    """``t`` (if given) is on ``ref``'s device with ``ref``'s dtype."""
    if t is None:
        return
    check(t.device == ref.device, f"{name} must be on {ref.device}, got {t.device}")
    check(t.dtype == ref.dtype, f"{name} must have dtype {ref.dtype}, got {t.dtype}")


def check_streams(seed: Sequence[int], offset: Sequence[int], K: int) -> None:
    """One (seed, offset) per client, each in [0, 2^63)."""
    for name, xs in (("seed", seed), ("offset", offset)):
        check(
            isinstance(xs, (list, tuple)) and len(xs) == K,
            f"{name} must be a list of {K} integers (one stream per client), got {xs!r}",
        )
        for x in xs:
            check(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63,
                f"{name} entries must be integers in [0, 2^63), got {x!r}",
            )


def check_positive_clip_norm(clip_norm: float) -> None:
    check(
        not math.isnan(clip_norm) and clip_norm > 0,
        f"clip_norm must be > 0 (inf disables clipping), got {clip_norm}",
    )


def check_denominator(denominator: float) -> None:
    check(math.isfinite(denominator) and denominator > 0, f"denominator must be finite and > 0, got {denominator}")


def check_noise_multiplier(noise_multiplier: float) -> None:
    check(
        math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier}",
    )


# ----------------------------------------------------------------------------------------------
# One function per op
# ----------------------------------------------------------------------------------------------
def check_lowrank_prompt(
    prefix: Tensor, suffix: Tensor, g: Tensor, u: Tensor | None, v: Tensor | None, residual: Tensor | None
) -> None:
    check_dim(prefix, "prefix", (3,), "3-D (n_cls, 1, d)")
    check_dim(suffix, "suffix", (3,), "3-D (n_cls, S, d)")
    check_dim(g, "g", (2, 3), "2-D (n_ctx, d) or 3-D (K, n_ctx, d)")
    n_cls, one, d = prefix.shape
    check(one == 1, f"prefix must have one token per class (n_cls, 1, d), got {tuple(prefix.shape)}")
    check(
        suffix.shape[0] == n_cls and suffix.shape[2] == d,
        f"suffix must be ({n_cls}, S, {d}) to match prefix, got {tuple(suffix.shape)}",
    )
    n_ctx = g.shape[-2]
    check(g.shape[-1] == d, f"g must have width {d} to match prefix, got {tuple(g.shape)}")
    check((u is None) == (v is None), "u and v must be given together or not at all")
    for t, name in ((suffix, "suffix"), (g, "g"), (u, "u"), (v, "v"), (residual, "residual")):
        check_same(prefix, t, name)
    if u is not None and v is not None:
        check_dim(u, "u", (2, 3), "2-D (n_ctx, r) or 3-D (K, n_ctx, r)")
        check_dim(v, "v", (2, 3), "2-D (r, d) or 3-D (K, r, d)")
        r = u.shape[-1]
        check(u.shape[-2] == n_ctx, f"u must have {n_ctx} rows (n_ctx), got {tuple(u.shape)}")
        check(v.shape[-2:] == (r, d), f"v must be ({r}, {d}) per client, got {tuple(v.shape)}")
    if residual is not None:
        check_dim(residual, "residual", (2, 3), "2-D (n_ctx, d) or 3-D (K, n_ctx, d)")
        check(
            residual.shape[-2:] == (n_ctx, d),
            f"residual must be ({n_ctx}, {d}) per client, got {tuple(residual.shape)}",
        )
    # A list, not a set: under dynamic shapes the sizes are SymInts, which do not hash.
    leading = [t.shape[0] for t in (g, u, v, residual) if t is not None and t.dim() == 3]
    check(all(k == leading[0] for k in leading), f"client dimensions K disagree across g, u, v, residual: {leading}")


def check_lowrank_prompt_backward(grad_out: Tensor, n_ctx: int) -> None:
    check_dim(grad_out, "grad_out", (3, 4), "3-D (n_cls, L, d) or 4-D (K, n_cls, L, d)")
    L = grad_out.shape[-2]
    check(0 <= n_ctx and 1 + n_ctx <= L, f"n_ctx must be in [0, {L - 1}], got {n_ctx}")


def check_clip_entries(clip_norm: Tensor, noise_multiplier: float) -> None:
    """Every clip norm > 0 (inf: no clipping), and finite wherever noise is added (its std is sigma C)."""
    check(
        bool((~torch.isnan(clip_norm) & (clip_norm > 0)).all()),
        f"clip_norm entries must be > 0 (inf disables clipping), got {clip_norm.tolist()}",
    )
    check(
        noise_multiplier == 0 or bool(torch.isfinite(clip_norm).all()),
        f"clip_norm entries must be finite when noise_multiplier > 0 (the noise std is sigma C), "
        f"got {clip_norm.tolist()}",
    )


def check_dp_lowrank_clip_noise(
    grad: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    clip_norm: Tensor,
    noise_multiplier: float,
    seed: Sequence[int],
    offset: Sequence[int],
    expected_batch_size: float,
    joint_uv: bool,
    per_sample: bool,
    sum_classes: bool,
    normalize: bool,
    stability: float,
    *,
    values: bool = True,
) -> None:
    check_noise_multiplier(noise_multiplier)
    check(
        math.isfinite(expected_batch_size) and expected_batch_size >= 0,
        f"expected_batch_size must be finite and >= 0 (0: use b), got {expected_batch_size}",
    )
    check(
        per_sample or not normalize,
        "normalize=True (automatic clipping) needs per_sample=True: it scales each per-example gradient",
    )
    if normalize:
        check(
            math.isfinite(stability) and stability > 0,
            f"stability must be finite and > 0 with normalize=True, got {stability}",
        )
    plain = 4 if sum_classes else 3
    what = "(b, n_cls, n_ctx, d) or (K, b, n_cls, n_ctx, d)" if sum_classes else "(b, n_ctx, d) or (K, b, n_ctx, d)"
    check_dim(grad, "grad", (plain, plain + 1), f"{plain}-D or {plain + 1}-D {what}")
    check(grad.is_floating_point(), f"grad must be floating point, got {grad.dtype}")
    batched = grad.dim() == plain + 1
    K = grad.shape[0] if batched else 1
    n_ctx, d = grad.shape[-2], grad.shape[-1]
    check_streams(seed, offset, K)
    check(isinstance(clip_norm, Tensor), f"clip_norm must be a float64 tensor, got {type(clip_norm).__name__}")
    want = (K, 3) if batched else (3,)
    check(clip_norm.dtype == torch.float64, f"clip_norm must have dtype torch.float64, got {clip_norm.dtype}")
    check(clip_norm.device == grad.device, f"clip_norm must be on {grad.device}, got {clip_norm.device}")
    check(
        tuple(clip_norm.shape) == want,
        f"clip_norm must have shape {want} (per client: C of g_U or g_L, of g_V, of g_G) "
        f"or be a float or a ({K},) tensor, got shape {tuple(clip_norm.shape)}",
    )
    check((u is None) == (v is None), "u and v must be given together or not at all")
    if u is not None and v is not None:
        kd = 3 if batched else 2
        check_dim(u, "u", (kd,), "3-D (K, n_ctx, r) like grad" if batched else "2-D (n_ctx, r) like grad")
        check_dim(v, "v", (kd,), "3-D (K, r, d) like grad" if batched else "2-D (r, d) like grad")
        check_same(grad, u, "u")
        check_same(grad, v, "v")
        uu = u if batched else u.unsqueeze(0)
        vv = v if batched else v.unsqueeze(0)
        r = uu.shape[-1]
        check(uu.shape == (K, n_ctx, r), f"u must be ({K}, {n_ctx}, r) to match grad, got {tuple(u.shape)}")
        check(vv.shape == (K, r, d), f"v must be ({K}, {r}, {d}) to match grad and u, got {tuple(v.shape)}")
    if values and K:
        check_clip_entries(clip_norm, noise_multiplier)
        check(
            not normalize or bool(torch.isfinite(clip_norm).all()),
            f"clip_norm entries must be finite with normalize=True (the factor is C / (norm + stability)), "
            f"got {clip_norm.tolist()}",
        )


def check_dp_output_clip_noise(
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
    *,
    values: bool = True,
) -> None:
    check_noise_multiplier(noise_multiplier)
    check(math.isfinite(logit_scale) and logit_scale > 0, f"logit_scale must be finite and > 0, got {logit_scale}")
    check_denominator(denominator)
    check_dim(image_feats, "image_feats", (3,), "3-D (K, b, D)")
    check_dim(text_feats, "text_feats", (3,), "3-D (K, n_cls, D)")
    check(text_feats.is_floating_point(), f"text_feats must be floating point, got {text_feats.dtype}")
    check_same(text_feats, image_feats, "image_feats")
    K, b, D = image_feats.shape
    n_cls = text_feats.shape[1]
    check(
        text_feats.shape[0] == K and text_feats.shape[2] == D,
        f"text_feats must be ({K}, n_cls, {D}) to match image_feats, got {tuple(text_feats.shape)}",
    )
    check(n_cls >= 1, "text_feats must hold at least one class, got n_cls=0")
    check(labels.dtype == torch.int64, f"labels must have dtype torch.int64, got {labels.dtype}")
    check(labels.device == text_feats.device, f"labels must be on {text_feats.device}, got {labels.device}")
    check(labels.shape == (K, b), f"labels must have shape ({K}, {b}) to match image_feats, got {tuple(labels.shape)}")
    if mask is not None:
        check_same(text_feats, mask, "mask")
        check(mask.shape == (K, b), f"mask must have shape ({K}, {b}) to match image_feats, got {tuple(mask.shape)}")
    check(clip_norm.dtype == torch.float32, f"clip_norm must have dtype torch.float32, got {clip_norm.dtype}")
    check(clip_norm.device == text_feats.device, f"clip_norm must be on {text_feats.device}, got {clip_norm.device}")
    check(clip_norm.shape == (K,), f"clip_norm must have shape ({K},) (one per client), got {tuple(clip_norm.shape)}")
    check_streams(seed, offset, K)
    if not values:
        return
    if K and b:
        check(
            bool(((labels >= 0) & (labels < n_cls)).all()),
            f"labels must lie in [0, {n_cls}) (the classes of text_feats)",
        )
    if K:
        check_clip_entries(clip_norm, noise_multiplier)


def check_lowrank_full_grad(grad_u: Tensor, grad_v: Tensor, u: Tensor, v: Tensor, scale: float) -> None:
    check(math.isfinite(scale), f"scale must be finite, got {scale}")
    check_dim(u, "u", (2, 3), "2-D (n_ctx, r) or 3-D (K, n_ctx, r)")
    for t, name in ((grad_u, "grad_u"), (grad_v, "grad_v"), (v, "v")):
        check_dim(t, name, (u.dim(),), f"{u.dim()}-D like u")
        check_same(u, t, name)
    check(grad_u.shape == u.shape, f"grad_u must have u's shape {tuple(u.shape)}, got {tuple(grad_u.shape)}")
    r = u.shape[-1]
    check(v.shape[-2] == r, f"v must have {r} rows (rank of u), got {tuple(v.shape)}")
    check(v.shape[:-2] == u.shape[:-2], f"v must have u's client dimension {tuple(u.shape[:-2])}, got {v.shape}")
    check(grad_v.shape == v.shape, f"grad_v must have v's shape {tuple(v.shape)}, got {tuple(grad_v.shape)}")


def check_lowrank_factorize(l: Tensor, rank: int, seed: Sequence[int], offset: Sequence[int]) -> None:  # noqa: E741
    check_dim(l, "l", (2, 3), "2-D (n_ctx, d) or 3-D (K, n_ctx, d)")
    check(l.is_floating_point(), f"l must be floating point, got {l.dtype}")
    K = l.shape[0] if l.dim() == 3 else 1
    top = min(l.shape[-2], l.shape[-1])
    check(1 <= rank <= top, f"rank must be in [1, {top}] (min(n_ctx, d)), got {rank}")
    check_streams(seed, offset, K)


def check_nn_map(y: Tensor, emb: Tensor, allowed: Tensor | None, chunk: int, *, values: bool = True) -> None:
    check(chunk >= 1, f"chunk must be >= 1 (vocabulary rows per block), got {chunk}")
    check_dim(y, "y", (2,), "2-D (B, d)")
    check_dim(emb, "emb", (2,), "2-D (V, d)")
    check(y.is_floating_point(), f"y must be floating point, got {y.dtype}")
    check_same(y, emb, "emb")
    check(emb.shape[1] == y.shape[1], f"emb must have width {y.shape[1]} to match y, got shape {tuple(emb.shape)}")
    V = emb.shape[0]
    if allowed is not None:
        check(
            allowed.dim() == 1 and allowed.shape[0] == V,
            f"allowed must be 1-D ({V},) like emb's rows, got shape {tuple(allowed.shape)}",
        )
        check(allowed.dtype == torch.bool, f"allowed must have dtype torch.bool, got {allowed.dtype}")
        check(allowed.device == y.device, f"allowed must be on {y.device}, got {allowed.device}")
    if values:
        n_allowed = V if allowed is None else int(allowed.sum())
        check(n_allowed > 0, f"nn_map needs at least one allowed id, got none of {V}")
