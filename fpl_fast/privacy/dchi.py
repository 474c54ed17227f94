"""d_chi-privacy for tokens (RAPT's text-to-text privatisation): the mechanism and the
inversion attacks that measure it.

Mechanism (Feyisetan et al.; RAPT Eqs. 1-3): a token t with embedding e_t = E[t] is released as

    t' = argmin_{w in V_a} ||E[w] - (e_t + z)||_2,   p(z) ∝ exp(-eta ||z||_2),

with z = l v, l ~ Gamma(shape d, rate eta) and v uniform on the unit sphere S^{d-1} (v = g / ||g||, g ~ N(0, I_d)).
V_a is the vocabulary minus the special tokens, which pass through unchanged. The release is eta d_chi-private with
d_chi the L2 distance between embeddings: two tokens at distance D are (eta D)-indistinguishable, and over the whole
vocabulary every token is (eta diam(E))-LDP (:func:`eps_token`). The nearest-neighbour step is post-processing.

Knows nothing about CLIP: it gets token ids and an embedding table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops import NN_MAP_CHUNK

__all__ = [
    "EXACT_DIAMETER_MAX_V",
    "bayes_inversion_accuracy",
    "calibrate_eta",
    "diameter",
    "eps_token",
    "nn_inversion_accuracy",
    "preservation_rate",
    "privatize",
    "sample_dchi",
]

EXACT_DIAMETER_MAX_V = 8192
"""Tables with at most this many (allowed) rows get their exact diameter; larger ones get an upper bound."""


def _check_eta(eta: float) -> None:
    if not (isinstance(eta, (int, float)) and not math.isnan(eta) and eta > 0):
        raise ValueError(f"eta must be a number > 0 (inf: no noise), got {eta!r}")


def sample_dchi(
    shape: Sequence[int],
    eta: float,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Noise with density p(z) ∝ exp(-eta ||z||_2) in R^d, float32.

    z = l v with l ~ Gamma(concentration d, rate eta) (scale 1/eta, so E||z|| = d / eta, Var||z|| = d / eta^2) and
    v = g / ||g||_2, g ~ N(0, I_d) (uniform on the sphere). Gamma(d, rate eta) is drawn as Gamma(d, 1) / eta with
    ``torch._standard_gamma``, which (unlike ``torch.distributions.Gamma``) takes a generator.

    Args:
        shape: (..., d), d >= 1.
        eta: privacy parameter > 0; larger means less noise. ``inf`` gives z = 0.
        generator: torch generator on ``device`` (None: the global one).
        device: where to draw.

    Returns:
        (..., d) float32 noise.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be (..., d) with d >= 1 and no negative size, got {shape}")
    _check_eta(eta)
    d = shape[-1]
    g = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    v = g / g.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    conc = torch.full(shape[:-1], float(d), dtype=torch.float32, device=device)
    radius = torch._standard_gamma(conc, generator=generator) / float(eta)  # Gamma(d, rate eta)
    return radius.unsqueeze(-1) * v


def _allowed_mask(V: int, special_ids: Sequence[int] | Tensor, allowed: Tensor | None, device: torch.device) -> Tensor:
    mask = torch.ones(V, dtype=torch.bool, device=device) if allowed is None else allowed.to(device).clone()
    if mask.shape != (V,) or mask.dtype != torch.bool:
        raise ValueError(
            f"allowed must be a ({V},) bool mask over the vocabulary, got {tuple(mask.shape)} {mask.dtype}"
        )
    special = torch.as_tensor(special_ids, dtype=torch.long, device=device).reshape(-1)
    if special.numel() and (int(special.min()) < 0 or int(special.max()) >= V):
        raise ValueError(f"special_ids must lie in [0, {V}), got {special.tolist()}")
    mask[special] = False
    if not bool(mask.any()):
        raise ValueError("no token is left to map to: allowed minus special_ids is empty")
    return mask


def privatize(
    ids: Tensor,
    emb: Tensor,
    eta: float,
    special_ids: Sequence[int] | Tensor = (),
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
    *,
    chunk: int = NN_MAP_CHUNK,
) -> tuple[Tensor, float]:
    """Privatise token ids with the d_chi mechanism.

    Special tokens (``special_ids``: SOT, EOT, padding, ...) pass through unchanged. Every other token t becomes
    ``nn_map(E[t] + z)`` over the ids allowed by ``allowed`` minus the special ids (so a special token is never
    produced), with fresh noise z per token from :func:`sample_dchi`.

    Args:
        ids: int64 token ids of any shape.
        emb: (V, d) embedding table (the backbone's token embedding), any float dtype; the noise is added in float32.
        eta: privacy parameter > 0 (``inf``: no noise).
        special_ids: ids that are never privatised nor produced.
        generator: torch generator on ``emb``'s device.
        allowed: optional (V,) bool mask restricting the output vocabulary (e.g. a POS class).
        chunk: vocabulary rows per block of the nearest-neighbour search.

    Returns:
        (privatised ids like ``ids``, preservation rate = fraction of non-special tokens mapped to themselves;
        nan when there is none).
    """
    _check_eta(eta)
    if ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 token ids, got {ids.dtype}")
    if emb.dim() != 2:
        raise ValueError(f"emb must be 2-D (V, d), got shape {tuple(emb.shape)}")
    V, d = emb.shape
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"ids must lie in [0, {V}), got values in [{int(ids.min())}, {int(ids.max())}]")
    device = emb.device
    mask = _allowed_mask(V, special_ids, allowed, device)
    special = torch.as_tensor(special_ids, dtype=torch.long, device=device).reshape(-1)
    flat = ids.to(device).reshape(-1)
    private = ~torch.isin(flat, special)
    src = flat[private]
    if src.numel() == 0:
        return ids.clone(), float("nan")
    table = emb.detach().float()
    y = table[src] + sample_dchi((src.numel(), d), eta, generator, device=device)  # (n, d)
    mapped = ops.nn_map(y, table, mask, chunk=chunk)
    out = flat.clone()
    out[private] = mapped
    rate = float((mapped == src).float().mean())
    return out.view(ids.shape).to(ids.device), rate


def preservation_rate(original: Tensor, privatized: Tensor, special_ids: Sequence[int] | Tensor = ()) -> float:
    """Fraction of non-special tokens with privatized == original; nan if there is none."""
    if original.shape != privatized.shape:
        raise ValueError(
            f"privatized must have original's shape {tuple(original.shape)}, got {tuple(privatized.shape)}"
        )
    special = torch.as_tensor(special_ids, dtype=torch.long, device=original.device).reshape(-1)
    keep = ~torch.isin(original, special)
    if not bool(keep.any()):
        return float("nan")
    return float((original[keep] == privatized[keep]).float().mean())


def nn_inversion_accuracy(original: Tensor, privatized: Tensor, special_ids: Sequence[int] | Tensor = ()) -> float:
    """Accuracy of the nearest-neighbour inversion attack: the attacker guesses x_t = x'_t.

    The released token is already the vocabulary's nearest neighbour of the noisy embedding, so this attack's
    accuracy equals the preservation rate by construction; it is reported under its own name as the baseline that
    :func:`bayes_inversion_accuracy` improves on.
    """
    return preservation_rate(original, privatized, special_ids)


def bayes_inversion_accuracy(
    original: Tensor,
    privatized: Tensor,
    emb: Tensor,
    eta: float,
    candidates: Tensor,
    *,
    special_ids: Sequence[int] | Tensor = (),
    n_mc: int = 64,
    generator: torch.Generator | None = None,
    chunk: int = NN_MAP_CHUNK,
) -> float:
    """Accuracy of the Bayes inversion attack with a uniform prior over ``candidates``.

    The attacker knows that the private tokens come from ``candidates`` (e.g. the dataset vocabulary), estimates
    P(M(w) = y) for every candidate w by ``n_mc`` Monte-Carlo privatisations, and guesses argmax_w P(M(w) = x'_t)
    (ties and unseen outputs: the candidate nearest to x'_t in embedding space). Evaluated on the non-special
    tokens of ``original`` that are candidates.

    Returns:
        Accuracy in [0, 1] (nan when no token qualifies).
    """
    if n_mc < 1:
        raise ValueError(f"n_mc must be >= 1, got {n_mc}")
    device = emb.device
    cand = torch.unique(candidates.to(device).reshape(-1))
    special = torch.as_tensor(special_ids, dtype=torch.long, device=device).reshape(-1)
    cand = cand[~torch.isin(cand, special)]
    orig = original.to(device).reshape(-1)
    priv = privatized.to(device).reshape(-1)
    keep = torch.isin(orig, cand)
    if not bool(keep.any()):
        return float("nan")
    orig, priv = orig[keep], priv[keep]
    # counts[i, y] = how often candidate i was released as y (sparse: only the outputs seen in priv matter).
    draws = cand.repeat_interleave(n_mc)
    released, _ = privatize(draws, emb, eta, special, generator, chunk=chunk)
    released = released.view(cand.numel(), n_mc)
    outputs, out_index = torch.unique(priv, return_inverse=True)
    hits = released[:, :, None] == outputs[None, None, :]  # (n_cand, n_mc, n_out)
    counts = hits.sum(dim=1).float()  # (n_cand, n_out)
    # Tie-break by embedding distance (a tiny bonus below one count).
    table = emb.detach().float()
    dist = torch.cdist(table[outputs], table[cand])  # (n_out, n_cand)
    bonus = 0.5 * (1.0 - dist / (dist.max() + 1e-12))
    score = counts.T + bonus  # (n_out, n_cand)
    guess = cand[score.argmax(dim=1)]  # (n_out,)
    return float((guess[out_index] == orig).float().mean())


def diameter(emb: Tensor, allowed: Tensor | None = None, *, exact: bool | None = None) -> tuple[float, bool]:
    """Diameter max_{w, w'} ||E[w] - E[w']|| of the allowed rows, or an upper bound.

    Exact (blockwise pairwise distances) when ``exact`` is True, or when None and at most
    :data:`EXACT_DIAMETER_MAX_V` rows are allowed. Otherwise the upper bound
    min(2 max_w ||E[w]||, 2 max_w ||E[w] - mean||) (both are valid bounds by the triangle inequality; the second is
    tighter for a table that is not centred at the origin).

    Returns:
        (value, is_exact).
    """
    table = emb.detach().double()
    if allowed is not None:
        table = table[allowed.to(table.device)]
    n = table.shape[0]
    if n <= 1:
        return 0.0, True
    if exact is None:
        exact = n <= EXACT_DIAMETER_MAX_V
    if not exact:
        bound_origin = 2.0 * float(table.norm(dim=1).max())
        bound_center = 2.0 * float((table - table.mean(0)).norm(dim=1).max())
        return min(bound_origin, bound_center), False
    best = 0.0
    block = 1024
    for start in range(0, n, block):
        best = max(best, float(torch.cdist(table[start : start + block], table).max()))
    return best, True


def eps_token(eta: float, emb: Tensor, allowed: Tensor | None = None, *, exact: bool | None = None) -> float:
    """Token-level LDP epsilon over the whole (allowed) vocabulary: eta * diameter(E) (see :func:`diameter`).

    When the diameter is the upper bound the returned epsilon is an upper bound too (still a valid guarantee).
    """
    _check_eta(eta)
    diam, _ = diameter(emb, allowed, exact=exact)
    return float(eta) * diam


def calibrate_eta(
    emb: Tensor,
    target_rate: float,
    sample_ids: Tensor,
    *,
    special_ids: Sequence[int] | Tensor = (),
    allowed: Tensor | None = None,
    seed: int = 0,
    iters: int = 24,
    chunk: int = NN_MAP_CHUNK,
) -> tuple[float, float]:
    """The eta whose empirical preservation rate on ``sample_ids`` is ``target_rate`` (spec R8).

    Bisection on log(eta) with common random numbers: every evaluation reuses the same directions and Gamma(d, 1)
    radii, only scaled by 1/eta. A token's Voronoi cell is convex and contains its own embedding, so along a fixed
    noise ray the token is preserved exactly for radii below a threshold: with common random numbers the empirical
    rate is monotone in eta and the bisection is well defined.

    Args:
        emb: (V, d) table.
        target_rate: in (0, 1).
        sample_ids: tokens to measure on (e.g. the training text's non-special tokens).
        special_ids, allowed: as :func:`privatize`.
        seed: seed of the common random numbers.
        iters: bisection steps.
        chunk: vocabulary block size of the nearest-neighbour search.

    Returns:
        (eta, measured preservation rate at that eta).
    """
    if not 0 < target_rate < 1:
        raise ValueError(f"target_rate must be in (0, 1), got {target_rate}")
    device = emb.device
    V, d = emb.shape
    mask = _allowed_mask(V, special_ids, allowed, device)
    special = torch.as_tensor(special_ids, dtype=torch.long, device=device).reshape(-1)
    src = sample_ids.to(device).reshape(-1)
    src = src[~torch.isin(src, special)]
    if src.numel() == 0:
        raise ValueError("sample_ids must contain at least one non-special token")
    table = emb.detach().float()
    gen = torch.Generator(device=device).manual_seed(seed)
    unit = sample_dchi((src.numel(), d), 1.0, gen, device=device)  # eta = 1: z(eta) = unit / eta
    base = table[src]

    def rate(eta: float) -> float:
        return float((ops.nn_map(base + unit / eta, table, mask, chunk=chunk) == src).float().mean())

    lo, hi = 1e-3, 1e3
    while rate(hi) < target_rate and hi < 1e12:
        lo, hi = hi, hi * 1e3
    while rate(lo) > target_rate and lo > 1e-12:
        lo, hi = lo * 1e-3, lo
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if rate(mid) < target_rate:
            lo = mid
        else:
            hi = mid
    return hi, rate(hi)
