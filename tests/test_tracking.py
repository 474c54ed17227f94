"""The TensorBoard log of a run's rounds (fpl_fast/tracking.py, --tensorboard): its scalars are rounds.csv's values
under tags that say which are private, it continues a resumed run without duplicates, each grid cell gets its own
folder, and a missing tensorboard package is one line (exit code 2) before anything runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from support import assert_tensorboard_matches_rounds_csv, tensorboard_scalars, train_job

from fpl_fast.config import RunConfig
from fpl_fast.methods.skeleton import run_method
from fpl_fast.tracking import ABOUT, TAGS

BASE = RunConfig(num_users=3, rounds=3, batch_size=16, seed=3, partition="iid", noise_seed=3, clip_mode="batch")


@pytest.fixture
def job(embedded_job):
    return embedded_job(BASE)


@dataclass(frozen=True)
class _Cfg:
    rounds: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Toy:
    """A method with a private loss and clipped fraction and no epsilon_global (a cell rounds.csv leaves empty)."""

    name = "toy"
    postfix = ("local_acc",)
    curves = ("local_acc", "neighbor_acc")

    def setup(self, cfg: _Cfg) -> dict[str, Any]:
        return {}

    def round(self, state: dict[str, Any], rnd: int) -> dict[str, Any]:
        return {
            "local_acc": 0.1 * rnd,
            "neighbor_acc": 0.05 * rnd,
            "epsilon_local": 0.5 * rnd,
            "epsilon_global": None,
            "loss": 2.0 / rnd,
            "clipped_fraction": 1 / (rnd + 2),
            "extra": rnd,  # the method's own key: in results.json, not in rounds.csv, not logged
        }

    def final(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"local_acc": 0.3}


def _texts(logdir: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}


def test_the_log_holds_rounds_csv_values_under_private_and_released_tags(tmp_path: Path) -> None:
    run_method(_Toy(), _Cfg(), out=tmp_path / "run", progress=False, tensorboard=tmp_path / "tb")
    got = assert_tensorboard_matches_rounds_csv(tmp_path / "tb", tmp_path / "run" / "rounds.csv")
    assert set(got) == {
        "released/local_acc",
        "released/neighbor_acc",
        "released/epsilon_local",
        "private/loss",
        "private/clipped_fraction",
        "time/seconds_elapsed",
    }
    assert [step for step, _ in got["private/loss"]] == [1, 2, 3]
    texts = _texts(tmp_path / "tb")
    assert ABOUT in texts["about/text_summary"] and "no DP" in texts["about/text_summary"]
    assert json.loads(texts["config/text_summary"].strip("`\n")) == {"rounds": 3}
    # every rounds.csv column but the round (the step) and dropped (client ids, no scalar) has its tag, under a
    # prefix that says what it is
    columns = {f for f in csv.DictReader(open(tmp_path / "run" / "rounds.csv")).fieldnames or []}
    assert set(TAGS) == columns - {"round", "dropped"}
    assert {t.split("/")[0] for t in TAGS.values()} == {"released", "private", "time"}
    assert [k for k, t in TAGS.items() if t.startswith("private/")] == ["loss", "clipped_fraction"]


def test_a_new_run_into_an_earlier_runs_log_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    run_method(_Toy(), _Cfg(), out=tmp_path / "a", progress=False, tensorboard=tmp_path / "tb")
    files = sorted(p.name for p in (tmp_path / "tb").iterdir())
    with pytest.raises(ValueError, match=r"^--tensorboard .*tb holds the log of an earlier run: choose another folder"):
        run_method(_Toy(), _Cfg(), out=tmp_path / "b", progress=False, tensorboard=tmp_path / "tb")
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == files
    assert_tensorboard_matches_rounds_csv(tmp_path / "tb", tmp_path / "a" / "rounds.csv")


def test_a_dpfpl_run_logs_its_rounds_and_a_resume_continues_the_log(job, tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    train_job(job, BASE, tmp_path / "run", stop_after_round=2, tensorboard=str(tb))
    assert [s for s, _ in tensorboard_scalars(tb)["private/loss"]] == [1, 2]
    res = train_job(job, BASE, tmp_path / "run", resume=True, tensorboard=str(tb))
    got = assert_tensorboard_matches_rounds_csv(tb, tmp_path / "run" / "rounds.csv")  # rounds 1-3, none twice
    assert [s for s, _ in got["released/epsilon_total"]] == [1, 2, 3]
    assert all(r["loss"] > 0 and 0 <= r["clipped_fraction"] <= 1 for r in res["rounds"])
    assert {"private/loss", "private/clipped_fraction", "released/epsilon_total"} <= set(got)


def test_a_missing_tensorboard_package_is_one_line_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fpl_fast.run import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now fails as without the package
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    assert main(["--quiet", "--rounds", "1", "--out", str(out), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"python -m fpl_fast.run: error: --tensorboard {tmp_path / 'tb'}: the tensorboard package is not installed: "
        "pip install tensorboard (or pip install '.[tensorboard]')"
    )
    assert not out.exists() and not (tmp_path / "tb").exists()
    with pytest.raises(ValueError, match="tensorboard package is not installed"):
        run_method(_Toy(), _Cfg(), out=out, progress=False, tensorboard=tmp_path / "tb")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--tensorboard", ""], "--tensorboard must be a folder path, got ''"),
        (["--method", "feddtpt", "--tensorboard", "{file}"], "is a file, not a folder"),
    ],
)
def test_a_bad_tensorboard_folder_is_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fpl_fast.run import main

    (tmp_path / "file").write_text("not a folder")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    assert main(["--quiet", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_run_with_tensorboard_writes_event_files_equal_to_rounds_csv(tmp_path: Path) -> None:
    out, tb = tmp_path / "run", tmp_path / "tb"
    cmd = [sys.executable, "-W", "ignore", "-m", "fpl_fast.run", "--quiet", "--rounds", "2", "--num-users", "3"]
    proc = subprocess.run([*cmd, "--out", str(out), "--tensorboard", str(tb)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert list(tb.glob("events.out.tfevents.*"))
    got = assert_tensorboard_matches_rounds_csv(tb, out / "rounds.csv")
    assert set(got) == set(TAGS.values())  # DP-FPL has every column: accuracies, epsilons, loss, clipped fraction


@pytest.mark.slow
def test_each_grid_cell_logs_to_its_own_subfolder(tmp_path: Path) -> None:
    from fpl_fast.grid.__main__ import main

    spec = tmp_path / "spec.json"
    tiny = {"rounds": 2, "num_users": 3, "num_shots": 2, "clip_mode": "batch", "noise_seed": 1}
    spec.write_text(json.dumps({"name": "tb", "base": tiny, "axes": {"seed": [1, 2]}}))
    grid, tb = tmp_path / "grid", tmp_path / "tb"
    assert main([str(spec), "--out", str(grid), "--tensorboard", str(tb), "--quiet"]) == 0
    cells = sorted(p.name for p in (grid / "cells").iterdir())
    assert sorted(p.name for p in tb.iterdir()) == cells == ["seed-1", "seed-2"]
    for name in cells:
        assert_tensorboard_matches_rounds_csv(tb / name, grid / "cells" / name / "rounds.csv")
