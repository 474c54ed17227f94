"""--protocol: personal (today's run, nothing added), global, dual, base2novel, xdataset and xdomain on the embedded
default at tiny rounds; their metrics in results.json, rounds.csv, the summary and the TensorBoard log; resuming;
and the one-line refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import assert_tensorboard_matches_rounds_csv
from torch.utils.data import Dataset

import fpl_fast
from fpl_fast.config import RunConfig
from fpl_fast.data import DatasetBundle, DigitsDataset
from fpl_fast.data.base_novel import base_class_count, base_novel_rows
from fpl_fast.methods.protocols import harmonic_mean
from fpl_fast.outputs import ROUND_FIELDS
from fpl_fast.validation import ConfigError

# A few seconds a run: 3 clients with 2 shots of every class each (iid: base2novel's 5 classes still fill a batch of
# 8), 2 rounds, reproducible noise (two runs of one config give the same numbers).
QUICK: dict[str, Any] = {"num_users": 3, "rounds": 2, "partition": "iid", "num_shots": 2, "noise_seed": 5}


@pytest.fixture
def backbone(embedded_job):
    """The session's embedded tiny CLIP (its image features cached across tests)."""
    return embedded_job(RunConfig(**QUICK))[0]


def _run(backbone: Any, out: Path, **changes: Any) -> fpl_fast.Result:
    settings: dict[str, Any] = {"out": str(out), "progress": False}
    if "tensorboard" in changes:
        settings["tensorboard"] = changes.pop("tensorboard")
    return fpl_fast.train({**QUICK, **changes}, settings=settings, backbone=backbone)


def _csv(out: Path) -> list[dict[str, str]]:
    with open(out / "rounds.csv") as f:
        return list(csv.DictReader(f))


def _assert_recorded(result: fpl_fast.Result, metrics: list[str]) -> None:
    """Every metric of the protocol is in every round record, in rounds.csv (after the shared columns, equal to the
    records), in final with its last value and its means over the last 5 and 10 evaluations."""
    final = result.final
    assert list(final["protocol_metrics"]) == metrics
    rows = _csv(result.out)
    assert list(rows[0]) == [*ROUND_FIELDS, *metrics]
    for rec, row in zip(result.rounds, rows, strict=True):
        for key in metrics:
            assert 0.0 <= rec[key] <= 1.0
            assert float(row[key]) == pytest.approx(rec[key], rel=1e-12)
    for key in metrics:
        assert final[key] == result.rounds[-1][key]
        values = [r[key] for r in result.rounds]
        assert final[f"{key}_mean_last5"] == pytest.approx(np.mean(values[-5:]), rel=1e-12)
        assert final[f"{key}_mean_last10"] == pytest.approx(np.mean(values[-10:]), rel=1e-12)


def test_base_is_the_first_ceil_half_of_the_labels() -> None:
    assert [base_class_count(n) for n in (2, 3, 10, 37, 100)] == [1, 2, 5, 19, 50]
    base, novel = base_novel_rows([4, 0, 5, 9, 2, 5], 5)
    assert base.tolist() == [0, 1, 4] and novel.tolist() == [2, 3, 5]
    with pytest.raises(ValueError, match="at least 2 classes"):
        base_class_count(1)


def test_base2novel_redraws_a_dirichlet_split_until_every_client_holds_a_batch() -> None:
    """The embedded default's base half: the first Dirichlet draw leaves a client 5 examples, fewer than a batch of 8;
    asking for 8 redraws, and asking for what the first draw already gives keeps it."""
    from fpl_fast.data import partition

    base = np.asarray(DigitsDataset("train").labels)
    base = base[base < 5]
    first = partition(base, 10, "dirichlet", beta=0.5, seed=1)
    assert min(len(ix) for ix in first.train) == 5
    assert min(len(ix) for ix in partition(base, 10, "dirichlet", beta=0.5, seed=1, min_train=8).train) >= 8
    kept = partition(base, 10, "dirichlet", beta=0.5, seed=1, min_train=5)
    assert all(np.array_equal(a, b) for a, b in zip(kept.train, first.train, strict=True))


def test_personal_is_todays_run_and_dual_leaves_its_training_untouched(backbone: Any, tmp_path: Path) -> None:
    """The default protocol adds no key anywhere; dual, which evaluates more, trains exactly the same prompts."""
    personal = _run(backbone, tmp_path / "personal")
    assert personal.config["protocol"] == "personal"
    assert not {"protocol", "protocol_metrics", "global_acc"} & set(personal.final)
    assert all(set(r) <= {*ROUND_FIELDS, "clip_norms"} for r in personal.rounds)
    assert list(_csv(personal.out)[0]) == list(ROUND_FIELDS)

    dual = _run(backbone, tmp_path / "dual", protocol="dual", tensorboard=str(tmp_path / "tb"))
    for key in ("local_acc", "neighbor_acc", "epsilon_total", "loss"):
        assert [r[key] for r in dual.rounds] == [r[key] for r in personal.rounds], key
    assert dual.final["local_acc_per_client"] == personal.final["local_acc_per_client"]
    _assert_recorded(dual, ["global_acc", "dual_hm"])
    for rec in dual.rounds:
        assert rec["dual_hm"] == pytest.approx(harmonic_mean(rec["local_acc"], rec["global_acc"]), rel=1e-12)
    scalars = assert_tensorboard_matches_rounds_csv(tmp_path / "tb", dual.out / "rounds.csv")
    assert len(scalars["released/dual_hm"]) == 2


def test_global_is_the_global_prompt_on_the_whole_test_split(backbone: Any, tmp_path: Path) -> None:
    """With promptfl every client's prompt is G, and the clients' test splits cover the test set: the global accuracy
    is their local accuracies weighted by split size (another path: the clients' prompts on their splits)."""
    r = _run(backbone, tmp_path / "g", protocol="global", factorization="promptfl")
    _assert_recorded(r, ["global_acc"])
    sizes = np.array([len(ix) for ix in r.federation.data.test_idx])
    assert sizes.sum() == len(r.federation.data.test_labels) == 400
    weighted = float(np.dot(r.final["local_acc_per_client"], sizes) / sizes.sum())
    assert r.final["global_acc"] == pytest.approx(weighted, abs=0.01)


@pytest.mark.parametrize("factorization", ["dpfpl", "promptfl"])
def test_base2novel_trains_on_the_base_half_and_tests_both(backbone: Any, tmp_path: Path, factorization: str) -> None:
    r = _run(backbone, tmp_path / "b2n", protocol="base2novel", factorization=factorization)
    fed = r.federation
    # Training saw the first ceil(10 / 2) = 5 digits and their names only; base accuracy is on all their test images.
    assert fed.text.n_cls == 5 and int(fed.data.train_labels.max()) == 4 and int(fed.data.test_labels.max()) == 4
    test_labels = DigitsDataset("test").labels
    assert len(fed.data.test_labels) == int((np.asarray(test_labels) < 5).sum())
    metrics = ["global_base_acc", "global_novel_acc", "global_hm", "personal_base_acc", "personal_novel_acc"]
    _assert_recorded(r, [*metrics, "personal_hm"])
    f = r.final
    assert f["global_hm"] == pytest.approx(harmonic_mean(f["global_base_acc"], f["global_novel_acc"]), rel=1e-12)
    assert f["personal_hm"] == pytest.approx(harmonic_mean(f["personal_base_acc"], f["personal_novel_acc"]), rel=1e-12)
    for part in ("base", "novel"):
        each = f[f"personal_{part}_acc_per_client"]
        assert len(each) == 3 and f[f"personal_{part}_acc"] == pytest.approx(np.mean(each), rel=1e-12)
    if factorization == "promptfl":  # each client's prompt is G: the personalised path gives the global numbers
        assert f["personal_base_acc"] == pytest.approx(f["global_base_acc"], abs=0.01)
        assert f["personal_novel_acc"] == pytest.approx(f["global_novel_acc"], abs=0.01)


def test_xdataset_scores_the_prompts_on_other_datasets_with_their_class_names(backbone: Any, tmp_path: Path) -> None:
    """digits-tune (the public part) is another test set; digits itself as a target is a check of the transfer path:
    its global accuracy is the source's, computed again from the target's own class prompts."""
    tb = tmp_path / "tb"
    r = _run(backbone, tmp_path / "xd", protocol="xdataset", eval_datasets="digits-tune,digits", tensorboard=str(tb))
    targets = ["global_acc@digits-tune", "personal_acc@digits-tune", "global_acc@digits", "personal_acc@digits"]
    _assert_recorded(r, ["global_acc", *targets, "transfer_global_acc", "transfer_personal_acc"])
    f = r.final
    assert f["global_acc@digits"] == f["global_acc"]
    assert f["transfer_global_acc"] == pytest.approx((f["global_acc@digits-tune"] + f["global_acc"]) / 2, rel=1e-12)
    each = f["personal_acc_per_client@digits-tune"]
    assert len(each) == 3 and f["personal_acc@digits-tune"] == pytest.approx(np.mean(each), rel=1e-12)
    assert r.config["eval_datasets"] == "digits-tune,digits"
    assert len(assert_tensorboard_matches_rounds_csv(tb, r.out / "rounds.csv")["released/global_acc@digits-tune"]) == 2


@pytest.mark.slow
def test_a_resumed_base2novel_run_ends_as_an_uninterrupted_one(backbone: Any, tmp_path: Path) -> None:
    cfg = {**QUICK, "rounds": 3, "protocol": "base2novel"}
    a, b = {"out": str(tmp_path / "a"), "progress": False}, {"out": str(tmp_path / "b"), "progress": False}
    whole = fpl_fast.train(cfg, settings=a, backbone=backbone)
    fpl_fast.train(cfg, settings=b, backbone=backbone, stop_after_round=1)
    resumed = fpl_fast.train(settings={**b, "resume": True}, backbone=backbone)
    drop = {"seconds", "seconds_elapsed"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.rounds] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole.rounds
    ]
    assert {k: v for k, v in resumed.final.items() if k not in drop} == {
        k: v for k, v in whole.final.items() if k not in drop
    }


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["base2novel", "dual"])
def test_the_cli_reports_the_protocols_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    from fpl_fast.run import main

    out = tmp_path / protocol
    argv = [
        "--quiet",
        "--protocol",
        protocol,
        "--rounds",
        "2",
        "--num-users",
        "3",
        "--num-shots",
        "2",
        "--partition",
        "iid",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    final = json.loads((out / "results.json").read_text())["final"]
    assert f"protocol {protocol}" in text
    for key, what in final["protocol_metrics"].items():
        line = next(ln for ln in text.splitlines() if ln.startswith(what))
        assert f"{final[key]:.4g} | {final[f'{key}_mean_last5']:.4g}" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--protocol", "everything"], "--protocol: invalid choice: 'everything'"),
        (["--protocol", "xdataset"], "--protocol xdataset needs --eval-datasets"),
        (["--protocol", "xdataset", "--eval-datasets", "mnist"], "--eval-datasets: unknown dataset 'mnist'; allowed"),
        (["--protocol", "xdomain"], "--protocol xdomain trains on --dataset imagenet"),
        (
            ["--protocol", "xdomain", "--dataset", "imagenet", "--eval-datasets", "dtd"],
            "--eval-datasets of --protocol xdomain are ImageNet variants",
        ),
        (["--eval-datasets", "dtd,,food101"], "--eval-datasets must be dataset names separated by commas"),
        (["--eval-datasets", "dtd,dtd"], "--eval-datasets names 'dtd' twice"),
        (["--protocol", "dual", "--engine", "flower-sim"], "--protocol dual runs on --engine inprocess only"),
        (["--protocol", "base2novel", "--mia", "2"], "--protocol base2novel with --mia"),
    ],
)
def test_bad_protocol_settings_end_in_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fpl_fast.run import main

    try:
        rc = main(["--quiet", "--out", str(tmp_path / "run"), *args])
    except SystemExit as exc:  # the parser's own errors
        rc = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything ran


class _OneClass(Dataset):
    """A labelled set of one class (its images are never read: the split is refused first)."""

    labels = np.zeros(4, dtype=np.int64)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> Any:
        raise AssertionError("no image should be read")


def test_base2novel_refuses_one_class_and_a_given_client_split(embedded_job: Any, tmp_path: Path) -> None:
    backbone, classnames, data = embedded_job(RunConfig(**QUICK))
    settings = {"out": str(tmp_path / "r"), "progress": False}
    one = DatasetBundle("one", _OneClass(), _OneClass(), ["zero"])
    with pytest.raises(ConfigError, match=r"^protocol='base2novel' on dataset 'one': .* at least 2 classes.* got 1$"):
        fpl_fast.train({**QUICK, "protocol": "base2novel"}, settings=settings, dataset=one, backbone=backbone)
    with pytest.raises(ConfigError, match="not features="):
        fpl_fast.train(
            {**QUICK, "protocol": "base2novel"},
            settings=settings,
            features=data,
            classnames=classnames,
            backbone=backbone,
        )
    assert not (tmp_path / "r").exists()


def test_eval_datasets_take_a_list_and_only_the_transfer_protocols_read_them() -> None:
    cfg = RunConfig(protocol="xdataset", eval_datasets=["dtd", "eurosat"])  # a --config file's JSON list
    assert cfg.eval_datasets == "dtd,eurosat" and cfg.eval_dataset_names == ("dtd", "eurosat")
    assert RunConfig(eval_datasets="dtd").eval_dataset_names == ()  # personal: unused (one grid spec for all)
    xdomain = RunConfig(protocol="xdomain", dataset="imagenet")
    assert xdomain.eval_dataset_names == ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert RunConfig(protocol="xdomain", dataset="imagenet", eval_datasets="imagenet_r").eval_dataset_names == (
        "imagenet_r",
    )


def test_a_flower_run_config_refuses_another_protocol() -> None:
    from fpl_fast.flower.protocol import from_run_config

    with pytest.raises(ValueError, match=r"^run config protocol='dual': Flower apps evaluate the personal protocol"):
        from_run_config({"protocol": "dual"})
    assert from_run_config({"protocol": "personal"})[0].protocol == "personal"


def test_xdomain_scores_the_four_imagenet_variants(embedded_job: Any, tmp_path: Path) -> None:
    """The method with the test sets of the four variants in hand (here the digits' test split under their names:
    the ImageNet folders are not on this machine): a metric pair per variant, and their means. Eval sets that do not
    fit the protocol are refused."""
    from fpl_fast.config import IMAGENET_VARIANTS
    from fpl_fast.federated.eval_sets import EvalSet
    from fpl_fast.methods.dpfpl import DPFPL
    from fpl_fast.methods.skeleton import run_method

    backbone, classnames, data = embedded_job(RunConfig(**QUICK))
    cfg = RunConfig(**QUICK, protocol="xdomain", dataset="imagenet")
    sets = [EvalSet(name, classnames, data.test_feats, data.test_labels) for name in IMAGENET_VARIANTS]
    with pytest.raises(ValueError, match=r"protocol 'xdomain' evaluates on \['imagenet_v2', .*got eval sets \[\]"):
        run_method(DPFPL(backbone, classnames, data, out=tmp_path / "x"), cfg, out=tmp_path / "x", progress=False)
    method = DPFPL(backbone, classnames, data, out=tmp_path / "r", eval_sets=sets)
    final = run_method(method, cfg, out=tmp_path / "r", progress=False)["final"]
    pairs = [f"{kind}_acc@{name}" for name in IMAGENET_VARIANTS for kind in ("global", "personal")]
    assert list(final["protocol_metrics"]) == ["global_acc", *pairs, "transfer_global_acc", "transfer_personal_acc"]
    assert all(final[f"global_acc@{name}"] == final["global_acc"] for name in IMAGENET_VARIANTS)  # the same test set
    assert final["transfer_global_acc"] == pytest.approx(final["global_acc"], rel=1e-12)
