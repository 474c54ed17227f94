"""The global prompt's noise: the server's Gaussian on the clients' mean, and the authors' promptfl client noise.

Per step (docs/design.md section 2): the server averages the K clients' clipped gradients of G and adds
N(0, (sigma_g C / (b K))^2) (:func:`server_aggregate_global`); with ``--promptfl-client-noise`` every client also adds
N(0, (sigma_g C / b)^2) before sending (:func:`client_noise_global`). Their multipliers:
:mod:`fpl_fast.privacy.sensitivity`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fpl_fast.ops.checks import check_noise_multiplier
from fpl_fast.privacy.noise_stream import NoiseStream
from fpl_fast.validation import check

__all__ = ["client_noise_global", "server_aggregate_global"]


def server_aggregate_global(
    client_grads: Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    batch_size: float,
    stream: NoiseStream,
) -> Tensor:
    """Average the clients' clipped global-prompt gradients and add the server's Gaussian noise.

    out = mean_k client_grads[k] + N(0, (sigma_g C / (b K))^2) per entry, so one example's influence
    C / (b K) is covered with noise multiplier sigma_g. The noise comes from the server's own ``stream``
    (``reference.philox_normal`` at the stream's next slice), apart from every client's.

    Args:
        client_grads: (K, n_ctx, d) each client's clipped, batch-averaged gradient of G
            (``LocalDPResult.grad_global``) for the K participating clients.
        clip_norm: C used by the clients (finite).
        noise_multiplier: sigma_g >= 0.
        batch_size: b, the per-client (expected) batch size the clients divided by.
        stream: the server's noise stream.

    Returns:
        (n_ctx, d) noisy average, in client_grads' dtype.
    """
    check(client_grads.dim() == 3, f"client_grads must be 3-D (K, n_ctx, d), got shape {tuple(client_grads.shape)}")
    check(client_grads.shape[0] >= 1, "client_grads must hold at least one client, got K=0")
    check(
        math.isfinite(clip_norm) and clip_norm > 0,
        f"clip_norm must be finite and > 0 for server noise, got {clip_norm}",
    )
    check_noise_multiplier(noise_multiplier)
    check(math.isfinite(batch_size) and batch_size > 0, f"batch_size must be finite and > 0, got {batch_size}")
    K = client_grads.shape[0]
    mean = client_grads.mean(dim=0)  # (n_ctx, d)
    if noise_multiplier == 0:
        return mean
    std = noise_multiplier * clip_norm / (batch_size * K)
    z = stream.normal(mean.numel(), client_grads.device).view_as(mean)
    return mean + (std * z).to(mean.dtype)


def client_noise_global(
    client_grads: Tensor,
    *,
    clip_norm: float | Tensor,
    noise_multiplier: float,
    batch_size: float,
    streams: Sequence[NoiseStream],
) -> Tensor:
    """The DP-FPL authors' promptfl client noise: client k adds N(0, (sigma_g C / b)^2) per entry to its clipped,
    batch-averaged gradient of G before it leaves the client (docs/design.md section 5), from its own secret
    ``streams[k]`` (never torch's global generator, so its noise is its own and checkpoints replay it).

    Args:
        client_grads: (K_a, n_ctx, d) the active clients' clipped gradients of G.
        clip_norm: C (finite), or (K_a, 1, 1) each client's C (adaptive clipping).
        noise_multiplier: sigma_g >= 0 (0: returned unchanged, nothing drawn).
        batch_size: b, the denominator of the clipped gradients.
        streams: one noise stream per row.

    Returns:
        (K_a, n_ctx, d) the noised gradients, in client_grads' dtype.
    """
    check(client_grads.dim() == 3, f"client_grads must be 3-D (K, n_ctx, d), got shape {tuple(client_grads.shape)}")
    check(
        len(streams) == client_grads.shape[0],
        f"streams must hold one noise stream per client ({client_grads.shape[0]}), got {len(streams)}",
    )
    check_noise_multiplier(noise_multiplier)
    if noise_multiplier == 0:
        return client_grads
    finite = bool(torch.isfinite(clip_norm).all()) if isinstance(clip_norm, Tensor) else math.isfinite(clip_norm)
    positive = bool((torch.as_tensor(clip_norm) > 0).all())
    check(finite and positive, f"clip_norm must be finite and > 0 for noise, got {clip_norm}")
    check(math.isfinite(batch_size) and batch_size > 0, f"batch_size must be finite and > 0, got {batch_size}")
    numel = client_grads[0].numel()
    z = torch.stack([s.normal(numel, client_grads.device) for s in streams]).view_as(client_grads)
    return client_grads + (z * (noise_multiplier * clip_norm / batch_size)).to(client_grads.dtype)
