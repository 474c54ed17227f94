"""python -m fpl_fast.grid: spec validation, the paper-shaped table against the cells' results.json, skipping and
resuming (after a SIGKILL of the whole process group too), failed cells, and image features cached across cells."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fpl_fast
from fpl_fast.config import PROTOCOLS, RunConfig, RunSettings
from fpl_fast.grid import SpecError, load_spec, parse_spec
from fpl_fast.grid.__main__ import main
from fpl_fast.grid.cells import _WORKER, _init_worker, run_grid, worker_threads
from fpl_fast.grid.table import write_plot, write_tables

# A few seconds a cell: 3 clients, 2 shots per class each, 2 rounds.
TINY: dict[str, Any] = {"rounds": 2, "num_users": 3, "num_shots": 2}


def _write(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(json.dumps(spec))
    return path


def _final(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "cells" / name / "results.json").read_text())["final"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"axes": {"nois": [1.0]}}, ["unknown field 'nois'", "allowed: RunConfig fields"]),
        ({"axes": {"noise": []}}, ["axis 'noise'", "non-empty list"]),
        ({"axes": {"noise": 1.0}}, ["axis 'noise'", "non-empty list"]),
        ({"axes": {"seed": [1, 1]}}, ["axis 'seed'", "twice"]),
        ({"axes": {"rank": [4, 32]}}, ["cell rank-32", "rank must be <= n_ctx"]),
        ({"axes": {"factorization": ["dpfpl", "lora"]}}, ["cell factorization-lora", "must be one of"]),
        ({"base": {"out": "x"}}, ["'out' is a run setting"]),
        ({"axes": {"seed": [1]}, "bogus": 1}, ["unknown key 'bogus'", "allowed: name, description"]),
        ({"axes": {"seed": [1]}, "table": {"rows": "seed", "columns": "seed"}}, ["rows and columns"]),
        ({"axes": {"seed": [1]}, "table": {"rows": "method"}}, ["unknown field 'method'"]),
        ({"base": {"epsilon": 3.0}, "axes": {"noise": [1.0]}}, ["cell noise-1.0", "leave out noise"]),
        ({"base": {"calibration": "paper"}, "axes": {"seed": [1]}}, ["cell seed-1", "needs epsilon"]),
    ],
)
def test_a_bad_spec_ends_in_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict[str, Any], words: list[str]
) -> None:
    assert main([str(_write(tmp_path / "spec.json", spec)), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m fpl_fast.grid: error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "g").exists()


def test_bad_flags_and_files_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.json").write_text("[1, 2]")
    for argv, word in [
        ([str(tmp_path / "missing.json")], "not found"),
        ([str(tmp_path / "bad.json")], "must hold a JSON object"),
        ([], "give a grid spec"),
        (["--axis", "noise"], "FIELD=V1,V2"),
        (["--axis", "seed=1", "--devices", ","], "--devices"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and word in err, (argv, err)
    for argv in (["--axis", "seed=1", "--workers", "0"], ["--axis", "seed=1", "--metric", "best"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_axes_make_the_cartesian_product_and_flags_add_axes() -> None:
    spec = parse_spec(
        {"base": TINY, "axes": {"factorization": ["promptfl", "dpfpl"]}},
        [("noise", [0.5, 1.5]), ("seed", [1, 2, 3])],
    )
    assert len(spec.cells) == 12 and spec.rows == "factorization" and spec.columns == "noise"
    assert spec.cells[0].name == "factorization-promptfl__noise-0.5__seed-1"
    assert spec.cells[-1].config == RunConfig(**TINY, factorization="dpfpl", noise=1.5, seed=3)
    eps = parse_spec({"base": {"calibration": "paper"}, "axes": {"epsilon": [0.5, 1.0]}})
    assert eps.columns == "epsilon" and [c.config.noise for c in eps.cells] == [None, None]
    with pytest.raises(SpecError, match="unknown field 'nosie'"):
        parse_spec({}, [("nosie", [1])])


def test_the_shipped_paper_grid_is_five_factorisations_by_three_noise_levels_by_three_seeds() -> None:
    spec = parse_spec(load_spec(Path(fpl_fast.__file__).parent / "configs" / "grid-paper-table.json"))
    assert len(spec.cells) == 45 and (spec.rows, spec.columns) == ("factorization", "noise")
    assert spec.axes["factorization"] == ["promptfl", "fedotp", "fedpgp", "dplora", "dpfpl"]
    assert len(spec.axes["noise"]) == 3 and spec.axes["seed"] == [1, 2, 3]
    default = RunConfig()
    changed = {k for k, v in spec.cells[0].config.to_dict().items() if v != getattr(default, k)} - set(spec.axes)
    assert changed == {"rounds"} and str(spec.cells[0].config.rounds) in spec.description


def test_the_shipped_protocol_grids_cover_every_protocol_and_the_embedded_one_runs_offline() -> None:
    configs = Path(fpl_fast.__file__).parent / "configs"
    specs = {p.name: parse_spec(load_spec(p)) for p in sorted(configs.glob("grid-*.json"))}
    assert {c.config.protocol for spec in specs.values() for c in spec.cells} == set(PROTOCOLS)
    embedded = specs["grid-protocols.json"]
    assert len(embedded.cells) == 15 and (embedded.rows, embedded.columns) == ("protocol", "clip_mode")
    assert {c.config.protocol for c in embedded.cells} == set(PROTOCOLS) - {"xdomain"}  # xdomain needs ImageNet
    assert all(c.config.model == RunConfig().model and c.config.dataset == "digits" for c in embedded.cells)
    for name in ("dual", "base2novel", "xdataset", "xdomain"):  # paper scale: the authors' settings, 16 shots
        cells = specs[f"grid-paper-{name}.json"].cells
        assert {c.config.protocol for c in cells} == {name} and all(c.config.model == "ViT-B-16" for c in cells)
        assert all(c.config.num_shots == 16 and c.config.rounds == 100 for c in cells)


def test_worker_i_runs_on_device_i_mod_len_devices_with_its_share_of_the_cores() -> None:
    import multiprocessing as mp

    import torch

    threads = torch.get_num_threads()
    counter = mp.get_context("spawn").Value("i", 0)
    try:
        got = []
        for _ in range(3):
            _init_worker(counter, ["cuda:0", "cuda:1"], 1)
            got.append(_WORKER["device"])
        assert got == ["cuda:0", "cuda:1", "cuda:0"] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        _WORKER["device"] = None
    assert worker_threads(1) >= worker_threads(2) >= 1 and worker_threads(10**6) == 1


@pytest.mark.slow
def test_table_resume_failed_cells_metric_and_features_cached_across_cells(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "grid"
    spec_json: dict[str, Any] = {
        "name": "tiny",
        "base": TINY,
        "axes": {"factorization": ["promptfl", "dpfpl"], "noise": [1.0, 2.0], "seed": [1, 2]},
    }
    spec = parse_spec(spec_json)
    # One cell stopped after its first round (a checkpoint, no results.json): the grid resumes it.
    from fpl_fast.job import train

    stopped = spec.cells[1]
    train(
        stopped.config, settings=RunSettings(out=str(out / "cells" / stopped.name), progress=False), stop_after_round=1
    )
    assert not (out / "cells" / stopped.name / "results.json").exists()
    # A half-written folder without a checkpoint: cleared, then run afresh.
    half = out / "cells" / spec.cells[2].name
    half.mkdir(parents=True)
    (half / "rounds.csv").write_text("round\n")
    (half / ".results.json.abc").write_text("{")

    reports = run_grid(spec, out, progress=False)
    status = {r["name"]: r["status"] for r in reports}
    assert status[stopped.name] == "resumed" and list(status.values()).count("done") == 7, status
    assert len(json.loads((out / "cells" / stopped.name / "results.json").read_text())["rounds"]) == 2
    # The features were encoded once, by the first cell that ran, and read from DIR/features by every other.
    encoded = [r["encoded_images"] for r in reports]
    assert sum(e > 0 for e in encoded) == 1 and encoded[0] > 0, encoded

    # table.csv and table.md: rows the factorisations, columns the noise levels, mean +- std over the seeds.
    md = write_tables(spec, out)
    with open(out / "table.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "factorization" and [r[0] for r in rows[1:]] == ["promptfl", "dpfpl"]
    assert rows[0][1:7] == [f"noise=1.0 {s}" for s in ("local_mean", "local_std", "neighbor_mean", "neighbor_std")] + [
        "noise=1.0 epsilon_total",
        "noise=1.0 n",
    ]
    assert len(rows[0]) == 1 + 2 * 6
    for i, fact in enumerate(["promptfl", "dpfpl"]):
        for j, noise in enumerate([1.0, 2.0]):
            finals = [_final(out, f"factorization-{fact}__noise-{noise}__seed-{s}") for s in (1, 2)]
            loc, nb = [f["local_acc"] for f in finals], [f["neighbor_acc"] for f in finals]
            got = [float(x) for x in rows[1 + i][1 + 6 * j : 6 + 6 * j]]
            want = [np.mean(loc), np.std(loc), np.mean(nb), np.std(nb), np.mean([f["epsilon_total"] for f in finals])]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
            assert rows[1 + i][6 + 6 * j] == "2"
            assert f"{100 * np.mean(loc):.1f} ± {100 * np.std(loc):.1f}" in md
    assert md.splitlines()[-2].startswith("| promptfl |") and "noise=2.0 neighbour" in md
    assert write_plot(spec, out).stat().st_size > 0

    # --metric mean_last5: one line naming the cell and the key when a results.json lacks it (one written before the
    # means existed); read once present.
    first = out / "cells" / spec.cells[0].name / "results.json"
    data = json.loads(first.read_text())
    del data["final"]["local_acc_mean_last5"]
    first.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no final\['local_acc_mean_last5'\]"):
        write_tables(spec, out, "mean_last5")
    for cell in spec.cells:
        path = out / "cells" / cell.name / "results.json"
        data = json.loads(path.read_text())
        data["final"].update(local_acc_mean_last5=0.25, neighbor_acc_mean_last5=0.5)
        path.write_text(json.dumps(data))
    assert "25.0 ± 0.0" in write_tables(spec, out, "mean_last5")
    write_tables(spec, out)

    # A second run of the finished grid redoes nothing.
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("cells/*/results.json")}
    again = run_grid(spec, out, progress=False)
    assert {r["status"] for r in again} == {"skipped"} and all(r["encoded_images"] == 0 for r in again)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before

    # A cell that fails is named with its one-line error, the others go on, and the exit code says so; another
    # grid over the same data, sharing the feature cache, encodes no image.
    monkeypatch.chdir(tmp_path)  # data_root "data" (the default, part of the feature key) holds no caltech101 here
    bad = {"base": {**TINY, "factorization": "promptfl"}}
    bad["axes"] = {"dataset": ["digits", "caltech101"]}
    argv = [str(_write(tmp_path / "bad.json", bad)), "--out", str(tmp_path / "g2"), "--quiet"]
    assert main([*argv, "--feature-cache", str(out / "features")]) == 1
    captured = capsys.readouterr()
    assert "1 run, 0 resumed, 0 skipped (finished before), 1 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if "failed:" in line]
    assert len(failed) == 1 and "cell dataset-caltech101 failed: " in failed[0], captured.err
    assert (tmp_path / "g2" / "cells" / "dataset-digits" / "results.json").is_file()
    cells = {c["name"]: c for c in json.loads((tmp_path / "g2" / "grid.json").read_text())["cells"]}
    assert cells["dataset-digits"]["status"] == "done" and cells["dataset-digits"]["encoded_images"] == 0
    assert cells["dataset-caltech101"]["status"] == "failed"


def _start(spec: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "fpl_fast.grid", str(spec), "--out", str(out), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, killed whole below (the workers with it)
        env={**os.environ, "FPL_FAST_SELFCHECK": "0"},
    )


@pytest.mark.slow
def test_a_grid_killed_with_its_workers_resumes_without_redoing_finished_cells(tmp_path: Path) -> None:
    spec = _write(
        tmp_path / "spec.json",
        {
            "base": {**TINY, "partition": "iid"},  # iid: base2novel's 5 classes fill a batch of 8
            "axes": {"protocol": ["personal", "dual", "base2novel"], "clip_mode": ["sample", "output"]},
            "table": {"rows": "protocol", "columns": "clip_mode"},
        },
    )
    out = tmp_path / "grid"
    proc = _start(spec, out)
    deadline = time.monotonic() + 600
    while not list(out.glob("cells/*/results.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("cells/*/results.json")}
    assert 1 <= len(finished) < 6
    stopped = {p.parent.name for p in out.glob("cells/*/checkpoint.pt") if not (p.parent / "results.json").exists()}

    proc = _start(spec, out)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr.decode()
    assert f"{len(finished)} skipped" in stdout.decode()
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished} == finished
    cells = json.loads((out / "grid.json").read_text())["cells"]
    assert len(list(out.glob("cells/*/results.json"))) == 6 and len(cells) == 6
    assert sum(c["status"] == "skipped" for c in cells) == len(finished)
    assert all(c["status"] == "resumed" for c in cells if c["name"] in stopped)  # from their checkpoints
    assert all(c["encoded_images"] == 0 for c in cells)  # the killed run had cached the features
    assert (out / "table.md").is_file() and (out / "accuracy_vs_epsilon.png").is_file()
    table = (out / "table.md").read_text()  # every protocol's metrics, from the cells run before and after the kill
    header = next(line for line in table.splitlines() if line.startswith("| protocol | clip_mode |"))
    assert header.split(" | ")[2:4] == ["global_acc", "dual_hm"] and "personal_hm" in header
    assert "| base2novel | output | - | - | " in table  # base2novel reports no global_acc, dual_hm


def test_the_table_shows_every_protocols_metrics(tmp_path: Path) -> None:
    """A grid over protocols: the cells' protocol metrics (results.json's final["protocol_metrics"]) make a second
    table, one line per (row, column), "-" where a cell's protocol does not report a metric; in table.csv, their mean
    and std per column value after the shared columns; --metric mean_last5 reads their means."""
    out = tmp_path / "grid"
    spec = parse_spec(
        {
            "base": {**TINY, "eval_datasets": "digits-tune"},
            "axes": {"protocol": ["personal", "dual", "xdataset"], "clip_mode": ["sample", "output"], "seed": [1, 2]},
            "table": {"rows": "protocol", "columns": "clip_mode"},
        }
    )
    keys = {
        "personal": [],
        "dual": ["global_acc", "dual_hm"],
        "xdataset": ["global_acc", "global_acc@digits-tune", "personal_acc@digits-tune"],
    }
    for cell in spec.cells:
        seed, protocol = cell.values["seed"], cell.values["protocol"]
        final: dict[str, Any] = {"local_acc": 0.5, "neighbor_acc": 0.4, "epsilon_total": 2.0}
        final.update(local_acc_mean_last5=0.5, neighbor_acc_mean_last5=0.4)
        if keys[protocol]:
            final["protocol_metrics"] = {k: f"what {k} is" for k in keys[protocol]}
        for i, k in enumerate(keys[protocol]):
            final[k] = 0.1 * (i + 1) + 0.02 * seed + (0.3 if cell.values["clip_mode"] == "output" else 0.0)
            final[f"{k}_mean_last5"] = 0.05
        (out / "cells" / cell.name).mkdir(parents=True)
        (out / "cells" / cell.name / "results.json").write_text(json.dumps({"final": final}))

    md = write_tables(spec, out)
    second = md[md.index("Protocol metrics") :].splitlines()
    header = "| protocol | clip_mode | global_acc | dual_hm | global_acc@digits-tune | personal_acc@digits-tune |"
    assert second[2] == header
    lines = {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in second[4:] if line}
    assert lines[("| personal", "sample")] == ["-", "-", "-", "- |"]
    assert lines[("| dual", "output")] == ["43.0 ± 1.0", "53.0 ± 1.0", "-", "- |"]
    assert lines[("| xdataset", "sample")] == ["13.0 ± 1.0", "-", "23.0 ± 1.0", "33.0 ± 1.0 |"]
    with open(out / "table.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows[0]) == 1 + 2 * 6 + 2 * 4 * 2
    assert rows[0][13:15] == ["clip_mode=sample global_acc mean", "clip_mode=sample global_acc std"]
    dual = next(r for r in rows if r[0] == "dual")
    assert [float(x) for x in dual[13:17]] == pytest.approx([0.13, 0.01, 0.23, 0.01])
    assert dual[17:21] == ["", "", "", ""]  # dual reports no transfer metric
    assert "5.0 ± 0.0" in write_tables(spec, out, "mean_last5").split("Protocol metrics")[1]
