"""Flower's own runtimes: ``--engine flower-sim`` (the simulation, Ray) and a real deployment on loopback
(SuperLink + one SuperNode per client + ``flwr run``, scripts/flower_loopback.sh), each in subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import assert_tensorboard_matches_rounds_csv

pytest.importorskip("flwr")  # the [flower] extra (CI installs it)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], out: Path, timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", "fpl_fast.run", *args, "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _in_process(out: Path, **changes: object) -> dict:
    """The uninterrupted in-process run's ``final`` (in this process: no interpreter to start)."""
    from fpl_fast.config import RunConfig
    from fpl_fast.job import train

    return train(RunConfig(**changes), settings={"out": str(out), "progress": False}).final  # type: ignore[arg-type]


@pytest.mark.slow
def test_engine_flower_sim_matches_the_in_process_run_of_the_embedded_default(tmp_path: Path) -> None:
    """The embedded default for 2 rounds on Flower's simulation runtime: accuracies within 0.02 of the in-process
    run's (float rounding of one client per encoder call against all at once), the same epsilons exactly."""
    ip = _in_process(tmp_path / "inprocess", rounds=2, noise_seed=7)
    args = ["--rounds", "2", "--noise-seed", "7", "--engine", "flower-sim", "--tensorboard", str(tmp_path / "tb")]
    fl = _run(args, tmp_path / "flower")
    final = fl["final"]
    assert final["engine"] == "flower" and [r["round"] for r in fl["rounds"]] == [1, 2]
    assert abs(final["local_acc"] - ip["local_acc"]) <= 0.02
    assert abs(final["neighbor_acc"] - ip["neighbor_acc"]) <= 0.02
    assert final["epsilon_total_per_client"] == ip["epsilon_total_per_client"]
    assert final["steps_per_client"] == ip["steps_per_client"]
    assert (tmp_path / "flower" / "rounds.csv").is_file() and (tmp_path / "flower" / "accuracy.png").is_file()
    # the server's log: what it holds, and no private/ tag (the loss and clipped fraction stay on the nodes)
    logged = assert_tensorboard_matches_rounds_csv(tmp_path / "tb", tmp_path / "flower" / "rounds.csv")
    assert "released/epsilon_total" in logged and not [t for t in logged if t.startswith("private/")]
    assert sorted(p.name for p in (tmp_path / "flower" / "nodes" / "flower").iterdir()) == [
        f"client-{k}" for k in range(10)
    ]


def test_engine_flower_sim_refuses_the_membership_attack(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fpl_fast.run", "--engine", "flower-sim", "--mia", "2", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("error: --mia needs --engine inprocess (--engine flower-sim)")


@pytest.mark.slow
def test_a_loopback_deployment_survives_a_killed_server_and_leaves_nothing_running(tmp_path: Path) -> None:
    """SuperLink + 2 SuperNodes on their own loopback ports + ``flwr run`` of the app folder that
    ``python -m fpl_fast.flower.deploy`` writes (scripts/flower_loopback.sh, which stops its processes by PID), 2
    rounds of sync="round" evaluated once, at the end (each message costs a ClientApp process), over TLS with
    SuperNode authentication (each node's key enrolled; a third SuperNode with a key no one enrolled is refused before
    the run). The ServerApp is SIGKILLed once its round-1 checkpoint exists (the clients are in round 2) and a new
    ``flwr run`` with resume=true continues: the results are the uninterrupted in-process run's with the same
    --noise-seed (same steps and epsilons, accuracies to 0.02), and
    every process the script started has stopped."""
    from fpl_fast.flower.deploy import write_app

    app = tmp_path / "app"
    write_app(app)
    out, state = tmp_path / "out", tmp_path / "nodes"
    run_config = f"num-users=2 rounds=2 sync='round' noise-seed=7 eval-every=2 run-name='lb' out='{out}' progress=false"
    script = REPO / "scripts" / "flower_loopback.sh"
    cmd = ["bash", str(script), str(app), "2", "--run-config", run_config]
    cmd += ["--node-config-extra", f"state-dir='{state}'", "--kill-server-when", str(out / "checkpoint.pt")]
    cmd += ["--unenrolled-node"]
    env = {**ENV, "VENV": str(Path(sys.executable).parent.parent), "LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"ServerApp \(pid \d+\) killed", proc.stderr), proc.stderr[-3000:]
    assert "TLS on; 2 SuperNode keys enrolled" in proc.stderr, proc.stderr[-3000:]
    refusal = re.search(r"unenrolled SuperNode refused: (.*)", proc.stderr)
    assert refusal is not None and "Failed to activate SuperNode." in refusal.group(1), proc.stderr[-3000:]
    ports = re.search(r"SuperLink 127\.0\.0\.1:(\d+), SuperNode ports ([\d ]+)", proc.stderr)
    assert ports is not None, proc.stderr
    for port in [ports.group(1), *ports.group(2).split()]:  # every process the script started has stopped
        left = subprocess.run(["pgrep", "-f", f"127.0.0.1 --port {port}|127.0.0.1:{port}"], capture_output=True)
        assert left.returncode == 1, f"still running on port {port}: {left.stdout!r}"
    fl = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in fl["rounds"]] == [2]  # eval-every=2: one evaluation, after the resume
    ip = _in_process(tmp_path / "ip", num_users=2, rounds=2, sync="round", noise_seed=7, eval_every=2)
    final = fl["final"]
    assert final["steps_per_client"] == ip["steps_per_client"]
    assert final["epsilon_total_per_client"] == ip["epsilon_total_per_client"]
    assert abs(final["local_acc"] - ip["local_acc"]) <= 0.02
    assert sorted(p.name for p in (state / "lb").iterdir()) == ["client-0", "client-1"]
    assert (state / "lb" / "client-0" / "state-2.pt").is_file()
