"""Secret noise and sampling by default, reproducible with --noise-seed; epsilon_total of both releases."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from support import train_job

from fpl_fast.config import RunConfig
from fpl_fast.federated.engine import Federation
from fpl_fast.outputs import load_checkpoint
from fpl_fast.privacy.accountant import epsilon_for
from fpl_fast.privacy.randomness import PartyRandomness, derive_key, party_key
from fpl_fast.privacy.sensitivity import combined_noise_multiplier

# 3 steps a round; C = 10 and lr 0.1 make one step's noise (lr sigma C / b ~ 0.1 per entry) far larger than rounding.
BASE = RunConfig(
    num_users=3, rounds=2, batch_size=8, seed=3, partition="iid", noise=1.0, num_shots=3, norm_thresh=10.0, lr=0.1
)


@pytest.fixture
def job(embedded_job):
    return embedded_job(BASE)


def _prompts(out) -> dict[str, torch.Tensor]:
    fed = load_checkpoint(out)["federation"]
    learner = fed["clients"]["learner"]
    prompts = {k: v for k, v in learner.items() if isinstance(v, torch.Tensor)}
    return {**prompts, **{f"local.{k}": v for k, v in learner["local"].items()}, "global": fed["server"]["g"]}


def _keys(out) -> list[int]:
    """Every key a run's parties hold (noise keys and the sampling generators' seeds), from its checkpoint."""
    fed = load_checkpoint(out)["federation"]
    parts = [c["randomness"] for c in fed["clients"]["clients"]] + [fed["server"]["randomness"]]
    keys = []
    for p in parts:
        keys.append(int(p["noise"]["seed"]))
        keys.append(int(p["sampling"]["state"]["state"]))  # PCG64's 128-bit state
    return keys


def test_keys_are_secret_by_default_and_derived_with_a_noise_seed():
    assert party_key(None, "client-0", "noise") != party_key(None, "client-0", "noise")  # fresh from the OS
    a = party_key(7, "client-0", "noise")
    assert a == party_key(7, "client-0", "noise") and 0 <= a < 2**63
    others = {party_key(7, "client-1", "noise"), party_key(7, "client-0", "sampling"), party_key(8, "client-0", "x")}
    assert len(others | {a}) == 4
    assert derive_key("eval", 1, 0) != derive_key("eval", 1, 1)
    r = PartyRandomness.create("server", None)
    assert "seed" not in repr(r.noise)  # the key never reaches a log line through a repr


def test_two_runs_with_the_same_seed_differ_and_results_hold_no_key(job, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = train_job(job, BASE, a)
    train_job(job, BASE, b)
    pa, pb = _prompts(a), _prompts(b)
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)  # different noise and batches
    assert ra["final"]["randomness"]["noise_and_sampling"] == "secret"
    text = "".join((a / name).read_text() for name in ("results.json", "rounds.csv"))
    keys = _keys(a)
    assert len(set(keys)) == len(keys) == 2 * (BASE.num_users + 1)
    for key in keys:
        assert str(key) not in text and hex(key)[2:] not in text


def test_two_runs_with_the_same_noise_seed_are_bitwise_equal(job, tmp_path):
    cfg = BASE.replace(noise_seed=11)
    ra = train_job(job, cfg, tmp_path / "a")
    rb = train_job(job, cfg, tmp_path / "b")
    pa, pb = _prompts(tmp_path / "a"), _prompts(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    strip = lambda rounds: [{k: v for k, v in r.items() if k != "seconds_elapsed"} for r in rounds]  # noqa: E731
    assert strip(ra["rounds"]) == strip(rb["rounds"])
    statement = ra["final"]["randomness"]
    assert statement["noise_and_sampling"] == "reproducible" and "does NOT hold" in statement["warning"]
    train_job(job, cfg.replace(noise_seed=12), tmp_path / "c")
    pc = _prompts(tmp_path / "c")
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_resume_continues_the_secret_streams(job, tmp_path):
    """The keys live in the checkpoint: two resumes of one stopped secret run end identically."""
    first = tmp_path / "first"
    train_job(job, BASE, first, stop_after_round=1)
    shutil.copytree(first, tmp_path / "second")
    train_job(job, BASE, first, resume=True)
    train_job(job, BASE, tmp_path / "second", resume=True)
    pa, pb = _prompts(first), _prompts(tmp_path / "second")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_a_clients_batches_and_noise_depend_only_on_its_own_key(job):
    """Client 0 steps alone or beside others: the same batch and the same local update."""
    backbone, classnames, data = job
    cfg = BASE.replace(noise_seed=5, sync="step")
    feds = [Federation(cfg, backbone, classnames, data, noise_local=1.0, noise_global=1.0) for _ in range(2)]
    before = feds[0].learner.local["l"][0].clone()
    feds[0].train_step(torch.tensor([0, 1, 2]), server_average=True)
    feds[1].train_step(torch.tensor([0]), server_average=True)
    assert feds[0].clients.rand[0].noise.offset == feds[1].clients.rand[0].noise.offset > 0
    assert feds[0].clients.samplers[0].pos == feds[1].clients.samplers[0].pos
    l_all, l_alone = feds[0].learner.local["l"][0], feds[1].learner.local["l"][0]
    assert not torch.equal(l_all, before)
    torch.testing.assert_close(l_all, l_alone, rtol=1e-5, atol=1e-6)  # batched vs alone: rounding only
    other = Federation(cfg.replace(noise_seed=6), backbone, classnames, data, noise_local=1.0, noise_global=1.0)
    other.train_step(torch.tensor([0]), server_average=True)
    assert (other.learner.local["l"][0] - l_alone).abs().max() > 1e-3  # other keys: other noise


def test_combined_multiplier_matches_the_shared_batch_event():
    """The issue's numbers: q = 8/60, sigma 1.5 for each release, 160 steps, delta 1e-5 (RDP)."""
    q, steps, delta = 8 / 60, 160, 1e-5
    sigma_eff = combined_noise_multiplier(1.5, 1.5)
    assert sigma_eff == pytest.approx(1.5 / np.sqrt(2))
    total = epsilon_for(sigma_eff, q, steps, delta, "rdp", "poisson")
    # Independent computation: one Poisson-sampled step whose Gaussian has the pair's joint sensitivity.
    acc = RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma_eff)), steps)
    assert total == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert total == pytest.approx(12.07, abs=0.01)
    # Two independently sampled sequences understate it.
    separate = RdpAccountant()
    separate.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.5)), 2 * steps)
    understated = separate.get_epsilon(delta)
    assert understated == pytest.approx(9.88, abs=0.01) and understated < total
    assert combined_noise_multiplier(2.0) == 2.0 and combined_noise_multiplier(1.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="finite and >= 0"):
        combined_noise_multiplier(-1.0)


def test_run_reports_epsilon_total_against_dp_accounting(job, tmp_path):
    cfg = BASE.replace(noise_local=1.2, noise_global=2.0, noise=None, noise_seed=1)
    res = train_job(job, cfg, tmp_path / "run")
    f = res["final"]
    assert f["sampling"] == "poisson"
    sigma_eff = (1.2**-2 + 2.0**-2) ** -0.5
    assert f["accountant_multiplier_total"] == pytest.approx(sigma_eff)
    for k in range(cfg.num_users):
        acc = RdpAccountant()
        q = f["sample_rate_per_client"][k]
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma_eff)), f["steps_per_client"][k])
        assert f["epsilon_total_per_client"][k] == pytest.approx(acc.get_epsilon(cfg.delta), rel=1e-6)
    assert f["epsilon_total"] == max(f["epsilon_total_per_client"]) > max(f["epsilon_local"], f["epsilon_global"])
    assert res["rounds"][-1]["epsilon_total"] == pytest.approx(f["epsilon_total"])
    header = (tmp_path / "run" / "rounds.csv").read_text().splitlines()[0]
    assert "epsilon_total" in header.split(",")


@pytest.mark.parametrize("calibrate_for", ["total", "each"])
def test_epsilon_target_calibrates_for_the_total_by_default(job, tmp_path, calibrate_for):
    cfg = BASE.replace(noise=None, epsilon=4.0, calibrate_for=calibrate_for, noise_seed=1)
    f = train_job(job, cfg, tmp_path / calibrate_for)["final"]
    if calibrate_for == "total":
        assert 3.9 < f["epsilon_total"] <= 4.0 + 1e-6
    else:
        assert 3.9 < f["epsilon_local"] <= 4.0 + 1e-6 and 3.9 < f["epsilon_global"] <= 4.0 + 1e-6
        assert f["epsilon_total"] > 4.5


def test_sampling_is_poisson_by_default_and_shuffled_for_batch_clipping():
    assert RunConfig().sampling == "poisson"
    assert RunConfig(clip_mode="batch").sampling == "shuffle"
    assert RunConfig(sampling="shuffle").sampling == "shuffle"
    with pytest.raises(ValueError, match="^sampling='poisson' needs clip_mode='sample'"):
        RunConfig(clip_mode="batch", sampling="poisson")
    with pytest.raises(ValueError, match="^noise_seed must be an integer >= 0"):
        RunConfig(noise_seed=-1)
    assert json.loads(json.dumps(RunConfig().to_dict()))["noise_seed"] is None
