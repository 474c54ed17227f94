"""Privacy accounting: a thin, documented layer over Google's dp-accounting.

Why dp-accounting: it is maintained by Google (the library behind TensorFlow Privacy's and JAX
privacy's accountants), framework-independent (NumPy/SciPy only, so it adds nothing to a torch
install), offers both Renyi-DP (RDP) and privacy-loss-distribution (PLD) accountants with Poisson
and fixed-size sampling events, and ships a calibration routine (``calibrate_dp_mechanism``) that
finds the smallest noise meeting a target. No accounting math is written here: this module builds
dp-accounting events for "``steps`` noised steps of a subsampled Gaussian mechanism" and asks the
library for epsilon.

Unit of privacy: one example of one client, add/remove-one neighbouring
(``NeighboringRelation.ADD_OR_REMOVE_ONE``). Each noised step is one Gaussian mechanism of noise
multiplier sigma (noise std / L2 sensitivity) applied to a batch drawn with rate q; the mapping
from the clipping scheme to sigma lives in :mod:`fpl_fast.privacy.sensitivity`.

Sampling:

- ``"poisson"``: every example joins each batch independently with probability q. dp-accounting's
  ``PoissonSampledDpEvent`` is the exact mechanism (up to the accountant's own bounds).
- ``"shuffle"``: shuffled fixed-size batches of b = q n examples. Accounted as Poisson sampling with
  q = b / n, the common practice (Opacus, TensorFlow Privacy). This is an approximation, not a proven
  upper bound: Chua et al. (ICML 2024, "How Private are DP-SGD Implementations?") show shuffling can
  leak more than Poisson sampling at the same q. dp-accounting's alternative,
  ``SampledWithoutReplacementDpEvent``, only exists for RDP and only under replace-one
  neighbouring, which would change the unit of privacy every report states, so it is not used.
- q = 1 (full batch, or the DP-FPL authors' assumption): no subsampling, a composed
  ``GaussianDpEvent``, exact under either sampling.
"""

from __future__ import annotations

import functools
import logging
import math
from contextlib import contextmanager
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.mechanism_calibration import ExplicitBracketInterval, NoBracketIntervalFoundError
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant, rdp_privacy_accountant

from fpl_fast.ops.checks import check_noise_multiplier
from fpl_fast.validation import check

__all__ = [
    "AccountantKind",
    "Sampling",
    "PrivacyAccountant",
    "epsilon_for",
    "calibrate_noise",
    "paper_noise_multiplier",
    "make_dp_accountant",
    "step_event",
]

AccountantKind = Literal["rdp", "pld"]
Sampling = Literal["poisson", "shuffle"]

_NAMES = {"rdp": "dp_accounting.rdp (RDP)", "pld": "dp_accounting.pld (PLD)"}
# PLD discretisation of the privacy loss (dp-accounting's default); smaller is tighter and slower.
PLD_DISCRETIZATION = 1e-4


def _check_kind(kind: str, sampling: str) -> None:
    check(kind in _NAMES, f"kind must be 'rdp' or 'pld', got {kind!r}")
    _check_sampling(sampling)


def _check_sampling(sampling: str) -> None:
    check(sampling in ("poisson", "shuffle"), f"sampling must be 'poisson' or 'shuffle', got {sampling!r}")


def _check_rate(sample_rate: float) -> None:
    check(0 < sample_rate <= 1, f"sample_rate must be in (0, 1], got {sample_rate}")


def _check_delta(delta: float) -> None:
    check(0 < delta < 1, f"delta must be in (0, 1), got {delta}")


def _check_steps(steps: int) -> None:
    check(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")


def make_dp_accountant(kind: AccountantKind) -> RdpAccountant | PLDAccountant:
    """A fresh dp-accounting accountant of the given kind, add/remove-one neighbouring."""
    check(kind in _NAMES, f"kind must be 'rdp' or 'pld', got {kind!r}")
    if kind == "rdp":
        return RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    return PLDAccountant(
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION,
    )


def step_event(noise_multiplier: float, sample_rate: float, sampling: Sampling = "poisson") -> dp_event.DpEvent:
    """The dp-accounting event of one noised step.

    Args:
        noise_multiplier: sigma, noise std over L2 sensitivity.
        sample_rate: q in (0, 1]; 1 means no subsampling.
        sampling: "poisson" or "shuffle" (accounted as Poisson with q = b / n, see the module doc).

    Returns:
        ``GaussianDpEvent(sigma)`` for q = 1, else ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``.
    """
    check_noise_multiplier(noise_multiplier)
    _check_rate(sample_rate)
    _check_sampling(sampling)
    gaussian = dp_event.GaussianDpEvent(float(noise_multiplier))
    if sample_rate == 1:
        return gaussian
    # "shuffle" deliberately maps to the same Poisson event (module docstring says why).
    return dp_event.PoissonSampledDpEvent(float(sample_rate), gaussian)


def _approximation(sample_rate: float, sampling: Sampling) -> str:
    if sample_rate == 1:
        return "no subsampling (q = 1): composed Gaussian mechanism, exact"
    if sampling == "poisson":
        return f"exact Poisson subsampled Gaussian (q = {sample_rate:g})"
    return (
        f"shuffled fixed-size batches accounted as Poisson sampling with q = b/n = {sample_rate:g} "
        "(common practice; not a proven bound for shuffling)"
    )


class _DropExcludedOrders(logging.Filter):
    """dp-accounting logs a warning for every RDP order whose series does not converge; it then
    excludes that order, which only loosens (never breaks) the bound. Those lines drown a progress bar."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


@contextmanager
def _quiet_orders():
    log = logging.getLogger("absl")
    f = _DropExcludedOrders()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


@functools.lru_cache(maxsize=1024)
def _one_step_rdp(noise_multiplier: float, sample_rate: float, sampling: str) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP of one noised step at each order), from dp-accounting's RDP accountant after one step."""
    accountant = make_dp_accountant("rdp")
    with _quiet_orders():
        accountant.compose(step_event(noise_multiplier, sample_rate, sampling), 1)  # type: ignore[arg-type]
    assert isinstance(accountant, RdpAccountant)
    return accountant.orders, accountant.rdp


def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: str, sampling: str) -> float:
    if steps == 0:
        return 0.0
    if kind == "rdp":
        # RDP composes linearly: compose(event, T) adds T times one step's RDP at every order, which costs a series
        # per order every time it is asked. The per-step RDP is computed once per (sigma, q) instead and scaled;
        # dp-accounting's own compute_epsilon converts it (the same numbers, bit for bit: tests/test_accountant.py).
        orders, rdp = _one_step_rdp(noise_multiplier, sample_rate, sampling)
        return float(rdp_privacy_accountant.compute_epsilon(orders, steps * rdp, delta)[0])
    accountant = make_dp_accountant(kind)  # type: ignore[arg-type]
    with _quiet_orders():  # RDP orders are evaluated in compose(), PLD's loss in get_epsilon()
        accountant.compose(step_event(noise_multiplier, sample_rate, sampling), steps)  # type: ignore[arg-type]
        return float(accountant.get_epsilon(delta))


class PrivacyAccountant:
    """Counts the noised steps of one mechanism and reports the epsilon spent.

    Example:
        >>> acc = PrivacyAccountant("rdp", noise_multiplier=1.0, sample_rate=0.01, delta=1e-5)
        >>> acc.step(100)
        >>> eps = acc.epsilon()

    Args:
        kind: "rdp" or "pld".
        noise_multiplier: sigma of every step (noise std over L2 sensitivity); 0 gives epsilon inf.
        sample_rate: q in (0, 1] (b / n for a client with n examples and batch b; 1: no subsampling).
        delta: target delta in (0, 1).
        sampling: "poisson" or "shuffle" (see the module docstring and :attr:`approximation`).
    """

    def __init__(
        self,
        kind: AccountantKind = "rdp",
        *,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        sampling: Sampling = "poisson",
    ) -> None:
        _check_kind(kind, sampling)
        check_noise_multiplier(noise_multiplier)
        _check_rate(sample_rate)
        _check_delta(delta)
        self.kind: AccountantKind = kind
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.sampling: Sampling = sampling
        self._steps = 0
        self._cache: tuple[int, float] | None = None

    @property
    def name(self) -> str:
        """The accountant, e.g. "dp_accounting.rdp (RDP)"."""
        return _NAMES[self.kind]

    @property
    def approximation(self) -> str:
        """One line stating what the accounting assumes about sampling."""
        return _approximation(self.sample_rate, self.sampling)

    @property
    def steps(self) -> int:
        """Noised steps counted so far."""
        return self._steps

    def step(self, n: int = 1) -> None:
        """Count ``n`` more noised steps."""
        check(isinstance(n, int) and n >= 0, f"n must be an integer >= 0, got {n!r}")
        self._steps += n

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any step; inf when sigma is 0)."""
        if self._cache is None or self._cache[0] != self._steps:
            eps = _epsilon(self.noise_multiplier, self.sample_rate, self._steps, self.delta, self.kind, self.sampling)
            self._cache = (self._steps, eps)
        return self._cache[1]

    def state_dict(self) -> dict[str, int]:
        """Checkpointable state (the step count; the rest is configuration)."""
        return {"steps": self._steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the step count from :meth:`state_dict`."""
        self._steps = int(state["steps"])

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant({self.kind!r}, noise_multiplier={self.noise_multiplier}, "
            f"sample_rate={self.sample_rate}, delta={self.delta}, sampling={self.sampling!r}, steps={self._steps})"
        )


def epsilon_for(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    kind: AccountantKind = "rdp",
    sampling: Sampling = "poisson",
) -> float:
    """Epsilon of ``steps`` noised steps of a (subsampled) Gaussian mechanism.

    Args:
        noise_multiplier: sigma >= 0 (0 gives inf).
        sample_rate: q in (0, 1].
        steps: number of noised steps, >= 1.
        delta: in (0, 1).
        kind: "rdp" or "pld".
        sampling: "poisson" or "shuffle".

    Returns:
        epsilon at ``delta`` from dp-accounting.
    """
    _check_kind(kind, sampling)
    check_noise_multiplier(noise_multiplier)
    _check_rate(sample_rate)
    _check_steps(steps)
    _check_delta(delta)
    return _epsilon(noise_multiplier, sample_rate, steps, delta, kind, sampling)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: AccountantKind = "rdp",
    sampling: Sampling = "poisson",
    *,
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` steps is at most ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's method on sigma, with a final check that
    the returned sigma does not exceed the target). For PLD the search is bracketed around the RDP
    answer first (RDP is cheap and, being looser, needs at least as much noise), which avoids
    evaluating PLD at tiny sigma where its discretised loss range explodes.

    Args:
        target_epsilon: > 0; ``math.inf`` returns 0.0 (no noise needed).
        delta: in (0, 1).
        sample_rate: q in (0, 1].
        steps: number of noised steps, >= 1.
        kind: "rdp" or "pld".
        sampling: "poisson" or "shuffle".
        tol: absolute tolerance on sigma.

    Returns:
        sigma with epsilon_for(sigma, ...) <= target_epsilon.

    Raises:
        ValueError: invalid arguments, or a target no sigma below 2^30 reaches (e.g. an epsilon
            smaller than what the RDP orders can certify at this delta).
    """
    _check_kind(kind, sampling)
    check(not math.isnan(target_epsilon) and target_epsilon > 0, f"target_epsilon must be > 0, got {target_epsilon}")
    _check_delta(delta)
    _check_rate(sample_rate)
    _check_steps(steps)
    check(math.isfinite(tol) and tol > 0, f"tol must be finite and > 0, got {tol}")
    if math.isinf(target_epsilon):
        return 0.0

    def event(sigma: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(step_event(sigma, sample_rate, sampling), steps)

    def eps(sigma: float) -> float:
        return _epsilon(sigma, sample_rate, steps, delta, kind, sampling)

    impossible = (
        f"target_epsilon={target_epsilon} at delta={delta} is out of reach of the {_NAMES[kind]} accountant "
        f"for q={sample_rate}, steps={steps} (no noise multiplier below 2^30 achieves it)"
    )
    bracket = None
    if kind == "pld":
        hi = calibrate_noise(target_epsilon, delta, sample_rate, steps, "rdp", sampling, tol=tol)
        for _ in range(30):
            if eps(hi) <= target_epsilon:
                break
            hi *= 1.25
        else:
            raise ValueError(impossible)
        ok = hi  # eps(ok) <= target; shrink until a sigma misses the target
        while True:
            bad = 0.8 * ok
            if bad <= tol:
                return float(ok)
            if eps(bad) > target_epsilon:
                break
            ok = bad
        bracket = ExplicitBracketInterval(bad, ok)
    try:
        with _quiet_orders():
            sigma = dp_accounting.calibrate_dp_mechanism(
                lambda: make_dp_accountant(kind),
                event,
                target_epsilon,
                delta,
                bracket_interval=bracket,
                tol=tol,
            )
    except NoBracketIntervalFoundError:
        raise ValueError(impossible) from None
    return float(sigma)


def paper_noise_multiplier(epsilon: float, delta: float, rounds: int) -> float:
    """The DP-FPL authors' noise formula: sigma = sqrt(rounds * log(1 / delta)) / epsilon.

    This is the authors' calibration (their ``--noise`` argument is this epsilon), kept for
    reproducing their runs. It is not a composition bound from an accountant: it treats the run as
    ``rounds`` releases, although with per-step synchronisation noise is added at every local batch
    (rounds x batches times), and it assumes sampling rate 1. Report the accountant's epsilon for
    the noise it gives (:func:`epsilon_for`).

    Args:
        epsilon: > 0.
        delta: in (0, 1).
        rounds: >= 1.
    """
    check(math.isfinite(epsilon) and epsilon > 0, f"epsilon must be finite and > 0, got {epsilon}")
    _check_delta(delta)
    check(isinstance(rounds, int) and rounds >= 1, f"rounds must be an integer >= 1, got {rounds!r}")
    return math.sqrt(rounds * math.log(1 / delta)) / epsilon
