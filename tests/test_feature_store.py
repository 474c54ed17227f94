"""The on-disk image-feature cache: round trip, corrupt entries, concurrent writers, and runs that encode nothing."""

from __future__ import annotations

import multiprocessing as mp
import warnings

import pytest
import torch

import fpl_fast
from fpl_fast.backbone.loading import load_backbone
from fpl_fast.data import DigitsDataset
from fpl_fast.data.feature_store import FeatureStore, weights_fingerprint


def test_an_entry_round_trips_bitwise_and_a_damaged_one_reads_as_missing(tmp_path) -> None:
    store = FeatureStore(tmp_path)
    feats = torch.randn(7, 5)
    path = store.save("k", feats, {"dataset": "x"})
    assert torch.equal(store.load("k", rows=7), feats)
    with pytest.warns(UserWarning, match="checksum or shape"):
        assert store.load("k", rows=8) is None
    path.write_bytes(path.read_bytes()[:50])  # truncated (a crash mid-copy)
    with pytest.warns(UserWarning, match="unreadable"):
        assert store.load("k", rows=7) is None
    entry = {"format": 1, "feats": feats + 1, "sha256": "0" * 64, "meta": {}}
    torch.save(entry, path)  # features that do not match their checksum
    with pytest.warns(UserWarning, match="checksum"):
        assert store.load("k", rows=7) is None
    assert store.load("missing", rows=7) is None
    assert not list(tmp_path.glob("*.tmp"))


def _writer(root: str, seed: int) -> None:
    store = FeatureStore(root)
    for _ in range(20):
        store.save("shared", torch.full((64, 32), float(seed)))


def test_concurrent_writers_leave_one_complete_entry(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats = FeatureStore(tmp_path).load("shared", rows=64)
    assert feats is not None and len(set(feats.flatten().tolist())) == 1  # one writer's whole matrix, no mixture
    assert not list(tmp_path.glob("*.tmp"))


def test_the_key_follows_the_encoder_weights_and_the_parts(tmp_path) -> None:
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    store = FeatureStore(tmp_path)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert store.entry_key(a, split="train") != store.entry_key(b, split="train")
    assert store.entry_key(a, split="train") != store.entry_key(a, split="test")
    assert store.entry_key(a, split="train", rows=3) == FeatureStore(tmp_path).entry_key(a, split="train", rows=3)


def test_a_second_backbone_reads_the_split_from_disk_and_encodes_nothing(tmp_path) -> None:
    ds = DigitsDataset("test")
    first = load_backbone("tiny-digits-clip", "embedded")
    first.feature_cache.disk = FeatureStore(tmp_path)
    want = first.image_features("digits:data", "test", ds, [3, 1])
    assert first.feature_cache.encoded_images == len(ds)  # a disk-backed split is encoded whole, once
    second = load_backbone("tiny-digits-clip", "embedded")
    second.feature_cache.disk = FeatureStore(tmp_path)
    got = second.image_features("digits:data", "test", ds, [3, 1])
    assert second.feature_cache.encoded_images == 0 and torch.equal(got, want)
    other = load_backbone("tiny-digits-clip", None)  # other (random) weights: another entry
    other.feature_cache.disk = FeatureStore(tmp_path)
    other.image_features("digits:data", "test", ds, [0])
    assert other.feature_cache.encoded_images == len(ds)


@pytest.mark.slow
def test_a_second_run_with_the_cache_encodes_no_image_and_gives_the_same_numbers(tmp_path) -> None:
    cfg = {"num_users": 3, "rounds": 1, "noise_seed": 2}
    cache = str(tmp_path / "features")
    runs = [
        fpl_fast.train(cfg, settings={"out": str(tmp_path / f"r{i}"), "progress": False, "feature_cache": cache})
        for i in range(2)
    ]
    assert runs[0].federation.backbone.feature_cache.encoded_images > 0
    assert runs[1].federation.backbone.feature_cache.encoded_images == 0
    assert runs[1].final["local_acc_per_client"] == runs[0].final["local_acc_per_client"]
