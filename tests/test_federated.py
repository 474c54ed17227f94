"""The federated simulation end to end on the embedded tiny CLIP and digits (CPU, seconds per test)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from support import train_job

from fpl_fast.config import RunConfig
from fpl_fast.federated.engine import Federation
from fpl_fast.prompts import FACTORIZATIONS

BASE = RunConfig(num_users=4, rounds=3, batch_size=16, seed=3, partition="iid", noise_seed=3)  # reproducible noise


@pytest.fixture
def job(embedded_job):
    """Backbone, class names and features of the embedded default (the session's, shared)."""
    return embedded_job(BASE)


def _federation(job, cfg: RunConfig, noise: float = 0.0) -> Federation:
    backbone, classnames, data = job
    return Federation(cfg, backbone, classnames, data, noise_local=noise, noise_global=noise)


def test_synchronised_step_leaves_every_client_with_the_same_global_prompt(job) -> None:
    fed = _federation(job, BASE.replace(client_fraction=0.5), noise=1.0)
    before = fed.server.global_ctx.clone()
    clients = fed.sample_clients()
    assert len(clients) == 2
    fed.train_step(clients, server_average=True)
    g = fed.learner.client_global
    assert torch.equal(g, fed.server.global_ctx.expand_as(g))  # idle clients received it too
    assert not torch.equal(fed.server.global_ctx, before)


def test_local_prompts_change_only_for_the_clients_that_trained(job) -> None:
    fed = _federation(job, BASE.replace(client_fraction=0.5), noise=1.0)
    before = fed.learner.local["l"].clone()
    clients = fed.sample_clients()
    fed.train_step(clients, server_average=True)
    idle = [k for k in range(BASE.num_users) if k not in clients.tolist()]
    assert torch.equal(fed.learner.local["l"][idle], before[idle])
    assert not torch.equal(fed.learner.local["l"][clients], before[clients])


def test_round_sync_averages_the_global_copies(job) -> None:
    fed = _federation(job, BASE.replace(sync="round"), noise=0.5)
    clients = fed.sample_clients()
    fed.train_round(clients)
    g = fed.learner.client_global
    assert torch.allclose(g, fed.server.global_ctx.expand_as(g))


def test_per_sample_chunk_is_sized_to_the_activations(job) -> None:
    fed = _federation(job, BASE)
    lane = fed.text.rows_per_client * fed.text.width  # activation floats of one sample of one client
    # The tiny default on the shared text path (47 rows a client): all of a b = 32 batch in one vmap.
    assert fed.clients.chunk_size(10) == (2**20) // (10 * lane) == 34
    assert fed.clients.chunk_size(1) > fed.clients.chunk_size(10)  # fewer active clients: more samples per chunk
    assert fed.clients.chunk_size(10**6) == 1  # never below one sample
    assert _federation(job, BASE.replace(chunk_size=3)).clients.chunk_size(10) == 3  # --chunk-size wins


def test_per_sample_step_does_not_depend_on_the_chunk(job) -> None:
    stepped = []
    for chunk in (1, 16):
        fed = _federation(job, BASE.replace(chunk_size=chunk), noise=1.0)
        fed.train_step(fed.sample_clients(), server_average=True)
        stepped.append(fed.learner.local["l"].clone())
    torch.testing.assert_close(stepped[0], stepped[1], rtol=1e-4, atol=1e-6)


def test_frozen_encoders_get_no_gradients(job) -> None:
    backbone = job[0]
    fed = _federation(job, BASE, noise=1.0)
    fed.train_step(fed.sample_clients(), server_average=True)
    fed2 = _federation(job, BASE.replace(clip_mode="batch"), noise=1.0)
    fed2.train_step(fed2.sample_clients(), server_average=True)
    params = list(backbone.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)


@pytest.mark.slow
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_every_factorization_learns_without_dp_and_beats_the_hand_written_prompt(job, factorization, tmp_path):
    # lr 0.1: fedotp steps G and L with the same gradient (an effective step twice the others'), and oscillates at 0.2.
    cfg = BASE.replace(factorization=factorization, noise=0.0, rounds=8, eval_every=8, lr=0.1)
    res = train_job(job, cfg, tmp_path)
    final = res["final"]
    # Measured (AVX-512, 2 threads): zero-shot 0.46; local 0.67 (fedotp) to 0.96 (dpfpl), i.e. 0.16 to 0.45 above the
    # bound: 64+ of the 400 test images, far beyond what another CPU's rounding moves an 8-round trajectory.
    assert final["local_acc"] > final["zero_shot_acc"] + 0.05, final


def test_reported_epsilon_equals_dp_accounting_for_the_same_q_sigma_steps(job, tmp_path) -> None:
    backbone, classnames, data = job
    cfg = BASE.replace(noise=1.3, clip_uv="separate", rounds=2)
    final = train_job(job, cfg, tmp_path)["final"]
    steps = final["steps_per_client"]
    qs = final["sample_rate_per_client"]

    def rdp_eps(sigma: float, q: float, n: int) -> float:
        acc = RdpAccountant()
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), n)
        return acc.get_epsilon(cfg.delta)

    # Separate clipping of U and V: the pair moves by sqrt(2) C, so the local release is told sigma / sqrt(2).
    want_local = max(rdp_eps(1.3 / math.sqrt(2), q, n) for q, n in zip(qs, steps, strict=True))
    want_global = max(rdp_eps(1.3, q, n) for q, n in zip(qs, steps, strict=True))
    assert final["epsilon_local"] == want_local
    assert final["epsilon_global"] == want_global
    assert steps == [2 * Federation(cfg, backbone, classnames, data, noise_local=0, noise_global=0).steps_per_round] * 4


def test_sync_step_counts_every_local_step_as_a_noised_step(job, tmp_path) -> None:
    backbone, classnames, data = job
    cfg = BASE.replace(noise=1.0, rounds=2, local_epochs=2)
    final = train_job(job, cfg, tmp_path)["final"]
    per_round = Federation(cfg, backbone, classnames, data, noise_local=0, noise_global=0).steps_per_round
    assert per_round > 1
    assert final["steps_per_client"] == [2 * per_round] * cfg.num_users


def test_batch_clip_mode_is_labelled_as_not_per_example(job, tmp_path) -> None:
    final = train_job(job, BASE.replace(clip_mode="batch", rounds=1), tmp_path)["final"]
    assert final["per_example_guarantee"] is False
    assert "NOT a per-example guarantee" in final["noise_note"]


def test_resume_ends_with_exactly_the_results_of_an_uninterrupted_run(job, tmp_path) -> None:
    cfg = BASE.replace(rounds=4, noise=1.0, client_fraction=0.75)
    full = train_job(job, cfg, tmp_path / "full")
    part = train_job(job, cfg, tmp_path / "part", stop_after_round=2)
    assert part["final"] is None and len(part["rounds"]) == 2
    resumed = train_job(job, cfg, tmp_path / "part", resume=True)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds_elapsed"} for r in rows]

    assert strip(resumed["rounds"]) == strip(full["rounds"])
    for key in ("local_acc", "neighbor_acc", "epsilon_local", "epsilon_global", "local_acc_per_client"):
        assert resumed["final"][key] == full["final"][key], key
    saved = json.loads((tmp_path / "part" / "results.json").read_text())
    assert saved["final"]["local_acc"] == full["final"]["local_acc"]
    for name in ("rounds.csv", "accuracy.png", "checkpoint.pt"):
        assert (tmp_path / "part" / name).is_file()


def test_resume_refuses_a_different_configuration(job, tmp_path) -> None:
    train_job(job, BASE.replace(rounds=2), tmp_path, stop_after_round=1)
    with pytest.raises(ValueError, match=r"^lr=0.5 contradicts the checkpoint in .* \(saved with lr=0.00711\)"):
        train_job(job, BASE.replace(rounds=2, lr=0.5), tmp_path, resume=True)  # the differing setting is named


def test_final_reports_the_means_of_the_last_5_and_10_evaluated_rounds_also_after_resume(job, tmp_path) -> None:
    cfg = BASE.replace(rounds=6, eval_every=1, noise=1.0, clip_mode="batch")  # one backward per step: quick
    train_job(job, cfg, tmp_path / "full")
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    rounds, final = saved["rounds"], saved["final"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    for key in ("local_acc", "neighbor_acc"):
        last5 = [r[key] for r in rounds if 2 <= r["round"] <= 6]
        assert final[f"{key}_mean_last5"] == pytest.approx(sum(last5) / 5, abs=1e-12)
        assert final[f"{key}_mean_last10"] == pytest.approx(sum(r[key] for r in rounds) / 6, abs=1e-12)  # all 6
        assert final[key] == rounds[-1][key]  # the last round's stays as it was
    assert final["acc_mean_last5_rounds"] == [2, 3, 4, 5, 6] and final["acc_mean_last10_rounds"] == [1, 2, 3, 4, 5, 6]
    train_job(job, cfg, tmp_path / "part", stop_after_round=3)
    resumed = train_job(job, cfg, tmp_path / "part", resume=True)["final"]
    for key in ("local_acc_mean_last5", "neighbor_acc_mean_last5", "local_acc_mean_last10", "acc_mean_last5_rounds"):
        assert resumed[key] == final[key], key


def test_accuracy_means_window_shorter_runs_and_missing_neighbour_accuracy() -> None:
    from fpl_fast.methods.dpfpl import recent_accuracy_means
    from fpl_fast.outputs import summary_table

    rows = [{"round": 2 * r, "local_acc": 0.1 * r, "neighbor_acc": None} for r in range(1, 4)]  # eval_every 2
    got = recent_accuracy_means(rows)
    assert got["local_acc_mean_last5"] == got["local_acc_mean_last10"] == pytest.approx(0.2)
    assert got["neighbor_acc_mean_last5"] is None and got["acc_mean_last5_rounds"] == [2, 4, 6]
    assert recent_accuracy_means([])["local_acc_mean_last5"] is None
    table = summary_table({"local_acc": 0.3, **got})
    # the summary names the evaluations it averaged: 3 of them, every other round
    assert re.search(r"mean local accuracy, last 3 evaluations \(rounds 2, 4, 6\) +0\.2\n", table), table
