"""The Philox4x32-10 + Box-Muller stream (csrc/philox.h): known answers, layout, statistics, kernel agreement."""

from __future__ import annotations

import math

import pytest
import torch
from support import to_device

from fpl_fast import ops
from fpl_fast.ops import reference
from fpl_fast.ops.reference.philox import philox4x32_10

M32 = 0xFFFFFFFF


def philox_py(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 on Python ints, written from the Random123 paper (Salmon et al., SC'11), for cross-checks."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


# Random123's kat_vectors for philox4x32_10: (counter, key, expected output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_python_philox_known_answers(ctr: tuple, key: tuple, want: tuple) -> None:
    assert philox_py(ctr, key) == want


def test_reference_known_answer_counter0_key0() -> None:
    out = philox4x32_10(torch.tensor([0], dtype=torch.int64), 0)
    assert [int(x.item()) for x in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_reference_matches_python_philox_for_64bit_seeds_and_counters(device: torch.device) -> None:
    """Counter words 2, 3 are 0 in the stream; seeds and counters use both 32-bit halves."""
    seeds = [0, 1, 0xDEADBEEF, (0x12345678 << 32) | 0x9ABCDEF0, (1 << 63) - 1]
    counters = [0, 1, 5, M32, 1 << 32, (0x0BADF00D << 32) | 0xFEEDFACE, (1 << 62) + 3]
    ctr = torch.tensor(counters, dtype=torch.int64, device=device)
    for seed in seeds:
        out = [x.cpu().tolist() for x in philox4x32_10(ctr, seed)]
        for j, c in enumerate(counters):
            want = philox_py((c & M32, c >> 32, 0, 0), (seed & M32, (seed >> 32) & M32))
            assert tuple(o[j] for o in out) == want, (seed, c)


def normals_py(seed: int, offset: int, n: int) -> list[float]:
    """The documented stream: counter offset + j // 4, Box-Muller (x0, x1) -> z0, z1 and (x2, x3) -> z2, z3."""
    out: list[float] = []
    q = 0
    while len(out) < n:
        c = offset + q
        x = philox_py((c & M32, c >> 32, 0, 0), (seed & M32, (seed >> 32) & M32))
        for a, b in ((x[0], x[1]), (x[2], x[3])):
            u1 = (a + 1.0) * 2.0**-32
            u2 = b * 2.0**-32
            r = math.sqrt(-2.0 * math.log(u1))
            out += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
        q += 1
    return out[:n]


@pytest.mark.parametrize("seed,offset,n", [(0, 0, 1), (42, 0, 7), ((3 << 40) + 11, (1 << 33) + 5, 13)])
def test_normals_match_documented_stream(seed: int, offset: int, n: int, device: torch.device) -> None:
    z = reference.philox_normal(seed, offset, n, device).cpu()
    assert z.dtype == torch.float32 and z.shape == (n,)
    torch.testing.assert_close(z, torch.tensor(normals_py(seed, offset, n), dtype=torch.float32), rtol=0, atol=1e-6)


def test_offset_shifts_stream_by_four_normals_per_counter(device: torch.device) -> None:
    base = reference.philox_normal(9, 100, 40, device)
    for shift in (1, 3):
        shifted = reference.philox_normal(9, 100 + shift, 40 - 4 * shift, device)
        assert torch.equal(shifted, base[4 * shift :])
    # A prefix of a longer draw is the shorter draw.
    assert torch.equal(reference.philox_normal(9, 100, 6, device), base[:6])
    assert reference.philox_normal(9, 100, 0, device).shape == (0,)


def test_normals_mean_and_std() -> None:
    """n = 2^16 normals. Bound: 6 standard errors (mean: 1/sqrt(n); sample std: ~1/sqrt(2n)); deterministic."""
    n = 1 << 16
    z = reference.philox_normal(2024, 7, n).double()
    assert abs(z.mean().item()) <= 6 / math.sqrt(n)
    assert abs(z.std().item() - 1.0) <= 6 / math.sqrt(2 * n)
    # Tails: P(|z| > 1) = 0.3173; binomial standard error sqrt(p (1 - p) / n).
    p = (z.abs() > 1).double().mean().item()
    assert abs(p - 0.31731) <= 6 * math.sqrt(0.31731 * 0.68269 / n)


def test_reference_stream_is_device_independent(device: torch.device) -> None:
    a = reference.philox_normal(5, 6, 1001, device).cpu()
    b = reference.philox_normal(5, 6, 1001, "cpu")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed,offset", [(0, 0), ((7 << 40) + 3, (5 << 34) + 9)])
def test_kernel_draws_the_reference_stream(seed: int, offset: int, device: torch.device) -> None:
    """dp_lowrank_clip_noise on zero gradients with sigma = C = b = 1 returns the raw normals: client k's are
    normals 0 .. n_ctx d - 1 of its own stream (64-bit seeds and offsets, distinct per client)."""
    K, n_ctx, d = 3, 2, 5
    grad = torch.zeros(K, 1, n_ctx, d)
    seeds = [seed + k * ((1 << 40) + 1) for k in range(K)]
    offsets = [offset + 3 * k for k in range(K)]
    gl, _, _, _ = ops.dp_lowrank_clip_noise(
        *to_device([grad, None, None], device), clip_norm=1.0, noise_multiplier=1.0, seed=seeds, offset=offsets
    )
    want = torch.stack(
        [reference.philox_normal(s, o, n_ctx * d).view(n_ctx, d) for s, o in zip(seeds, offsets, strict=True)]
    )
    torch.testing.assert_close(gl.cpu(), want, rtol=0, atol=2e-6)
