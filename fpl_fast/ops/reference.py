"""Plain-PyTorch twins of every fpl_fast op: the specification, the fallback and the test oracle.

Each function has the same signature and semantics as ``torch.ops.fpl_fast.<op>``. Shapes use
K clients (an optional leading dimension), b samples, n_cls classes, n_ctx context tokens, width d,
rank r. Randomness is data: noise comes from a Philox4x32-10 stream addressed by (seed, offset),
implemented here with int64 tensor arithmetic so that the reference, the CPU kernels and the CUDA
kernels draw the same numbers (``csrc/philox.h`` documents the stream layout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeGuard

import torch
from torch import Tensor

from fpl_fast.validation import check

__all__ = [
    "CLIP_EPS",
    "philox_normal",
    "dp_noise_numel",
    "output_noise_numel",
    "dp_output_clip_noise",
    "factorize_noise_numel",
    "lowrank_prompt",
    "lowrank_prompt_backward",
    "dp_lowrank_clip_noise",
    "lowrank_full_grad",
    "lowrank_factorize",
]

# Clip factor min(1, C / (norm + CLIP_EPS)), as Opacus and the DP-FPL authors' code.
CLIP_EPS = 1e-6
# Gram-Schmidt guard for an all-zero column.
GS_EPS = 1e-12

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


# ----------------------------------------------------------------------------------------------
# Philox4x32-10 in int64 arithmetic
# ----------------------------------------------------------------------------------------------
def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and uint32 values b held in int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    s = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (s >> 32), s & _M32


def _philox4x32_10(counter: Tensor, seed: int) -> list[Tensor]:
    c = [counter & _M32, (counter >> 32) & _M32, torch.zeros_like(counter), torch.zeros_like(counter)]
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + _PHILOX_W[0]) & _M32
            k1 = (k1 + _PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c[0])
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def philox_normal(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Normals 0..numel-1 of the (seed, offset) stream, float32 (see csrc/philox.h)."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    n_ctr = (numel + 3) // 4
    ctr = torch.arange(n_ctr, dtype=torch.int64, device=device) + offset
    x = _philox4x32_10(ctr, seed)
    two32 = 2.0**-32
    out = []
    for a, b in ((x[0], x[1]), (x[2], x[3])):
        u1 = (a.double() + 1.0) * two32
        u2 = b.double() * two32
        r = torch.sqrt(-2.0 * torch.log(u1))
        out += [r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)]
    return torch.stack(out, dim=1).reshape(-1)[:numel].float()


# ----------------------------------------------------------------------------------------------
# Input checks (the C++ kernels check the same preconditions, in the same order: csrc/checks.h)
# ----------------------------------------------------------------------------------------------
def _check_streams(seed: Sequence[int], offset: Sequence[int], K: int) -> None:
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


def _client_normals(seed: Sequence[int], offset: Sequence[int], per_client: int, device) -> Tensor:
    """(K, per_client) float32: row k holds normals 0 .. per_client - 1 of stream (seed[k], offset[k])."""
    if not seed:
        return torch.zeros(0, per_client, device=device)
    return torch.stack([philox_normal(s, o, per_client, device) for s, o in zip(seed, offset, strict=True)])


def _check_dim(t: Tensor, name: str, dims: tuple[int, ...], what: str) -> None:
    check(t.dim() in dims, f"{name} must be {what}, got shape {tuple(t.shape)}")


def _check_same(ref: Tensor, t: Tensor | None, name: str) -> None:
    if t is None:
        return
    check(t.device == ref.device, f"{name} must be on {ref.device}, got {t.device}")
    check(t.dtype == ref.dtype, f"{name} must have dtype {ref.dtype}, got {t.dtype}")


def _check_hyper(clip_norm: float, noise_multiplier: float) -> None:
    check(
        not math.isnan(clip_norm) and clip_norm > 0,
        f"clip_norm must be > 0 (inf disables clipping), got {clip_norm}",
    )
    check(
        math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier}",
    )


def _clip_factor(norm: Tensor, clip_norm: float) -> Tensor:
    return torch.clamp(clip_norm / (norm + CLIP_EPS), max=1.0)


def _batched(t: Tensor | None, plain_dims: int) -> TypeGuard[Tensor]:
    return t is not None and t.dim() == plain_dims + 1


# ----------------------------------------------------------------------------------------------
# lowrank_prompt
# ----------------------------------------------------------------------------------------------
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
    _check_dim(prefix, "prefix", (3,), "3-D (n_cls, 1, d)")
    _check_dim(suffix, "suffix", (3,), "3-D (n_cls, S, d)")
    _check_dim(g, "g", (2, 3), "2-D (n_ctx, d) or 3-D (K, n_ctx, d)")
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
        _check_same(prefix, t, name)
    if u is not None and v is not None:
        _check_dim(u, "u", (2, 3), "2-D (n_ctx, r) or 3-D (K, n_ctx, r)")
        _check_dim(v, "v", (2, 3), "2-D (r, d) or 3-D (K, r, d)")
        r = u.shape[-1]
        check(u.shape[-2] == n_ctx, f"u must have {n_ctx} rows (n_ctx), got {tuple(u.shape)}")
        check(v.shape[-2:] == (r, d), f"v must be ({r}, {d}) per client, got {tuple(v.shape)}")
    if residual is not None:
        _check_dim(residual, "residual", (2, 3), "2-D (n_ctx, d) or 3-D (K, n_ctx, d)")
        check(
            residual.shape[-2:] == (n_ctx, d),
            f"residual must be ({n_ctx}, {d}) per client, got {tuple(residual.shape)}",
        )
    # A list, not a set: under dynamic shapes the sizes are SymInts, which do not hash.
    leading = [t.shape[0] for t, nd in ((g, 2), (u, 2), (v, 2), (residual, 2)) if _batched(t, nd)]
    check(all(k == leading[0] for k in leading), f"client dimensions K disagree across g, u, v, residual: {leading}")
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
    _check_dim(grad_out, "grad_out", (3, 4), "3-D (n_cls, L, d) or 4-D (K, n_cls, L, d)")
    go = grad_out if grad_out.dim() == 4 else grad_out.unsqueeze(0)
    check(0 <= n_ctx and 1 + n_ctx <= go.shape[2], f"n_ctx must be in [0, {go.shape[2] - 1}], got {n_ctx}")
    acc = torch.float64 if go.dtype == torch.float64 else torch.float32
    grad_ctx = go[:, :, 1 : 1 + n_ctx, :].to(acc).sum(dim=1)  # (K, n_ctx, d)
    K = go.shape[0]
    if u is None or v is None:  # two distinct empty tensors: outputs must not alias each other
        return grad_ctx.to(go.dtype), go.new_zeros(K, 0, 0), go.new_zeros(K, 0, 0)
    grad_u = torch.matmul(grad_ctx, v.to(acc).transpose(-1, -2))  # (K, n_ctx, r)
    grad_v = torch.matmul(u.to(acc).transpose(-1, -2), grad_ctx)  # (K, r, d)
    return grad_ctx.to(go.dtype), grad_u.to(go.dtype), grad_v.to(go.dtype)


# ----------------------------------------------------------------------------------------------
# dp_lowrank_clip_noise
# ----------------------------------------------------------------------------------------------
def dp_noise_numel(K: int, n_ctx: int, d: int, rank: int | None) -> int:
    """Normals one ``dp_lowrank_clip_noise`` call draws for K clients (rank None: full local prompt)."""
    per_client = n_ctx * d if rank is None else n_ctx * rank + rank * d
    return K * per_client


def dp_lowrank_clip_noise(
    grad: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    clip_norm: float,
    noise_multiplier: float,
    seed: Sequence[int],
    offset: Sequence[int],
    expected_batch_size: float = 0.0,
    joint_uv: bool = True,
    per_sample: bool = True,
    sum_classes: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample clipping and Gaussian noise for the prompt factors, for all clients at once.

    Per sample i of client k, with grad_i the context gradient (summed over classes if
    ``sum_classes``): g_U,i = grad_i V^T, g_V,i = U^T grad_i, g_G,i = grad_i. Each is clipped with
    factor min(1, C / (norm + 1e-6)) (``joint_uv``: g_U,i and g_V,i share one factor from their joint
    norm), the clipped terms are summed, N(0, (sigma C)^2) is added to the U and V sums (local DP; the
    global prompt's noise is the server's), and everything is divided by ``expected_batch_size`` if
    > 0 (Poisson sampling) else by max(b, 1).

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
        clip_norm: C > 0 (inf disables clipping).
        noise_multiplier: sigma >= 0.
        seed, offset: the Philox stream of each client, K integers each (1 when grad has no K).

    Returns:
        grad_u (K, n_ctx, r), grad_v (K, r, d), grad_g (K, n_ctx, d) in grad's dtype, and
        norms (K, b, 3) float32 with the unclipped per-sample norms of (g_U, g_V, g_G)
        ((K, 1, 3) of the batch mean when ``per_sample=False``). K is absent when grad has none.
    """
    _check_hyper(clip_norm, noise_multiplier)
    check(
        math.isfinite(expected_batch_size) and expected_batch_size >= 0,
        f"expected_batch_size must be finite and >= 0 (0: use b), got {expected_batch_size}",
    )
    plain = 4 if sum_classes else 3
    what = "(b, n_cls, n_ctx, d) or (K, b, n_cls, n_ctx, d)" if sum_classes else "(b, n_ctx, d) or (K, b, n_ctx, d)"
    _check_dim(grad, "grad", (plain, plain + 1), f"{plain}-D or {plain + 1}-D {what}")
    check(grad.is_floating_point(), f"grad must be floating point, got {grad.dtype}")
    batched = grad.dim() == plain + 1
    x = grad if batched else grad.unsqueeze(0)
    K, b = x.shape[0], x.shape[1]
    n_ctx, d = x.shape[-2], x.shape[-1]
    _check_streams(seed, offset, K)
    check((u is None) == (v is None), "u and v must be given together or not at all")
    if u is not None and v is not None:
        kd = 3 if batched else 2
        _check_dim(u, "u", (kd,), "3-D (K, n_ctx, r) like grad" if batched else "2-D (n_ctx, r) like grad")
        _check_dim(v, "v", (kd,), "3-D (K, r, d) like grad" if batched else "2-D (r, d) like grad")
        _check_same(grad, u, "u")
        _check_same(grad, v, "v")
        uu = u if batched else u.unsqueeze(0)
        vv = v if batched else v.unsqueeze(0)
        r = uu.shape[-1]
        check(uu.shape == (K, n_ctx, r), f"u must be ({K}, {n_ctx}, r) to match grad, got {tuple(u.shape)}")
        check(vv.shape == (K, r, d), f"v must be ({K}, {r}, {d}) to match grad and u, got {tuple(v.shape)}")
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    xs = x.to(acc)
    if sum_classes:
        xs = xs.sum(dim=2)  # (K, b, n_ctx, d)
    denom = float(expected_batch_size) if expected_batch_size > 0 else float(max(b, 1))
    C = float(clip_norm)

    if per_sample:
        xg = xs
    else:
        xg = xs.mean(dim=1, keepdim=True) if b > 0 else xs.new_zeros(K, 1, n_ctx, d)

    norm_g = xg.flatten(2).norm(dim=2)  # (K, b')
    if u is not None:
        uu, vv = uu.to(acc), vv.to(acc)
        a = torch.einsum("kind,krd->kinr", xg, vv)  # g_U,i (K, b', n_ctx, r)
        bb = torch.einsum("knr,kind->kird", uu, xg)  # g_V,i (K, b', r, d)
        norm_u = a.flatten(2).norm(dim=2)
        norm_v = bb.flatten(2).norm(dim=2)
        if joint_uv:
            cu = cv = _clip_factor(torch.sqrt(norm_u**2 + norm_v**2), C)
        else:
            cu, cv = _clip_factor(norm_u, C), _clip_factor(norm_v, C)
        local_a = (cu[..., None, None] * a).sum(dim=1)  # (K, n_ctx, r)
        local_b = (cv[..., None, None] * bb).sum(dim=1)  # (K, r, d)
        norms = torch.stack([norm_u, norm_v, norm_g], dim=-1)
    else:
        local_a = (_clip_factor(norm_g, C)[..., None, None] * xg).sum(dim=1)  # (K, n_ctx, d)
        local_b = xs.new_zeros(K, 0, d)
        norms = torch.stack([norm_g, torch.zeros_like(norm_g), norm_g], dim=-1)
    glob = (_clip_factor(norm_g, C)[..., None, None] * xg).sum(dim=1)  # (K, n_ctx, d)

    if per_sample:
        scale = 1.0 / denom
    else:
        scale = 1.0  # clip(mean) itself; only the noise is divided by the denominator

    if noise_multiplier > 0:
        numel_a, numel_b = local_a[0].numel(), local_b[0].numel()
        z = _client_normals(seed, offset, numel_a + numel_b, grad.device).to(acc)  # (K, P)
        z = z * (noise_multiplier * C / denom)
        local_a = local_a * scale + z[:, :numel_a].view_as(local_a)
        local_b = local_b * scale + z[:, numel_a:].view_as(local_b)
    else:
        local_a, local_b = local_a * scale, local_b * scale
    glob = glob * scale

    outs = (local_a.to(grad.dtype), local_b.to(grad.dtype), glob.to(grad.dtype), norms.float())
    return outs if batched else tuple(t[0] for t in outs)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# dp_output_clip_noise (output-space per-example DP)
# ----------------------------------------------------------------------------------------------
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
    check(
        math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier}",
    )
    check(math.isfinite(logit_scale) and logit_scale > 0, f"logit_scale must be finite and > 0, got {logit_scale}")
    check(math.isfinite(denominator) and denominator > 0, f"denominator must be finite and > 0, got {denominator}")
    _check_dim(image_feats, "image_feats", (3,), "3-D (K, b, D)")
    _check_dim(text_feats, "text_feats", (3,), "3-D (K, n_cls, D)")
    check(text_feats.is_floating_point(), f"text_feats must be floating point, got {text_feats.dtype}")
    _check_same(text_feats, image_feats, "image_feats")
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
        _check_same(text_feats, mask, "mask")
        check(mask.shape == (K, b), f"mask must have shape ({K}, {b}) to match image_feats, got {tuple(mask.shape)}")
    check(clip_norm.dtype == torch.float32, f"clip_norm must have dtype torch.float32, got {clip_norm.dtype}")
    check(clip_norm.device == text_feats.device, f"clip_norm must be on {text_feats.device}, got {clip_norm.device}")
    check(clip_norm.shape == (K,), f"clip_norm must have shape ({K},) (one per client), got {tuple(clip_norm.shape)}")
    _check_streams(seed, offset, K)
    if K and b:
        check(
            bool(((labels >= 0) & (labels < n_cls)).all()),
            f"labels must lie in [0, {n_cls}) (the classes of text_feats)",
        )
    if K:
        check(
            bool((~torch.isnan(clip_norm) & (clip_norm > 0)).all()),
            f"clip_norm entries must be > 0 (inf disables clipping), got {clip_norm.tolist()}",
        )
        check(
            noise_multiplier == 0 or bool(torch.isfinite(clip_norm).all()),
            f"clip_norm entries must be finite when noise_multiplier > 0 (the noise std is sigma C), "
            f"got {clip_norm.tolist()}",
        )

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
    f = torch.clamp(clip_norm.to(acc)[:, None] / (norms + CLIP_EPS), max=1.0) * m  # (K, b)
    a = (f[..., None] * w).transpose(1, 2) @ x_hat  # (K, n_cls, D)
    proj = (a * t_hat).sum(-1, keepdim=True)
    s_sum = (logit_scale / t_norm)[..., None] * (a - proj * t_hat)
    if noise_multiplier > 0:
        z = _client_normals(seed, offset, n_cls * D, text_feats.device).to(acc).view(K, n_cls, D)
        s_sum = s_sum + z * (noise_multiplier * clip_norm.to(acc))[:, None, None]
    release = s_sum / denominator
    return release.to(text_feats.dtype), norms.float(), losses.float()


# ----------------------------------------------------------------------------------------------
# lowrank_full_grad
# ----------------------------------------------------------------------------------------------
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
    check(math.isfinite(scale), f"scale must be finite, got {scale}")
    _check_dim(u, "u", (2, 3), "2-D (n_ctx, r) or 3-D (K, n_ctx, r)")
    for t, name in ((grad_u, "grad_u"), (grad_v, "grad_v"), (v, "v")):
        _check_dim(t, name, (u.dim(),), f"{u.dim()}-D like u")
        _check_same(u, t, name)
    check(grad_u.shape == u.shape, f"grad_u must have u's shape {tuple(u.shape)}, got {tuple(grad_u.shape)}")
    r = u.shape[-1]
    check(v.shape[-2] == r, f"v must have {r} rows (rank of u), got {tuple(v.shape)}")
    check(v.shape[:-2] == u.shape[:-2], f"v must have u's client dimension {tuple(u.shape[:-2])}, got {v.shape}")
    check(grad_v.shape == v.shape, f"grad_v must have v's shape {tuple(v.shape)}, got {tuple(grad_v.shape)}")
    ut = u.transpose(-1, -2)
    inner = torch.matmul(ut, grad_u)  # (K, r, r)
    out = torch.matmul(grad_u, v) + torch.matmul(u, grad_v) + torch.matmul(u, torch.matmul(inner, v))
    return scale * out


# ----------------------------------------------------------------------------------------------
# lowrank_factorize
# ----------------------------------------------------------------------------------------------
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
    _check_dim(l, "l", (2, 3), "2-D (n_ctx, d) or 3-D (K, n_ctx, d)")
    check(l.is_floating_point(), f"l must be floating point, got {l.dtype}")
    batched = l.dim() == 3
    x = l if batched else l.unsqueeze(0)
    K, n_ctx, d = x.shape
    check(1 <= rank <= min(n_ctx, d), f"rank must be in [1, {min(n_ctx, d)}] (min(n_ctx, d)), got {rank}")
    _check_streams(seed, offset, K)
    acc = torch.float64 if l.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    v0 = _client_normals(seed, offset, d * rank, l.device).to(acc).view(K, d, rank)
    u = _gram_schmidt(torch.matmul(xa, v0))  # (K, n_ctx, r)
    w = _gram_schmidt(torch.matmul(xa.transpose(-1, -2), u))  # (K, d, r)
    v = w.transpose(-1, -2)  # (K, r, d)
    res = xa - torch.matmul(u, v)
    outs = (u.to(l.dtype), v.contiguous().to(l.dtype), res.to(l.dtype))
    return outs if batched else tuple(t[0] for t in outs)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# nn_map (RAPT's nearest-token search)
# ----------------------------------------------------------------------------------------------
__all__ += ["NN_MAP_CHUNK", "nn_map"]

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
    check(chunk >= 1, f"chunk must be >= 1 (vocabulary rows per block), got {chunk}")
    _check_dim(y, "y", (2,), "2-D (B, d)")
    _check_dim(emb, "emb", (2,), "2-D (V, d)")
    check(y.is_floating_point(), f"y must be floating point, got {y.dtype}")
    _check_same(y, emb, "emb")
    check(emb.shape[1] == y.shape[1], f"emb must have width {y.shape[1]} to match y, got shape {tuple(emb.shape)}")
    V = emb.shape[0]
    if allowed is not None:
        check(
            allowed.dim() == 1 and allowed.shape[0] == V,
            f"allowed must be 1-D ({V},) like emb's rows, got shape {tuple(allowed.shape)}",
        )
        check(allowed.dtype == torch.bool, f"allowed must have dtype torch.bool, got {allowed.dtype}")
        check(allowed.device == y.device, f"allowed must be on {y.device}, got {allowed.device}")
    n_allowed = V if allowed is None else int(allowed.sum())
    check(n_allowed > 0, f"nn_map needs at least one allowed id, got none of {V}")
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
