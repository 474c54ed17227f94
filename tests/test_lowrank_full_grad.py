"""lowrank_full_grad: g_L = scale (g_U V + U g_V + U U^T g_U V)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from support import (
    FLOAT_DTYPES,
    TOL,
    assert_bf16_close,
    assert_parity,
    make,
    needs_ext,
    noncontig,
    to_device,
    transposed,
)
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops import reference

N_CTX, D = 5, 9  # odd sizes

# K: client dim (None: none); r: rank; scale.
CASES: dict[str, dict[str, Any]] = {
    "K3_r2": {"K": 3, "r": 2, "scale": 0.1},
    "plain_r3": {"K": None, "r": 3, "scale": -2.5},
    "K1_rank1": {"K": 1, "r": 1, "scale": 0.1},
    "full_rank_scale0": {"K": 2, "r": N_CTX, "scale": 0.0},
    "paper_shape": {"K": 2, "r": 8, "scale": 0.1, "n_ctx": 16, "d": 512},
}


def dims(case: str) -> tuple[int, int]:
    """(n_ctx, d) of a case."""
    return CASES[case].get("n_ctx", N_CTX), CASES[case].get("d", D)


def make_inputs(case: str, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """(grad_u, grad_v, u, v) on the CPU."""
    c = CASES[case]
    lead = () if c["K"] is None else (c["K"],)
    r = c["r"]
    n_ctx, d = dims(case)
    return [
        make(*lead, n_ctx, r, dtype=dtype, seed=1),
        make(*lead, r, d, dtype=dtype, seed=2),
        make(*lead, n_ctx, r, dtype=dtype, seed=3),
        make(*lead, r, d, dtype=dtype, seed=4),
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str, dtype: torch.dtype, device: torch.device) -> None:
    args = make_inputs(case, dtype)
    scale = CASES[case]["scale"]
    assert_parity(ops.lowrank_full_grad, reference.lowrank_full_grad, [*args, scale], device=device)


@pytest.mark.parametrize("case", ["K3_r2", "plain_r3", "paper_shape"])
def test_formula_by_hand(case: str, device: torch.device) -> None:
    """Per client, in float64: scale (gU V + U gV + U U^T gU V) with explicit matrix products."""
    gu, gv, u, v = make_inputs(case, torch.float64)
    scale = CASES[case]["scale"]
    out = ops.lowrank_full_grad(*to_device([gu, gv, u, v], device), scale).cpu()
    batched = CASES[case]["K"] is not None
    gu, gv, u, v = (t if batched else t.unsqueeze(0) for t in (gu, gv, u, v))
    want = torch.stack([scale * (gu[k] @ v[k] + u[k] @ gv[k] + u[k] @ u[k].T @ gu[k] @ v[k]) for k in range(len(u))])
    torch.testing.assert_close(out, want if batched else want[0], **TOL[torch.float64])


def test_noncontiguous(device: torch.device) -> None:
    gu, gv, u, v = make_inputs("K3_r2")
    nc = [noncontig(gu), transposed(gv), transposed(u), noncontig(v)]
    assert_parity(ops.lowrank_full_grad, reference.lowrank_full_grad, [*nc, 0.1], device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["K3_r2", "plain_r3", "paper_shape"])
def test_low_precision(case: str, dtype: torch.dtype, device: torch.device) -> None:
    args = make_inputs(case, dtype)
    assert_bf16_close(ops.lowrank_full_grad, reference.lowrank_full_grad, [*args, CASES[case]["scale"]], device=device)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["K3_r2", "plain_r3", "K1_rank1"])
def test_backward_matches_reference_autograd(case: str, device: torch.device) -> None:
    args = make_inputs(case, torch.float64)
    scale = CASES[case]["scale"]
    w = make(*args[0].shape[:-2], *dims(case), dtype=torch.float64, seed=9)

    def grads(fn: Any, xs: list[Tensor], w: Tensor) -> list[Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in xs]
        (fn(*leaves, scale) * w).sum().backward()
        return [t.grad for t in leaves]

    got = grads(ops.lowrank_full_grad, to_device(args, device), w.to(device))
    want = grads(reference.lowrank_full_grad, args, w)
    for name, a, b in zip(["grad_u", "grad_v", "u", "v"], got, want, strict=True):
        torch.testing.assert_close(a.cpu(), b, **TOL[torch.float64], msg=lambda m, n=name: f"d/d{n}: {m}")


@pytest.mark.parametrize("case", ["K3_r2", "plain_r3"])
def test_gradcheck(case: str, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(5)
    lead = () if CASES[case]["K"] is None else (2,)
    r = CASES[case]["r"]
    shapes = [(*lead, 3, r), (*lead, r, 4), (*lead, 3, r), (*lead, r, 4)]
    xs = tuple(torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_(True) for s in shapes)
    assert torch.autograd.gradcheck(lambda *t: ops.lowrank_full_grad(*t, 0.7), xs, eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("case", ["K3_r2", "plain_r3"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(case: str, requires_grad: bool, device: torch.device) -> None:
    args = [t.requires_grad_(requires_grad) for t in to_device(make_inputs(case), device)]
    torch.library.opcheck(torch.ops.fpl_fast.lowrank_full_grad.default, (*args, CASES[case]["scale"]))


@needs_ext
def test_compile_fullgraph(device: torch.device) -> None:
    """The fused SGD-style update: L <- L - lr * g_L, compiled with the custom op inside."""
    gu, gv, u, v = to_device(make_inputs("K3_r2"), device)
    lmat = to_device(make(3, N_CTX, D, seed=8), device)

    def sgd(lmat: Tensor, gu: Tensor, gv: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return lmat - 0.01 * ops.lowrank_full_grad(gu, gv, u, v, 0.1)

    compiled = torch.compile(sgd, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(lmat, gu, gv, u, v), sgd(lmat, gu, gv, u, v))


@needs_ext
def test_compile_inductor_with_backward() -> None:
    """The one inductor test of the suite (CPU): forward and the registered backward through Inductor."""
    args = [t.requires_grad_(True) for t in make_inputs("K3_r2")]

    def loss(gu: Tensor, gv: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return ops.lowrank_full_grad(gu, gv, u, v, 0.1).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(loss(*args), args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
def _bad_cases() -> dict[str, tuple[list[Any], str]]:
    gu, gv, u, v = make_inputs("K3_r2")
    return {
        "scale_nan": ([gu, gv, u, v, math.nan], "scale"),
        "scale_inf": ([gu, gv, u, v, math.inf], "scale"),
        "u_1d": ([gu[0, 0], gv, u[0, 0], v, 0.1], r"\bu\b"),
        "u_4d": ([gu, gv, u.unsqueeze(0), v, 0.1], r"\bu\b"),
        "grad_u_wrong_shape": ([gu[:, :-1], gv, u, v, 0.1], "grad_u"),
        "grad_u_unbatched": ([gu[0], gv, u, v, 0.1], "grad_u"),
        "v_wrong_rank": ([gu, gv, u, v[:, :1], 0.1], r"\bv\b"),
        "v_wrong_K": ([gu, gv, u, v[:2], 0.1], r"\bv\b"),
        "grad_v_wrong_shape": ([gu, gv[..., :-1], u, v, 0.1], "grad_v"),
        "grad_v_dtype": ([gu, gv.double(), u, v, 0.1], "grad_v"),
        "v_dtype": ([gu, gv, u, v.double(), 0.1], r"\bv\b"),
    }


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("bad", list(_bad_cases()))
def test_bad_inputs_raise_value_error(bad: str, impl: str, device: torch.device) -> None:
    args, pattern = _bad_cases()[bad]
    fn = reference.lowrank_full_grad if impl == "reference" else ops.lowrank_full_grad
    with pytest.raises(ValueError, match=pattern):
        fn(*to_device(args, device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to put inputs on two devices")
@pytest.mark.parametrize("impl", ["reference", "ops"])
def test_wrong_device_raises(impl: str) -> None:
    gu, gv, u, v = to_device(make_inputs("K3_r2"), "cuda")
    fn = reference.lowrank_full_grad if impl == "reference" else ops.lowrank_full_grad
    with pytest.raises(ValueError, match="grad_v"):
        fn(gu, gv.cpu(), u, v, 0.1)
