"""FedDTPT: label-only oracle, proposers, client loop, server aggregation (spec F1-F9) and the run end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from support import assert_tensorboard_matches_rounds_csv
from torch.utils.data import Subset

from fpl_fast.backbone.loading import load_backbone
from fpl_fast.data.digits import DIGIT_CLASSNAMES, DigitsDataset
from fpl_fast.methods.feddtpt import (
    Batch,
    Config,
    EmbeddingNeighbor,
    HistoryEntry,
    Oracle,
    RandomProposer,
    allowed_vocabulary,
    client_update,
    run,
    token_table,
)
from fpl_fast.methods.feddtpt.aggregation import SERVER_MODES, aggregate, attention_weights, elbow_eps

# --------------------------------------------------------------------------------------------------------------
# Fixtures: a random-init tiny CLIP (the oracle only needs to be a deterministic classifier here)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("tiny-digits-clip", None)


@pytest.fixture(scope="module")
def images():
    return Subset(DigitsDataset("test"), range(40))


@pytest.fixture()
def oracle(backbone, images) -> Oracle:
    o = Oracle(backbone, DIGIT_CLASSNAMES)
    o.register("test", images)
    return o


def _labels(images) -> np.ndarray:
    return np.asarray([images[i][1] for i in range(len(images))])


def _table(vocab: int = 300, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# F1: the oracle exposes labels only and counts its queries
# --------------------------------------------------------------------------------------------------------------


def test_oracle_returns_integer_labels_only_and_counts_queries(oracle: Oracle) -> None:
    prompt = [320, 1125, 539, 320]
    pred = oracle.predict(prompt, "test", [0, 1, 2, 5, 7])
    assert pred.dtype == torch.long and not pred.is_floating_point()
    assert pred.shape == (5,)
    assert int(pred.min()) >= 0 and int(pred.max()) < len(DIGIT_CLASSNAMES)
    assert oracle.queries == 5
    assert oracle.text_encodings == len(DIGIT_CLASSNAMES)

    many = oracle.predict_many([prompt, [320, 1125], [539]], "test", np.arange(10))
    assert many.dtype == torch.long and many.shape == (3, 10)
    assert torch.equal(many[0, [0, 1, 2, 5, 7]], pred)  # same prompt, same images: same labels
    assert oracle.queries == 5 + 3 * 10
    assert oracle.text_encodings == 3 * len(DIGIT_CLASSNAMES)  # the first prompt's texts were cached

    # Nothing public hands out floats: every public attribute is an int or a method.
    for name in dir(oracle):
        if name.startswith("_"):
            continue
        value = getattr(oracle, name)
        assert callable(value) or (isinstance(value, int) and not isinstance(value, bool)), name


def test_oracle_rejects_bad_prompts_and_splits(oracle: Oracle) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        oracle.predict([], "test", [0])
    with pytest.raises(ValueError, match="without SOT/EOT"):
        oracle.predict([320, 49406], "test", [0])
    with pytest.raises(ValueError, match="prompt length must be <="):
        oracle.predict([320] * 80, "test", [0])
    with pytest.raises(ValueError, match="registered splits"):
        oracle.predict([320], "train", [0])
    with pytest.raises(ValueError, match="indices must lie in"):
        oracle.predict([320], "test", [40])


def test_oracle_text_matches_the_backbone_tokenization(backbone, oracle: Oracle, images) -> None:
    """The assembled ids reproduce the plain text 'a photo of a <class>.' exactly (no retokenization drift)."""
    with torch.no_grad():
        w = backbone.zero_shot_weights(DIGIT_CLASSNAMES, "a photo of a {}.").float()
        x = torch.nn.functional.normalize(backbone.image_features("data", "test", images).float(), dim=-1)
        expected = (x @ w.T).argmax(-1)
    got = oracle.predict(backbone.tokenizer.encode("a photo of a"), "test", np.arange(len(images)))
    assert torch.equal(got, expected)


def test_allowed_vocabulary_excludes_specials(backbone) -> None:
    tok = backbone.tokenizer
    full = allowed_vocabulary(tok)
    assert full.numel() == len(tok.encoder) - 3
    for special in (tok.sot_token_id, tok.eot_token_id, 0):
        assert special not in set(full.tolist())
    words = allowed_vocabulary(tok, words_only=True)
    assert 0 < words.numel() < full.numel()
    assert all(tok.decoder[i].endswith("</w>") and tok.decoder[i][:-4].isalpha() for i in words[:500].tolist())


# --------------------------------------------------------------------------------------------------------------
# F5: proposers
# --------------------------------------------------------------------------------------------------------------


def test_embedding_neighbor_proposes_nearest_tokens_and_skips_banned_ones() -> None:
    z = _table()
    allowed = torch.arange(1, 300)
    prop = EmbeddingNeighbor(z, allowed, rng=np.random.default_rng(0), explore=0.0)
    zn = torch.nn.functional.normalize(z, dim=-1)
    sims = zn[allowed] @ zn[5]
    ranked = allowed[torch.argsort(sims, descending=True)].tolist()
    ranked.remove(5)
    assert prop.propose([5, 7], 0, [], 4) == ranked[:4]
    history = [HistoryEntry(0, 5, ranked[0], 0.1, -0.2), HistoryEntry(1, 7, ranked[1], 0.1, -0.2)]
    assert prop.propose([5, 7], 0, history, 4) == ranked[1:5]  # banned at position 0 only

    explore = EmbeddingNeighbor(z, allowed, rng=np.random.default_rng(0), explore=0.25)
    out = explore.propose([5, 7], 0, [], 8)
    assert len(out) == len(set(out)) == 8 and 5 not in out
    assert out[:6] == ranked[:6]


def test_random_proposer_ignores_history() -> None:
    allowed = torch.arange(1, 300)
    prop = RandomProposer(allowed, rng=np.random.default_rng(0))
    out = prop.propose([5, 7], 0, [HistoryEntry(0, 5, 9, 0.0, -1.0)], 8)
    assert len(out) == len(set(out)) == 8 and 5 not in out
    assert set(out) <= set(allowed.tolist())
    assert not prop.uses_history


# --------------------------------------------------------------------------------------------------------------
# F4: client loop
# --------------------------------------------------------------------------------------------------------------


def _client(
    oracle: Oracle, images, *, seed: int, feedback: bool = True, proposer: str = "neighbor", iterations: int = 4
):
    labels = _labels(images)
    batches = [Batch("test", np.arange(30), labels[:30]), Batch("test", np.arange(30, 40), labels[30:])]
    z = token_table(oracle._backbone)
    allowed = allowed_vocabulary(oracle._backbone.tokenizer)
    rng = np.random.default_rng(seed)
    prop = EmbeddingNeighbor(z, allowed, rng=rng) if proposer == "neighbor" else RandomProposer(allowed, rng=rng)
    return client_update(
        oracle, [320, 1125, 539], batches, prop, iterations=iterations, candidates=4, rng=rng, feedback=feedback
    )


def test_client_feedback_loop_never_lowers_accuracy_and_logs_every_candidate(oracle: Oracle, images) -> None:
    labels = _labels(images)
    start = oracle.queries
    res = _client(oracle, images, seed=3)
    initial = float((oracle.predict([320, 1125, 539], "test", np.arange(40)).numpy() == labels).mean())
    assert res.acc >= initial
    final = float((oracle.predict(res.prompt, "test", np.arange(40)).numpy() == labels).mean())
    assert res.acc == pytest.approx(final)
    assert len(res.history) == 4 * 4
    assert all(h.delta < 0 or h.acc >= 0 for h in res.history)
    # 1 initial evaluation + 4 iterations x 4 candidates, each on 40 images
    assert res.queries == (1 + 16) * 40
    assert oracle.queries - start == res.queries + 2 * 40
    assert len(res.prompt) == 3


def test_client_no_feedback_mode_edits_cyclically_without_history(oracle: Oracle, images) -> None:
    res = _client(oracle, images, seed=3, feedback=False, iterations=3)
    assert res.history == []
    assert res.queries == 40  # only the final report evaluation
    # one unconditional edit per position, each the nearest neighbour of the token it replaces
    z = token_table(oracle._backbone)
    prop = EmbeddingNeighbor(z, allowed_vocabulary(oracle._backbone.tokenizer), rng=np.random.default_rng(0))
    assert res.prompt == [prop.propose([t], 0, [], 1)[0] for t in (320, 1125, 539)]


def test_deterministic_seed_gives_deterministic_client_result(oracle: Oracle, images) -> None:
    for proposer in ("neighbor", "random"):
        a = _client(oracle, images, seed=11, proposer=proposer)
        b = _client(oracle, images, seed=11, proposer=proposer)
        assert a.prompt == b.prompt and a.acc == b.acc and a.history == b.history


# --------------------------------------------------------------------------------------------------------------
# F6: server aggregation
# --------------------------------------------------------------------------------------------------------------


def test_attention_weights_follow_eq6_and_alpha_sums_to_one_per_client() -> None:
    z = _table()
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11], [3, 12, 13, 14, 15]]
    ids = torch.tensor([t for p in prompts for t in p])
    client_of = torch.tensor([k for k, p in enumerate(prompts) for _ in p])
    w, alpha = attention_weights(z[ids], client_of)
    e = torch.nn.functional.normalize(z[ids].double(), dim=-1)
    for i in range(len(ids)):
        brute = sum(float(e[i] @ e[j]) for j in range(len(ids)) if client_of[j] != client_of[i])
        assert float(w[i]) == pytest.approx(brute, abs=1e-10)
    for k in range(len(prompts)):
        assert float(alpha[client_of == k].sum()) == pytest.approx(1.0, abs=1e-12)
    res = aggregate(prompts, z, previous=[3, 4, 5, 6])
    for k in range(len(prompts)):
        assert float(res.alpha[client_of == k].sum()) == pytest.approx(1.0, abs=1e-12)


def test_duplicate_token_across_all_clients_ends_up_in_the_output() -> None:
    z = _table(vocab=2000, dim=32, seed=1)
    rng = np.random.default_rng(0)
    shared = 1234
    pool = rng.permutation([i for i in range(1, 2000) if i != shared])
    prompts = []
    for k in range(10):
        p = pool[4 * k : 4 * k + 4].tolist()
        p.insert(int(rng.integers(5)), shared)
        prompts.append(p)
    res = aggregate(prompts, z, previous=[1, 2, 3])
    assert shared in res.prompt
    assert not res.fallback and res.eps is not None and res.eps > 0


@pytest.mark.parametrize("mode", SERVER_MODES)
def test_identical_client_prompts_give_the_same_global_prompt(mode: str) -> None:
    z = _table()
    prompt = [17, 42, 99, 5, 230]
    res = aggregate([list(prompt) for _ in range(6)], z, previous=[1, 2], mode=mode, allowed=torch.arange(1, 300))
    if mode in ("topn", "kmeans"):  # N = the previous global prompt's length
        res = aggregate([list(prompt) for _ in range(6)], z, previous=prompt, mode=mode, allowed=torch.arange(1, 300))
    assert res.prompt == prompt


def test_a_token_repeated_inside_one_prompt_survives_once() -> None:
    """Clustering acts on tokens: the two "a" of "a photo of a" fall into one cluster (documented behaviour)."""
    z = _table(vocab=2000)
    a, photo, of = 320, 1125, 539
    res = aggregate([[a, photo, of, a] for _ in range(4)], z, previous=[a])
    assert res.prompt == [a, photo, of]


def test_no_cluster_falls_back_to_the_previous_prompt_and_n_max_caps_the_length() -> None:
    z = _table()
    prompts = [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    res = aggregate(prompts, z, previous=[40, 41], min_samples=50)  # no core point: everything is noise
    assert res.fallback and res.prompt == [40, 41] and res.n_noise == 9

    many = [list(range(10, 30)) for _ in range(3)]
    capped = aggregate(many, z, previous=[1], n_max=5)
    assert len(capped.prompt) == 5
    order = [many[0].index(t) for t in capped.prompt]
    assert order == sorted(order)  # re-sorted by position after the cap


def test_server1_mean_maps_to_the_nearest_allowed_token() -> None:
    z = _table()
    target = 77
    z[10] = z[target] + 0.01
    z[11] = z[target] - 0.01
    res = aggregate([[10, 3], [11, 3, 4]], z, previous=[1, 2], mode="mean", allowed=torch.arange(1, 300))
    assert res.prompt == [target, 3]  # positions aligned by truncation to the shortest prompt


def test_elbow_eps_is_positive_and_finite() -> None:
    rng = np.random.default_rng(0)
    cases = [
        rng.normal(size=(40, 16)),
        np.zeros((12, 4)),  # all duplicates: every distance is 0
        rng.normal(size=(1, 8)),
        rng.normal(size=(2, 8)),
        np.concatenate([np.ones((10, 4)), rng.normal(size=(30, 4))]),
    ]
    for pts in cases:
        for method in ("second_diff", "kneedle"):
            eps = elbow_eps(pts, method=method)
            assert math.isfinite(eps) and eps > 0, (pts.shape, method, eps)
    # a tight group plus far points: the knee sits at the end of the group's distances
    grouped = np.concatenate([np.zeros((10, 4)), 5 * np.eye(4)[rng.integers(4, size=30)] + rng.normal(size=(30, 4))])
    assert elbow_eps(grouped) < 1e-3


def test_aggregation_is_deterministic() -> None:
    z = _table()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 300, size=int(rng.integers(3, 7))).tolist() for _ in range(8)]
    for mode in SERVER_MODES:
        a = aggregate(prompts, z, previous=[1, 2, 3, 4], mode=mode, allowed=torch.arange(1, 300), seed=2)
        b = aggregate(prompts, z, previous=[1, 2, 3, 4], mode=mode, allowed=torch.arange(1, 300), seed=2)
        assert a.prompt == b.prompt and torch.equal(a.alpha, b.alpha) and a.eps == b.eps


# --------------------------------------------------------------------------------------------------------------
# Config and the run end to end (F7, F8)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rounds": 0}, "rounds must be an integer >= 1"),
        ({"server": "avg"}, "server must be one of"),
        ({"proposer": "mlm"}, "proposer must be one of neighbor, random"),
        ({"partition": "shards"}, "partition must be one of iid, pathological, dirichlet"),
        ({"explore": 1.5}, r"explore must be in \[0, 1\]"),
        ({"seed_prompt": " "}, "seed_prompt must be one of"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ],
)
def test_config_rejects_bad_values(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Config(**changes)


SMALL = Config(num_users=3, rounds=2, iterations=4, candidates=4, batch_size=16, seed=7)


@pytest.mark.slow
def test_run_end_to_end_writes_results_with_the_shared_shape(tmp_path) -> None:
    res = run(SMALL, out=tmp_path, progress=False, tensorboard=tmp_path / "tb")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    logged = assert_tensorboard_matches_rounds_csv(tmp_path / "tb", tmp_path / "rounds.csv")
    assert sorted(logged) == ["released/local_acc", "released/neighbor_acc", "time/seconds_elapsed"]  # no DP, no loss
    assert (tmp_path / "rounds.csv").is_file()
    assert (
        list(on_disk) == ["method", "config", "rounds", "final", "fpl_fast_version"] and on_disk["method"] == "feddtpt"
    )
    assert len(on_disk["rounds"]) == SMALL.rounds
    for row in on_disk["rounds"]:
        for key in ("round", "local_acc", "neighbor_acc", "epsilon_local", "epsilon_global", "seconds_elapsed"):
            assert key in row
        assert row["epsilon_local"] is None and row["epsilon_global"] is None
        assert 0.0 <= row["local_acc"] <= 1.0 and 0.0 <= row["neighbor_acc"] <= 1.0
    final = on_disk["final"]
    for key in ("local_acc", "neighbor_acc", "zero_shot_acc", "epsilon_local", "epsilon_global", "delta"):
        assert key in final
    assert final["accountant"] is None and "no differential privacy" in final["note"]
    # queries: per client and round, 1 + iterations x candidates prompts on B u D_g (16 + 10 images)
    assert final["queries"] == SMALL.rounds * SMALL.num_users * (1 + 4 * 4) * (16 + 10)
    # bits: round 1 uploads and downloads K prompts of the 4-token seed, 16 bits per token
    first = on_disk["rounds"][0]
    assert first["upload_bits"] == first["download_bits"] == SMALL.num_users * 4 * 16
    assert final["total_bits"] == final["upload_bits"] + final["download_bits"]
    assert final["zero_shot_acc"] == final["seed_prompt_acc"]  # seed preset = the zero-shot text
    # the search improves on the hand-written prompt (measured: 0.46 -> 0.96 in round 1 with these settings)
    assert max(row["test_acc"] for row in on_disk["rounds"]) > final["zero_shot_acc"]
    assert final["transfer"]["model"] == "tiny-bidir-clip" and 0.0 <= final["transfer"]["acc"] <= 1.0
    assert res["final"]["prompt"] == final["prompt"]


@pytest.mark.slow
def test_run_is_deterministic(tmp_path) -> None:
    cfg = dataclasses.replace(SMALL, rounds=1, transfer_model=None, pretrained=None, partition="dirichlet", beta=1.0)
    a = run(cfg, out=tmp_path / "a", progress=False)
    b = run(cfg, out=tmp_path / "b", progress=False)
    assert a["final"]["prompt"] == b["final"]["prompt"]
    assert a["final"]["queries"] == b["final"]["queries"]
    assert a["rounds"][0]["test_acc"] == b["rounds"][0]["test_acc"]
