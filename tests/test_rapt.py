"""RAPT on a CLIP text tower (spec R5-R10, R13): sequences, gradients, config checks, end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import assert_tensorboard_matches_rounds_csv

from fpl_fast.backbone.loading import load_backbone
from fpl_fast.data.topics import TEXT_CLASSNAMES, make_text_dataset
from fpl_fast.methods import rapt
from fpl_fast.validation import ConfigError


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("tiny-digits-clip", None)


def test_text_dataset_is_deterministic_and_balanced() -> None:
    a, b = make_text_dataset("train"), make_text_dataset("train")
    assert a.texts == b.texts and (a.labels == b.labels).all()
    assert len(a) == 800 and len(make_text_dataset("test")) == 400
    assert sorted(set(a.labels.tolist())) == list(range(len(TEXT_CLASSNAMES)))
    assert (torch.bincount(torch.as_tensor(a.labels)) == 200).all()
    assert make_text_dataset("test").texts != a.texts[:400]
    with pytest.raises(ValueError, match="split must be one of"):
        make_text_dataset("val")


def test_build_sequences_layout() -> None:
    body = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    tokens, eot = rapt.build_sequences(body, 100, 101, n_prompt=2)
    assert tokens.shape == (2, 2 + 2 + 3)
    assert tokens[:, 0].tolist() == [100, 100]
    assert tokens[0].tolist() == [100, 0, 0, 5, 6, 7, 101]
    assert tokens[1].tolist() == [100, 0, 0, 8, 101, 0, 0]
    assert eot.tolist() == [6, 4]


def test_reconstruction_vocab(backbone) -> None:
    ids = rapt.reconstruction_vocab(backbone, 50)
    assert ids.numel() == 50 and bool((ids[1:] > ids[:-1]).all())
    words = [backbone.tokenizer.decoder[int(i)] for i in ids]
    assert all(w.endswith("</w>") and w[:-4].isalpha() for w in words)
    full = rapt.reconstruction_vocab(backbone, 0)
    assert full.numel() == 49408 - 2 and not torch.isin(full, torch.tensor(rapt.special_ids(backbone))).any()


@pytest.mark.parametrize("task_head", ["linear", "cosine"])
def test_gradients_reach_only_prompt_and_heads(backbone, task_head: str) -> None:
    rec_ids = rapt.reconstruction_vocab(backbone, 40)
    model = rapt.RaptModel(
        backbone,
        n_cls=4,
        n_prompt=4,
        n_plain=3,
        rec_vocab_size=rec_ids.numel(),
        rec_dim=16,
        task_head=task_head,
        label_features=backbone.encode_text([f"a sentence about {c}." for c in TEXT_CLASSNAMES]),
        generator=torch.Generator().manual_seed(0),
    )
    body = [torch.cat([rec_ids[:3], torch.tensor(backbone.tokenizer.encode(t))]) for t in ["rain today", "a song"]]
    l_task, l_rec, _ = rapt._losses(model, body, torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([2, 3]))
    (l_task + l_rec).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prompt", "rec_down.weight", "rec_up.weight"} | (
        {"head.weight", "head.bias"} if task_head == "linear" else set()
    )
    assert trainable == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"frozen backbone parameter {name} got a gradient"
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())


def test_reconstruction_loss_reaches_prompt_through_causal_mask(backbone) -> None:
    """With lambda > 0 and no task loss, P still gets a gradient: plain positions attend to [SOT] P k'."""
    rec_ids = rapt.reconstruction_vocab(backbone, 10)
    model = rapt.RaptModel(backbone, n_cls=2, n_prompt=3, n_plain=2, rec_vocab_size=10, rec_dim=8, task_head="linear")
    _, l_rec, _ = rapt._losses(
        model, [torch.cat([rec_ids[:2], torch.tensor([320])])], torch.tensor([[0, 1]]), torch.tensor([0])
    )
    l_rec.backward()
    assert model.prompt.grad.abs().sum() > 0
    assert model.head.weight.grad is None


@pytest.mark.parametrize(
    "change,field",
    [
        ({"num_users": 0}, "num_users"),
        ({"partition": "pathological"}, "partition"),
        ({"task_head": "lm"}, "task_head"),
        ({"eta": -1.0}, "eta"),
        ({"target_preservation": 1.0}, "target_preservation"),
        ({"dataset": "digits"}, "dataset"),
        ({"n_plain": 0}, "n_plain"),
        ({"lr": 0.0}, "lr"),
        ({"train_size": 3}, "train_size"),
    ],
)
def test_config_validation(change: dict, field: str) -> None:
    """A bad value raises a ConfigError (a ValueError) that names its field; the CLI spells it as a flag."""
    with pytest.raises(ConfigError, match=f"^{field} must") as info:
        rapt.Config(**change)
    assert info.value.field == field


def test_end_to_end(tmp_path: Path) -> None:
    cfg = rapt.Config(
        num_users=2, rounds=2, local_epochs=1, calibration_tokens=64, bayes_mc=4, n_prompt=4, rec_vocab=200
    )
    res = rapt.run(cfg, out=tmp_path, progress=False, tensorboard=tmp_path / "tb")
    saved = json.loads((tmp_path / "results.json").read_text())
    logged = assert_tensorboard_matches_rounds_csv(tmp_path / "tb", tmp_path / "rounds.csv")
    assert "private/loss" in logged and "private/clipped_fraction" not in logged  # RAPT clips nothing
    assert (tmp_path / "rounds.csv").is_file()
    assert list(saved) == ["method", "config", "rounds", "final", "fpl_fast_version"] and saved["method"] == "rapt"
    assert saved["config"]["num_users"] == 2 and len(saved["rounds"]) == 2
    for row in saved["rounds"]:
        for key in ("round", "local_acc", "neighbor_acc", "epsilon_local", "epsilon_global", "loss", "seconds_elapsed"):
            assert key in row
    final = saved["final"]
    for key in ("local_acc", "neighbor_acc", "zero_shot_acc", "epsilon_local", "epsilon_global", "delta", "accountant"):
        assert key in final
    for row in saved["rounds"]:  # the objective L = L_task + lambda L_rec, averaged over the round's steps
        assert row["loss"] == pytest.approx(row["loss_task"] + cfg.rec_weight * row["loss_rec"], rel=1e-9)
    assert 0 <= final["local_acc"] <= 1 and 0 <= final["neighbor_acc"] <= 1
    assert final["epsilon_local"] == pytest.approx(final["eta"] * final["diameter"])
    assert final["nn_inversion_acc"] == final["preservation_rate_test"]
    assert abs(final["calibration_rate"] - 0.7) < 0.02
    assert res["final"]["eta"] == final["eta"]


def test_shipped_text_tower_loads_offline_and_separates_topics() -> None:
    """The default backbone is the shipped text tower (pretrained on sentences of another seed); its frozen EOT
    features of clean topic text are linearly separable far above chance (0.25), unlike a random tower's (~0.4)."""
    from fpl_fast.data.pretrain_text_tower import TEXT_TOWER_WEIGHTS, linear_probe_accuracy

    assert Path(rapt.Config().pretrained) == TEXT_TOWER_WEIGHTS and TEXT_TOWER_WEIGHTS.is_file()
    assert TEXT_TOWER_WEIGHTS.stat().st_size < 1_000_000
    tower = load_backbone("tiny-digits-clip", rapt.Config().pretrained)
    assert tower.meta["recipe"] == "fpl_fast.data.pretrain_text_tower"
    assert linear_probe_accuracy(tower, n_train=400, n_test=200, steps=150) > 0.85
