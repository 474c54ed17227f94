"""The noise plan of a run and each client's privacy ledger.

The plan says which noise multipliers are in force (given with --noise or calibrated for --epsilon) and what
the accountant is told for each release: the sensitivity of what is clipped decides it (sensitivity.py explains
the factors). Each client holds a :class:`ClientAccountant` that counts the noised steps it really took and
composes them when its epsilon is asked for, so a client that skipped rounds is accounted for what it did.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from fpl_fast.config import AccountantName, RunConfig, SamplingName, clients_dropped, clients_per_round
from fpl_fast.privacy.accountant import calibrate_noise, epsilon_for, paper_noise_multiplier
from fpl_fast.privacy.adaptive_clip import AdaptiveClipping, Quantities, count_noise_std, quantities, with_counts
from fpl_fast.privacy.clipping import LocalDP
from fpl_fast.privacy.sensitivity import (
    accountant_noise_multiplier,
    combined_noise_multiplier,
    global_accountant_noise_multiplier,
    promptfl_accountant_noise_multiplier,
)
from fpl_fast.prompts import get_factorization

__all__ = [
    "NoisePlan",
    "active_clients",
    "clipped_quantities",
    "plan_noise",
    "global_release_noise",
    "trust_model",
    "ClientAccountant",
    "Epsilons",
]


@dataclass(frozen=True)
class NoisePlan:
    """Noise multipliers in force and what the accountant is told.

    sigma_local / sigma_global: the std of the added noise over the clip norm C.
    accountant_local / accountant_global: the multipliers the accountant composes (separate clipping of U and V
    moves the pair by sqrt(2) C; batch-mean clipping lets one example move the clipped mean by 2 C against noise
    sigma C / b).
    accountant_total: the multiplier of both releases seen together (one Gaussian on the same batch per step,
    ``combined_noise_multiplier``); the global one alone when there is no local prompt (promptfl).
    count_noise / n_counts: with adaptive clipping, the std sigma_b of the noise on each of the n_counts centred
    counts per client and step; the three accountant multipliers then include the counts (each clip norm shapes both
    prompts' releases, :func:`fpl_fast.privacy.adaptive_clip.with_counts`).
    """

    sigma_local: float
    sigma_global: float
    accountant_local: float
    accountant_global: float
    accountant_total: float
    note: str = ""
    count_noise: float = 0.0
    n_counts: int = 0

    @classmethod
    def from_sigmas(cls, cfg: RunConfig, sigma_local: float, sigma_global: float, note: str = "") -> NoisePlan:
        """The plan of these noise multipliers: the accountant's multipliers follow from the sensitivities, and with
        adaptive clipping sigma_b from the count budget."""
        acc_l, acc_g = _accountant_multipliers(cfg, sigma_local, sigma_global)
        total = _total_multiplier(cfg, acc_l, acc_g)
        if not cfg.adaptive_clip:
            return cls(sigma_local, sigma_global, acc_l, acc_g, total, note)
        n = len(clipped_quantities(cfg))
        sigma_b = count_noise_std(total, n, cfg.count_budget)
        acc_l, acc_g, total = (with_counts(m, sigma_b, n) for m in (acc_l, acc_g, total))
        return cls(sigma_local, sigma_global, acc_l, acc_g, total, note, sigma_b, n)

    def adaptive_clipping(self, cfg: RunConfig) -> AdaptiveClipping:
        """The clip-norm update of an adaptive run, with this plan's count noise."""
        return AdaptiveClipping(
            target_quantile=cfg.target_quantile,
            lr=cfg.clip_lr,
            clip_min=cfg.clip_min,
            clip_max=cfg.clip_max,
            count_noise=self.count_noise,
            expected_batch_size=float(cfg.batch_size),
        )


def clipped_quantities(cfg: RunConfig) -> Quantities:
    """The quantities the run clips (each with its own clip norm and, when adaptive, its own count)."""
    scheme = get_factorization(cfg.factorization)
    return quantities(
        clips_factors=scheme.clips_factors,
        has_local=scheme.has_local,
        joint_uv=cfg.clip_uv == "joint",
        output_mode=cfg.clip_mode == "output",
    )


def _accountant_multipliers(cfg: RunConfig, sigma_local: float, sigma_global: float) -> tuple[float, float]:
    """What the accountant is told for the local and the global release."""
    if cfg.clip_mode == "output":  # one release Z per step, sensitivity C_o, noise sigma C_o: multiplier sigma
        return sigma_local, sigma_local
    b = float(cfg.batch_size)  # the denominator of the clipped sums (fixed, or expected under Poisson sampling)
    local_cfg = LocalDP(
        clip_norm=1.0,  # the multipliers do not depend on C
        noise_multiplier=sigma_local,
        clip_mode=cfg.clip_mode,
        joint_uv=cfg.clip_uv == "joint",
    )
    lowrank = get_factorization(cfg.factorization).clips_factors
    local = accountant_noise_multiplier(local_cfg, lowrank=lowrank, batch_size=b)
    if cfg.promptfl_client_noise:  # the authors' client noise and the server's: one Gaussian on the mean
        glob = promptfl_accountant_noise_multiplier(
            sigma_global, clip_mode=cfg.clip_mode, batch_size=b, active_clients=active_clients(cfg)
        )
    else:
        glob = global_accountant_noise_multiplier(sigma_global, clip_mode=cfg.clip_mode, batch_size=b)
    return local, glob


def active_clients(cfg: RunConfig) -> int:
    """K_a, the clients averaged in every step: the server samples exactly m each round and floor(P m) of them drop
    out (--client-drop-rate P), so m - floor(P m) report."""
    m = clients_per_round(cfg.client_fraction, cfg.num_users)
    return m - clients_dropped(cfg.client_drop_rate, m)


def _total_multiplier(cfg: RunConfig, local: float, glob: float) -> float:
    """The multiplier of everything a client releases per step (the global prompt alone without a local prompt;
    output mode: both prompts are functions of the one release, so its multiplier is the total)."""
    if not get_factorization(cfg.factorization).has_local or cfg.clip_mode == "output":
        return glob
    return combined_noise_multiplier(local, glob)


def plan_noise(cfg: RunConfig, *, sample_rate: float, steps: int) -> NoisePlan:
    """Noise multipliers from --noise, or calibrated from --epsilon (accountant or the authors' formula) for the
    largest sampling rate and the most steps any client takes."""
    notes = []
    if cfg.clip_mode == "batch":
        notes.append(
            "clip-mode batch (the authors' batch-mean clipping) is NOT a per-example guarantee: one example can "
            "move the clipped mean by 2C, so the accountant is told sigma / (2b)"
        )
    if cfg.clip_mode == "output":
        clip = "auto (sqrt(2) s / min_c ||T_c|| per client and step)" if cfg.output_clip == "auto" else cfg.output_clip
        notes.append(
            f"clip-mode output: each example's cotangent dl/dT clipped to C_o = {clip}, one Gaussian "
            "N(0, (sigma C_o)^2) per client and step added on the client;"
            " both prompts are post-processing of it (no server noise)"
        )
    if cfg.promptfl_client_noise:
        ka = active_clients(cfg)
        notes.append(
            "promptfl client noise (the authors'): each client adds N(0, (sigma C / b)^2) to its clipped gradient "
            f"of G and the server N(0, (sigma C / (b K_a))^2) to their mean, K_a = {ka}: one Gaussian of std "
            f"(sigma C / b) sqrt(1/K_a + 1/K_a^2), accounted as multiplier sigma sqrt(K_a + 1)"
            + (" / (2b)" if cfg.clip_mode == "batch" else "")
        )
    if cfg.epsilon is None:
        base = cfg.noise or 0.0
        s_l = cfg.noise_local if cfg.noise_local is not None else base
        s_g = cfg.noise_global if cfg.noise_global is not None else base
    elif cfg.calibration == "paper":
        s_l = s_g = paper_noise_multiplier(cfg.epsilon, cfg.delta, cfg.rounds)
        notes.append(
            f"sigma from the authors' formula sqrt(rounds log(1/delta)) / epsilon = {s_l:.4g}; "
            "the epsilon reported is the accountant's for that sigma"
        )
    else:
        need = calibrate_noise(cfg.epsilon, cfg.delta, sample_rate, steps, cfg.accountant, cfg.sampling_scheme)
        # Invert the sensitivity mapping: the accountant needs multiplier `need` after it. All multipliers
        # scale linearly with sigma, so for the total one sigma = need / (the total at sigma 1).
        scale_l, scale_g = _accountant_multipliers(cfg, 1.0, 1.0)
        if cfg.clip_mode == "output":
            s_l = s_g = need / scale_l
        elif cfg.calibrate_for == "total":
            s_l = s_g = need / _total_multiplier(cfg, scale_l, scale_g)
        else:
            s_l, s_g = need / scale_l, need / scale_g
        if cfg.adaptive_clip:
            # The counts' noise scales with the releases' (count_noise_std), so every multiplier is linear in a
            # common factor of (s_l, s_g): scale both until the binding multiplier, counts included, is `need`.
            s_l, s_g = (s * need / _binding_multiplier(cfg, NoisePlan.from_sigmas(cfg, s_l, s_g)) for s in (s_l, s_g))
        what = "epsilon_total (both prompts)" if cfg.calibrate_for == "total" else "each release"
        notes.append(
            f"sigma calibrated with {cfg.accountant.upper()} (dp_accounting) for {what} epsilon={cfg.epsilon}, "
            f"delta={cfg.delta}, q={sample_rate:.4g}, steps={steps}"
        )
    plan = NoisePlan.from_sigmas(cfg, s_l, s_g)
    if cfg.adaptive_clip:
        notes.append(
            f"adaptive clipping: each client's {plan.n_counts} clip norm(s) follow the {cfg.target_quantile:g} "
            f"quantile of its per-example norms from centred counts noised with sigma_b = {plan.count_noise:.4g} "
            f"(multiplier {2 * plan.count_noise:.4g}, {cfg.count_budget:.0%} of each step's budget), counted in every "
            "epsilon"
        )
    if cfg.automatic_clip:
        notes.append(
            f"automatic clipping: each example's gradient divided by its norm + {cfg.clip_stability:g} (sensitivity 1)"
        )
    return dataclasses.replace(plan, note="; ".join(notes))


def _binding_multiplier(cfg: RunConfig, plan: NoisePlan) -> float:
    """The multiplier that --epsilon bounds: the total one, or with --calibrate-for each the smaller of the two."""
    if cfg.clip_mode == "output" or cfg.calibrate_for == "total":
        return plan.accountant_total
    if not get_factorization(cfg.factorization).has_local:
        return plan.accountant_global
    return min(plan.accountant_local, plan.accountant_global)


def global_release_noise(cfg: RunConfig, plan: NoisePlan) -> float:
    """sigma_g of the global prompt's release (by the server with sync="step", by each client with sync="round");
    none in output mode, where the one release of the step already covers G."""
    return 0.0 if cfg.clip_mode == "output" else plan.sigma_global


def trust_model(cfg: RunConfig) -> str:
    """Who must be trusted for epsilon_global to hold."""
    if cfg.clip_mode == "output" or cfg.sync == "round":
        return "no trusted server: every client adds its own noise before anything leaves it"
    return "trusted server: the global prompt's noise is added by the server to the clients' clipped gradients"


@dataclass(frozen=True)
class Epsilons:
    """What one client has spent so far: its local release, its global release and both together."""

    local: float
    global_: float
    total: float


@functools.lru_cache(maxsize=4096)
def _epsilon(
    multiplier: float, q: float, steps: int, delta: float, accountant: AccountantName, sampling: SamplingName
) -> float:
    if steps == 0:
        return 0.0
    if multiplier <= 0:
        return math.inf
    return epsilon_for(multiplier, q, steps, delta, accountant, sampling)


class ClientAccountant:
    """One client's privacy ledger: its subsampled Gaussian mechanism (multipliers of the plan, its own
    sampling rate) and the number of noised steps it took, composed when :meth:`epsilons` is asked."""

    def __init__(self, cfg: RunConfig, plan: NoisePlan, sample_rate: float) -> None:
        self.plan = plan
        self.sample_rate = sample_rate
        self.delta, self.accountant, self.sampling = cfg.delta, cfg.accountant, cfg.sampling_scheme
        self.has_local = get_factorization(cfg.factorization).has_local
        self.steps = 0

    def record_step(self) -> None:
        self.steps += 1

    def _eps(self, multiplier: float) -> float:
        return _epsilon(multiplier, self.sample_rate, self.steps, self.delta, self.accountant, self.sampling)

    def epsilons(self) -> Epsilons:
        p = self.plan
        local = self._eps(p.accountant_local) if self.has_local else 0.0
        return Epsilons(local, self._eps(p.accountant_global), self._eps(p.accountant_total))

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
