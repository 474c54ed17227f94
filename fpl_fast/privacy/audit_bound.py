"""Empirical privacy auditing with one training run (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023): a measured lower bound on epsilon to set beside the accountant's upper bound.

The experiment: m canaries, each included in the audited client's training data independently with probability 1/2
(S_j = +-1, secret); one training run; a score per canary; the auditor guesses "included" for its k most confident
canaries and "excluded" for its k least confident and abstains on the rest. If the run is (epsilon, delta)-DP with
respect to each canary (add/remove one example), the number of correct guesses W out of r = 2k satisfies their
Theorem 5.2:

    P[W >= v] <= f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i,   f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]

so every epsilon whose right-hand side is below the significance 1 - confidence is rejected, and the largest such
epsilon is a lower bound at that confidence (:func:`epsilon_lower_bound`). The guess count is chosen from a fixed
grid of fractions of m with a Bonferroni correction over the grid, so the reported confidence holds for the best of
them. (jax_privacy.auditing implements the same bound but pulls in JAX; the bound is a few lines of SciPy.)

Two auditors, named in every report:

- **white-box** (the DP-SGD threat model: the adversary crafts an example's gradient and sees every noised release):
  canary j is an example whose gradient is a crafted vector along one coordinate e_j, inserted exactly where the
  mechanism clips (the per-example context gradient in --clip-mode sample; the batch mean it joins in --clip-mode
  batch; the per-example cotangent dl/dT in --clip-mode output), of norm ``canary_norm`` times the clip norm. The
  score of canary j is the sum over the steps of coordinate e_j of the release the adversary observes, in units of
  one clipped canary: the global prompt's noised gradient (the server's noised mean with sync="step", the client's
  noised gradient with sync="round"; its bound is epsilon_global), or the client's release Z in output mode (one
  release covers both prompts: epsilon_total).
- **black-box** (only the final prompts are seen): canary j is an image of the test data with a wrong label drawn at
  random, scored by minus its loss under the audited client's final personalised prompt (its bound: epsilon_total).

The training run with canaries (the instrumented client and server roles) is :mod:`fpl_fast.attacks.canaries`.
Canaries are sampled like the client's other examples at the client's public rate q = b / n (fixed in advance: the
client's data size then depends on the secret draw, its rate does not), so the audited client's accountant, told q
and the steps it took, gives the upper bound of this very run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit
from scipy.stats import binom
from torch import Tensor

from fpl_fast.config import RunConfig
from fpl_fast.privacy.randomness import party_key
from fpl_fast.validation import check

__all__ = [
    "AUDITORS",
    "GUESS_FRACTIONS",
    "AuditConfig",
    "p_value",
    "epsilon_lower_bound",
    "guesses",
    "one_run_bound",
    "CanaryDesign",
    "Canaries",
    "black_box_scores",
]

AUDITORS = ("white-box", "black-box")
# Guesses r = fraction * m (half "in" from the top, half "out" from the bottom); Bonferroni over the grid.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# A white-box canary's norm over the clip norm: above 1 where each example is clipped (clipped to exactly the clip
# norm); large where nothing bounds one example (the authors' batch-mean clip, or no DP), so it dominates the mean.
CANARY_NORM = {"per-example clip": 2.0, "no per-example clip": 1000.0}


# ----------------------------------------------------------------------------------------------
# The bound (Steinke, Nasr and Jagielski 2023, Theorem 5.2)
# ----------------------------------------------------------------------------------------------
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] allowed by (eps, delta)-DP with m canaries: the theorem's right-hand side."""
    check(0 <= v <= r <= m, f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    check(eps >= 0 and 0 <= delta <= 1, f"need eps >= 0 and 0 <= delta <= 1, got eps={eps}, delta={delta}")
    q = float(expit(eps))  # accuracy of eps-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    gap = binom.sf(v - i - 1, r, q) - tail  # f(v - i) - f(v) = P[v - i <= Binomial(r, q) <= v - 1]
    return float(min(1.0, tail + 2 * m * delta * float(np.max(gap / i))))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon that v correct guesses out of r (m canaries) reject at ``confidence``; 0 if none.

    p_value grows with eps, so the rejected set is an interval [0, eps*): found by doubling then bisection (to 1e-6).
    """
    check(0 < confidence < 1, f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= alpha:  # ends: p_value -> 1 as eps grows
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= alpha else (lo, mid)
    return lo


def guesses(scores: np.ndarray, r: int) -> np.ndarray:
    """+1 for the r/2 highest scores, -1 for the r/2 lowest, 0 (abstain) elsewhere (ties broken by position)."""
    order = np.argsort(scores, kind="stable")
    out = np.zeros(len(scores), dtype=np.int64)
    k = r // 2
    if k:
        out[order[-k:]] = 1
        out[order[:k]] = -1
    return out


def one_run_bound(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float) -> dict[str, Any]:
    """The audit's lower bound from the canaries' scores and their true membership.

    Every guess count r of :data:`GUESS_FRACTIONS` is tested at significance (1 - confidence) / len(grid), so the best
    of them holds at ``confidence``. Returns the bound, the r and v it came from, the guesses at that r and the table.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    check(m >= 2 and included.shape == scores.shape, f"need >= 2 scores with one membership each, got {m}")
    check(bool(np.isfinite(scores).all()), "canary scores must be finite (the training run diverged?)")
    per_test = 1.0 - (1.0 - confidence) / len(GUESS_FRACTIONS)
    truth = np.where(included, 1, -1)
    table, best = [], None
    for frac in GUESS_FRACTIONS:
        r = max(2, 2 * int(round(frac * m / 2)))
        g = guesses(scores, r)
        v = int((g == truth).sum())
        eps = epsilon_lower_bound(m, r, v, delta, per_test)
        table.append({"guesses": r, "correct": v, "epsilon_lower_bound": eps})
        if best is None or eps > best[0]:
            best = (eps, r, v, g)
    assert best is not None
    return {
        "epsilon_lower_bound": best[0],
        "guesses": best[1],
        "correct": best[2],
        "guess": best[3],
        "table": table,
        "confidence": confidence,
    }


# ----------------------------------------------------------------------------------------------
# The canaries
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditConfig:
    """What the audit adds to a run's settings.

    Attributes:
        auditor: "white-box" (crafted gradients, every release observed) or "black-box" (canary images, final
            prompts).
        canaries: m (None: white-box min(1000, coordinates of what is observed), black-box 200).
        client: the audited client (its data receives the canaries).
        confidence: of the lower bound.
        canary_norm: a white-box canary's norm over the clip norm (None: :data:`CANARY_NORM` of the run's clipping).
        design_seed: the public design (canary coordinates, images and labels); the inclusion draw is secret.
    """

    auditor: str = "white-box"
    canaries: int | None = None
    client: int = 0
    confidence: float = 0.95
    canary_norm: float | None = None
    design_seed: int = 0

    def __post_init__(self) -> None:
        check(self.auditor in AUDITORS, f"auditor must be one of {', '.join(AUDITORS)}, got {self.auditor!r}")
        check(
            self.canaries is None or (isinstance(self.canaries, int) and self.canaries >= 2),
            f"canaries must be an integer >= 2, got {self.canaries!r}",
        )
        check(isinstance(self.client, int) and self.client >= 0, f"audit client must be >= 0, got {self.client!r}")
        check(0 < self.confidence < 1, f"confidence must be in (0, 1), got {self.confidence}")
        check(
            self.canary_norm is None or (math.isfinite(self.canary_norm) and self.canary_norm > 0),
            f"canary norm must be a finite number > 0, got {self.canary_norm}",
        )


@dataclass(frozen=True)
class CanaryDesign:
    """The public part of the experiment: what each canary is (fixed before the secret inclusion draw).

    coords: (m,) the coordinate e_j of each white-box canary in the observed release (flattened); features/labels:
    the black-box canaries' image features (m, D) and wrong labels (m,); norm: a white-box canary's norm over the clip
    norm (None: by the run's clipping, :data:`CANARY_NORM`).
    """

    auditor: str
    m: int
    client: int
    coords: np.ndarray | None = None
    features: Tensor | None = None
    labels: Tensor | None = None
    norm: float | None = None

    @property
    def white_box(self) -> bool:
        return self.auditor == "white-box"

    @classmethod
    def build(cls, audit: AuditConfig, cfg: RunConfig, data: Any, *, observed_size: int, n_cls: int):
        """Check the audit against the run and draw the public design (``data``: the run's ClientData;
        ``observed_size``: coordinates of the release the white-box auditor observes)."""
        check(
            audit.client < cfg.num_users,
            f"audit client must be < num_users ({cfg.num_users}), got {audit.client}",
        )
        rng = np.random.default_rng(audit.design_seed)
        if audit.auditor == "white-box":
            m = audit.canaries if audit.canaries is not None else min(1000, observed_size)
            check(
                m <= observed_size,
                f"canaries must be <= {observed_size} for the white-box auditor (one coordinate each of the observed "
                f"release), got {m}",
            )
            coords = rng.permutation(observed_size)[:m]
            return cls(audit.auditor, m, audit.client, coords=coords, norm=audit.canary_norm)
        check(not cfg.augment, "the black-box audit needs cached image features: leave out --augment")
        n_test = data.test_feats.shape[0]
        m = audit.canaries if audit.canaries is not None else min(200, n_test)
        check(m <= n_test, f"canaries must be <= {n_test} for the black-box auditor (one test image each), got {m}")
        pick = torch.as_tensor(rng.permutation(n_test)[:m], dtype=torch.long)
        true = data.test_labels[pick]
        wrong = (true + torch.as_tensor(rng.integers(1, n_cls, size=m), dtype=torch.long)) % n_cls
        return cls(audit.auditor, m, audit.client, features=data.test_feats[pick].float(), labels=wrong)


class Canaries:
    """The experiment's state: the design, the secret inclusion draw and (white-box) the running scores.

    The inclusion bits come from the auditor's own key (the OS CSPRNG, or ``noise_seed`` for reproducible research),
    apart from every party's training randomness.
    """

    def __init__(self, design: CanaryDesign, noise_seed: int | None) -> None:
        self.design = design
        rng = np.random.Generator(np.random.PCG64(party_key(noise_seed, "auditor", "canaries")))
        self.included = rng.random(design.m) < 0.5
        self.members = np.flatnonzero(self.included)  # canary ids in the client's data, in order
        self.scores = np.zeros(design.m)
        self.position: int | None = None  # the audited client's row in this step's active clients (None: idle)
        self.sampled = np.zeros(0, dtype=np.int64)  # canary ids in the audited client's batch of this step
        self.observed_steps = 0
        # Set by AuditedClients from the run: the release the white-box auditor observes, the canaries' norm.
        self.output_mode = False
        self.norm = 0.0

    @property
    def crafting(self) -> bool:
        """White-box canaries are in the audited client's batch of this step."""
        return self.design.white_box and self.position is not None and len(self.sampled) > 0

    @property
    def observing_global(self) -> bool:
        """The white-box auditor scores this step's global-prompt release (parameter modes, audited client active)."""
        return self.design.white_box and self.position is not None and not self.output_mode

    @property
    def coords(self) -> np.ndarray:
        """The white-box canaries' coordinates."""
        assert self.design.coords is not None, "black-box canaries have no coordinates"
        return self.design.coords

    def observe(self, release: Tensor, unit: float) -> None:
        """White-box: add this step's observed release (flattened) at each canary's coordinate, in canary units."""
        at = torch.as_tensor(self.coords, dtype=torch.long, device=release.device)
        values = release.detach().flatten()[at].double().cpu().numpy()
        self.scores += values / unit
        self.observed_steps += 1

    def crafted(self, ids: np.ndarray, size: int, scale: float, device: torch.device) -> Tensor:
        """The crafted vectors (len(ids), size) of canaries ``ids``: ``scale`` along each one's coordinate."""
        out = torch.zeros(len(ids), size, device=device)
        if len(ids):
            out[torch.arange(len(ids)), torch.as_tensor(self.coords[ids], dtype=torch.long)] = scale
        return out


def black_box_scores(text: Tensor, design: CanaryDesign, logit_scale: float) -> np.ndarray:
    """Minus each canary's loss under the client's final prompt (normalised text features (n_cls, D))."""
    assert design.features is not None and design.labels is not None
    x = F.normalize(design.features.to(text.device), dim=-1)
    logits = float(logit_scale) * x @ F.normalize(text, dim=-1).T
    loss = F.cross_entropy(logits, design.labels.to(text.device), reduction="none")
    return (-loss).double().cpu().numpy()
