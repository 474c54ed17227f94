"""Generic op tests, parametrised over the op table (op_table.OPS) and the devices (conftest's ``device``).

Kernel vs reference on every case and dtype, views, low precision, bad inputs, opcheck, torch.compile,
gradients, launch-size independence and the noise streams; what one op alone promises is in
test_ops_specific.py. Test ids read ``<test>[<device>-<op>-<case>-<dtype>]``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from op_table import BY_NAME, EXACT, HOOKS, OpInfo, Sample, params, registered_ops, run, with_views
from support import TOL, assert_bf16_close, assert_parity, make, misaligned, needs_ext, to_device
from torch import Tensor

from fpl_fast import ops

ANY_ERROR = (RuntimeError, ValueError)  # the registered op's own checks: an error, whatever its wording


def _face(info: OpInfo, device: torch.device | str) -> Any:
    """The Python face with its keyword tensors (a clip-norm vector) moved to ``device`` as well."""
    return lambda *a, **k: info.op(*a, **to_device(k, device))


# ----------------------------------------------------------------------------------------------
# The table covers the schema
# ----------------------------------------------------------------------------------------------
@needs_ext
def test_every_registered_op_has_a_table_entry() -> None:
    registered = registered_ops()
    missing = registered - set(BY_NAME) - set(HOOKS)
    assert not missing, f"torch.ops.fpl_fast ops without an op_table.OPS entry: {sorted(missing)}"
    stale = set(BY_NAME) - registered
    assert not stale, f"op_table entries the extension does not register (stale build?): {sorted(stale)}"


# ----------------------------------------------------------------------------------------------
# Kernel vs reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("info,case,dtype", params("parity"))
def test_parity(info: OpInfo, case: str, dtype: torch.dtype, device: torch.device) -> None:
    s = info.sample(case, dtype)
    out, _ = assert_parity(_face(info, device), info.ref, s.args, s.kwargs, device=device, tol=info.tol(dtype))
    if info.check is not None:
        info.check(case, dtype, s, out)


@pytest.mark.parametrize("info,case,variant", params("noncontig"))
def test_noncontiguous(info: OpInfo, case: str, variant: int, device: torch.device) -> None:
    s = info.sample(case, torch.float32 if torch.float32 in info.dtypes else info.dtypes[0])
    views = with_views(s.args, info.noncontig_views[variant])
    dtype = s.args[0].dtype
    assert_parity(_face(info, device), info.ref, views, s.kwargs, device=device, tol=info.tol(dtype))
    if info.noncontig_bitwise:  # a contiguous call gives the same numbers
        a = run(info.op, Sample(views, s.kwargs), device)
        b = run(info.op, s, device)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, **EXACT)


@pytest.mark.parametrize("info,case,dtype", params("misaligned"))
def test_misaligned_pointers(info: OpInfo, case: str, dtype: torch.dtype, device: torch.device) -> None:
    """Inputs one element off alignment give what aligned inputs give (the vector path's fallback)."""
    s = info.sample(case, dtype)
    args = to_device(list(s.args), device)
    shifted = [a if not isinstance(a, Tensor) else misaligned(a) for a in args]
    aligned = run(info.op, Sample(tuple(args), s.kwargs), device)
    got = run(info.op, Sample(tuple(shifted), s.kwargs), device)
    for a, b in zip(aligned, got, strict=True):
        torch.testing.assert_close(b, a, **TOL.get(dtype, {}))


@pytest.mark.parametrize("info,case,dtype", params("low_precision"))
def test_low_precision(info: OpInfo, case: str, dtype: torch.dtype, device: torch.device) -> None:
    s = info.sample(case, dtype)
    assert_bf16_close(_face(info, device), info.ref, s.args, s.kwargs, device=device)


# ----------------------------------------------------------------------------------------------
# Bad inputs: the Python face and the reference raise a ValueError naming the argument; the registered op
# (no Python layer) raises an error of its own
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("info,bad", params("bad"))
def test_bad_inputs(info: OpInfo, bad: str, impl: str, device: torch.device) -> None:
    b = info.bad_inputs()[bad]
    args, kw = to_device(list(b.args), device), to_device(b.kwargs, device)
    if impl == "reference":
        with pytest.raises(ValueError, match=b.match):
            info.ref(*args, **kw)
    elif info.has_face:
        with pytest.raises(ValueError, match=b.match):
            info.op(*args, **kw)
    else:
        if not ops.has_cpp_ops():
            pytest.skip("fpl_fast._C is not built")
        with pytest.raises(ANY_ERROR):
            info.op(*args, **kw)


@needs_ext
@pytest.mark.parametrize("info,bad", params("cpp_bad"))
def test_bad_inputs_on_the_registered_op(info: OpInfo, bad: str, device: torch.device) -> None:
    b = info.bad_inputs()[bad]
    s = Sample(tuple(to_device(list(b.args), device)), to_device(b.kwargs, device))
    with pytest.raises(ANY_ERROR):
        getattr(torch.ops.fpl_fast, info.name)(*info.schema_args(s))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to put inputs on two devices")
@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("info", params("wrong_device"))
def test_wrong_device_raises(info: OpInfo, impl: str) -> None:
    assert info.wrong_device is not None
    case, cpu_arg, match = info.wrong_device
    s = info.sample(case, torch.float32)
    args, kw = to_device(list(s.args), "cuda"), to_device(s.kwargs, "cuda")
    if isinstance(cpu_arg, int):
        args[cpu_arg] = s.args[cpu_arg]
    else:
        kw[cpu_arg] = s.kwargs[cpu_arg]
    with pytest.raises(ValueError, match=match):
        (info.ref if impl == "reference" else info.op)(*args, **kw)


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("info,case,requires_grad", params("opcheck"))
def test_opcheck(info: OpInfo, case: str, requires_grad: bool, device: torch.device) -> None:
    s = info.sample(case, torch.float32 if torch.float32 in info.dtypes else info.dtypes[0])
    args = to_device(list(info.schema_args(s)), device)
    if requires_grad:
        args = [a.requires_grad_(True) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    torch.library.opcheck(getattr(torch.ops.fpl_fast, info.name).default, tuple(args))


@needs_ext
@pytest.mark.parametrize("info", params("compile"))
def test_compile_fullgraph(info: OpInfo, device: torch.device) -> None:
    assert info.compile is not None
    c = info.compile(device)
    compiled = torch.compile(c.fn, fullgraph=True, backend="aot_eager")
    tol = EXACT if c.exact else {}
    if not c.backward:
        got = compiled(*c.args)
        want = (c.expect or c.fn)(*c.args)
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want)), strict=True):
            torch.testing.assert_close(a.cpu(), b.cpu(), **tol)
        return
    leaves_c = [t.clone().requires_grad_(True) for t in c.args]
    leaves_e = [t.clone().requires_grad_(True) for t in c.args]
    out_c, out_e = compiled(*leaves_c), c.fn(*leaves_e)
    torch.testing.assert_close(out_c, out_e, **tol)
    out_c.backward()
    out_e.backward()
    for a, b in zip(leaves_c, leaves_e, strict=True):
        torch.testing.assert_close(a.grad, b.grad, **tol)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
def _grads(fn: Any, args: list[Any], w: Tensor) -> list[Tensor | None]:
    leaves = [t.detach().clone().requires_grad_(True) if isinstance(t, Tensor) else t for t in args]
    (fn(*leaves) * w).sum().backward()
    return [t.grad if isinstance(t, Tensor) else None for t in leaves]


@pytest.mark.parametrize("info,case", params("grad"))
def test_backward_matches_reference_autograd(info: OpInfo, case: str, device: torch.device) -> None:
    """Gradients of every tensor input (shared inputs sum over K) vs the reference's autograd, float64."""
    s = info.sample(case, torch.float64)
    w = make(*info.ref(*s.args).shape, dtype=torch.float64, seed=42)
    got = _grads(info.op, to_device(list(s.args), device), w.to(device))
    want = _grads(info.ref, list(s.args), w)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), f"input {i}"
        if a is not None and b is not None:
            assert a.shape == b.shape, f"grad of input {i}: {tuple(a.shape)} != {tuple(b.shape)}"
            torch.testing.assert_close(a.cpu(), b, **TOL[torch.float64], msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("info,case", params("gradcheck"))
def test_gradcheck(info: OpInfo, case: str, device: torch.device) -> None:
    assert info.gradcheck is not None
    args = tuple(
        a.detach().to(device).requires_grad_(True) if isinstance(a, Tensor) else a for a in info.gradcheck()[case]
    )
    assert torch.autograd.gradcheck(info.op, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("info,case", params("gradgrad"))
def test_double_backward(info: OpInfo, case: str, device: torch.device) -> None:
    """Second-order gradients through the op (create_graph=True) pass torch's finite-difference check."""
    s = info.sample(case, torch.float64)
    args = [t.requires_grad_(True) if isinstance(t, Tensor) else t for t in to_device(list(s.args), device)]
    idx = [i for i, t in enumerate(args) if isinstance(t, Tensor)]

    def fn(*xs: Tensor) -> Tensor:
        full = list(args)
        for i, x in zip(idx, xs, strict=True):
            full[i] = x
        return info.op(*full)

    assert torch.autograd.gradgradcheck(fn, tuple(args[i] for i in idx))


# ----------------------------------------------------------------------------------------------
# Launch size and streams
# ----------------------------------------------------------------------------------------------
def _client(x: Any, k: int, keep_dim: bool) -> Any:
    """Client k's part of a per-client argument: dim 0 of a tensor, entry k of a stream list."""
    if isinstance(x, Tensor):
        return x[k : k + 1] if keep_dim else x[k]
    if isinstance(x, list):
        return [x[k]]
    return x


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("info,case,dtype", params("launch"))
def test_client_alone_equals_client_in_a_launch(
    info: OpInfo, case: str, dtype: torch.dtype, impl: str, device: torch.device
) -> None:
    """A client's outputs (noise included) are bitwise the same whether it runs alone (K = 1, and without K where
    the op allows it) with its own (seed, offset) or as one of K clients with distinct streams. The kernels compute
    each client in a loop of its own; the reference's batched matmuls go through BLAS, whose blocking may depend on
    the batch size (seen on an AMD EPYC: 1 ulp), so there (unless launch_ref_exact) the same noise and the same
    values to float32 rounding."""
    assert info.launch_sample is not None
    fn = info.op if impl == "ops" else info.ref
    exact = impl == "ops" or info.launch_ref_exact

    def same(x: Tensor, y: Tensor) -> bool:
        return torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-6, atol=1e-7)

    s = info.launch_sample(case, dtype)
    args, kw = to_device(list(s.args), device), to_device(s.kwargs, device)
    together = fn(*args, **kw)
    K = together[0].shape[0]
    for k in range(K):
        modes = (True, False) if info.launch_plain else (True,)
        for keep_dim in modes:
            one = fn(*(_client(a, k, keep_dim) for a in args), **{n: _client(v, k, keep_dim) for n, v in kw.items()})
            for i, (t, a) in enumerate(zip(together, one, strict=True)):
                what = "K = 1 launch" if keep_dim else "launch without K"
                assert same(a[0] if keep_dim else a, t[k]), f"output {i} of client {k}: {what} differs from K = {K}"


def _with_stream(s: Sample, where: int | str, value: list[int]) -> Sample:
    args, kw = list(s.args), dict(s.kwargs)
    if isinstance(where, int):
        args[where] = value
    else:
        kw[where] = value
    return Sample(tuple(args), kw)


def _stream(s: Sample, where: int | str) -> list[int]:
    return s.args[where] if isinstance(where, int) else s.kwargs[where]


@pytest.mark.parametrize("info", params("streams"))
def test_same_stream_bitwise_other_stream_differs(info: OpInfo, device: torch.device) -> None:
    """The same (seed, offset) gives the same bits; another seed or offset of client 0 changes client 0's noisy
    outputs and nothing else (not its noise-free outputs, nor any output of the other clients)."""
    assert info.stream_case is not None
    s = info.sample(info.stream_case, torch.float32)
    a, b = run(info.op, s, device), run(info.op, s, device)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for where in info.stream_at:
        bumped = [v + 1 if k == 0 else v for k, v in enumerate(_stream(s, where))]
        c = run(info.op, _with_stream(s, where, bumped), device)
        for i, (x, y) in enumerate(zip(a, c, strict=True)):
            if i in info.noisy_outputs:
                assert not torch.equal(x[0], y[0]), f"{where}: output {i} of client 0 did not change"
            else:
                assert torch.equal(x[0], y[0]), f"{where}: output {i} of client 0 depends on the noise"
            assert torch.equal(x[1:], y[1:]), f"{where}: output {i} of another client changed"
