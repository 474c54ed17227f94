"""Sensitivity of each clipped release: the noise multiplier the accountant must be told for it.

One example's influence on a release, in units of the noise std (docs/design.md section 2): per-sample clipping
moves a sum by <= C, batch-mean clipping (the DP-FPL authors') moves clip(mean) by <= 2C, separate clipping of U and
V moves the pair by <= sqrt(2) C, and releases of the same batch combine into one Gaussian.
"""

from __future__ import annotations

import math

from fpl_fast.ops.checks import check_noise_multiplier
from fpl_fast.privacy.clipping import ClipMode, LocalDP
from fpl_fast.validation import check, is_int

__all__ = [
    "accountant_noise_multiplier",
    "combined_noise_multiplier",
    "global_accountant_noise_multiplier",
    "promptfl_accountant_noise_multiplier",
    "promptfl_noise_std",
]


def _sensitivity_factor(clip_mode: str, batch_size: float | None) -> float:
    """How many C's one example can move the clipped release, in units of the noise's b."""
    check(clip_mode in ("sample", "batch"), f"clip_mode must be 'sample' or 'batch', got {clip_mode!r}")
    if clip_mode == "sample":
        return 1.0
    check(
        batch_size is not None and math.isfinite(batch_size) and batch_size > 0,
        f"batch clip_mode needs the batch size (finite and > 0) to state its guarantee, got {batch_size}",
    )
    # clip(mean) has norm <= C, so neighbouring batches differ by up to 2C, while the noise std is
    # sigma C / b: relative to the per-sample mechanism the sensitivity is 2 b times larger.
    return 2.0 * float(batch_size)  # type: ignore[arg-type]


def accountant_noise_multiplier(cfg: LocalDP, *, lowrank: bool = True, batch_size: float | None = None) -> float:
    """The noise multiplier the accountant must be told for the local mechanism.

    - joint clipping of (g_U,i, g_V,i) to C: one example moves the pair by <= C: sigma_l;
    - the authors' separate clipping (``joint_uv=False``): g_U,i and g_V,i are each clipped to C
      and each noised with sigma_l C, so the pair moves by up to sqrt(2) C: sigma_l / sqrt(2);
    - fedotp's full local prompt (``lowrank=False``): one clipped gradient: sigma_l.

    In ``clip_mode="batch"`` the batch mean is clipped, so two neighbouring batches can differ by
    2C in the release while the noise std stays sigma_l C / b: the multiplier is further divided by
    2 b. That is the honest worst case of the authors' scheme (which is not a per-example guarantee
    as they state it).

    Args:
        cfg: the local-DP configuration.
        lowrank: the local prompt is released as factors U, V (dplora, dpfpl, fedpgp); False for
            fedotp's full L.
        batch_size: b for ``clip_mode="batch"`` (default ``cfg.expected_batch_size``).
    """
    b = batch_size if batch_size is not None else cfg.expected_batch_size
    sigma = cfg.noise_multiplier / _sensitivity_factor(cfg.clip_mode, b)
    if lowrank and not cfg.joint_uv:
        sigma /= math.sqrt(2.0)
    return sigma


def global_accountant_noise_multiplier(
    noise_multiplier: float, *, clip_mode: ClipMode = "sample", batch_size: float | None = None
) -> float:
    """The noise multiplier the accountant must be told for the global prompt's release.

    Per-sample mode: one example moves the server's mean by <= C / (b K) and the noise std is
    sigma_g C / (b K): sigma_g. Batch mode: it moves it by <= 2 C / K: sigma_g / (2 b).
    """
    check_noise_multiplier(noise_multiplier)
    return noise_multiplier / _sensitivity_factor(clip_mode, batch_size)


def combined_noise_multiplier(*multipliers: float) -> float:
    """One Gaussian mechanism equivalent to several released on the same sampled batch each step.

    Releases with multipliers sigma_1, sigma_2, ... of the same batch form one Gaussian mechanism of multiplier
    sigma_eff = (sum_j sigma_j^-2)^(-1/2) (the privacy loss of a Gaussian is ||sensitivity / std||^2 / 2, and the
    normalised sensitivities add in squares); 0 (no privacy) when any release is noiseless. This is what an
    observer of both the local and the global prompt learns: composing them as two independently sampled event
    sequences would understate epsilon.
    """
    check(len(multipliers) >= 1, "combined_noise_multiplier needs at least one multiplier")
    for m in multipliers:
        check(math.isfinite(m) and m >= 0, f"noise multipliers must be finite and >= 0, got {m}")
    if any(m == 0 for m in multipliers):
        return 0.0
    return sum(m**-2 for m in multipliers) ** -0.5


def promptfl_noise_std(noise_multiplier: float, *, clip_norm: float, batch_size: float, active_clients: int) -> float:
    """Std per entry of all the noise on the server's mean with the authors' promptfl client noise.

    mean_k (g_k + z_k) + z_s with z_k ~ N(0, (sigma C / b)^2) on each of the K_a clients and z_s ~
    N(0, (sigma C / (b K_a))^2) from the server: the noise (1/K_a) sum_k z_k + z_s is one Gaussian of variance
    (sigma C / b)^2 / K_a + (sigma C / (b K_a))^2, i.e. std (sigma C / b) sqrt(1/K_a + 1/K_a^2).
    """
    check(
        is_int(active_clients) and active_clients >= 1,
        f"active_clients must be an integer >= 1, got {active_clients!r}",
    )
    ka = float(active_clients)
    return noise_multiplier * clip_norm / batch_size * math.sqrt(1.0 / ka + 1.0 / ka**2)


def promptfl_accountant_noise_multiplier(
    noise_multiplier: float, *, clip_mode: ClipMode = "batch", batch_size: float, active_clients: int
) -> float:
    """The multiplier the accountant is told for G's release with the authors' promptfl client noise.

    It is the std of the one Gaussian on the mean (:func:`promptfl_noise_std`) over the sensitivity of that mean
    to one example, which changes one client's clipped gradient g_k: by <= 2C in batch mode (g_k = clip(batch
    mean), norm <= C on both sides), by <= C / b in sample mode (g_k = sum of clipped examples / b); the mean moves
    by 1/K_a of that. So, in units where C = 1:

        batch:  (sigma / b) sqrt(1/K_a + 1/K_a^2) / (2 / K_a) = sigma sqrt(K_a + 1) / (2 b)
        sample: (sigma / b) sqrt(1/K_a + 1/K_a^2) / (1 / (b K_a)) = sigma sqrt(K_a + 1)

    (without client noise: sigma / (2 b) and sigma, :func:`global_accountant_noise_multiplier`). It grows with K_a,
    so the caller passes the fewest clients a step can average (the server samples max(1, round(fraction K)) each
    round). This is the guarantee of G as released (trusted server); what the server itself sees of one client,
    g_k + z_k, has the multiplier without client noise on its own.
    """
    check_noise_multiplier(noise_multiplier)
    check(clip_mode in ("sample", "batch"), f"clip_mode must be 'sample' or 'batch', got {clip_mode!r}")
    check(math.isfinite(batch_size) and batch_size > 0, f"batch_size must be finite and > 0, got {batch_size}")
    std = promptfl_noise_std(noise_multiplier, clip_norm=1.0, batch_size=batch_size, active_clients=active_clients)
    per_client = 1.0 / batch_size if clip_mode == "sample" else 2.0  # one example's move of g_k (C = 1)
    return std / (per_client / active_clients)
