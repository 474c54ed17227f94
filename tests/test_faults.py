"""Faults and bad input: killed runs, damaged checkpoints, diverging training, output folders in use.

The kill tests run the job for real in subprocesses (SIGKILL from outside, and from inside a checkpoint write
through the FPL_FAST_CRASH_IN_CHECKPOINT hook of fpl_fast.outputs) and compare the resumed run with an
uninterrupted one, bitwise except for wall-clock fields.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import train_job

from fpl_fast import outputs
from fpl_fast.config import RunConfig
from fpl_fast.federated.server import Server
from fpl_fast.methods.dpfpl import TrainingDiverged, build_federation
from fpl_fast.run import main

# Tiny and quick: 2 clients, one shot per class (3 steps a round), batch-mean clipping (no per-sample pass)
# with noise, so that resuming has the sampler's, the factorisation's and the DP noise's streams to get right.
FLAGS = {
    "rounds": 4,
    "num_users": 2,
    "num_shots": 1,
    "batch_size": 4,
    "n_ctx": 4,
    "rank": 2,
    "partition": "iid",
    "clip_mode": "batch",
    "noise": 1.0,
    "seed": 5,
    "noise_seed": 5,  # the resumed run is compared with an uninterrupted one: reproducible noise and batches
}
BASE = RunConfig(**FLAGS)
ARGS = [a for k, v in FLAGS.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture
def job(embedded_job):
    return embedded_job(BASE)


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("python -m fpl_fast.run: error: "), err
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def test_checkpoint_write_keeps_the_previous_one_and_leaves_no_temporary_file(job, tmp_path: Path) -> None:
    train_job(job, BASE, tmp_path, stop_after_round=2)
    assert outputs.load_checkpoint(tmp_path)["next_round"] == 2
    prev = torch.load(tmp_path / outputs.PREVIOUS, map_location="cpu", weights_only=False)
    assert prev["next_round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [outputs.PREVIOUS, outputs.CHECKPOINT]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_checkpoint_fails_in_one_line_and_is_left_untouched(
    job, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    train_job(job, BASE, tmp_path, stop_after_round=2)
    path = tmp_path / outputs.CHECKPOINT
    good = path.read_bytes()
    bad = {"truncate": good[: len(good) // 2], "garbage": bytes(range(256)) * (len(good) // 256), "empty": b""}[damage]
    path.write_bytes(bad)
    before = _files(tmp_path)

    line = _one_line_error(capsys, main(["--quiet", *ARGS, "--resume", "--out", str(tmp_path)]))
    assert "cannot read" in line and str(path) in line and outputs.PREVIOUS in line, line
    with pytest.raises(ValueError, match="truncated or corrupt"):  # train itself refuses it too
        train_job(job, BASE, tmp_path, resume=True)
    assert _files(tmp_path) == before  # the damaged file is not replaced and the previous one is kept
    assert torch.load(tmp_path / outputs.PREVIOUS, map_location="cpu", weights_only=False)["next_round"] == 1


def test_resume_without_a_checkpoint_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    for folder in (empty, tmp_path / "missing", tmp_path / "done"):
        line = _one_line_error(capsys, main(["--quiet", *ARGS, "--resume", "--out", str(folder)]))
        assert "nothing to resume" in line and str(folder) in line, line
    assert not (tmp_path / "missing").exists() and not any(empty.iterdir())


# ----------------------------------------------------------------------------------------------
# Output folders
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dpfpl", "feddtpt"])
@pytest.mark.parametrize("name", ["results.json", "checkpoint.pt"])
def test_an_out_folder_of_a_previous_run_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, method: str
) -> None:
    (tmp_path / name).write_bytes(b"a previous run")
    before = _files(tmp_path)
    flags = ARGS if method == "dpfpl" else ["--rounds", "1"]
    line = _one_line_error(capsys, main(["--quiet", "--method", method, *flags, "--out", str(tmp_path)]))
    assert "previous run" in line and name in line and "--resume" in line, line
    assert _files(tmp_path) == before


def test_train_refuses_a_used_folder_and_accepts_an_empty_one(job, tmp_path: Path) -> None:
    cfg = BASE.replace(rounds=1)
    res = train_job(job, cfg, tmp_path)  # exists (pytest made it) and is empty: fine
    assert res["final"] is not None
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="holds a previous run"):
        train_job(job, cfg, tmp_path)
    assert _files(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------
def test_a_non_finite_released_gradient_stops_the_run_naming_round_and_step(
    job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's noised gradient turns infinite at round 2, step 2: the run stops there, and the checkpoint of
    round 1 is kept and loads into a Federation with finite prompts."""
    per_round = build_federation(BASE, *job)[0].steps_per_round
    calls = 0
    aggregate = Server.aggregate

    def blow_up(self: Server, grads: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        out = aggregate(self, grads)
        return out * float("inf") if calls == per_round + 2 else out

    monkeypatch.setattr(Server, "aggregate", blow_up)
    with pytest.raises(TrainingDiverged, match=rf"round 2, step 2 of {per_round}: the global prompt") as info:
        train_job(job, BASE, tmp_path)
    assert "\n" not in str(info.value) and "checkpoint of round 1" in str(info.value)
    ckpt = outputs.load_checkpoint(tmp_path)
    assert ckpt["next_round"] == 1
    fed = build_federation(BASE, *job)[0]
    fed.load_state_dict(ckpt["federation"])
    assert torch.isfinite(fed.server.global_ctx).all() and torch.isfinite(fed.learner.local["l"]).all()
    assert not (tmp_path / "results.json").exists()


def test_a_huge_learning_rate_fails_in_one_line_with_round_and_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # lr 1e38 with C = 10: the first update overflows float32 (with the default C = 0.3 it might not).
    args = ["--quiet", *ARGS, "--lr", "1e38", "--norm-thresh", "10", "--out", str(tmp_path)]
    line = _one_line_error(capsys, main(args))
    assert "training diverged in round 1, step 1 of" in line and "--lr" in line, line
    assert not (tmp_path / outputs.CHECKPOINT).exists()


# ----------------------------------------------------------------------------------------------
# Killed for real
# ----------------------------------------------------------------------------------------------
def _start(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "fpl_fast.run", "--quiet", *ARGS, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _without_timing(res: dict) -> tuple[list[dict], dict]:
    rounds = [{k: v for k, v in r.items() if k != "seconds_elapsed"} for r in res["rounds"]]
    final = {k: v for k, v in res["final"].items() if k != "seconds"}
    return rounds, final


@pytest.mark.slow
def test_runs_killed_anywhere_resume_to_exactly_the_uninterrupted_results(tmp_path: Path) -> None:
    full = _start(tmp_path / "full")  # the reference, alongside the interrupted chain

    # 1. SIGKILL from outside as soon as the first checkpoint exists.
    part = tmp_path / "part"
    proc = _start(part)
    while not (part / outputs.CHECKPOINT).exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    rc, err = _finish(proc)
    assert rc == -signal.SIGKILL, f"the run ended before it was killed: {err}"
    first = outputs.load_checkpoint(part)["next_round"]
    assert 1 <= first < BASE.rounds

    # 2. Resumed, it dies inside its second checkpoint write: after the new file is written, before the rename.
    rc, err = _finish(_start(part, "--resume", env={"FPL_FAST_CRASH_IN_CHECKPOINT": "2"}))
    assert rc == -signal.SIGKILL, err
    assert outputs.load_checkpoint(part)["next_round"] == first + 1  # the last completed write, intact
    assert any(p.name.startswith(f".{outputs.CHECKPOINT}.") for p in part.iterdir())  # the unrenamed new one

    # 3. Resumed again, it runs to the end.
    rc, err = _finish(_start(part, "--resume"))
    assert rc == 0, err
    assert not any(p.name.startswith(f".{outputs.CHECKPOINT}.") for p in part.iterdir())  # cleaned up
    rc, err = _finish(full)
    assert rc == 0, err

    got = json.loads((part / "results.json").read_text())
    want = json.loads((tmp_path / "full" / "results.json").read_text())
    assert [r["round"] for r in got["rounds"]] == list(range(1, BASE.rounds + 1))
    assert _without_timing(got) == _without_timing(want)
    assert (part / "rounds.csv").read_text().count("\n") == BASE.rounds + 1
