"""Client drop-out (--client-drop-rate P): floor(P m) of each round's m sampled clients drop out for the whole round,
drawn by the server's own generator; a dropped client takes no step and its ledger counts none (embedded job, CPU)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from support import train_job

from fpl_fast import outputs
from fpl_fast.config import RunConfig, clients_dropped
from fpl_fast.federated.engine import Federation
from fpl_fast.federated.server import Server
from fpl_fast.privacy.plan import active_clients
from fpl_fast.validation import ConfigError

# 4 shots a class: 40 examples a client, 5 steps a round; batch-mean clipping: one backward a step (quick).
BASE = RunConfig(
    num_users=4,
    rounds=3,
    num_shots=4,
    batch_size=8,
    seed=3,
    partition="iid",
    noise_seed=3,
    noise=1.0,
    clip_mode="batch",
)
DROP = BASE.replace(client_drop_rate=0.5)  # 2 of the 4 clients drop out each round


@pytest.fixture
def job(embedded_job):
    """Backbone, class names and features of the embedded default (the session's, shared)."""
    return embedded_job(BASE)


def _federation(job, cfg: RunConfig) -> Federation:
    backbone, classnames, data = job
    return Federation(cfg, backbone, classnames, data, noise_local=cfg.noise, noise_global=cfg.noise)


def _client_state(fed: Federation, k: int) -> dict:
    """Everything of client k's that a step would move: its prompt rows, optimiser rows, randomness and ledger."""
    c = fed.clients
    return {
        "local": {n: t[k].clone() for n, t in fed.learner.local.items()},
        "momentum": {n: b[k].clone() for n, b in c.opt_local.buffers.items()},
        "global_momentum": {n: b[k].clone() for n, b in c.opt_global.buffers.items()},
        "randomness": c.rand[k].state_dict(),
        "sampler": c.samplers[k].state_dict(),
        "steps": c.accountants[k].steps,
    }


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not _same(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_the_count_is_floor_of_the_rate_times_the_sampled_clients() -> None:
    assert [clients_dropped(0.5, m) for m in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 2]
    assert clients_dropped(0.29, 100) == 29  # not 28 (0.29 x 100 is 28.999.. in floating point)
    assert clients_dropped(0.0, 10) == 0 and clients_dropped(0.99, 10) == 9  # at least one client reports
    assert active_clients(DROP) == 2 and active_clients(BASE) == 4
    assert active_clients(BASE.replace(num_users=10, client_fraction=0.5, client_drop_rate=0.4)) == 3


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, float("nan"), "half", True])
def test_a_rate_outside_0_1_is_refused_in_one_line(rate) -> None:
    with pytest.raises(ConfigError, match=r"^client_drop_rate must be a number in \[0, 1\), got ") as info:
        BASE.replace(client_drop_rate=rate)
    assert "\n" not in str(info.value)


def test_a_rate_that_drops_nobody_is_refused_with_the_smallest_that_does() -> None:
    with pytest.raises(ConfigError, match=r"drops floor\(0.2 x 4\) = 0 of the 4 clients .* at least 1/4 = 0.25"):
        BASE.replace(client_drop_rate=0.2)
    assert BASE.replace(client_drop_rate=0.25).client_drop_rate == 0.25


def test_the_cli_refuses_a_rate_of_one_in_one_line(capsys) -> None:
    from fpl_fast.run import main

    rc = main(["--quiet", "--client-drop-rate", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "--client-drop-rate" in err[0] and "[0, 1)" in err[0], err


def test_rate_zero_draws_nothing_and_trains_as_without_drop_out(job, tmp_path, monkeypatch) -> None:
    """P = 0 is the run of before the flag: the drop-out generator is never drawn from, and a run whose server skips
    the drop-out step altogether ends bit for bit the same."""
    cfg = BASE.replace(rounds=2)
    res = train_job(job, cfg, tmp_path / "zero")
    server = outputs.load_checkpoint(tmp_path / "zero")["federation"]["server"]
    fresh = Server(cfg, torch.zeros(1), noise_multiplier=0.0).dropout.bit_generator.state
    assert server["dropout"] == fresh  # nothing drawn
    assert res["final"]["clients_dropped_per_round"] == [[], []]
    monkeypatch.setattr(Server, "round_clients", lambda self, n: self.sample_clients(n))  # no drop-out step at all
    without = train_job(job, cfg, tmp_path / "without")
    assert torch.equal(outputs.load_checkpoint(tmp_path / "without")["federation"]["server"]["g"], server["g"])
    for key in ("local_acc_per_client", "epsilon_total_per_client", "steps_per_client"):
        assert without["final"][key] == res["final"][key], key


@pytest.mark.parametrize(("sync", "clip_mode"), [("step", "sample"), ("round", "batch")])
def test_a_dropped_client_takes_no_step_and_the_others_train(job, sync: str, clip_mode: str) -> None:
    fed = _federation(job, DROP.replace(sync=sync, clip_mode=clip_mode))
    before = [_client_state(fed, k) for k in range(4)]
    g_before = fed.server.global_ctx.clone()
    reporting = fed.sample_clients().tolist()
    dropped = fed.server.dropped[-1]
    assert len(dropped) == 2 and sorted(reporting + dropped) == [0, 1, 2, 3]
    fed.train_round(torch.as_tensor(reporting))
    after = [_client_state(fed, k) for k in range(4)]
    for k in dropped:
        assert _same(after[k], before[k]), k  # prompt, momentum, randomness, batches and ledger all as they were
    for k in reporting:
        assert after[k]["steps"] == fed.steps_per_round
        assert not torch.equal(after[k]["local"]["l"], before[k]["local"]["l"])
    assert not torch.equal(fed.server.global_ctx, g_before)


def test_the_server_averages_and_noises_for_the_clients_that_report(job, monkeypatch) -> None:
    """sync step: the server's noise is sigma_g C / (b K_r) for the K_r = 2 clients that report."""
    seen = []
    from fpl_fast.federated import server as server_mod

    real = server_mod.server_aggregate_global

    def spy(grads, **kw):
        seen.append(grads.shape[0])
        return real(grads, **kw)

    monkeypatch.setattr(server_mod, "server_aggregate_global", spy)
    fed = _federation(job, DROP)
    fed.train_round(fed.sample_clients())
    assert seen == [2] * fed.steps_per_round


def test_if_every_client_drops_out_the_round_leaves_everything_as_it_was(job) -> None:
    fed = _federation(job, DROP)
    before = [_client_state(fed, k) for k in range(4)]
    g = fed.server.global_ctx.clone()
    ticks = []
    assert fed.train_round(torch.zeros(0, dtype=torch.long), on_step=lambda: ticks.append(1)) == []
    assert torch.equal(fed.server.global_ctx, g) and len(ticks) == fed.steps_per_round
    assert all(_same(_client_state(fed, k), before[k]) for k in range(4))


def test_drop_outs_come_from_the_servers_own_generator(job) -> None:
    """The draw moves neither the server's client sampling nor any client's randomness: a client that reports
    draws exactly what it draws without drop-out; secret keys without --noise-seed."""
    cfg = DROP.replace(client_fraction=0.75)  # 3 sampled, 1 drops out
    with_drop, without = _federation(job, cfg), _federation(job, cfg.replace(client_drop_rate=0.0))
    for _ in range(2):
        reporting = with_drop.sample_clients()
        with_drop.train_round(reporting)
        sampled = without.sample_clients()
        without.train_round(sampled)
        assert set(reporting.tolist()) | set(with_drop.server.dropped[-1]) == set(sampled.tolist())
    assert with_drop.server.rand.state_dict() == without.server.rand.state_dict()  # its sampling and noise keys
    steps = with_drop.steps_taken
    for k in range(4):
        if steps[k] == without.steps_taken[k]:  # reported every round it was sampled: the same draws
            assert _same(with_drop.clients.rand[k].state_dict(), without.clients.rand[k].state_dict()), k
            assert _same(with_drop.clients.samplers[k].state_dict(), without.clients.samplers[k].state_dict()), k
    assert (steps < without.steps_taken).any()  # someone did drop out
    secret = [Server(RunConfig(client_drop_rate=0.5), torch.zeros(1), noise_multiplier=0.0) for _ in range(2)]
    assert secret[0].dropout.bit_generator.state != secret[1].dropout.bit_generator.state


def test_a_run_with_drop_out_records_and_accounts_what_each_client_did(job, tmp_path) -> None:
    res = train_job(job, DROP, tmp_path / "a")
    final = res["final"]
    log = final["clients_dropped_per_round"]
    assert len(log) == DROP.rounds and all(len(d) == 2 for d in log)
    backbone, classnames, data = job
    per_round = Federation(DROP, backbone, classnames, data, noise_local=0, noise_global=0).steps_per_round
    reported = [sum(k not in d for d in log) for k in range(4)]
    assert final["steps_per_client"] == [per_round * r for r in reported]
    eps = final["epsilon_total_per_client"]
    for j in range(4):  # the epsilons follow the steps actually taken
        for k in range(4):
            if reported[j] < reported[k]:
                assert eps[j] < eps[k]
            elif reported[j] == reported[k]:
                assert eps[j] == eps[k]
    assert [r["dropped"] for r in res["rounds"]] == log
    with open(tmp_path / "a" / "rounds.csv") as f:
        assert [row["dropped"] for row in csv.DictReader(f)] == [" ".join(map(str, d)) for d in log]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["final"]["clients_dropped_per_round"] == log

    # Reproducible with the noise seed; another noise seed draws other drop-outs.
    again = train_job(job, DROP, tmp_path / "b")["final"]
    assert again["clients_dropped_per_round"] == log and again["local_acc_per_client"] == final["local_acc_per_client"]
    other = train_job(job, DROP.replace(noise_seed=4), tmp_path / "c")["final"]
    assert other["clients_dropped_per_round"] != log


def test_a_resumed_run_draws_the_same_drop_outs(job, tmp_path) -> None:
    cfg = DROP
    full = train_job(job, cfg, tmp_path / "full")
    train_job(job, cfg, tmp_path / "part", stop_after_round=1)
    resumed = train_job(job, cfg, tmp_path / "part", resume=True)
    for key in ("clients_dropped_per_round", "steps_per_client", "local_acc_per_client", "epsilon_total_per_client"):
        assert resumed["final"][key] == full["final"][key], key
