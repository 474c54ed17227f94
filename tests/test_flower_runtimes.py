"""Flower's own runtimes, each in subprocesses: ``--engine flower-sim`` (the simulation, Ray) and real deployments on
loopback (SuperLink + one SuperNode per client + ``flwr run``, scripts/flower_loopback.sh, over TLS with SuperNode
authentication): a killed ServerApp resumed, and a second claim of a partition refused.

The three runs start together (the ``runs`` fixture) and each test waits for its own: each run spends most of its
time waiting (a process per Flower message to start, Flower's polls), so together they take little longer than the
longest alone, where one after the other they took 210 s of a worker's time (2 CPU cores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import Processes, assert_tensorboard_matches_rounds_csv, listening

pytest.importorskip("flwr")  # the [flower] extra (CI installs it)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 600.0  # s for a run (they share the machine with each other and with the other tests' worker)


@dataclass
class Started:
    """A run in the background: its process and its folder, which holds its log (stdout and stderr)."""

    proc: subprocess.Popen[bytes]
    root: Path

    def finish(self) -> tuple[int, str]:
        """Wait for the run; (exit status, log)."""
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.root.name} did not finish in {TIMEOUT:g} s: " + self.log()[-3000:])
        return rc, self.log()

    def log(self) -> str:
        return (self.root / "log.txt").read_text(errors="replace")


def _start(procs: Processes, root: Path, cmd: list[str], env: dict[str, str]) -> Started:
    """``cmd`` in its folder ``root`` (which exists), in a session of its own."""
    return Started(procs.start(cmd, root / "log.txt", env, cwd=root), root)


def _loopback(procs: Processes, root: Path, run_config: str, *options: str) -> Started:
    """scripts/flower_loopback.sh with 2 SuperNodes on the app folder that ``python -m fpl_fast.flower.deploy``
    writes."""
    from fpl_fast.flower.deploy import write_app

    cmd = ["bash", str(REPO / "scripts" / "flower_loopback.sh"), str(root / "app"), "2", "--run-config", run_config]
    env = {**ENV, "VENV": str(Path(sys.executable).parent.parent), "LOG_DIR": str(root / "logs"), "RUN_TIMEOUT": "500"}
    write_app(root / "app")  # makes root too
    return _start(procs, root, [*cmd, *options], env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Started]]:
    procs = Processes()
    try:
        started: dict[str, Started] = {}
        sim = tmp_path_factory.mktemp("sim")
        cmd = [sys.executable, "-m", "fpl_fast.run", "--rounds", "2", "--noise-seed", "7", "--engine", "flower-sim"]
        cmd += ["--tensorboard", str(sim / "tb"), "--quiet", "--out", str(sim / "flower")]
        started["sim"] = _start(procs, sim, cmd, ENV)

        killed = tmp_path_factory.mktemp("killed")
        out, state = killed / "out", killed / "nodes"
        config = f"num-users=2 rounds=2 sync='round' noise-seed=7 eval-every=2 run-name='lb' out='{out}' progress=false"
        started["killed"] = _loopback(
            procs,
            killed / "run",
            config,
            *("--node-config-extra", f"state-dir='{state}'", "--kill-server-when", str(out / "checkpoint.pt")),
            "--unenrolled-node",
        )

        dup = tmp_path_factory.mktemp("dup")
        config = f"num-users=2 rounds=1 sync='round' run-name='dup' out='{dup / 'out'}' progress=false node-timeout=60"
        started["dup"] = _loopback(
            procs,
            dup / "run",
            config,
            *("--node-config-extra", f"state-dir='{dup / 'nodes'}'"),
            *("--extra-node", f"partition-id=1 num-partitions=2 state-dir='{dup / 'intruder'}'"),
        )
        yield started
    finally:  # a failed test's run: its process group is stopped (a finished run's group is already gone)
        procs.stop_all()


def _in_process(embedded_job: Any, out: Path, **changes: object) -> dict:
    """The uninterrupted in-process run's ``final``, in this process on the session's prepared job (its images are
    encoded once per session)."""
    from fpl_fast.config import RunConfig
    from fpl_fast.job import train

    cfg = RunConfig(**changes)  # type: ignore[arg-type]
    backbone, names, data = embedded_job(cfg)
    settings = {"out": str(out), "progress": False}
    return train(cfg, settings=settings, backbone=backbone, features=data, classnames=names).final


def _script_ports_stopped(stderr: str) -> None:
    """Every process the loopback script started has stopped: nothing runs or listens on its ports."""
    ports = re.search(r"SuperLink 127\.0\.0\.1:(\d+), SuperNode ports ([\d ]+)", stderr)
    assert ports is not None, stderr[-3000:]
    for port in [ports.group(1), *ports.group(2).split()]:
        left = subprocess.run(["pgrep", "-f", f"127.0.0.1 --port {port}|127.0.0.1:{port}"], capture_output=True)
        assert left.returncode == 1, f"still running on port {port}: {left.stdout!r}"
        assert not listening(int(port)), f"still listening on {port}"


@pytest.mark.slow
def test_engine_flower_sim_matches_the_in_process_run_of_the_embedded_default(
    runs: dict[str, Started], embedded_job: Any, tmp_path: Path
) -> None:
    """The embedded default for 2 rounds on Flower's simulation runtime: accuracies within 0.02 of the in-process
    run's (float rounding of one client per encoder call against all at once), the same epsilons exactly."""
    ip = _in_process(embedded_job, tmp_path / "inprocess", rounds=2, noise_seed=7)
    rc, err = runs["sim"].finish()
    assert rc == 0, err[-3000:]
    sim = runs["sim"].root
    fl = json.loads((sim / "flower" / "results.json").read_text())
    final = fl["final"]
    assert final["engine"] == "flower" and [r["round"] for r in fl["rounds"]] == [1, 2]
    assert abs(final["local_acc"] - ip["local_acc"]) <= 0.02
    assert abs(final["neighbor_acc"] - ip["neighbor_acc"]) <= 0.02
    assert final["epsilon_total_per_client"] == ip["epsilon_total_per_client"]
    assert final["steps_per_client"] == ip["steps_per_client"]
    assert (sim / "flower" / "rounds.csv").is_file() and (sim / "flower" / "accuracy.png").is_file()
    # the server's log: what it holds, and no private/ tag (the loss and clipped fraction stay on the nodes)
    logged = assert_tensorboard_matches_rounds_csv(sim / "tb", sim / "flower" / "rounds.csv")
    assert "released/epsilon_total" in logged and not [t for t in logged if t.startswith("private/")]
    assert sorted(p.name for p in (sim / "flower" / "nodes" / "flower").iterdir()) == [f"client-{k}" for k in range(10)]


def test_engine_flower_sim_refuses_the_membership_attack(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fpl_fast.run", "--engine", "flower-sim", "--mia", "2", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("error: --mia needs --engine inprocess (--engine flower-sim)")


@pytest.mark.slow
def test_a_loopback_deployment_survives_a_killed_server_and_leaves_nothing_running(
    runs: dict[str, Started], embedded_job: Any, tmp_path: Path
) -> None:
    """2 rounds of sync="round" evaluated once, at the end (each message costs a ClientApp process), with a third
    SuperNode whose key no one enrolled refused before the run. The ServerApp is SIGKILLed once its round-1
    checkpoint exists (the clients are in round 2) and a new ``flwr run`` with resume=true continues: the results are
    the uninterrupted in-process run's with the same --noise-seed (same steps and epsilons, accuracies to 0.02), and
    every process the script started has stopped."""
    ip = _in_process(embedded_job, tmp_path / "ip", num_users=2, rounds=2, sync="round", noise_seed=7, eval_every=2)
    rc, err = runs["killed"].finish()
    assert rc == 0, err[-3000:]
    assert re.search(r"ServerApp \(pid \d+\) killed", err), err[-3000:]
    assert "TLS on; 2 SuperNode keys enrolled" in err, err[-3000:]
    refusal = re.search(r"unenrolled SuperNode refused: (.*)", err)
    assert refusal is not None and "Failed to activate SuperNode." in refusal.group(1), err[-3000:]
    _script_ports_stopped(err)
    root = runs["killed"].root.parent
    fl = json.loads((root / "out" / "results.json").read_text())
    assert [r["round"] for r in fl["rounds"]] == [2]  # eval-every=2: one evaluation, after the resume
    final = fl["final"]
    assert final["steps_per_client"] == ip["steps_per_client"]
    assert final["epsilon_total_per_client"] == ip["epsilon_total_per_client"]
    assert abs(final["local_acc"] - ip["local_acc"]) <= 0.02
    assert sorted(p.name for p in (root / "nodes" / "lb").iterdir()) == ["client-0", "client-1"]
    assert (root / "nodes" / "lb" / "client-0" / "state-2.pt").is_file()


@pytest.mark.slow
def test_a_second_node_claiming_a_taken_partition_is_refused_under_tls(runs: dict[str, Started]) -> None:
    """Two enrolled SuperNodes for partitions 0 and 1 and a third, also enrolled, that claims partition 1: the
    ServerApp refuses the run at set-up with one line naming both nodes (it cannot tell which one is honest), and
    every process stops."""
    rc, err = runs["dup"].finish()
    assert rc == 1, err[-3000:]
    assert "TLS on; 3 SuperNode keys enrolled" in err
    assert re.search(r"nodes \d+ and \d+ both hold partition-id 1", err) is not None, err[-3000:]
    assert not (runs["dup"].root.parent / "out" / "results.json").exists()
    _script_ports_stopped(err)
