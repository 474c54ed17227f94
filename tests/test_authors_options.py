"""The DP-FPL authors' compatibility options: their steps per round (--steps-per-round authors) and their promptfl
client noise on G (--promptfl-client-noise), against the math each one states."""

from __future__ import annotations

import math

import pytest
import torch

from fpl_fast.config import RunConfig
from fpl_fast.federated.client import steps_per_round
from fpl_fast.federated.engine import Federation
from fpl_fast.methods.dpfpl import build_federation
from fpl_fast.privacy.noise_stream import NoiseStream
from fpl_fast.privacy.plan import NoisePlan
from fpl_fast.privacy.sensitivity import promptfl_accountant_noise_multiplier, promptfl_noise_std
from fpl_fast.validation import ConfigError, flag_message

BASE = RunConfig(num_users=4, rounds=2, batch_size=16, seed=3, partition="iid", noise_seed=3)
PROMPTFL = BASE.replace(
    factorization="promptfl", clip_mode="batch", clip_uv="separate", promptfl_client_noise=True, client_fraction=0.75
)


@pytest.fixture
def job(embedded_job):
    return embedded_job(BASE)


# ----------------------------------------------------------------------------------------------
# --steps-per-round
# ----------------------------------------------------------------------------------------------
def test_steps_per_round_mean_and_authors() -> None:
    cfg = BASE.replace(batch_size=8, local_epochs=2)
    sizes = [20, 17, 40]
    assert steps_per_round(cfg, sizes) == 2 * math.ceil((20 + 17 + 40) / 3 / 8) == 8  # E ceil(mean / b)
    assert steps_per_round(cfg.replace(steps_per_round="authors"), sizes) == 2 * (17 // 8) == 4  # E floor(min / b)


def test_authors_steps_per_round_refuses_zero_steps() -> None:
    cfg = BASE.replace(batch_size=8, steps_per_round="authors")
    with pytest.raises(ConfigError) as err:
        steps_per_round(cfg, [20, 5, 40])
    assert err.value.field == "steps_per_round"
    assert str(err.value).startswith("steps_per_round='authors' gives 0 local steps: the smallest client holds 5")
    assert flag_message(err.value).startswith("--steps-per-round authors gives 0 local steps")
    with pytest.raises(ConfigError, match="steps_per_round must be one of mean, authors, got 'min'"):
        BASE.replace(steps_per_round="min")


def test_epsilon_calibration_uses_the_steps_in_force(job) -> None:
    backbone, classnames, data = job
    sizes = [len(ix) for ix in data.train_idx]
    plans = {}
    for policy in ("mean", "authors"):
        cfg = BASE.replace(epsilon=3.0, noise=None, steps_per_round=policy)
        fed, plan, _ = build_federation(cfg, backbone, classnames, data)
        want = math.ceil(sum(sizes) / len(sizes) / 16) if policy == "mean" else min(sizes) // 16
        assert fed.steps_per_round == want
        assert f"steps={cfg.rounds * want}" in plan.note
        plans[policy] = (want, plan.sigma_global)
    (mean_steps, mean_sigma), (authors_steps, authors_sigma) = plans["mean"], plans["authors"]
    assert authors_steps < mean_steps and authors_sigma < mean_sigma  # fewer steps: less noise for the same epsilon


# ----------------------------------------------------------------------------------------------
# --promptfl-client-noise
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [{"factorization": "dpfpl"}, {"sync": "round"}, {"clip_mode": "output", "clip_uv": "joint", "lr": None}],
)
def test_promptfl_client_noise_is_refused_outside_the_authors_promptfl(changes: dict) -> None:
    with pytest.raises(ConfigError, match="^promptfl_client_noise needs factorization='promptfl', sync='step'") as e:
        PROMPTFL.replace(**changes)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("clip_mode", "ka"), [("batch", 3), ("batch", 1), ("sample", 3), ("batch", 10)])
def test_accountant_multiplier_is_the_one_gaussian_over_one_examples_move_of_the_mean(clip_mode: str, ka: int) -> None:
    sigma, b, K = 1.7, 16, 10
    frac = ka / K
    cfg = PROMPTFL.replace(clip_mode=clip_mode, num_users=K, client_fraction=frac, batch_size=b)
    plan = NoisePlan.from_sigmas(cfg, sigma, sigma)
    std = (sigma / b) * math.sqrt(1 / ka + 1 / ka**2)  # the noise on the mean, in units of C
    move = 2 / ka if clip_mode == "batch" else 1 / (b * ka)  # one example moves one client's clipped g_k by 2C / (C/b)
    assert plan.accountant_global == std / move == plan.accountant_total  # promptfl: the global release is the total
    closed = sigma * math.sqrt(ka + 1) / (2 * b if clip_mode == "batch" else 1)
    assert plan.accountant_global == pytest.approx(closed, rel=1e-12)
    base = NoisePlan.from_sigmas(cfg.replace(promptfl_client_noise=False), sigma, sigma).accountant_global
    assert plan.accountant_global == pytest.approx(base * math.sqrt(ka + 1), rel=1e-12)
    assert promptfl_noise_std(sigma, clip_norm=1.0, batch_size=b, active_clients=ka) == std
    assert (
        promptfl_accountant_noise_multiplier(sigma, clip_mode=clip_mode, batch_size=b, active_clients=ka) == std / move
    )


def _variance_bounds(n: int, z: float = 6.0) -> tuple[float, float]:
    """Bounds on (sum of n squared N(0, 1)) / n, i.e. chi2(n) / n, from the Wilson-Hilferty approximation
    (chi2(n) / n)^(1/3) ~ N(1 - 2/(9n), 2/(9n)), exact to O(1/n) at n ~ 1e5; z = 6 standard deviations: a false
    failure has probability ~2e-9, whatever CPU draws the (seeded) noise."""
    m, s = 1 - 2 / (9 * n), math.sqrt(2 / (9 * n))
    return (m - z * s) ** 3, (m + z * s) ** 3


def test_promptfl_noise_on_gs_update_has_the_stated_std_from_the_clients_own_streams(job, monkeypatch) -> None:
    """Clipped gradients forced to zero, momentum off: G's update per step is -lr times the server's noisy mean, so
    its entries' empirical variance must be lr^2 (sigma C / b)^2 (1/K_a + 1/K_a^2) within a chi-square bound."""
    backbone, classnames, data = job
    cfg = PROMPTFL.replace(momentum=0.0, norm_thresh=10.0, lr=0.5)
    sigma = 1.3
    fed = Federation(cfg, backbone, classnames, data, noise_local=sigma, noise_global=sigma)
    ka = 3
    assert fed.server.noise_multiplier == sigma and fed.clients.client_global_noise == sigma

    def zero_grad(ctx, feats, labels, mask):
        return torch.zeros(ctx.shape[0], 1, *ctx.shape[1:]), torch.zeros_like(mask)

    monkeypatch.setattr(fed.clients, "batch_mean_grad", zero_grad)
    torch_rng = torch.get_rng_state()
    updates, offsets = [], []
    steps = 300
    for _ in range(steps):
        clients = fed.sample_clients()
        assert len(clients) == ka
        before_g = fed.server.global_ctx.clone()
        before = [fed.clients.rand[k].noise.offset for k in range(cfg.num_users)]
        fed.train_step(clients, server_average=True)
        updates.append((fed.server.global_ctx - before_g).double().flatten())
        offsets.append([fed.clients.rand[k].noise.offset - before[k] for k in range(cfg.num_users)])
    assert torch.equal(torch.get_rng_state(), torch_rng)  # no draw from torch's global generator
    numel = fed.server.global_ctx.numel()
    for used in offsets:  # each active client drew its n_ctx x d normals from its own stream, an idle one none
        assert sorted(used) == [0] * (cfg.num_users - ka) + [NoiseStream.counters(numel)] * ka
    u = torch.cat(updates) / -cfg.learning_rate
    want = promptfl_noise_std(sigma, clip_norm=cfg.clip_norm, batch_size=cfg.batch_size, active_clients=ka)
    n = u.numel()
    assert n == steps * numel
    ratio = float((u**2).mean()) / want**2  # the mean is known (0): n degrees of freedom
    lo, hi = _variance_bounds(n)
    assert lo < ratio < hi, (ratio, lo, hi)
    server_only = (sigma * cfg.clip_norm / (cfg.batch_size * ka)) ** 2 / want**2
    assert server_only < lo  # and the bound is tight enough to tell it from the server's noise alone


def test_client_noise_is_added_to_the_clipped_gradient_from_the_clients_stream(job) -> None:
    backbone, classnames, data = job
    sigma = 0.9
    on = Federation(PROMPTFL, backbone, classnames, data, noise_local=sigma, noise_global=sigma)
    off = Federation(
        PROMPTFL.replace(promptfl_client_noise=False), backbone, classnames, data, noise_local=sigma, noise_global=sigma
    )
    rows = on.sample_clients()
    assert torch.equal(rows, off.sample_clients())
    g_off, _ = off.clients.local_step(rows)
    states = [off.clients.rand[k].noise.state() for k in rows.tolist()]  # where the client noise is drawn from
    g_on, _ = on.clients.local_step(rows)
    z = torch.stack([NoiseStream.from_state(s).normal(g_off[0].numel()) for s in states]).view_as(g_off)
    scale = sigma * PROMPTFL.clip_norm / PROMPTFL.batch_size
    torch.testing.assert_close(g_on, g_off + scale * z, rtol=0, atol=1e-6)
