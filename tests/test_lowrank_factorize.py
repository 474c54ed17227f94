"""lowrank_factorize: one randomised power iteration with Gram-Schmidt, L = U V + R."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support import (
    FLOAT_DTYPES,
    TOL,
    assert_bf16_close,
    assert_parity,
    client_streams,
    make,
    needs_ext,
    noncontig,
    to_device,
    transposed,
)
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops import reference

N_CTX, D = 6, 11  # odd sizes
SEED, OFFSET = 7, 3  # client k's stream: client_streams(K, SEED, OFFSET)[.][k]

# K: client dim (None: none); r: rank.
CASES: dict[str, dict[str, Any]] = {
    "K3_r2": {"K": 3, "r": 2},
    "plain_r4": {"K": None, "r": 4},
    "K1_rank1": {"K": 1, "r": 1},
    "full_rank": {"K": 2, "r": N_CTX},
    "paper_shape": {"K": 2, "r": 8, "n_ctx": 16, "d": 512},
}


def dims(case: str) -> tuple[int, int]:
    """(n_ctx, d) of a case."""
    return CASES[case].get("n_ctx", N_CTX), CASES[case].get("d", D)


def streams(case: str) -> list[list[int]]:
    """[seeds, offsets]: distinct per-client streams of a case."""
    return list(client_streams(CASES[case]["K"], SEED, OFFSET))


def make_l(case: str, dtype: torch.dtype = torch.float32) -> Tensor:
    c = CASES[case]
    lead = () if c["K"] is None else (c["K"],)
    return make(*lead, *dims(case), dtype=dtype, seed=1)


def _orthonormal_checks(u: Tensor, v: Tensor, res: Tensor, lmat: Tensor, tol: dict[str, float]) -> None:
    r = u.shape[-1]
    eye = torch.eye(r, dtype=u.dtype).expand(*u.shape[:-2], r, r)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, eye, **tol, msg=lambda m: f"U^T U != I: {m}")
    torch.testing.assert_close(v @ v.transpose(-1, -2), eye, **tol, msg=lambda m: f"V V^T != I: {m}")
    torch.testing.assert_close(u @ v + res, lmat, **tol, msg=lambda m: f"U V + R != L: {m}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str, dtype: torch.dtype, device: torch.device) -> None:
    lmat = make_l(case, dtype)
    # Gram-Schmidt amplifies rounding by the conditioning of L V0: float32 gets a looser tolerance.
    tol = TOL[dtype] if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    (u, v, res), _ = assert_parity(
        ops.lowrank_factorize,
        reference.lowrank_factorize,
        [lmat, CASES[case]["r"], *streams(case)],
        device=device,
        tol=tol,
    )
    c = CASES[case]
    lead = () if c["K"] is None else (c["K"],)
    n_ctx, d = dims(case)
    assert u.shape == (*lead, n_ctx, c["r"]) and v.shape == (*lead, c["r"], d) and res.shape == lmat.shape
    _orthonormal_checks(u, v, res, lmat, tol)


@pytest.mark.parametrize("case", list(CASES))
def test_factor_properties_float64(case: str, device: torch.device) -> None:
    """U has orthonormal columns, V orthonormal rows, U V + R == L (tight, in float64)."""
    lmat = make_l(case, torch.float64)
    u, v, res = (t.cpu() for t in ops.lowrank_factorize(lmat.to(device), CASES[case]["r"], *streams(case)))
    _orthonormal_checks(u, v, res, lmat, TOL[torch.float64])
    if CASES[case]["r"] == N_CTX:  # U is square orthogonal: U U^T = I
        eye = torch.eye(N_CTX, dtype=torch.float64).expand_as(u)
        torch.testing.assert_close(u @ u.transpose(-1, -2), eye, **TOL[torch.float64])


def test_matches_qr_by_hand(device: torch.device) -> None:
    """Independent of the reference: Gram-Schmidt is QR with a positive diagonal of R; client k's V0 is normals
    0 .. d r - 1 of its own stream (seed[k], offset[k]), row-major."""
    K, r = 2, 3
    lmat = make(K, N_CTX, D, dtype=torch.float64, seed=2)
    seeds, offsets = client_streams(K, SEED, OFFSET)
    u, v, _ = (t.cpu() for t in ops.lowrank_factorize(lmat.to(device), r, seeds, offsets))
    v0 = torch.stack([reference.philox_normal(s, o, D * r) for s, o in zip(seeds, offsets, strict=True)])
    v0 = v0.double().view(K, D, r)

    def orth(m: Tensor) -> Tensor:
        q, rr = torch.linalg.qr(m)
        return q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-2)

    u_want = orth(lmat @ v0)
    v_want = orth(lmat.transpose(-1, -2) @ u_want).transpose(-1, -2)
    torch.testing.assert_close(u, u_want, **TOL[torch.float64])
    torch.testing.assert_close(v, v_want, **TOL[torch.float64])


def test_rank_r_matrix_subspaces_are_recovered_exactly(device: torch.device) -> None:
    """For a rank-r L, U spans its column space and V its row space exactly: U U^T L = L = L V^T V.

    Note: R = L - U V itself is NOT ~0 under the contract (DESIGN section 1, reference.py): V = orth(L^T U)^T
    has orthonormal rows, so U V has all singular values 1 and only equals L when L's are (checked below).
    """
    K, r = 3, 2
    lmat = make(K, N_CTX, r, dtype=torch.float64, seed=3) @ make(K, r, D, dtype=torch.float64, seed=4)
    seeds, offsets = client_streams(K, SEED, OFFSET)
    u, v, res = (t.cpu() for t in ops.lowrank_factorize(lmat.to(device), r, seeds, offsets))
    ut, vt = u.transpose(-1, -2), v.transpose(-1, -2)
    torch.testing.assert_close(u @ (ut @ lmat), lmat, **TOL[torch.float64])
    torch.testing.assert_close((lmat @ vt) @ v, lmat, **TOL[torch.float64])
    # A rank-r L with unit singular values (a product of orthonormal factors) is reproduced: R ~ 0.
    q1 = torch.linalg.qr(make(K, N_CTX, r, dtype=torch.float64, seed=5))[0]
    q2 = torch.linalg.qr(make(K, D, r, dtype=torch.float64, seed=6))[0]
    unit = q1 @ q2.transpose(-1, -2)
    _, _, res = (t.cpu() for t in ops.lowrank_factorize(unit.to(device), r, seeds, offsets))
    torch.testing.assert_close(res, torch.zeros_like(res), rtol=0, atol=1e-10)


def test_seed_and_offset(device: torch.device) -> None:
    """Same streams: bitwise equal. Another seed or offset of one client changes that client's factors only."""
    lmat = make(2, N_CTX, D, seed=5).to(device)
    r = 4
    seeds, offsets = client_streams(2, SEED, OFFSET)
    a = ops.lowrank_factorize(lmat, r, seeds, offsets)
    b = ops.lowrank_factorize(lmat, r, seeds, offsets)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    for other in ([seeds[0] + 1, seeds[1]], offsets), (seeds, [offsets[0] + 1, offsets[1]]):
        c = ops.lowrank_factorize(lmat, r, *other)
        assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[1][0], c[1][0])
        for x, y in zip(a, c, strict=True):
            assert torch.equal(x[1], y[1]), "client 1's factors must not depend on client 0's stream"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_client_alone_equals_client_in_a_launch(impl: str, dtype: torch.dtype, device: torch.device) -> None:
    """A client's factors are bitwise the same whether it runs alone (K = 1, and without K) with its own
    (seed, offset) or as one of K = 3 clients with distinct streams."""
    fn = ops.lowrank_factorize if impl == "ops" else reference.lowrank_factorize
    lmat = make(3, N_CTX, D, dtype=dtype, seed=8).to(device)
    r = 3
    seeds, offsets = client_streams(3, SEED, OFFSET)
    together = fn(lmat, r, seeds, offsets)
    for k in range(3):
        alone = fn(lmat[k : k + 1], r, [seeds[k]], [offsets[k]])
        plain = fn(lmat[k], r, [seeds[k]], [offsets[k]])
        for i, (t, a, p) in enumerate(zip(together, alone, plain, strict=True)):
            assert torch.equal(a[0], t[k]), f"output {i} of client {k}: K = 1 launch differs from K = 3"
            assert torch.equal(p, t[k]), f"output {i} of client {k}: launch without K differs from K = 3"


def test_zero_matrix_gives_no_nan(device: torch.device) -> None:
    """An all-zero L hits the Gram-Schmidt guard: U = V = R = 0, nothing NaN."""
    u, v, res = (
        t.cpu() for t in ops.lowrank_factorize(torch.zeros(2, N_CTX, D, device=device), 2, [SEED] * 2, [OFFSET] * 2)
    )
    for t in (u, v, res):
        assert torch.isfinite(t).all() and torch.count_nonzero(t) == 0


def test_noncontiguous(device: torch.device) -> None:
    lmat = make_l("K3_r2")
    tol = {"rtol": 1e-4, "atol": 1e-4}
    for view in (noncontig(lmat), transposed(lmat)):
        assert_parity(
            ops.lowrank_factorize, reference.lowrank_factorize, [view, 2, *streams("K3_r2")], device=device, tol=tol
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["K3_r2", "K1_rank1", "paper_shape"])
def test_low_precision(case: str, dtype: torch.dtype, device: torch.device) -> None:
    lmat = make_l(case, dtype)
    assert_bf16_close(
        ops.lowrank_factorize, reference.lowrank_factorize, [lmat, CASES[case]["r"], *streams(case)], device=device
    )


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("case", ["K3_r2", "plain_r4"])
def test_opcheck(case: str, device: torch.device) -> None:
    lmat = make_l(case).to(device)
    torch.library.opcheck(torch.ops.fpl_fast.lowrank_factorize.default, (lmat, CASES[case]["r"], *streams(case)))


@needs_ext
def test_compile_fullgraph(device: torch.device) -> None:
    lmat = make_l("K3_r2").to(device)

    def step(lmat: Tensor, offset: int) -> Tensor:
        u, v, res = ops.lowrank_factorize(lmat, 2, [SEED, SEED + 1, SEED], [offset, offset, offset + 1])
        return u @ v + res

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(lmat, OFFSET), step(lmat, OFFSET))


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
# Bad per-client stream lists for K = 3 clients: (value, message pattern after "seed " / "offset ").
_BAD_STREAMS: dict[str, tuple[Any, str]] = {
    "too_short": ([1, 2], r"must be a list of 3 integers \(one stream per client\), got \[1, 2\]"),
    "too_long": ([0] * 4, r"must be a list of 3 integers \(one stream per client\), got \[0, 0, 0, 0\]"),
    "an_int": (0, r"must be a list of 3 integers \(one stream per client\), got 0"),
    "negative": ([0, -1, 0], r"entries must be integers in \[0, 2\^63\), got -1"),
    "too_big": ([0, 0, 2**64], r"entries must be integers in \[0, 2\^63\), got 18446744073709551616"),
    "float": ([0.5, 0, 0], r"entries must be integers in \[0, 2\^63\), got 0.5"),
    "bool": ([0, False, 0], r"entries must be integers in \[0, 2\^63\), got False"),
}


def _bad_cases() -> dict[str, tuple[list[Any], str]]:
    lmat = make_l("K3_r2")
    ok = [[0] * 3, [0] * 3]
    return {
        "l_1d": ([lmat[0, 0], 1, [0], [0]], r"\bl\b"),
        "l_4d": ([lmat.unsqueeze(0), 1, *ok], r"\bl\b"),
        "l_int": ([lmat.long(), 1, *ok], r"\bl\b"),
        "rank_0": ([lmat, 0, *ok], "rank"),
        "rank_negative": ([lmat, -1, *ok], "rank"),
        "rank_too_big": ([lmat, N_CTX + 1, *ok], "rank"),
        **{
            f"{key}_{name}": ([lmat, 2, *(value if i == j else ok[j] for j in range(2))], f"^{key} {pattern}")
            for i, key in enumerate(("seed", "offset"))
            for name, (value, pattern) in _BAD_STREAMS.items()
        },
    }


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("bad", list(_bad_cases()))
def test_bad_inputs_raise_value_error(bad: str, impl: str, device: torch.device) -> None:
    args, pattern = _bad_cases()[bad]
    fn = reference.lowrank_factorize if impl == "reference" else ops.lowrank_factorize
    with pytest.raises(ValueError, match=pattern):
        fn(*to_device(args, device))


@needs_ext
@pytest.mark.parametrize("key", ["seed", "offset"])
@pytest.mark.parametrize("bad", ["too_short", "too_long", "negative"])
def test_bad_streams_on_the_cpp_op_match_the_reference(bad: str, key: str, device: torch.device) -> None:
    """The C++ checks themselves (torch.ops, no Python wrapper) raise a ValueError for the reference's check: both
    messages start with the same key phrase (the values after "got" are formatted by Python or by c10)."""
    lmat = make_l("K3_r2").to(device)
    lists = {"seed": [0] * 3, "offset": [0] * 3, key: _BAD_STREAMS[bad][0]}
    phrase = f"^{key} " + _BAD_STREAMS[bad][1].split(", got")[0]
    with pytest.raises(ValueError, match=phrase):
        reference.lowrank_factorize(lmat, 2, lists["seed"], lists["offset"])
    with pytest.raises(ValueError, match=phrase):
        torch.ops.fpl_fast.lowrank_factorize(lmat, 2, lists["seed"], lists["offset"])
