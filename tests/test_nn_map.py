"""nn_map: argmin_w ||emb[w] - y||, blockwise, ties to the smaller id, optional allowed mask (spec R2)."""

from __future__ import annotations

import pytest
import torch
from support import make, needs_ext, noncontig, to_device
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops import reference


def brute_force(y: Tensor, emb: Tensor, allowed: Tensor | None = None) -> Tensor:
    """torch.cdist(...).argmin in float64, disallowed ids at +inf."""
    dist = torch.cdist(y.double(), emb.double())  # (B, V)
    if allowed is not None:
        dist[:, ~allowed] = float("inf")
    return dist.argmin(dim=1)


def separated(B: int, V: int, d: int, *, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """Queries within 1% of the typical row spacing of a random row: every nearest id is unique by a wide margin,
    so any summation order (and float32 or bf16 rounding) gives the exact brute-force answer."""
    emb = make(V, d, dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, V, (B,), generator=gen)
    y = emb[target] + 0.01 * make(B, d, dtype=torch.float64, seed=seed + 2)
    return y.to(dtype), emb.to(dtype)


# (B, V, d, chunk): odd sizes, one query, chunk 1, chunk larger than V, chunk not dividing V.
CASES = {
    "odd": (37, 101, 13, 16),
    "single_query": (1, 50, 8, 7),
    "chunk1": (9, 23, 5, 1),
    "chunk_gt_V": (70, 40, 6, 4096),
    "many_rows": (150, 257, 4, 64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_brute_force_float64(case: str, device: torch.device) -> None:
    """Random float64 data (no near-ties at float64 precision): exactly cdist's argmin."""
    B, V, d, chunk = CASES[case]
    y, emb = make(B, d, dtype=torch.float64, seed=1), make(V, d, dtype=torch.float64, seed=2)
    got = ops.nn_map(y.to(device), emb.to(device), chunk=chunk).cpu()
    assert got.dtype == torch.int64 and got.shape == (B,)
    torch.testing.assert_close(got, brute_force(y, emb), rtol=0, atol=0)
    torch.testing.assert_close(got, reference.nn_map(y, emb, None, chunk), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_equals_brute_force_separated(dtype: torch.dtype, device: torch.device) -> None:
    y, emb = separated(200, 333, 24, dtype=dtype, seed=3)
    got = ops.nn_map(y.to(device), emb.to(device), chunk=50).cpu()
    torch.testing.assert_close(got, brute_force(y, emb), rtol=0, atol=0)


def test_allowed_mask(device: torch.device) -> None:
    B, V, d = 40, 64, 7
    y, emb = make(B, d, dtype=torch.float64, seed=4), make(V, d, dtype=torch.float64, seed=5)
    allowed = torch.rand(V, generator=torch.Generator().manual_seed(6)) < 0.3
    allowed[0] = False
    got = ops.nn_map(y.to(device), emb.to(device), allowed.to(device), chunk=9).cpu()
    assert bool(allowed[got].all())
    torch.testing.assert_close(got, brute_force(y, emb, allowed), rtol=0, atol=0)
    torch.testing.assert_close(got, reference.nn_map(y, emb, allowed, 9), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_ties_go_to_smaller_id(chunk: int, device: torch.device) -> None:
    """Integer-valued float64 data make every score exact: duplicated rows tie bitwise."""
    base = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]], dtype=torch.float64)
    emb = torch.cat([base, base, base])  # ids i, i + 4, i + 8 identical
    y = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 3.0], [5.0, 5.0], [2.0, 0.0]], dtype=torch.float64)
    # the last query is equidistant from rows 0 and 1: the smaller id wins as well
    expected = torch.tensor([0, 1, 2, 3, 0])
    got = ops.nn_map(y.to(device), emb.to(device), chunk=chunk).cpu()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    allowed = torch.ones(12, dtype=torch.bool)
    allowed[:5] = False  # the first copy and row 4 are out: ties now go to ids 8, 5, 6, 7 and 5 (< 8)
    got = ops.nn_map(y.to(device), emb.to(device), allowed.to(device), chunk=chunk).cpu()
    torch.testing.assert_close(got, torch.tensor([8, 5, 6, 7, 5]), rtol=0, atol=0)


def test_empty_batch_and_noncontiguous(device: torch.device) -> None:
    emb = make(30, 5, dtype=torch.float64, seed=7)
    empty = ops.nn_map(torch.zeros(0, 5, dtype=torch.float64, device=device), emb.to(device))
    assert empty.shape == (0,) and empty.dtype == torch.int64
    y = make(11, 5, dtype=torch.float64, seed=8)
    got = ops.nn_map(noncontig(y.to(device)), noncontig(emb.to(device)), chunk=4).cpu()
    torch.testing.assert_close(got, brute_force(y, emb), rtol=0, atol=0)


def _bad_inputs() -> list[tuple[str, tuple]]:
    y, emb = make(3, 4), make(6, 4)
    return [
        ("chunk0", (y, emb, None, 0)),
        ("y1d", (y[0], emb, None, 8)),
        ("emb3d", (y, emb[None], None, 8)),
        ("int_y", (y.long(), emb.long(), None, 8)),
        ("dtype", (y, emb.double(), None, 8)),
        ("width", (y, make(6, 5), None, 8)),
        ("allowed_shape", (y, emb, torch.ones(5, dtype=torch.bool), 8)),
        ("allowed_dtype", (y, emb, torch.ones(6), 8)),
        ("none_allowed", (y, emb, torch.zeros(6, dtype=torch.bool), 8)),
        ("empty_vocab", (y, emb[:0], None, 8)),
    ]


# The key phrase the reference's and the kernels' messages start with (the values after "got" are formatted by
# Python or by c10).
_PHRASES = {
    "chunk0": r"chunk must be >= 1 \(vocabulary rows per block\)",
    "y1d": r"y must be 2-D \(B, d\)",
    "emb3d": r"emb must be 2-D \(V, d\)",
    "int_y": "y must be floating point",
    "dtype": "emb must have dtype",
    "width": "emb must have width 4 to match y",
    "allowed_shape": r"allowed must be 1-D \(6,\) like emb's rows",
    "allowed_dtype": "allowed must have dtype",
    "none_allowed": "nn_map needs at least one allowed id",
    "empty_vocab": "nn_map needs at least one allowed id",
}


@pytest.mark.parametrize("name,args", _bad_inputs(), ids=[n for n, _ in _bad_inputs()])
def test_bad_input_raises_like_reference(name: str, args: tuple, device: torch.device) -> None:
    with pytest.raises(ValueError, match="^" + _PHRASES[name]):
        reference.nn_map(*args)
    with pytest.raises(ValueError, match="^" + _PHRASES[name]):
        ops.nn_map(*to_device(list(args[:3]), device), chunk=args[3])


@needs_ext
def test_cpp_op_is_used() -> None:
    assert ops._HAS_NN_MAP, "fpl_fast._C is built but has no nn_map op (stale build?)"


@needs_ext
def test_opcheck(device: torch.device) -> None:
    y, emb = make(9, 6, dtype=torch.float64, seed=9), make(20, 6, dtype=torch.float64, seed=10)
    allowed = torch.ones(20, dtype=torch.bool)
    allowed[3] = False
    for args in ((y, emb, None, 7), (y, emb, allowed, 64)):
        torch.library.opcheck(torch.ops.fpl_fast.nn_map.default, to_device(list(args), device))


@needs_ext
def test_compile_fullgraph() -> None:
    y, emb = make(5, 4, dtype=torch.float64, seed=11), make(12, 4, dtype=torch.float64, seed=12)
    fn = torch.compile(lambda a, b: ops.nn_map(a, b, chunk=5), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(y, emb), brute_force(y, emb), rtol=0, atol=0)
