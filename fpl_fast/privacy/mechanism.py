"""The Gaussian mechanisms of DP-FPL: local clipping + noise, server noise, and their accounting.

Glue between the fused op ``ops.dp_lowrank_clip_noise`` (clipping and local noise), a Philox noise
stream and the accountant. Nothing here knows about CLIP: it gets per-sample context gradients and
the prompt factors as tensors.

Mechanisms per step (docs/method.md section 2; unit of privacy: one example of one client, add/remove):

- Local DP: per-sample g_U,i, g_V,i (or fedotp's g_L,i) clipped to C, summed, plus
  N(0, (sigma_l C)^2), divided by b. The accountant's multiplier is :func:`accountant_noise_multiplier`.
- Global DP: per-sample g_G,i clipped to C and averaged on the client (the fused op's third output);
  the server averages the K clients and adds N(0, (sigma_g C / (b K))^2)
  (:func:`server_aggregate_global`).
- The DP-FPL authors' promptfl (``--promptfl-client-noise``): every client also adds N(0, (sigma_g C / b)^2) to its
  clipped gradient of G before sending it (:func:`client_noise_global`); with the server's noise that is one
  Gaussian on the mean (:func:`promptfl_accountant_noise_multiplier`).
- Output-space DP (``--clip-mode output``, docs/method.md section 2): each example's cotangent
  dl_i/dT w.r.t. the class text features is clipped to C_o, summed, noised once with N(0, (sigma C_o)^2) on the
  client and divided by b (:func:`privatize_output`); every prompt gradient is one vjp of that release, so the
  local prompt, the global prompt and both together are covered by this one Gaussian mechanism (multiplier sigma).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fpl_fast import ops
from fpl_fast.validation import check, is_int

__all__ = [
    "ClipMode",
    "NoiseStream",
    "take_each",
    "LocalDP",
    "LocalDPResult",
    "privatize_local",
    "accountant_noise_multiplier",
    "global_accountant_noise_multiplier",
    "combined_noise_multiplier",
    "server_aggregate_global",
    "client_noise_global",
    "promptfl_noise_std",
    "promptfl_accountant_noise_multiplier",
    "OUTPUT_HEADS",
    "OutputDP",
    "OutputDPResult",
    "output_clip_bound",
    "privatize_output",
]

ClipMode = Literal["sample", "batch"]

_SEED_BOUND = 2**63 - 1  # the ops take int64 seeds and offsets


# ----------------------------------------------------------------------------------------------
# Noise stream
# ----------------------------------------------------------------------------------------------
class NoiseStream:
    """Hands out non-overlapping (seed, offset) slices of one Philox4x32-10 stream.

    Each Philox counter yields 4 normals, so a draw of ``numel`` normals at (seed, offset) uses
    counters offset .. offset + ceil(numel / 4) - 1; :meth:`take` returns the current offset and
    advances it past them, so successive calls never reuse noise, and a run is reproducible from one
    seed. The state is just (seed, offset), for checkpoints.

    Args:
        generator: an int seed in [0, 2^63), or a ``torch.Generator`` from which the seed is drawn.
        offset: the first free counter (0 for a fresh stream).
    """

    def __init__(self, generator: torch.Generator | int, offset: int = 0) -> None:
        if isinstance(generator, torch.Generator):
            seed = int(torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=generator.device).item())
        elif isinstance(generator, int) and not isinstance(generator, bool):
            seed = generator
        else:
            raise ValueError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
        check(0 <= seed < _SEED_BOUND, f"seed must be in [0, 2^63), got {seed}")
        check(isinstance(offset, int) and 0 <= offset < _SEED_BOUND, f"offset must be in [0, 2^63), got {offset}")
        self._seed = seed
        self._offset = offset

    @property
    def seed(self) -> int:
        """The Philox key."""
        return self._seed

    @property
    def offset(self) -> int:
        """The next free counter."""
        return self._offset

    @staticmethod
    def counters(numel: int) -> int:
        """Philox counters a draw of ``numel`` normals consumes: ceil(numel / 4)."""
        return (numel + 3) // 4

    def take(self, numel: int) -> tuple[int, int]:
        """Reserve ``numel`` normals; returns the (seed, offset) to pass to the op.

        Args:
            numel: normals the next op call draws (``reference.dp_noise_numel`` /
                ``reference.factorize_noise_numel``; 0 when it draws none).
        """
        check(isinstance(numel, int) and numel >= 0, f"numel must be an integer >= 0, got {numel!r}")
        out = (self._seed, self._offset)
        self._offset += self.counters(numel)
        check(self._offset < _SEED_BOUND, f"noise stream exhausted at offset {self._offset}")
        return out

    def normal(self, numel: int, device: torch.device | str = "cpu") -> Tensor:
        """``numel`` fresh N(0, 1) float32 normals from the stream (``reference.philox_normal``)."""
        seed, offset = self.take(numel)
        return ops.philox_normal(seed, offset, numel, device)

    def state(self) -> tuple[int, int]:
        """(seed, offset): everything needed to resume."""
        return self._seed, self._offset

    @classmethod
    def from_state(cls, state: tuple[int, int]) -> NoiseStream:
        """The stream saved by :meth:`state`."""
        seed, offset = state
        return cls(int(seed), offset=int(offset))

    def state_dict(self) -> dict[str, int]:
        """Checkpointable form of :meth:`state`."""
        return {"seed": self._seed, "offset": self._offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from :meth:`state_dict`."""
        restored = NoiseStream(int(state["seed"]), offset=int(state["offset"]))
        self._seed, self._offset = restored.state()

    def __repr__(self) -> str:
        return f"NoiseStream(offset={self._offset})"  # never the key: reprs end up in logs


def take_each(streams: Sequence[NoiseStream], numel: int) -> tuple[list[int], list[int]]:
    """Reserve ``numel`` normals from each client's stream: the (seed, offset) lists the noise ops take."""
    taken = [s.take(numel) for s in streams]
    return [t[0] for t in taken], [t[1] for t in taken]


# ----------------------------------------------------------------------------------------------
# Local DP
# ----------------------------------------------------------------------------------------------
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
    """

    clip_norm: float
    noise_multiplier: float
    clip_mode: ClipMode = "sample"
    joint_uv: bool = True
    expected_batch_size: float | None = None

    def __post_init__(self) -> None:
        check(
            not math.isnan(self.clip_norm) and self.clip_norm > 0,
            f"clip_norm must be > 0 (inf disables clipping), got {self.clip_norm}",
        )
        check(
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0,
            f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}",
        )
        check(
            self.noise_multiplier == 0 or math.isfinite(self.clip_norm),
            f"clip_norm must be finite when noise_multiplier > 0 (the noise std is sigma C), got {self.clip_norm}",
        )
        check(self.clip_mode in ("sample", "batch"), f"clip_mode must be 'sample' or 'batch', got {self.clip_mode!r}")
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
        noise_std: std of the noise added to each entry of the local gradients (sigma C / b).
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

    Returns:
        A :class:`LocalDPResult` (without K when grad_ctx has none).
    """
    check((u is None) == (v is None), "u and v must be given together or not at all")
    plain = 4 if sum_classes else 3
    check(
        grad_ctx.dim() in (plain, plain + 1),
        f"grad_ctx must be {plain}-D or {plain + 1}-D (K first) with sum_classes={sum_classes}, "
        f"got shape {tuple(grad_ctx.shape)}",
    )
    batched = grad_ctx.dim() == plain + 1
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
    out_a, out_b, grad_g, norms = ops.dp_lowrank_clip_noise(
        grad_ctx,
        u,
        v,
        clip_norm=cfg.clip_norm,
        noise_multiplier=sigma,
        seed=seed,
        offset=offset,
        expected_batch_size=denom,
        joint_uv=cfg.joint_uv,
        per_sample=cfg.clip_mode == "sample",
        sum_classes=sum_classes,
    )
    C = cfg.clip_norm
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
        noise_std=sigma * C / denom if sigma > 0 else 0.0,
        batch_size=denom,
    )


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
    check(
        math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier}",
    )
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


# ----------------------------------------------------------------------------------------------
# Global DP (server)
# ----------------------------------------------------------------------------------------------
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
    check(
        math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier}",
    )
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
    clip_norm: float,
    noise_multiplier: float,
    batch_size: float,
    streams: Sequence[NoiseStream],
) -> Tensor:
    """The DP-FPL authors' promptfl client noise: client k adds N(0, (sigma_g C / b)^2) per entry to its clipped,
    batch-averaged gradient of G before it leaves the client (their DP_FPL.py:282-284), from its own secret
    ``streams[k]`` (never torch's global generator, so its noise is its own and checkpoints replay it).

    Args:
        client_grads: (K_a, n_ctx, d) the active clients' clipped gradients of G.
        clip_norm: C (finite).
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
    check(
        math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier}",
    )
    if noise_multiplier == 0:
        return client_grads
    check(math.isfinite(clip_norm) and clip_norm > 0, f"clip_norm must be finite and > 0 for noise, got {clip_norm}")
    check(math.isfinite(batch_size) and batch_size > 0, f"batch_size must be finite and > 0, got {batch_size}")
    numel = client_grads[0].numel()
    z = torch.stack([s.normal(numel, client_grads.device) for s in streams]).view_as(client_grads)
    return client_grads + (z * (noise_multiplier * clip_norm / batch_size)).to(client_grads.dtype)


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
    check(
        math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier}",
    )
    check(clip_mode in ("sample", "batch"), f"clip_mode must be 'sample' or 'batch', got {clip_mode!r}")
    check(math.isfinite(batch_size) and batch_size > 0, f"batch_size must be finite and > 0, got {batch_size}")
    std = promptfl_noise_std(noise_multiplier, clip_norm=1.0, batch_size=batch_size, active_clients=active_clients)
    per_client = 1.0 / batch_size if clip_mode == "sample" else 2.0  # one example's move of g_k (C = 1)
    return std / (per_client / active_clients)


# ----------------------------------------------------------------------------------------------
# Output-space DP
# ----------------------------------------------------------------------------------------------
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
    check(text_feats.dim() == 3, f"text_feats must be 3-D (K, n_cls, D), got shape {tuple(text_feats.shape)}")
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
        clip_norm: C_o > 0 for every client, or ``"auto"`` (:func:`output_clip_bound`, one per client per step).
        noise_multiplier: sigma >= 0: the noise on the clipped sum has std sigma C_o.
        denominator: b, or the expected batch size under Poisson sampling.
        head: the logit head (``"auto"`` needs one of :data:`OUTPUT_HEADS`).
    """

    clip_norm: float | str
    noise_multiplier: float
    denominator: float
    head: str = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.clip_norm, str):
            check(self.clip_norm == "auto", f"output clip norm must be a number > 0 or 'auto', got {self.clip_norm!r}")
            _check_auto_head(self.head)
        else:
            check(
                math.isfinite(self.clip_norm) and self.clip_norm > 0,
                f"output clip norm must be a finite number > 0 or 'auto', got {self.clip_norm}",
            )
        check(
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0,
            f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}",
        )
        check(
            math.isfinite(self.denominator) and self.denominator > 0,
            f"denominator must be finite and > 0, got {self.denominator}",
        )


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
    if cfg.clip_norm == "auto":
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
