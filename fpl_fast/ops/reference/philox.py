"""The Philox4x32-10 noise stream in int64 tensor arithmetic, so that the reference, the CPU kernels and the CUDA
kernels draw the same numbers.

A stream is addressed by (seed, offset): counter offset + j yields normals 4j .. 4j + 3 by Box-Muller in float64,
rounded to float32 (``csrc/philox.h`` documents the layout and the precision per backend).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["client_normals", "philox4x32_10", "philox_normal"]

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and uint32 values b held in int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    s = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (s >> 32), s & _M32


def philox4x32_10(counter: Tensor, seed: int) -> list[Tensor]:
    """The four uint32 words (held in int64) of the Philox4x32-10 block of each 64-bit ``counter`` under ``seed``."""
    c = [counter & _M32, (counter >> 32) & _M32, torch.zeros_like(counter), torch.zeros_like(counter)]
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + _PHILOX_W[0]) & _M32
            k1 = (k1 + _PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c[0])
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def philox_normal(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Normals 0..numel-1 of the (seed, offset) stream, float32 (see csrc/philox.h)."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    n_ctr = (numel + 3) // 4
    ctr = torch.arange(n_ctr, dtype=torch.int64, device=device) + offset
    x = philox4x32_10(ctr, seed)
    two32 = 2.0**-32
    out = []
    for a, b in ((x[0], x[1]), (x[2], x[3])):
        u1 = (a.double() + 1.0) * two32
        u2 = b.double() * two32
        r = torch.sqrt(-2.0 * torch.log(u1))
        out += [r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)]
    return torch.stack(out, dim=1).reshape(-1)[:numel].float()


def client_normals(seed: Sequence[int], offset: Sequence[int], per_client: int, device) -> Tensor:
    """(K, per_client) float32: row k holds normals 0 .. per_client - 1 of stream (seed[k], offset[k])."""
    if not seed:
        return torch.zeros(0, per_client, device=device)
    return torch.stack([philox_normal(s, o, per_client, device) for s, o in zip(seed, offset, strict=True)])
