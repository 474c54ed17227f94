"""The public Python API: the data seams; the registry; errors name fields (the tutorial's example runs in
tests/test_docs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fpl_fast
from fpl_fast.prompts import Factorization, StepFactors, factorization_names, get_factorization, register


class _Frozen(Factorization):
    """A toy whose local prompt is a fixed offset that never trains (nothing local is released)."""

    name = "frozen-offset"
    has_local = False

    def init_local(self, normal, K, n_ctx, d, rank):
        return {"off": normal(K, n_ctx, d)}

    def factors(self, local, clients, *, rank, seed, offset):
        return StepFactors(None, None, local["off"][clients])


def test_a_registered_factorization_is_a_config_choice_and_trains_through_the_learner() -> None:
    register(_Frozen())
    assert "frozen-offset" in factorization_names() and get_factorization("frozen-offset").name == "frozen-offset"
    cfg = fpl_fast.RunConfig(factorization="frozen-offset", rank=99)  # no rank: 99 > n_ctx is fine
    assert cfg.factorization == "frozen-offset"
    from fpl_fast.prompts import PromptConfig, PromptLearner

    pl = PromptLearner(PromptConfig("frozen-offset", 4, 2), 3, 6, generator=torch.Generator().manual_seed(0))
    f = pl.factors(torch.tensor([0, 2]), seed=[1, 2], offset=[0, 0])
    ctx = pl.context(torch.tensor([0, 2]), f)
    torch.testing.assert_close(ctx, pl.client_global[[0, 2]] + pl.local["off"][[0, 2]])
    assert pl.local_update_direction(f, torch.zeros(2, 4, 6), torch.zeros(0)) == {}


def test_register_refuses_a_name_taken_by_another_class_and_a_missing_name() -> None:
    class Other(Factorization):
        name = "dpfpl"

    with pytest.raises(ValueError, match="already registered"):
        register(Other())
    with pytest.raises(ValueError, match="non-empty string name"):
        register(Factorization())
    with pytest.raises(ValueError, match="factorization must be one of"):
        fpl_fast.RunConfig(factorization="nope")


def test_api_errors_name_fields_not_flags() -> None:
    with pytest.raises(ValueError, match=r"^rank must be an integer >= 1, got 0"):
        fpl_fast.train({"rank": 0})
    with pytest.raises(ValueError, match=r"unknown RunConfig settings \['rnak'\]"):
        fpl_fast.train({"rnak": 3})
    with pytest.raises(ValueError, match=r"^resume needs out"):
        fpl_fast.train(settings={"resume": True})
    with pytest.raises(ValueError, match=r"^resume: no checkpoint.pt in .*: nothing to resume \(set resume=False"):
        fpl_fast.train(settings={"resume": True, "out": "/nonexistent/run"})
    with pytest.raises(ValueError, match=r"^device='cuda:99': "):  # named as the device, before anything loads
        fpl_fast.train({"device": "cuda:99"}, settings={"out": "/nonexistent/run"})
    with pytest.raises(TypeError, match="RunConfig or a dict"):
        fpl_fast.train(3)  # type: ignore[arg-type]


@pytest.fixture
def prepared(embedded_job):
    return embedded_job(fpl_fast.RunConfig(num_users=3, rounds=1))


def test_precomputed_features_give_the_same_run_as_the_dataset(prepared, tmp_path) -> None:
    """The features seam: the same features and split as the built-in dataset give the same numbers."""
    backbone, classnames, data = prepared
    cfg = {"num_users": 3, "rounds": 1, "noise_seed": 3}
    ours = fpl_fast.train(cfg, settings={"out": str(tmp_path / "a"), "progress": False}, backbone=backbone)
    theirs = fpl_fast.train(
        cfg,
        settings={"out": str(tmp_path / "b"), "progress": False},
        features=data,
        classnames=classnames,
        backbone=backbone,
    )
    assert theirs.final["local_acc_per_client"] == ours.final["local_acc_per_client"]
    assert theirs.final["epsilon_total"] == ours.final["epsilon_total"]
    with pytest.raises(ValueError, match="features needs classnames"):
        fpl_fast.train(cfg, settings={"out": str(tmp_path / "c")}, features=data, backbone=backbone)
    short = fpl_fast.ClientData(**{**data.__dict__, "train_idx": data.train_idx[:2], "test_idx": data.test_idx[:2]})
    with pytest.raises(ValueError, match="has 2 clients in train_idx but num_users is 3"):
        fpl_fast.train(
            cfg, settings={"out": str(tmp_path / "d")}, features=short, classnames=classnames, backbone=backbone
        )
    empty = [np.array([], dtype=np.int64), *data.train_idx[1:]]
    with pytest.raises(ValueError, match=r"clients \[0\] of the given split have no training examples"):
        fpl_fast.train(
            cfg,
            settings={"out": str(tmp_path / "e")},
            features=fpl_fast.ClientData(**{**data.__dict__, "train_idx": empty}),
            classnames=classnames,
            backbone=backbone,
        )


def test_train_runs_the_other_methods_from_their_config(tmp_path) -> None:
    """fpl_fast.train is the one way into a run for FedDTPT and RAPT too; settings that only DP-FPL has are refused
    in one line before anything runs."""
    from fpl_fast.methods import feddtpt, rapt

    with pytest.raises(ValueError, match=r"^mia apply to DP-FPL runs only, not to rapt$"):
        fpl_fast.train(rapt.Config(rounds=1), settings={"out": str(tmp_path / "r"), "mia": 2})
    with pytest.raises(ValueError, match=r"^backbone apply to DP-FPL runs only, not to feddtpt$"):
        fpl_fast.train(feddtpt.Config(rounds=1), settings={"out": str(tmp_path / "f")}, backbone=object())
    assert not (tmp_path / "r").exists() and not (tmp_path / "f").exists()
    result = fpl_fast.train(feddtpt.Config(rounds=1), settings={"out": str(tmp_path / "run"), "progress": False})
    assert result.method == "feddtpt" and result.federation is None and result.out == tmp_path / "run"
    assert (tmp_path / "run" / "results.json").is_file() and 0.0 <= result.local_acc <= 1.0
