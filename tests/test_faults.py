"""Faults and bad input: killed runs, damaged checkpoints, diverging training, output folders in use.

The kill tests run the job for real in subprocesses (SIGKILL from outside, and from inside a checkpoint write
through the FPL_FAST_CRASH_IN_CHECKPOINT hook of fpl_fast.outputs) and compare the resumed run with an
uninterrupted one, bitwise except for wall-clock fields.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
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
from fpl_fast.federated.engine import Federation
from fpl_fast.federated.server import Server
from fpl_fast.methods.dpfpl import TrainingDiverged, build_federation
from fpl_fast.run import main
from fpl_fast.validation import ConfigError, flag_message

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
    """Rerunning the API into a run's folder: the refusal is worded for the caller (resume=True), the CLI's for the
    command line (--resume)."""
    cfg = BASE.replace(rounds=1)
    res = train_job(job, cfg, tmp_path)  # exists (pytest made it) and is empty: fine
    assert res["final"] is not None
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match="holds a previous run") as err:
        train_job(job, cfg, tmp_path)
    assert "set resume=True in the settings to continue it" in str(err.value) and "--" not in str(err.value)
    assert "pass --resume to continue it" in flag_message(err.value)
    assert _files(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Resuming takes the checkpoint's configuration
# ----------------------------------------------------------------------------------------------
def test_resume_with_only_the_folder_finishes_the_stopped_run(job, tmp_path: Path) -> None:
    """``--resume --out DIR`` alone (the CLI), and ``config=None`` (the API): the run continues with the
    configuration saved in the checkpoint, to the results of the run never stopped."""
    want = train_job(job, BASE, tmp_path / "whole")
    train_job(job, BASE, tmp_path / "cli", stop_after_round=2)
    assert main(["--quiet", "--resume", "--out", str(tmp_path / "cli")]) == 0
    got = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert got["config"] == BASE.to_dict() and _without_timing(got) == _without_timing(want)
    train_job(job, BASE, tmp_path / "api", stop_after_round=2)
    assert _without_timing(train_job(job, None, tmp_path / "api", resume=True)) == _without_timing(want)


def test_a_flag_that_contradicts_the_checkpoint_is_named_with_both_values(
    job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_job(job, BASE, tmp_path, stop_after_round=1)
    before = _files(tmp_path)
    line = _one_line_error(capsys, main(["--quiet", "--resume", "--out", str(tmp_path), "--rounds", "7"]))
    assert line.endswith(
        f"error: --rounds 7 contradicts the checkpoint in {tmp_path} (saved with --rounds 4); leave --rounds out to "
        "resume with the saved configuration"
    ), line
    line = _one_line_error(capsys, main(["--quiet", "--resume", "--out", str(tmp_path), "--clip-mode", "sample"]))
    assert "--clip-mode sample contradicts" in line and "(saved with --clip-mode batch)" in line, line
    with pytest.raises(ConfigError, match=r"^rounds=7 contradicts the checkpoint in .* \(saved with rounds=4\)"):
        train_job(job, BASE.replace(rounds=7), tmp_path, resume=True)
    assert _files(tmp_path) == before  # nothing was touched
    # Settings that repeat the saved ones are fine: a dict of some of them, or the whole command line again.
    partial = train_job(job, {"rounds": 4, "clip_mode": "batch"}, tmp_path, resume=True, stop_after_round=2)
    assert partial["config"] == BASE.to_dict() and partial["final"] is None
    assert main(["--quiet", *ARGS, "--resume", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["config"] == BASE.to_dict()


# ----------------------------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("after_rounds", [1, 0])
def test_ctrl_c_says_in_one_line_how_to_resume_and_exits_130(
    job, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, after_rounds: int
) -> None:
    """KeyboardInterrupt in round ``after_rounds + 1``: one line on stderr, exit code 130; with a checkpoint, the
    line's command resumes the run to the results of one never interrupted."""
    out = tmp_path / "run"
    train_round = Federation.train_round
    calls = 0

    def interrupted(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > after_rounds:
            raise KeyboardInterrupt
        return train_round(self, *args, **kwargs)

    monkeypatch.setattr(Federation, "train_round", interrupted)
    rc = main(["--quiet", *ARGS, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 130 and len(lines) == 1 and "Traceback" not in err, err
    monkeypatch.setattr(Federation, "train_round", train_round)
    if after_rounds == 0:
        assert lines[0] == (
            f"python -m fpl_fast.run: interrupted; no checkpoint was written to {out}: run the command again to "
            "start over"
        )
        return
    prefix = "python -m fpl_fast.run: interrupted; continue with: python -m fpl_fast.run "
    assert lines[0] == f"{prefix}--resume --out {shlex.quote(str(out))}", lines[0]
    assert main(["--quiet", *shlex.split(lines[0][len(prefix) :])]) == 0
    want = train_job(job, BASE, tmp_path / "whole")
    assert _without_timing(json.loads((out / "results.json").read_text())) == _without_timing(want)


# ----------------------------------------------------------------------------------------------
# An output folder that cannot be written
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exists", [True, False])
def test_a_read_only_out_folder_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    """A folder the run cannot write (mode 0500; as root, which writes whatever the mode, a read-only file system
    simulated where the check writes) fails in one line before the backbone loads."""
    import fpl_fast.job

    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "run"
    if exists:
        out.mkdir()
    (out if exists else parent).chmod(0o500)
    if os.geteuid() == 0:  # root: chmod does not stop it; make the probe meet what a read-only mount returns

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(outputs.tempfile, "mkstemp" if exists else "mkdtemp", read_only)
    monkeypatch.setattr(fpl_fast.job, "prepare", lambda *a, **k: pytest.fail("the data was prepared"))
    try:
        line = _one_line_error(capsys, main(["--quiet", *ARGS, "--out", str(out)]))
    finally:
        (out if exists else parent).chmod(0o700)
    why = os.strerror(errno.EROFS if os.geteuid() == 0 else errno.EACCES)
    assert line.endswith(f"error: --out {out} is not writable: {why}"), line
    assert sorted(p.name for p in parent.iterdir()) == (["run"] if exists else [])  # the check left nothing
    assert not exists or list(out.iterdir()) == []


def test_an_out_path_under_a_file_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    line = _one_line_error(capsys, main(["--quiet", *ARGS, "--out", str(tmp_path / "file" / "run")]))
    assert line.endswith(f"--out {tmp_path / 'file' / 'run'} is not writable: {tmp_path / 'file'} is a file"), line


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

    def blow_up(self: Server, grads: torch.Tensor, clip_norm: float | None = None) -> torch.Tensor:
        nonlocal calls
        calls += 1
        out = aggregate(self, grads, clip_norm)
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
