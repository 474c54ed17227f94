"""d_chi privatisation (spec R1, R3, R11): the noise sampler's law, privatize, eps_token, calibration."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from fpl_fast.privacy import dchi

N = 20000  # noise samples for the statistical tests
# Statistical bounds: a correct sampler fails any one check with probability <= ALPHA (a seeded run is deterministic;
# the bound says why its pass is not luck, and why another CPU's rounding cannot flip it).
ALPHA = 1e-6
Z = stats.norm.isf(ALPHA / 2)  # two-sided normal quantile, ~4.9


@pytest.mark.parametrize("d,eta", [(8, 2.0), (64, 50.0)])
def test_radius_mean_and_law(d: int, eta: float) -> None:
    """||z|| ~ Gamma(d, rate eta): E||z|| = d / eta within Z sigma / sqrt(n) (sigma = sqrt(d) / eta); the sample
    variance within Z sqrt((kurtosis - 1) / n) of sigma^2 (Gamma: kurtosis 3 + 6 / d); KS p-value above ALPHA."""
    gen = torch.Generator().manual_seed(0)
    z = dchi.sample_dchi((N, d), eta, gen)
    assert z.dtype == torch.float32 and z.shape == (N, d)
    r = z.double().norm(dim=1)
    sigma = math.sqrt(d) / eta
    assert abs(r.mean().item() - d / eta) < Z * sigma / math.sqrt(N)
    assert abs(r.var().item() / sigma**2 - 1.0) < Z * math.sqrt((2 + 6 / d) / N)
    assert stats.kstest(r.numpy(), stats.gamma(a=d, scale=1.0 / eta).cdf).pvalue > ALPHA


@pytest.mark.parametrize("d", [3, 16])
def test_direction_uniform_on_sphere(d: int) -> None:
    """v = z / ||z||: mean ~ 0, and each coordinate has the sphere's marginal law ((v_j + 1) / 2 ~ Beta((d-1)/2,
    (d-1)/2)); the cube sampler seen in public SnD code ("2 rand - 1", normalised) fails this KS test. The d
    coordinates are d tests: each gets ALPHA / d (Bonferroni); v_j has variance 1 / d."""
    gen = torch.Generator().manual_seed(1)
    z = dchi.sample_dchi((N, d), 1.0, gen).double()
    v = z / z.norm(dim=1, keepdim=True)
    assert v.mean(0).abs().max().item() < stats.norm.isf(ALPHA / (2 * d)) / math.sqrt(N * d)
    beta = stats.beta((d - 1) / 2, (d - 1) / 2)
    for j in range(d):
        assert stats.kstest(((v[:, j] + 1) / 2).numpy(), beta.cdf).pvalue > ALPHA / d
    # The same test rejects the cube-direction pitfall, so it has power.
    cube = 2 * torch.rand(N, d, generator=gen, dtype=torch.float64) - 1
    cube = cube / cube.norm(dim=1, keepdim=True)
    assert stats.kstest(((cube[:, 0] + 1) / 2).numpy(), beta.cdf).pvalue < ALPHA  # measured 3e-22 (d 3), 1e-56 (16)


def test_rate_not_scale() -> None:
    """eta is a RATE: the noise shrinks as eta grows (mean d / eta, not d eta)."""
    d = 32
    means = [
        dchi.sample_dchi((4000, d), eta, torch.Generator().manual_seed(2)).norm(dim=1).mean().item()
        for eta in (1.0, 10.0, 100.0)
    ]
    assert means[0] > means[1] > means[2]
    for eta, m in zip((1.0, 10.0, 100.0), means, strict=True):
        assert abs(m / (d / eta) - 1) < 0.02
    assert dchi.sample_dchi((5, d), math.inf).abs().max().item() == 0.0


def test_sampler_reproducible_and_checks() -> None:
    a = dchi.sample_dchi((7, 5), 3.0, torch.Generator().manual_seed(3))
    b = dchi.sample_dchi((7, 5), 3.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eta must be a number > 0"):
            dchi.sample_dchi((2, 3), bad)
    with pytest.raises(ValueError, match="shape must be"):
        dchi.sample_dchi((2, 0), 1.0)


def _table(V: int = 200, d: int = 16, seed: int = 4) -> torch.Tensor:
    return torch.randn(V, d, generator=torch.Generator().manual_seed(seed))


def test_privatize_keeps_special_tokens() -> None:
    emb = _table()
    specials = [0, 1, 199]
    ids = torch.randint(0, 200, (30, 12), generator=torch.Generator().manual_seed(5))
    ids[:, 0], ids[:, -1] = 0, 199
    ids[3, 4] = 1
    out, rate = dchi.privatize(ids, emb, 0.01, specials, torch.Generator().manual_seed(6))
    assert out.shape == ids.shape and out.dtype == torch.int64
    is_special = torch.isin(ids, torch.tensor(specials))
    assert torch.equal(out[is_special], ids[is_special])
    # non-special tokens are never mapped onto a special token
    assert not torch.isin(out[~is_special], torch.tensor(specials)).any()
    assert 0 <= rate <= 1
    assert rate == pytest.approx(dchi.preservation_rate(ids, out, specials))


def test_preservation_limits() -> None:
    """Preservation rate -> 1 as eta -> inf and -> about 1 / |V_a| as eta -> 0."""
    V = 200
    emb = _table(V)
    specials = [0, 1]
    ids = torch.randint(2, V, (5000,), generator=torch.Generator().manual_seed(7))
    rates = {}
    for eta in (1e-3, 1.0, 5.0, 1e4):
        _, rates[eta] = dchi.privatize(ids, emb, eta, specials, torch.Generator().manual_seed(8))
    assert rates[1e4] == 1.0
    assert rates[1e-3] <= rates[1.0] <= rates[5.0] <= rates[1e4]
    p = 1.0 / (V - len(specials))  # uniform over V_a when the noise swamps the table
    # Binomial: over a uniform id and the noise each draw is preserved with probability exactly p (the cells' shares
    # of the far-away noise sum to 1); Z standard errors, plus 1e-3 for eta = 1e-3 being finite.
    assert abs(rates[1e-3] - p) < Z * math.sqrt(p * (1 - p) / ids.numel()) + 1e-3


def test_privatize_allowed_and_errors() -> None:
    emb = _table(50, 4)
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[10:20] = True
    ids = torch.arange(2, 50)
    out, _ = dchi.privatize(ids, emb, 0.5, [0, 1], torch.Generator().manual_seed(9), allowed)
    assert bool(((out >= 10) & (out < 20)).all())
    with pytest.raises(ValueError, match="ids must lie in"):
        dchi.privatize(torch.tensor([50]), emb, 1.0)
    with pytest.raises(ValueError, match="ids must be int64"):
        dchi.privatize(torch.tensor([1.0]), emb, 1.0)
    with pytest.raises(ValueError, match="no token is left"):
        dchi.privatize(ids, emb, 1.0, list(range(50)))


def test_eps_token_exact_and_bound() -> None:
    emb = _table(300, 8)
    brute = torch.cdist(emb.double(), emb.double()).max().item()
    diam, exact = dchi.diameter(emb)
    assert exact and diam == pytest.approx(brute, rel=1e-12)
    assert dchi.eps_token(2.0, emb) == pytest.approx(2.0 * brute, rel=1e-12)
    bound, exact = dchi.diameter(emb, exact=False)
    assert not exact and brute <= bound <= 2 * emb.double().norm(dim=1).max().item() + 1e-9
    # masking rows only shrinks the diameter
    allowed = torch.ones(300, dtype=torch.bool)
    allowed[::2] = False
    assert dchi.diameter(emb, allowed)[0] <= diam


def test_calibrate_eta_hits_target() -> None:
    emb = _table(400, 16)
    n = 8000
    sample = torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(10))
    eta, measured = dchi.calibrate_eta(emb, 0.6, sample, seed=3)
    assert abs(measured - 0.6) < 0.01  # bisection on common random numbers: the measured rate is hit exactly
    _, fresh = dchi.privatize(sample, emb, eta, (), torch.Generator().manual_seed(11))
    # Fresh noise: the calibrated eta's expected rate is off 0.6 by one binomial draw of the calibration noise, the
    # fresh rate by another: the difference has sd <= sqrt(2 p (1 - p) / n) (0.011 at n = 8000); Z of them.
    assert abs(fresh - 0.6) < Z * math.sqrt(2 * 0.6 * 0.4 / n)


def test_inversion_attacks() -> None:
    emb = _table(100, 8)
    cand = torch.arange(10, 30)
    ids = cand[torch.randint(0, 20, (2000,), generator=torch.Generator().manual_seed(12))]
    out, rate = dchi.privatize(ids, emb, 1e5, (), torch.Generator().manual_seed(13))
    assert dchi.nn_inversion_accuracy(ids, out) == rate == 1.0
    assert dchi.bayes_inversion_accuracy(ids, out, emb, 1e5, cand, n_mc=4) == 1.0
    # with moderate noise the attacker who knows the candidate set does at least as well as guessing x' itself
    # (measured at 500 ids: 0.374 vs 0.248, ~4.7 paired standard errors; 2000 ids double that)
    out, rate = dchi.privatize(ids, emb, 2.0, (), torch.Generator().manual_seed(14))
    bayes = dchi.bayes_inversion_accuracy(
        ids, out, emb, 2.0, cand, n_mc=200, generator=torch.Generator().manual_seed(15)
    )
    assert bayes >= rate
