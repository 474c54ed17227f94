"""Few-shot training sets: --shots-protocol per-client (shots of each client's share, after the split) and coop
(CoOp's: shots of the whole training set from the seed alone, then the split)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpl_fast.config import CHOICES, RunConfig
from fpl_fast.data import SHOTS_PROTOCOLS, coop_shots, partition, sample_shots
from fpl_fast.data.clients import client_split

# 12 classes of unequal sizes (8 .. 30), one with fewer than the shots asked for below.
SIZES = [8, 30, 12, 25, 9, 17, 22, 3, 14, 19, 27, 10]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(SIZES)), SIZES))
TEST_LABELS = np.repeat(np.arange(len(SIZES)), 5)
SPLITS = [
    {"num_users": 2, "scheme": "iid"},
    {"num_users": 5, "scheme": "iid"},
    {"num_users": 4, "scheme": "dirichlet", "beta": 0.3},
    {"num_users": 3, "scheme": "dirichlet", "beta": 5.0},
    {"num_users": 4, "scheme": "pathological"},
    {"num_users": 3, "scheme": "pathological", "classes_per_user": 2},
]


def test_the_protocols_are_the_settings_choices() -> None:
    assert SHOTS_PROTOCOLS == CHOICES["shots_protocol"] == ("per-client", "coop")
    assert RunConfig().shots_protocol == "per-client"  # the default job's numbers do not move


def test_coop_shots_are_k_per_class_of_the_whole_set() -> None:
    kept = coop_shots(LABELS, 4, seed=3)
    counts = np.bincount(LABELS[kept], minlength=len(SIZES))
    assert np.array_equal(counts, np.minimum(SIZES, 4))  # all 3 of the class that has fewer, as CoOp
    assert len(np.unique(kept)) == len(kept) and np.array_equal(kept, np.sort(kept))


def test_coop_shots_depend_on_the_seed() -> None:
    draws = [coop_shots(LABELS, 4, seed=s) for s in range(4)]
    assert all(np.array_equal(d, coop_shots(LABELS, 4, seed=s)) for s, d in enumerate(draws))
    assert len({tuple(d) for d in draws}) == 4


@pytest.mark.parametrize("seed", [0, 7])
def test_coop_protocol_trains_on_the_same_shots_whatever_the_split(seed: int) -> None:
    """The clients' union is the seed's CoOp draw (of the classes the scheme hands out) for every number of
    clients, scheme and parameter; the shares are disjoint."""
    want = coop_shots(LABELS, 4, seed=seed)
    for args in SPLITS:
        split = partition(LABELS, **args, num_shots=4, shots_protocol="coop", test_labels=TEST_LABELS, seed=seed)
        union = np.concatenate(split.train)
        assert len(union) == len(np.unique(union)), args
        covered = np.unique(np.concatenate(split.classes))  # all, but where classes_per_user leaves some out
        assert len(covered) == len(SIZES) or "classes_per_user" in args
        assert np.array_equal(np.sort(union), want[np.isin(LABELS[want], covered)]), args
        for part, classes in zip(split.train, split.classes, strict=True):
            assert np.array_equal(np.unique(LABELS[part]), classes)
    other = partition(LABELS, 3, "iid", num_shots=4, shots_protocol="coop", seed=seed + 1)
    assert not np.array_equal(np.sort(np.concatenate(other.train)), want)


def test_coop_protocol_splits_the_few_shot_set_with_the_schemes_rules() -> None:
    split = partition(LABELS, 4, "pathological", num_shots=2, shots_protocol="coop", test_labels=TEST_LABELS, seed=1)
    shares = [set(LABELS[p].tolist()) for p in split.train]
    assert all(a.isdisjoint(b) for i, a in enumerate(shares) for b in shares[i + 1 :])
    assert set().union(*shares) == set(range(len(SIZES)))
    for part, test in zip(split.train, split.test, strict=True):  # a client's test classes are its own
        assert set(TEST_LABELS[test].tolist()) == set(LABELS[part].tolist())


def test_per_client_protocol_is_unchanged() -> None:
    """Shots drawn from each client's share after the split (client c with seed + 1 + c), as before the coop
    protocol existed; the default is per-client."""
    for args in SPLITS:
        whole = partition(LABELS, **args, seed=5)
        default = partition(LABELS, **args, num_shots=3, seed=5)
        explicit = partition(LABELS, **args, num_shots=3, shots_protocol="per-client", seed=5)
        for c, share in enumerate(whole.train):
            want = sample_shots(LABELS, share, 3, seed=5 + 1 + c)
            assert np.array_equal(default.train[c], want) and np.array_equal(explicit.train[c], want), args
            assert np.bincount(LABELS[want]).max() <= 3
        assert all(np.array_equal(a, b) for a, b in zip(default.test, whole.test, strict=True))


def test_per_client_shots_follow_the_split_and_coop_shots_do_not() -> None:
    """What tells the two apart: per-client shots change with the number of clients, CoOp's do not."""
    per_client = [np.sort(np.concatenate(partition(LABELS, k, "iid", num_shots=2, seed=0).train)) for k in (2, 3)]
    assert not np.array_equal(*per_client)
    assert len(per_client[1]) > len(coop_shots(LABELS, 2, seed=0))  # up to 2 per class per client, not in all


def test_without_shots_the_protocol_changes_nothing() -> None:
    for args in SPLITS:
        a = partition(LABELS, **args, test_labels=TEST_LABELS, seed=2)
        b = partition(LABELS, **args, shots_protocol="coop", test_labels=TEST_LABELS, seed=2)
        assert all(np.array_equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test, strict=True))


def test_bad_protocol_and_too_many_clients_for_the_shots_are_named() -> None:
    with pytest.raises(ValueError, match=r"shots_protocol must be one of \('per-client', 'coop'\), got 'all'"):
        partition(LABELS, 2, num_shots=2, shots_protocol="all", seed=0)
    with pytest.raises(ValueError, match="num_users=30 exceeds the 24 training samples"):  # 12 classes, 2 shots
        partition(LABELS, 30, num_shots=2, shots_protocol="coop", seed=0)


class _Blank(torch.utils.data.Dataset):
    """Blank (3, 32, 32) images with the given labels."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 32, 32), int(self.labels[i])


def test_a_runs_client_data_follow_the_configs_protocol() -> None:
    """The run's data path (fpl_fast.preparation) passes --shots-protocol to the split."""
    from fpl_fast.data import DatasetBundle
    from fpl_fast.preparation import prepare

    names = [f"class {k}" for k in range(len(SIZES))]
    bundle = DatasetBundle("blank", _Blank(LABELS), _Blank(TEST_LABELS), names)
    for protocol in SHOTS_PROTOCOLS:
        cfg = RunConfig(num_users=3, partition="dirichlet", beta=1.0, num_shots=2, shots_protocol=protocol, seed=4)
        _, _, data = prepare(cfg, dataset=bundle)
        union = np.sort(np.concatenate(data.train_idx))
        want = client_split(
            LABELS, 3, "dirichlet", beta=1.0, seed=4, num_shots=2, shots_protocol=protocol, test_labels=TEST_LABELS
        )
        assert np.array_equal(union, np.sort(np.concatenate(want.train)))
        assert np.array_equal(union, coop_shots(LABELS, 2, seed=4)) == (protocol == "coop")
