"""lowrank_prompt (and lowrank_prompt_backward): [prefix | G + U V (+ R) | suffix] for every class."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support import (
    FLOAT_DTYPES,
    TOL,
    assert_bf16_close,
    assert_parity,
    make,
    misaligned,
    needs_ext,
    noncontig,
    to_device,
    transposed,
)
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops import reference

N_CLS, N_CTX, D, S = 5, 3, 7, 4  # odd sizes on purpose

# Per input: an int is its client dimension K; None / "plain" means no K ("res": None means no residual at all).
# "r" is the rank, None for no u, v.
CASES: dict[str, dict[str, Any]] = {
    "promptfl_plain": {"g": None, "uv": None, "r": None, "res": None},
    "fedotp_shared_g": {"g": None, "uv": None, "r": None, "res": 3},
    "fedpgp_per_client": {"g": 2, "uv": 2, "r": 3, "res": None},
    "dpfpl_K1": {"g": 1, "uv": 1, "r": 2, "res": 1},
    "dpfpl_plain_rank1": {"g": None, "uv": None, "r": 1, "res": "plain"},
    "mixed_shared_g_and_uv": {"g": None, "uv": "plain", "r": 2, "res": 4},
    # Wider: the kernels' SIMD main loops and 4-row blocks run, not only their tails.
    "wide_per_client": {"g": 3, "uv": 3, "r": 5, "res": 3, "n_ctx": 6, "d": 53},
    # Widths that are multiples of 16 bytes (the CUDA kernels' vector loads), r > 8, and CLIP's 768.
    "vector_rank10": {"g": 2, "uv": 2, "r": 10, "res": 2, "n_ctx": 12, "d": 64},
    "paper_width_shared_g": {"g": None, "uv": 2, "r": 8, "res": 2, "n_ctx": 4, "d": 768},
}


def dims(case: str) -> tuple[int, int]:
    """(n_ctx, d) of a case."""
    return CASES[case].get("n_ctx", N_CTX), CASES[case].get("d", D)


def _shape(k: Any, *rest: int) -> tuple[int, ...]:
    return tuple(rest) if k in (None, "plain") else (k, *rest)


def make_inputs(case: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Tensor | None]:
    """(prefix, suffix, g, u, v, residual) on the CPU for one CASES entry."""
    c = CASES[case]
    n_ctx, d = dims(case)
    prefix = make(N_CLS, 1, d, dtype=dtype, seed=seed)
    suffix = make(N_CLS, S, d, dtype=dtype, seed=seed + 1)
    g = make(*_shape(c["g"], n_ctx, d), dtype=dtype, seed=seed + 2)
    u = v = res = None
    if c["r"] is not None:
        u = make(*_shape(c["uv"], n_ctx, c["r"]), dtype=dtype, seed=seed + 3)
        v = make(*_shape(c["uv"], c["r"], d), dtype=dtype, seed=seed + 4)
    if c["res"] is not None:
        res = make(*_shape(c["res"], n_ctx, d), dtype=dtype, seed=seed + 5)
    return [prefix, suffix, g, u, v, res]


def _expected_shape(case: str) -> tuple[int, ...]:
    c = CASES[case]
    ks = {k for k in (c["g"], c["uv"] if c["r"] else None, c["res"]) if isinstance(k, int)}
    n_ctx, d = dims(case)
    L = 1 + n_ctx + S
    return (ks.pop(), N_CLS, L, d) if ks else (N_CLS, L, d)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case: str, dtype: torch.dtype, device: torch.device) -> None:
    args = make_inputs(case, dtype)
    out, _ = assert_parity(ops.lowrank_prompt, reference.lowrank_prompt, args, device=device)
    assert out[0].shape == _expected_shape(case)


def test_forward_layout_by_hand(device: torch.device) -> None:
    """Independent of the reference: prefix, G + U V + R, suffix land at the right positions."""
    prefix, suffix, g, u, v, res = make_inputs("fedpgp_per_client", torch.float64)
    res = make(2, N_CTX, D, dtype=torch.float64, seed=9)
    out = ops.lowrank_prompt(*to_device([prefix, suffix, g, u, v, res], device)).cpu()
    for k in range(2):
        ctx = g[k] + u[k] @ v[k] + res[k]
        for c in range(N_CLS):
            torch.testing.assert_close(out[k, c, 0], prefix[c, 0])
            torch.testing.assert_close(out[k, c, 1 : 1 + N_CTX], ctx)
            torch.testing.assert_close(out[k, c, 1 + N_CTX :], suffix[c])


@pytest.mark.parametrize("case", ["fedpgp_per_client", "mixed_shared_g_and_uv", "dpfpl_plain_rank1", "wide_per_client"])
def test_forward_noncontiguous(case: str, device: torch.device) -> None:
    args = make_inputs(case)
    nc = [None if t is None else (transposed(t) if i in (2, 3, 4) else noncontig(t)) for i, t in enumerate(args)]
    assert_parity(ops.lowrank_prompt, reference.lowrank_prompt, nc, device=device)
    # A contiguous call gives the same numbers.
    a = ops.lowrank_prompt(*to_device(nc, device))
    b = ops.lowrank_prompt(*to_device(args, device))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["vector_rank10", "paper_width_shared_g"])
def test_forward_misaligned_pointers(case: str, dtype: torch.dtype, device: torch.device) -> None:
    """Inputs one element off alignment give what aligned inputs give (the vector path's fallback)."""
    args = to_device(make_inputs(case, dtype), device)
    shifted = [None if t is None else misaligned(t) for t in args]
    torch.testing.assert_close(ops.lowrank_prompt(*shifted), ops.lowrank_prompt(*args), **TOL.get(dtype, {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["fedpgp_per_client", "dpfpl_plain_rank1", "fedotp_shared_g", "wide_per_client"])
def test_forward_low_precision(case: str, dtype: torch.dtype, device: torch.device) -> None:
    args = make_inputs(case, dtype)
    assert_bf16_close(ops.lowrank_prompt, reference.lowrank_prompt, args, device=device)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
def _grads(fn: Any, args: list[Tensor | None], w: Tensor) -> list[Tensor | None]:
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in args]
    out = fn(*leaves)
    (out * w).sum().backward()
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_reference_autograd(case: str, device: torch.device) -> None:
    """Gradients of prefix, suffix, g, u, v, residual (shared inputs sum over K) vs the reference's autograd."""
    args = make_inputs(case, torch.float64)
    w = make(*_expected_shape(case), dtype=torch.float64, seed=42)
    got = _grads(ops.lowrank_prompt, to_device(args, device), w.to(device))
    want = _grads(reference.lowrank_prompt, args, w)
    names = ["prefix", "suffix", "g", "u", "v", "residual"]
    for name, a, b in zip(names, got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, f"grad of {name}: {tuple(a.shape)} != {tuple(b.shape)}"
            torch.testing.assert_close(a.cpu(), b, **TOL[torch.float64], msg=lambda m, n=name: f"grad {n}: {m}")


def test_backward_shared_vs_per_client_g(device: torch.device) -> None:
    """A shared G receives the sum over clients of what per-client copies of G receive."""
    prefix, suffix, _, u, v, res = make_inputs("fedpgp_per_client", torch.float64)
    g = make(N_CTX, D, dtype=torch.float64, seed=7)
    w = make(2, N_CLS, 1 + N_CTX + S, D, dtype=torch.float64, seed=8)
    shared = _grads(ops.lowrank_prompt, to_device([prefix, suffix, g, u, v, res], device), w.to(device))[2]
    per_client = _grads(
        ops.lowrank_prompt, to_device([prefix, suffix, g.expand(2, N_CTX, D), u, v, res], device), w.to(device)
    )[2]
    assert shared.shape == (N_CTX, D) and per_client.shape == (2, N_CTX, D)
    torch.testing.assert_close(shared, per_client.sum(0))
    # By hand: dL/dG_k = sum over classes of w at the context positions.
    torch.testing.assert_close(per_client.cpu(), w[:, :, 1 : 1 + N_CTX].sum(1))


@pytest.mark.parametrize("case", ["fedpgp_per_client", "mixed_shared_g_and_uv", "dpfpl_plain_rank1"])
def test_gradcheck(case: str, device: torch.device) -> None:
    c = CASES[case]
    # Tiny shapes: 2 classes, 2 context tokens, width 3, suffix 2.
    gen = torch.Generator().manual_seed(3)
    k = {key: c[key] if not isinstance(c[key], int) else 2 for key in ("g", "uv", "res")}

    def t(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)

    r = c["r"]
    args = [
        t(2, 1, 3),
        t(2, 2, 3),
        t(*_shape(k["g"], 2, 3)),
        None if r is None else t(*_shape(k["uv"], 2, r)),
        None if r is None else t(*_shape(k["uv"], r, 3)),
        None if c["res"] is None else t(*_shape(k["res"], 2, 3)),
    ]
    assert torch.autograd.gradcheck(ops.lowrank_prompt, tuple(args), eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# lowrank_prompt_backward (the op the autograd formula calls)
# ----------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["fedpgp_per_client", "mixed_shared_g_and_uv", "promptfl_plain", "wide_per_client"])
def test_backward_op_matches_reference(case: str, dtype: torch.dtype, device: torch.device) -> None:
    _, _, _, u, v, _ = make_inputs(case, dtype)
    grad_out = make(*_expected_shape(case), dtype=dtype, seed=11)
    assert_parity(
        torch.ops.fpl_fast.lowrank_prompt_backward,
        reference.lowrank_prompt_backward,
        [grad_out, u, v, dims(case)[0]],
        device=device,
    )


@needs_ext
def test_backward_op_noncontiguous_and_bf16(device: torch.device) -> None:
    _, _, _, u, v, _ = make_inputs("fedpgp_per_client")
    grad_out = make(2, N_CLS, 1 + N_CTX + S, D, seed=12)
    assert_parity(
        torch.ops.fpl_fast.lowrank_prompt_backward,
        reference.lowrank_prompt_backward,
        [noncontig(grad_out), transposed(u), transposed(v), N_CTX],
        device=device,
    )
    bf = [grad_out.bfloat16(), u.bfloat16(), v.bfloat16(), N_CTX]
    assert_bf16_close(torch.ops.fpl_fast.lowrank_prompt_backward, reference.lowrank_prompt_backward, bf, device=device)


@pytest.mark.parametrize("case", ["fedpgp_per_client", "mixed_shared_g_and_uv", "promptfl_plain"])
def test_double_backward(case: str, device: torch.device) -> None:
    """Second-order gradients through the op (create_graph=True) pass torch's finite-difference check."""
    args = [None if t is None else t.requires_grad_(True) for t in to_device(make_inputs(case, torch.float64), device)]
    idx = [i for i, t in enumerate(args) if t is not None]

    def fn(*xs: Tensor) -> Tensor:
        full = list(args)
        for i, x in zip(idx, xs, strict=True):
            full[i] = x
        return ops.lowrank_prompt(*full)

    assert torch.autograd.gradgradcheck(fn, tuple(args[i] for i in idx))


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("case", ["fedpgp_per_client", "mixed_shared_g_and_uv", "fedotp_shared_g"])
def test_opcheck(case: str, device: torch.device) -> None:
    args = to_device(make_inputs(case), device)
    leaves = [None if t is None else t.requires_grad_(True) for t in args]
    torch.library.opcheck(torch.ops.fpl_fast.lowrank_prompt.default, tuple(leaves))
    plain = [None if t is None else t.detach() for t in args]
    torch.library.opcheck(torch.ops.fpl_fast.lowrank_prompt.default, tuple(plain))
    grad_out = to_device(make(*_expected_shape(case), seed=5), device)
    torch.library.opcheck(
        torch.ops.fpl_fast.lowrank_prompt_backward.default, (grad_out, args[3], args[4], dims(case)[0])
    )


@needs_ext
def test_compile_fullgraph(device: torch.device) -> None:
    args = to_device(make_inputs("mixed_shared_g_and_uv"), device)
    w = to_device(make(*_expected_shape("mixed_shared_g_and_uv"), seed=6), device)

    def loss(prefix: Tensor, suffix: Tensor, g: Tensor, u: Tensor, v: Tensor, res: Tensor) -> Tensor:
        return (ops.lowrank_prompt(prefix, suffix, g, u, v, res) * w).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves_c = [t.clone().requires_grad_(True) for t in args]
    leaves_e = [t.clone().requires_grad_(True) for t in args]
    out_c = compiled(*leaves_c)
    out_e = loss(*leaves_e)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    for a, b in zip(leaves_c, leaves_e, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------------------------
# Bad inputs: both the reference and the op raise ValueError naming the argument
# ----------------------------------------------------------------------------------------------
def _bad_cases() -> dict[str, tuple[Any, str]]:
    p, s, g, u, v, _ = make_inputs("fedpgp_per_client")
    return {
        "prefix_2d": ((p[:, 0], s, g, u, v, None), "prefix"),
        "prefix_two_tokens": ((torch.cat([p, p], 1), s, g, u, v, None), "prefix"),
        "suffix_wrong_ncls": ((p, s[:-1], g, u, v, None), "suffix"),
        "g_1d": ((p, s, g[0, 0], u, v, None), r"\bg\b"),
        "g_wrong_width": ((p, s, g[..., :-1], u, v, None), r"\bg\b"),
        "u_without_v": ((p, s, g, u, None, None), r"\bu\b"),
        "u_wrong_rows": ((p, s, g, u[:, :-1], v, None), r"\bu\b"),
        "v_wrong_rank": ((p, s, g, u, v[:, :-1], None), r"\bv\b"),
        "residual_wrong_shape": ((p, s, g, u, v, g[..., :-1]), "residual"),
        "client_dims_disagree": ((p, s, g, u[:1], v[:1], None), r"\bK\b|client"),
        "g_dtype_mismatch": ((p, s, g.double(), u, v, None), r"\bg\b.*dtype|dtype.*\bg\b"),
        "v_dtype_mismatch": ((p, s, g, u, v.double(), None), r"\bv\b.*dtype|dtype.*\bv\b"),
    }


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("bad", list(_bad_cases()))
def test_bad_inputs_raise_value_error(bad: str, impl: str, device: torch.device) -> None:
    args, pattern = _bad_cases()[bad]
    fn = reference.lowrank_prompt if impl == "reference" else ops.lowrank_prompt
    with pytest.raises(ValueError, match=pattern):
        fn(*to_device(list(args), device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to put inputs on two devices")
@pytest.mark.parametrize("impl", ["reference", "ops"])
def test_wrong_device_raises(impl: str) -> None:
    p, s, g, u, v, _ = to_device(make_inputs("fedpgp_per_client"), "cuda")
    fn = reference.lowrank_prompt if impl == "reference" else ops.lowrank_prompt
    with pytest.raises(ValueError, match=r"\bu\b"):
        fn(p, s, g, u.cpu(), v, None)


@pytest.mark.parametrize("impl", ["reference", "ops_backward"])
def test_backward_bad_n_ctx(impl: str) -> None:
    if impl == "ops_backward" and not ops.has_cpp_ops():
        pytest.skip("fpl_fast._C is not built")
    fn = reference.lowrank_prompt_backward if impl == "reference" else torch.ops.fpl_fast.lowrank_prompt_backward
    grad_out = make(N_CLS, 1 + N_CTX + S, D)
    with pytest.raises(ValueError, match="n_ctx"):
        fn(grad_out, None, None, 1 + N_CTX + S)
    with pytest.raises(ValueError, match="grad_out"):
        fn(grad_out[0], None, None, N_CTX)
