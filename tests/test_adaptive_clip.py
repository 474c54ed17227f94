"""Adaptive clipping (fpl_fast/privacy/adaptive_clip.py) against its math, its privacy cost against dp-accounting,
automatic clipping's sensitivity, and the settings' one-line refusals."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from fpl_fast.config import RunConfig
from fpl_fast.privacy.adaptive_clip import (
    AdaptiveClipping,
    centred_counts,
    count_noise_std,
    noised_fractions,
    op_clip_columns,
    quantities,
    quantity_norms,
    updated_clip_norms,
    with_counts,
)
from fpl_fast.privacy.clipping import LocalDP, privatize_local
from fpl_fast.privacy.noise_stream import NoiseStream
from fpl_fast.privacy.plan import ClientAccountant, NoisePlan, plan_noise
from fpl_fast.privacy.sensitivity import combined_noise_multiplier
from fpl_fast.validation import ConfigError


def _cfg(**kw) -> AdaptiveClipping:
    base = dict(target_quantile=0.5, lr=0.2, clip_min=1e-3, clip_max=100.0, count_noise=0.0, expected_batch_size=8.0)
    return AdaptiveClipping(**{**base, **kw})


@pytest.mark.parametrize("norm", [0.1, 0.5, 1.0, 7.0])  # below, at and above C = 1
def test_one_example_moves_the_centred_count_by_exactly_a_half(norm: float) -> None:
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(1, 9, 2, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(1, 9)
    mask[0, 8] = 0  # the neighbour without example 8
    norms[0, 8] = norm
    clip = torch.ones(1, 2, dtype=torch.float64)
    with_it = centred_counts(norms, clip, torch.ones(1, 9))
    without = centred_counts(norms, clip, mask)
    assert torch.equal((with_it - without).abs(), torch.full((1, 2), 0.5, dtype=torch.float64))
    assert float((with_it - without)[0, 0]) == (0.5 if norm <= 1.0 else -0.5)


def test_padding_rows_do_not_count() -> None:
    norms = torch.tensor([[[0.0], [0.0], [5.0]]], dtype=torch.float64)  # two padding rows of norm 0
    mask = torch.tensor([[0.0, 0.0, 1.0]])
    assert float(centred_counts(norms, torch.ones(1, 1, dtype=torch.float64), mask)) == -0.5


def test_count_noise_std_comes_from_each_clients_stream() -> None:
    """n draws of N(0, sigma_b^2): the sample std is within 5 of its standard errors (sqrt(1 / (2 n)) relative)."""
    sigma_b, n = 3.0, 20000
    cfg = _cfg(count_noise=sigma_b, expected_batch_size=1.0)
    streams = [NoiseStream(11), NoiseStream(12)]
    counts = torch.zeros(2, n, dtype=torch.float64)
    noise = (noised_fractions(counts, cfg, streams) - 0.5) * cfg.expected_batch_size
    for k in range(2):
        assert abs(float(noise[k].std()) / sigma_b - 1) < 5 * math.sqrt(1 / (2 * n))
    # The draw is the stream's own: the same stream state gives the same noise, and it advanced by n.
    again = (noised_fractions(counts[:1], cfg, [NoiseStream(11)]) - 0.5) * cfg.expected_batch_size
    assert torch.equal(again[0], noise[0]) and streams[0].offset == NoiseStream(11).offset + NoiseStream.counters(n)


def test_fraction_divides_by_the_public_expected_batch_size() -> None:
    counts = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    got = noised_fractions(counts, _cfg(expected_batch_size=10.0), [NoiseStream(0)])
    assert torch.allclose(got, torch.tensor([[0.8, 0.4]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_update_against_a_hand_computation() -> None:
    cfg = _cfg(target_quantile=0.7, lr=0.3)
    clip = torch.tensor([[2.0, 0.5]], dtype=torch.float64)
    frac = torch.tensor([[0.9, 0.2]], dtype=torch.float64)
    want = [2.0 * math.exp(-0.3 * (0.9 - 0.7)), 0.5 * math.exp(-0.3 * (0.2 - 0.7))]
    assert updated_clip_norms(clip, frac, cfg).tolist() == [pytest.approx(want, rel=1e-15)]


def test_clip_norms_stay_within_their_bounds() -> None:
    cfg = _cfg(lr=5.0, clip_min=0.1, clip_max=2.0)
    clip = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    for frac in ([[10.0, -10.0]], [[-10.0, 10.0]]) * 20:
        clip = updated_clip_norms(clip, torch.tensor(frac, dtype=torch.float64), cfg)
        assert float(clip.min()) >= 0.1 and float(clip.max()) <= 2.0
    assert clip.tolist() == [[2.0, 0.1]]


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
def test_noise_free_steps_reach_the_target_quantile(gamma: float) -> None:
    """200 steps on a fixed log-normal norm distribution, from C = 10: the fraction of norms <= C ends within 0.05."""
    g = torch.Generator().manual_seed(3)
    pool = torch.exp(torch.randn(4000, generator=g, dtype=torch.float64) * 0.8 - 1.0)
    cfg = _cfg(target_quantile=gamma, lr=0.2, expected_batch_size=64.0)
    clip = torch.full((1, 1), 10.0, dtype=torch.float64)
    for _ in range(200):
        batch = pool[torch.randint(0, pool.numel(), (64,), generator=g)].view(1, 64, 1)
        counts = centred_counts(batch, clip, torch.ones(1, 64))
        clip = updated_clip_norms(clip, noised_fractions(counts, cfg, [NoiseStream(0)]), cfg)
    assert abs(float((pool <= clip[0, 0]).double().mean()) - gamma) < 0.05


def test_quantities_and_columns() -> None:
    assert quantities(clips_factors=True, has_local=True, joint_uv=True) == ((0, 1), (2,))
    assert quantities(clips_factors=True, has_local=True, joint_uv=False) == ((0,), (1,), (2,))
    assert quantities(clips_factors=False, has_local=True, joint_uv=True) == ((0,), (2,))
    assert quantities(clips_factors=False, has_local=False, joint_uv=True) == ((2,),)
    assert quantities(clips_factors=True, has_local=True, joint_uv=True, output_mode=True) == ((0,),)
    norms = torch.tensor([[[3.0, 4.0, 2.0]]])
    assert quantity_norms(norms, ((0, 1), (2,))).tolist() == [[[5.0, 2.0]]]
    clip = torch.tensor([[0.5, 2.0]])
    assert op_clip_columns(clip, ((0, 1), (2,))).tolist() == [[0.5, 0.5, 2.0]]
    assert op_clip_columns(torch.tensor([[1.0, 2.0, 3.0]]), ((0,), (1,), (2,))).tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_count_noise_takes_its_share_of_z_eff(budget: float, n: int) -> None:
    z_r = 1.3
    sigma_b = count_noise_std(z_r, n, budget)
    z_eff = with_counts(z_r, sigma_b, n)
    assert n * (2 * sigma_b) ** -2 == pytest.approx(budget * z_eff**-2, rel=1e-12)
    assert z_eff == pytest.approx(z_r * math.sqrt(1 - budget), rel=1e-12)


def _plan_cfg(**kw) -> RunConfig:
    return RunConfig(**{"norm_thresh": "adaptive", "noise": 1.2, **kw})


@pytest.mark.parametrize(
    "kw", [{}, {"clip_uv": "separate"}, {"factorization": "fedotp"}, {"factorization": "promptfl"}]
)
def test_plan_folds_the_counts_into_every_multiplier(kw: dict) -> None:
    """z_eff^-2 = sigma_L^-2 + sigma_G^-2 + Q (2 sigma_b)^-2, against the plan without counts."""
    cfg = _plan_cfg(**kw)
    fixed = NoisePlan.from_sigmas(cfg.replace(norm_thresh=0.3), 1.2, 1.2)
    plan = NoisePlan.from_sigmas(cfg, 1.2, 1.2)
    q = {"separate": 3, "promptfl": 1}.get(kw.get("clip_uv", kw.get("factorization", "")), 2)
    assert plan.n_counts == q
    count = q * (2 * plan.count_noise) ** -2
    assert count == pytest.approx(cfg.count_budget * plan.accountant_total**-2, rel=1e-12)
    assert plan.accountant_total == pytest.approx((fixed.accountant_total**-2 + count) ** -0.5, rel=1e-12)
    assert plan.accountant_local == pytest.approx((fixed.accountant_local**-2 + count) ** -0.5, rel=1e-12)
    assert plan.accountant_global == pytest.approx((fixed.accountant_global**-2 + count) ** -0.5, rel=1e-12)
    if kw.get("factorization") != "promptfl":
        releases = combined_noise_multiplier(fixed.accountant_local, fixed.accountant_global)
        assert plan.accountant_total == pytest.approx((releases**-2 + count) ** -0.5, rel=1e-12)


def test_epsilon_is_dp_accountings_for_a_gaussian_of_z_eff() -> None:
    cfg = _plan_cfg()
    plan = NoisePlan.from_sigmas(cfg, 1.2, 1.2)
    q, steps = 8 / 150, 300
    acc = ClientAccountant(cfg, plan, q)
    acc.steps = steps
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(plan.accountant_total))
    want = RdpAccountant().compose(event, steps).get_epsilon(cfg.delta)
    assert acc.epsilons().total == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("calibrate_for", ["total", "each"])
@pytest.mark.parametrize("clip_mode", ["sample", "output"])
def test_epsilon_calibration_includes_the_counts(calibrate_for: str, clip_mode: str) -> None:
    cfg = _plan_cfg(noise=None, epsilon=3.0, calibrate_for=calibrate_for, clip_mode=clip_mode)
    q, steps = 8 / 150, 300
    plan = plan_noise(cfg, sample_rate=q, steps=steps)
    acc = ClientAccountant(cfg, plan, q)
    acc.steps = steps
    eps = acc.epsilons()
    binding = eps.total if calibrate_for == "total" or clip_mode == "output" else max(eps.local, eps.global_)
    assert binding == pytest.approx(3.0, rel=2e-3) and eps.total >= binding - 1e-9
    assert plan.count_noise > 0 and "adaptive clipping" in plan.note


@pytest.mark.parametrize("joint_uv", [True, False])
def test_automatic_clipping_sensitivity_is_at_most_one_however_large_the_gradient(joint_uv: bool) -> None:
    """Without noise, the released sum with one example added moves by < 1 in (g_U, g_V) and in g_G."""
    g = torch.Generator().manual_seed(5)
    K, B, n_ctx, d, r = 1, 6, 4, 8, 2
    u = torch.randn(K, n_ctx, r, generator=g, dtype=torch.float64)
    v = torch.randn(K, r, d, generator=g, dtype=torch.float64)
    cfg = LocalDP(clip_norm=1.0, noise_multiplier=0.0, joint_uv=joint_uv, normalize=True, expected_batch_size=1.0)
    for scale in (1e-3, 1.0, 1e6):
        grads = torch.randn(K, B, n_ctx, d, generator=g, dtype=torch.float64) * scale
        full = privatize_local(grads, u, v, cfg, [NoiseStream(0)])
        less = privatize_local(grads[:, :-1], u, v, cfg, [NoiseStream(0)])
        du = torch.cat([(full.grad_u - less.grad_u).flatten(), (full.grad_v - less.grad_v).flatten()]).norm()
        bound = 1.0 if joint_uv else math.sqrt(2.0)
        assert float(du) < bound + 1e-9 and float((full.grad_global - less.grad_global).norm()) < 1.0 + 1e-9


@pytest.mark.parametrize(
    ("kw", "name", "needle"),
    [
        ({"norm_thresh": "adaptive", "target_quantile": 0.0}, "target_quantile", "(0, 1)"),
        ({"norm_thresh": "adaptive", "target_quantile": 1.0}, "target_quantile", "(0, 1)"),
        ({"norm_thresh": "adaptive", "clip_lr": 0.0}, "clip_lr", "> 0"),
        ({"norm_thresh": "adaptive", "clip_lr": -1.0}, "clip_lr", "> 0"),
        ({"norm_thresh": "adaptive", "count_budget": 1.0}, "count_budget", "(0, 1)"),
        ({"norm_thresh": "adaptive", "count_budget": 0.0}, "count_budget", "(0, 1)"),
        ({"norm_thresh": "adaptive", "clip_mode": "batch"}, "norm_thresh", "batch"),
        ({"norm_thresh": "adaptive", "clip_mode": "output", "output_clip": "auto"}, "norm_thresh", "output_clip"),
        ({"norm_thresh": "adaptive", "clip_init": 1e4}, "clip_init", "[clip_min, clip_max]"),
        ({"norm_thresh": "sometimes"}, "norm_thresh", "adaptive"),
        ({"clip_style": "automatic", "clip_mode": "batch"}, "clip_style", "clip_mode='sample'"),
        ({"clip_style": "automatic", "clip_mode": "output"}, "clip_style", "output_clip='auto' is another thing"),
        ({"clip_style": "automatic", "norm_thresh": "adaptive"}, "clip_style", "adaptive"),
        ({"clip_style": "automatic", "clip_stability": 0.0}, "clip_stability", "> 0"),
        ({"clip_min": 2.0, "clip_max": 1.0}, "clip_min", "clip_max"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kw: dict, name: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig(**kw)
    assert err.value.field == name and needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--norm-thresh", "adaptive", "--target-quantile", "1.5"], "--target-quantile"),
        (["--norm-thresh", "adaptive", "--clip-lr", "0"], "--clip-lr"),
        (["--norm-thresh", "adaptive", "--count-budget", "1"], "--count-budget"),
        (["--norm-thresh", "adaptive", "--clip-mode", "batch"], "--norm-thresh"),
        (["--clip-style", "automatic", "--clip-mode", "output"], "--clip-style"),
        (["--norm-thresh", "often"], "--norm-thresh"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fpl_fast.run import main

    try:
        rc = main(["--quiet", *args])
    except SystemExit as exc:  # the parser's own errors exit from inside parse_args
        rc = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err


# ----------------------------------------------------------------------------------------------
# In a run
# ----------------------------------------------------------------------------------------------
ADAPTIVE = RunConfig(num_users=3, rounds=3, noise_seed=5, norm_thresh="adaptive", clip_init=10.0, clip_lr=0.5)


def test_an_adaptive_run_records_each_clients_clip_norms_and_resumes_exactly(embedded_job, tmp_path) -> None:
    from fpl_fast.job import train

    job = embedded_job(ADAPTIVE)
    whole = train(ADAPTIVE, settings={"out": str(tmp_path / "a"), "progress": False}, backbone=job[0])
    rounds = whole.rounds
    assert [len(r["clip_norms"]) for r in rounds] == [3, 3, 3] and all(len(c) == 2 for c in rounds[0]["clip_norms"])
    first = [c[0] for c in rounds[0]["clip_norms"]]
    last = [c[0] for c in rounds[-1]["clip_norms"]]
    assert all(ADAPTIVE.clip_min <= c <= ADAPTIVE.clip_max for r in rounds for row in r["clip_norms"] for c in row)
    assert max(last) < min(first) < 10.0  # from C = 10, far above the norms (~0.3): every client's C came down
    assert rounds[-1]["clip_norm"] == pytest.approx(sum(last) / 3)
    csv_rows = (tmp_path / "a" / "rounds.csv").read_text().splitlines()
    assert "clip_norm" in csv_rows[0].split(",")
    stopped = tmp_path / "b"
    train(ADAPTIVE, settings={"out": str(stopped), "progress": False}, backbone=job[0], stop_after_round=1)
    resumed = train(None, settings={"out": str(stopped), "resume": True, "progress": False}, backbone=job[0])
    untimed = lambda rs: [{k: v for k, v in r.items() if k != "seconds_elapsed"} for r in rs]  # noqa: E731
    assert untimed(resumed.rounds) == untimed(rounds) and resumed.final["local_acc"] == whole.final["local_acc"]


def test_the_servers_noise_covers_the_largest_clip_norm_of_the_step(embedded_job, monkeypatch) -> None:
    """Each step the server noises G for the largest clip norm of G among that step's clients, before they update."""
    import fpl_fast.federated.client as client_mod
    import fpl_fast.federated.server as server_mod
    from fpl_fast.job import train

    in_force: list[float] = []
    covered: list[float] = []
    real_step, real_noise = client_mod.Clients.local_step, server_mod.server_aggregate_global

    def local_step(self, rows):
        in_force.append(float(self.global_clip_norms(rows).max()))
        return real_step(self, rows)

    def server_noise(grads, *, clip_norm, **kw):
        covered.append(clip_norm)
        return real_noise(grads, clip_norm=clip_norm, **kw)

    monkeypatch.setattr(client_mod.Clients, "local_step", local_step)
    monkeypatch.setattr(server_mod, "server_aggregate_global", server_noise)
    cfg = ADAPTIVE.replace(rounds=1)
    train(cfg, settings={"out": None, "progress": False}, backbone=embedded_job(cfg)[0])
    assert len(covered) == len(in_force) > 2 and covered == in_force
    assert covered[0] == cfg.clip_init and covered[-1] < cfg.clip_init  # it follows the clients' moving C
