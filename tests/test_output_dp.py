"""Output-space per-example DP (--clip-mode output): the whole step, its sensitivity, the auto bound, the noise,
the accounting and the errors (docs/design.md section 2)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from support import train_job

from fpl_fast import ops
from fpl_fast.config import RunConfig
from fpl_fast.federated.engine import Federation
from fpl_fast.ops import reference
from fpl_fast.privacy.noise_stream import NoiseStream
from fpl_fast.privacy.output_dp import OutputDP, output_clip_bound, privatize_output
from fpl_fast.prompts import FACTORIZATIONS

Tensor = torch.Tensor

BASE = RunConfig(
    num_users=3, rounds=2, batch_size=16, seed=3, partition="iid", noise_seed=3, clip_mode="output", output_clip=0.25
)


@pytest.fixture
def job(embedded_job):
    return embedded_job(BASE)


def _federation(job, cfg: RunConfig, noise: float) -> Federation:
    backbone, classnames, data = job
    return Federation(cfg, backbone, classnames, data, noise_local=noise, noise_global=noise)


def _naive_release(text: Tensor, feats, labels, mask, s: float, clip: float, sigma: float, streams, b: float):
    """Per-example cotangents by an autograd loop in float64, clipped, summed, noised from the same streams, / b."""
    K, n_cls, D = text.shape
    out, n_clipped, n_real = [], 0, 0
    for k in range(K):
        total = torch.zeros(n_cls, D, dtype=torch.float64)
        for i in range(feats.shape[1]):
            if mask[k, i] == 0:
                continue
            t = text[k].double().requires_grad_(True)
            logits = s * (F.normalize(feats[k, i].double(), dim=-1) @ F.normalize(t, dim=-1).T)
            (c,) = torch.autograd.grad(F.cross_entropy(logits[None], labels[k, i][None]), t)
            factor = min(1.0, clip / (float(c.norm()) + 1e-6))
            n_clipped += factor < 1
            n_real += 1
            total += factor * c
        seed, offset = streams[k].take(n_cls * D)
        noise = reference.philox_normal(seed, offset, n_cls * D).double().view(n_cls, D)
        out.append((total + sigma * clip * noise) / b)
    return torch.stack(out), n_clipped / n_real


def test_output_step_equals_a_naive_float64_step(job) -> None:
    fed = _federation(job, BASE, noise=0.7)
    clients = torch.arange(3)
    streams = [fed.clients.rand[k].noise for k in range(3)]
    seed, off = [s.seed for s in streams], [s.offset for s in streams]
    factors = fed.learner.factors(clients, seed=seed, offset=off)
    ctx = fed.learner.context(clients, factors).detach()
    feats, labels, mask = fed.clients.batch(clients)
    twin = [NoiseStream(s.seed, offset=s.offset) for s in streams]

    grad, res = fed.clients.output_release_grad(ctx, feats, labels, mask, streams)

    text = fed.text.features(ctx, traceable=True).detach()
    want_z, frac = _naive_release(
        text, feats, labels, mask, fed.backbone.logit_scale, 0.25, 0.7, twin, fed.clients.batch_denominator
    )
    assert 0 < frac < 1  # C_o = 0.25 sits inside this batch's norms (median ~0.27 at initialisation)
    torch.testing.assert_close(res.release.double(), want_z, rtol=1e-4, atol=1e-6)
    assert [s.offset for s in streams] == [s.offset for s in twin]  # the step drew exactly one (n_cls, D) per client
    # One vjp of the text encoder with the naive release as its cotangent.
    c = ctx.clone().requires_grad_(True)
    with torch.enable_grad():
        (want_grad,) = torch.autograd.grad(fed.text.features(c, traceable=True), c, grad_outputs=want_z.float())
    torch.testing.assert_close(grad[:, 0], want_grad, rtol=1e-3, atol=1e-6)


def test_output_step_adds_no_server_noise_and_draws_one_release_per_client(job) -> None:
    fed = _federation(job, BASE, noise=1.0)
    clients = torch.arange(3)
    server_before = fed.server.rand.noise.offset
    client_before = [fed.clients.rand[k].noise.offset for k in range(3)]
    g_before = fed.server.global_ctx.clone()
    stats = fed.train_step(clients, server_average=True)
    assert fed.server.rand.noise.offset == server_before
    width = fed.data.train_feats.shape[1]  # D: the release is (n_cls, D) per client
    per_client = NoiseStream.counters(fed.learner.factorize_draws()) + NoiseStream.counters(fed.text.n_cls * width)
    assert [fed.clients.rand[k].noise.offset - client_before[k] for k in range(3)] == [per_client] * 3
    assert not torch.equal(fed.server.global_ctx, g_before)
    assert 0 <= stats.clipped_fraction <= 1


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("sync", ["step", "round"])
def test_every_factorization_and_sync_trains_in_output_mode(job, factorization, sync) -> None:
    cfg = BASE.replace(factorization=factorization, sync=sync, sampling="shuffle" if sync == "round" else "poisson")
    fed = _federation(job, cfg, noise=1.0)
    local_before = {k: t.clone() for k, t in fed.learner.local.items()}
    g_before = fed.server.global_ctx.clone()
    fed.train_round(fed.sample_clients())
    assert not torch.equal(fed.server.global_ctx, g_before)
    assert torch.isfinite(fed.server.global_ctx).all()
    changed = [not torch.equal(t, local_before[k]) for k, t in fed.learner.local.items()]
    assert all(changed) if factorization != "promptfl" else not fed.learner.local


def _head_inputs(K: int, b: int, n_cls: int, D: int, seed: int, t_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, b, D, generator=g, dtype=torch.float64)
    t = torch.randn(K, n_cls, D, generator=g, dtype=torch.float64) * t_scale
    y = torch.randint(0, n_cls, (K, b), generator=g)
    return x, t, y


def _clipped_sum(x, t, y, mask, s, clip):
    K = len(clip)
    kw = dict(logit_scale=s, clip_norm=clip, noise_multiplier=0.0, seed=[0] * K, offset=[0] * K, denominator=1.0)
    z, norms, _ = ops.dp_output_clip_noise(x, t, y, mask, **kw)
    return z, norms


@pytest.mark.parametrize("s", [1.0, 100.0, 1e4])
def test_adding_one_example_moves_the_clipped_sum_by_at_most_c(s) -> None:
    """Add/remove neighbours through the mask: the one extra example's cotangent norm is up to sqrt(2) s /
    min ||T_c|| (here up to ~1e5 with a tiny class feature), yet the clipped sum moves by at most C_o."""
    K, b, n_cls, D = 8, 12, 5, 16
    worst = 0.0
    for trial in range(6):
        x, t, y = _head_inputs(K, b, n_cls, D, seed=trial, t_scale=1.0)
        t[:, 0] *= 1e-3  # one class with a tiny text feature: huge gradients for examples near it
        clip = torch.full((K,), 0.5, dtype=torch.float32)
        without = torch.ones(K, b, dtype=torch.float64)
        without[:, trial % b] = 0.0
        z_with, norms = _clipped_sum(x, t, y, torch.ones(K, b, dtype=torch.float64), s, clip)
        z_without, _ = _clipped_sum(x, t, y, without, s, clip)
        moved = (z_with - z_without).flatten(1).norm(dim=1)
        worst = max(worst, float((moved / 0.5).max()))
        assert float(norms[:, trial % b].max()) > 0.5 or s == 1.0  # the added example really is clipped at s >= 100
    assert worst <= 1.0 + 1e-6, worst


def test_the_release_moves_by_at_most_c_over_b_under_poisson_denominators(job) -> None:
    x, t, y = _head_inputs(4, 10, 6, 8, seed=7, t_scale=0.01)
    clip = torch.full((4,), 2.0, dtype=torch.float32)
    kw = dict(logit_scale=50.0, clip_norm=clip, noise_multiplier=0.0, seed=[0] * 4, offset=[0] * 4, denominator=8.0)
    full = torch.ones(4, 10, dtype=torch.float64)
    less = full.clone()
    less[:, 3] = 0
    z1, _, _ = ops.dp_output_clip_noise(x, t, y, full, **kw)
    z0, _, _ = ops.dp_output_clip_noise(x, t, y, less, **kw)
    assert float((z1 - z0).flatten(1).norm(dim=1).max()) <= 2.0 / 8.0 * (1 + 1e-9)


@pytest.mark.parametrize("t_scale", [1e-3, 1.0, 1e3])
def test_auto_never_clips(t_scale) -> None:
    for seed in range(5):
        x, t, y = _head_inputs(6, 20, 7, 12, seed=seed, t_scale=t_scale)
        t[:, 1] *= 0.01
        x, t = x.float(), t.float()
        streams = [NoiseStream(seed * 10 + k) for k in range(6)]
        res = privatize_output(x, t, y, None, 100.0, OutputDP("auto", 1.0, denominator=20.0), streams)
        assert float(res.clip_fraction.max()) == 0.0
        bound = output_clip_bound(t, 100.0)
        assert torch.all(res.norms <= bound[:, None])
        assert torch.equal(res.clip_norms, bound)


def test_auto_never_clips_in_a_federated_round(job) -> None:
    fed = _federation(job, BASE.replace(output_clip="auto"), noise=1.0)
    stats = fed.train_round(fed.sample_clients())
    assert [s.clipped_fraction for s in stats] == [0.0] * len(stats)


def test_noise_std_of_the_release_is_sigma_c_over_b() -> None:
    K, b, n_cls, D = 4, 6, 40, 80
    x, t, y = _head_inputs(K, b, n_cls, D, seed=11)
    x, t = x.float(), t.float()
    clip = torch.tensor([0.5, 1.0, 2.0, 4.0])
    kw = dict(logit_scale=20.0, clip_norm=clip, seed=[5, 6, 7, 8], offset=[0, 10, 20, 30], denominator=6.0)
    noisy, _, _ = ops.dp_output_clip_noise(x, t, y, None, noise_multiplier=1.3, **kw)
    clean, _, _ = ops.dp_output_clip_noise(x, t, y, None, noise_multiplier=0.0, **kw)
    z = (noisy - clean) / (1.3 * clip / 6.0)[:, None, None]  # standard normal if the std is sigma C_o / b
    n = z[0].numel()
    for k in range(K):
        # 6 standard errors: the mean's is 1/sqrt(n), the sample std's sqrt(1/(2n)) (n = 3200 each).
        assert abs(float(z[k].mean())) < 6 / math.sqrt(n)
        assert abs(float(z[k].std()) - 1.0) < 6 * math.sqrt(1 / (2 * n))


def test_epsilon_is_one_number_for_local_global_and_total(job, tmp_path) -> None:
    cfg = BASE.replace(noise=1.1)
    final = train_job(job, cfg, tmp_path)["final"]
    acc = RdpAccountant()
    q, n = final["sample_rate_per_client"][0], final["steps_per_client"][0]
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.1)), n)
    want = acc.get_epsilon(cfg.delta)
    assert final["epsilon_local"] == final["epsilon_global"] == final["epsilon_total"] == pytest.approx(want, rel=1e-9)
    assert final["accountant"].startswith("dp_accounting")
    assert final["per_example_guarantee"] is True
    assert final["output_clip"] == 0.25
    assert "no trusted server" in final["trust_model"]


def test_epsilon_target_calibrates_the_one_release(job, tmp_path) -> None:
    final = train_job(job, BASE.replace(noise=None, epsilon=3.0), tmp_path)["final"]
    assert final["epsilon_total"] == pytest.approx(3.0, rel=0.02)
    assert final["epsilon_total"] <= 3.0 + 1e-6


def test_auto_refuses_a_head_it_does_not_hold_for() -> None:
    with pytest.raises(ValueError, match="holds only for the cosine-similarity cross-entropy head"):
        OutputDP("auto", 1.0, denominator=8.0, head="linear")


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, "sometimes"])
def test_bad_output_clip_is_one_clear_error(value) -> None:
    with pytest.raises(ValueError, match="^output_clip must be"):
        RunConfig(clip_mode="output", output_clip=value)
    if not isinstance(value, str):
        with pytest.raises(ValueError, match="output clip norm must be"):
            OutputDP(value, 1.0, denominator=8.0)


def test_output_mode_refuses_split_noise_flags() -> None:
    with pytest.raises(ValueError, match="^noise_local does not apply to clip_mode='output'"):
        RunConfig(clip_mode="output", noise_local=2.0)


@pytest.mark.parametrize("flag", ["0", "nan", "-2", "auto?"])
def test_cli_bad_output_clip_is_one_line(flag) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fpl_fast.run", "--clip-mode", "output", "--output-clip", flag, "--out", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--output-clip" in lines[0], proc.stderr
