"""The method skeleton's driver (one round loop, one results.json shape) and the shared client split."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fpl_fast.data.clients import client_split
from fpl_fast.methods.skeleton import run_method
from fpl_fast.outputs import ROUND_FIELDS, summary_table


@dataclass(frozen=True)
class _Cfg:
    rounds: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Toy:
    name = "toy"
    postfix = ("local_acc",)
    curves = ("local_acc", "neighbor_acc")

    def setup(self, cfg: _Cfg) -> dict[str, Any]:
        return {"calls": [], "cfg": cfg}

    def round(self, state: dict[str, Any], rnd: int) -> dict[str, Any]:
        state["calls"].append(rnd)
        return {"extra": rnd * 10, "neighbor_acc": 0.5, "local_acc": rnd / 4, "epsilon_local": None}

    def final(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"local_acc": 0.75, "neighbor_acc": 0.5, "calls": list(state["calls"])}


def test_driver_writes_one_shape_with_method_first(tmp_path: Path) -> None:
    res = run_method(_Toy(), _Cfg(), out=tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(saved) == ["method", "config", "rounds", "final", "fpl_fast_version"] and saved["method"] == "toy"
    assert saved["config"] == {"rounds": 3} and saved["final"]["calls"] == [1, 2, 3]
    row = saved["rounds"][1]
    # the shared columns first, in rounds.csv's order, then the method's own
    assert list(row) == ["round", "local_acc", "neighbor_acc", "epsilon_local", "seconds_elapsed", "extra"]
    assert row["round"] == 2 and row["extra"] == 20
    # one clock for every method: the run's seconds at the end of each round, up to the final total
    elapsed = [r["seconds_elapsed"] for r in saved["rounds"]]
    assert 0 <= elapsed[0] <= elapsed[1] <= elapsed[2] <= res["final"]["seconds"]
    assert list(res["final"])[-1] == "seconds"
    with open(tmp_path / "run" / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(ROUND_FIELDS) and [r["round"] for r in rows] == ["1", "2", "3"]
    assert "mean local accuracy" in summary_table(res["final"])


def test_client_split_names_the_empty_client() -> None:
    labels = np.repeat(np.arange(4), 5)
    split = client_split(labels, 2, "iid", beta=0.5, seed=1, test_labels=labels)
    assert [len(ix) for ix in split.train] == [10, 10] and [len(ix) for ix in split.test] == [10, 10]
    # classes 2 and 3 only in the test set: pathological shares of 2 classes leave a client without training data
    with pytest.raises(ValueError, match=r"client \d received no training examples with partition 'pathological' "):
        for seed in range(20):  # some seeds give the empty share to a client
            client_split(np.array([0, 0, 1, 1]), 2, "pathological", beta=0.5, seed=seed, test_labels=np.arange(4))


def _plotted(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The legend labels of every accuracy.png written from now on (the figure caught before it is saved)."""
    from fpl_fast import outputs

    labels: list[list[str]] = []

    def catch(fig: Any, path: Path) -> None:
        labels.append(fig.axes[0].get_legend_handles_labels()[1])

    monkeypatch.setattr(outputs, "save_figure", catch)
    return labels


def test_the_plot_draws_only_the_curves_a_method_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _plotted(monkeypatch)
    run_method(_Toy(), _Cfg(), out=tmp_path / "both", progress=False)

    class _OneModel(_Toy):  # like RAPT and FedDTPT: one global model, no neighbour curve though it has the values
        curves = ("local_acc",)

    run_method(_OneModel(), _Cfg(), out=tmp_path / "one", progress=False)
    assert labels == [["local (own test split)", "neighbour (others' splits)"], ["local (own test split)"]]


@pytest.mark.parametrize(
    ("rounds", "label"),
    [
        ([16, 17, 18, 19, 20], "last 5 evaluations (rounds 16-20)"),
        ([1, 2, 3, 4], "last 4 evaluations (rounds 1-4)"),
        ([2, 4, 6], "last 3 evaluations (rounds 2, 4, 6)"),
        ([1], "last 1 evaluation (round 1)"),
    ],
)
def test_the_summary_says_how_many_evaluations_it_averaged(rounds: list[int], label: str) -> None:
    final = {"local_acc": 0.5, "local_acc_mean_last5": 0.25, "acc_mean_last5_rounds": rounds}
    table = summary_table(final)
    assert re.search(rf"\nmean local accuracy, {re.escape(label)} +0\.25\n", table), table
    assert re.search(rf"\nmean neighbour accuracy, {re.escape(label)} +-\n", table), table
