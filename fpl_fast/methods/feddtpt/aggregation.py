"""FedDTPT server (F6 of :mod:`fpl_fast.methods.feddtpt`): semantic-attention weights and clustering aggregation
of discrete client prompts.

Every uploaded token p_k^n of client k at position n is mapped to its static embedding row E_k^n = z[p_k^n]
(for CLIP: the text tower's ``token_embedding.weight``, the analogue of the paper's MLM embedding layer).
With S the cosine-similarity matrix over all M = sum_k |P_k| uploaded tokens:

    w_k^n = sum_{(k', n'): k' != k} S[(k, n), (k', n')]          (Eq. 6: all tokens of all other clients)
    alpha_k^n = exp(w_k^n / tau) / sum_j exp(w_k^j / tau)         (softmax within client k's prompt; tau = 1)

The default aggregation (``mode="dbscan"``) then

1. picks the DBSCAN radius eps by elbow detection on the sorted k-distance curve of the L2-normalised embeddings
   ([ours], documented in :func:`elbow_eps`);
2. clusters the normalised embeddings with scikit-learn's ``DBSCAN(eps, min_samples)``; noise points (label -1)
   are dropped;
3. takes in each cluster the member with the largest alpha as its representative;
4. orders the representatives by their original position n (ties: larger alpha first), keeps at most ``n_max``
   (those with the largest alpha, re-sorted by position), and falls back to the previous global prompt when no
   cluster was found.

The paper's server ablations (Table 5) are the other modes: ``"mean"`` (Server-1, per-position mean embedding
mapped to the nearest allowed token), ``"topn"`` (Server-2, the top-N tokens by alpha without clustering) and
``"kmeans"`` (Server-3, Algorithm 2 verbatim: k-means with a fixed number of clusters N).

Note: clustering acts on tokens, not positions, so a token that occurs twice in one prompt (e.g. the two "a" of
"a photo of a") falls into one cluster and survives only once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN, KMeans
from sklearn.neighbors import NearestNeighbors
from torch import Tensor

__all__ = [
    "ELBOW_METHODS",
    "SERVER_MODES",
    "AggregationResult",
    "aggregate",
    "attention_weights",
    "elbow_eps",
    "nearest_allowed",
]

SERVER_MODES = ("dbscan", "mean", "topn", "kmeans")
"""Aggregation modes: the paper's method and its ablations Server-1 (mean), Server-2 (topn), Server-3 (kmeans)."""

ELBOW_METHODS = ("second_diff", "kneedle")
"""How :func:`elbow_eps` finds the knee of the k-distance curve."""

_EPS_FLOOR = 1e-6


@dataclass(frozen=True)
class AggregationResult:
    """Outcome of one server aggregation.

    Attributes:
        prompt: the new global prompt, token ids.
        alpha: (M,) float64 attention weights of all uploaded tokens (client-major order).
        eps: the DBSCAN radius (``mode="dbscan"`` only, else None).
        n_clusters: clusters found (dbscan/kmeans), else the number of tokens kept.
        n_noise: DBSCAN noise points dropped (0 for the other modes).
        fallback: True if the previous global prompt was kept because no cluster was found.
    """

    prompt: list[int]
    alpha: Tensor
    eps: float | None
    n_clusters: int
    n_noise: int
    fallback: bool


def attention_weights(emb: Tensor, client_of: Tensor, *, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Similarity-attention logits w and weights alpha of uploaded tokens (Eq. 6 and its per-client softmax).

    Args:
        emb: (M, d) embedding rows of all uploaded tokens.
        client_of: (M,) long, the client that uploaded each token.
        temperature: softmax temperature tau > 0 (1 in the paper).

    Returns:
        ``(w, alpha)``, both (M,) float64; alpha sums to 1 over the tokens of each client.
    """
    if emb.dim() != 2 or client_of.shape != (emb.shape[0],):
        raise ValueError(f"emb must be (M, d) and client_of (M,), got {tuple(emb.shape)} and {tuple(client_of.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    e = F.normalize(emb.double(), dim=-1)
    sim = e @ e.T  # (M, M) cosine similarities
    other = client_of[:, None] != client_of[None, :]  # (M, M): pairs of tokens from different clients
    w = (sim * other).sum(dim=1)  # (M,)
    alpha = torch.empty_like(w)
    for k in torch.unique(client_of).tolist():
        rows = client_of == k
        alpha[rows] = torch.softmax(w[rows] / temperature, dim=0)
    return w, alpha


def elbow_eps(
    points: np.ndarray,
    *,
    min_samples: int = 2,
    method: str = "second_diff",
    low: float = 0.1,
    high: float = 0.9,
) -> float:
    """DBSCAN radius from the elbow of the sorted k-distance curve ([ours]: the paper only names a "secondary-range
    elbow judgement strategy").

    d_i is the Euclidean distance from point i to its ``min_samples``-th nearest *other* point, sorted ascending.
    ``"second_diff"``: the knee is the argmax of d_{i+1} - 2 d_i + d_{i-1} over the secondary range
    i in [floor(low M), ceil(high M)] (clipped to [1, M - 2]). ``"kneedle"``: a simplified Kneedle (Satopaa et al.
    2011, no smoothing): with x and d rescaled to [0, 1], the knee maximises x - d (the curve's largest drop below
    its chord). eps = max(d_knee, 1e-6).

    Args:
        points: (M, d) points (the L2-normalised token embeddings).
        min_samples: which neighbour defines d_i (reduced to M - 1 when there are fewer other points).
        method: ``"second_diff"`` or ``"kneedle"``.
        low: start of the secondary range as a fraction of M.
        high: end of the secondary range as a fraction of M.

    Returns:
        eps, a positive finite float (1e-6 when M < 2).
    """
    if method not in ELBOW_METHODS:
        raise ValueError(f"elbow method must be one of {ELBOW_METHODS}, got {method!r}")
    if not isinstance(min_samples, int) or min_samples < 1:
        raise ValueError(f"min_samples must be an int >= 1, got {min_samples!r}")
    if not 0 <= low <= high <= 1:
        raise ValueError(f"low and high must satisfy 0 <= low <= high <= 1, got {low} and {high}")
    pts = np.asarray(points, dtype=np.float64)
    m = pts.shape[0]
    if m < 2:
        return _EPS_FLOOR
    k = min(min_samples, m - 1)
    dist, _ = NearestNeighbors(n_neighbors=k).fit(pts).kneighbors()  # query points are not their own neighbours
    d = np.sort(dist[:, k - 1])
    if method == "kneedle":
        span = d[-1] - d[0]
        if span <= 0:
            knee = 0
        else:
            x = np.linspace(0.0, 1.0, m)
            knee = int(np.argmax(x - (d - d[0]) / span))
    else:
        lo = max(1, math.floor(low * m))
        hi = min(m - 2, math.ceil(high * m))
        if lo > hi:  # too few points for a second difference: take the median distance
            knee = m // 2
        else:
            second = d[lo + 1 : hi + 2] - 2.0 * d[lo : hi + 1] + d[lo - 1 : hi]
            knee = lo + int(np.argmax(second))
    eps = float(d[knee])
    return eps if math.isfinite(eps) and eps > _EPS_FLOOR else _EPS_FLOOR


def nearest_allowed(vectors: Tensor, z: Tensor, allowed: Tensor, *, chunk: int = 8192) -> Tensor:
    """Nearest allowed token (Euclidean, in the raw embedding space) of each vector.

    Computed as argmin_w ||z_w||^2 - 2 z_w . v over vocabulary chunks (ties: the smaller id).

    Args:
        vectors: (P, d) query vectors.
        z: (V, d) embedding table.
        allowed: (A,) sorted long ids of the allowed vocabulary.
        chunk: vocabulary rows per matrix product.

    Returns:
        (P,) long token ids.
    """
    v = vectors.double()
    best_val = torch.full((v.shape[0],), math.inf, dtype=torch.float64)
    best_id = torch.zeros(v.shape[0], dtype=torch.long)
    for start in range(0, allowed.numel(), chunk):
        ids = allowed[start : start + chunk]
        rows = z[ids].double()  # (c, d)
        score = (rows * rows).sum(-1)[None, :] - 2.0 * v @ rows.T  # (P, c)
        val, arg = score.min(dim=1)
        better = val < best_val
        best_val = torch.where(better, val, best_val)
        best_id = torch.where(better, ids[arg], best_id)
    return best_id


def _position_order(tokens: list[int], alpha: np.ndarray, positions: np.ndarray) -> list[int]:
    """Indices of the chosen tokens sorted by (position ascending, alpha descending, index)."""
    return sorted(tokens, key=lambda i: (int(positions[i]), -float(alpha[i]), i))


def _cap(chosen: list[int], alpha: np.ndarray, positions: np.ndarray, n_max: int) -> list[int]:
    if len(chosen) > n_max:
        chosen = sorted(chosen, key=lambda i: (-float(alpha[i]), i))[:n_max]
    return _position_order(chosen, alpha, positions)


def _representatives(labels: np.ndarray, alpha: np.ndarray) -> list[int]:
    reps = []
    for c in sorted(set(labels.tolist()) - {-1}):
        members = np.flatnonzero(labels == c)
        reps.append(int(members[np.argmax(alpha[members])]))  # first member wins ties
    return reps


def aggregate(
    prompts: Sequence[Sequence[int]],
    z: Tensor,
    *,
    previous: Sequence[int],
    mode: str = "dbscan",
    min_samples: int = 2,
    elbow: str = "second_diff",
    temperature: float = 1.0,
    n_max: int = 16,
    allowed: Tensor | None = None,
    seed: int = 0,
) -> AggregationResult:
    """Aggregate the clients' discrete prompts into a global prompt (F6).

    Args:
        prompts: one token-id list per client (lengths may differ).
        z: (V, d) token-embedding table.
        previous: the current global prompt (fallback; its length is N for ``"topn"`` and ``"kmeans"``).
        mode: ``"dbscan"`` (FedDTPT), ``"mean"`` (Server-1), ``"topn"`` (Server-2), ``"kmeans"`` (Server-3).
        min_samples: DBSCAN ``min_samples`` and the neighbour rank of the elbow curve.
        elbow: elbow method of :func:`elbow_eps`.
        temperature: attention softmax temperature.
        n_max: maximum global prompt length.
        allowed: (A,) allowed token ids; needed by ``"mean"`` (nearest-token mapping).
        seed: random state of k-means.

    Returns:
        The aggregation result.
    """
    if mode not in SERVER_MODES:
        raise ValueError(f"server mode must be one of {SERVER_MODES}, got {mode!r}")
    if not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"n_max must be an int >= 1, got {n_max!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if not previous:
        raise ValueError("previous must be a non-empty token-id list")
    ids = torch.as_tensor([t for p in prompts for t in p], dtype=torch.long)  # (M,)
    if int(ids.min()) < 0 or int(ids.max()) >= z.shape[0]:
        raise ValueError(f"token ids must lie in [0, {z.shape[0]}), got range [{int(ids.min())}, {int(ids.max())}]")
    client_of = torch.as_tensor([k for k, p in enumerate(prompts) for _ in p], dtype=torch.long)
    positions = np.asarray([n for p in prompts for n in range(len(p))], dtype=np.int64)
    emb = z[ids].double()  # (M, d)
    _, alpha_t = attention_weights(emb, client_of, temperature=temperature)
    alpha = alpha_t.numpy()
    points = F.normalize(emb, dim=-1).numpy()  # (M, d)
    n_target = min(len(previous), n_max)

    if mode == "mean":
        if allowed is None:
            raise ValueError("mode 'mean' needs the allowed vocabulary (allowed=...)")
        length = min(len(p) for p in prompts)
        per_pos = torch.stack([z[torch.as_tensor([p[n] for p in prompts])].double().mean(0) for n in range(length)])
        new = nearest_allowed(per_pos, z, allowed).tolist()[:n_max]
        return AggregationResult(new, alpha_t, None, len(new), 0, False)

    if mode == "topn":
        seen: set[int] = set()
        chosen: list[int] = []
        for i in sorted(range(len(ids)), key=lambda i: (-float(alpha[i]), i)):
            if int(ids[i]) not in seen:  # [ours] one copy per token id, else top-N repeats one shared token
                seen.add(int(ids[i]))
                chosen.append(i)
            if len(chosen) == n_target:
                break
        order = _position_order(chosen, alpha, positions)
        return AggregationResult([int(ids[i]) for i in order], alpha_t, None, len(order), 0, False)

    if mode == "kmeans":
        distinct = len(np.unique(points.round(12), axis=0))
        n_clusters = max(1, min(n_target, distinct))
        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(points).labels_
        order = _cap(_representatives(labels, alpha), alpha, positions, n_max)
        return AggregationResult([int(ids[i]) for i in order], alpha_t, None, n_clusters, 0, False)

    eps = elbow_eps(points, min_samples=min_samples, method=elbow)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="euclidean").fit(points).labels_
    reps = _representatives(labels, alpha)
    n_noise = int((labels == -1).sum())
    if not reps:
        return AggregationResult(list(previous), alpha_t, eps, 0, n_noise, True)
    order = _cap(reps, alpha, positions, n_max)
    return AggregationResult([int(ids[i]) for i in order], alpha_t, eps, len(reps), n_noise, False)
