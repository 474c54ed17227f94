"""A self-check of each compiled kernel the first time it runs eagerly on a device type.

The first eager call of a public op of :mod:`fpl_fast.ops` on a device type ("cpu", "cuda") with the compiled
kernel first runs that kernel and the reference (:mod:`fpl_fast.ops.reference`, the spec) on a small fixed input
on that device (milliseconds) and compares them. On a mismatch (or if the kernel raises) it warns once with a
:class:`SelfCheckWarning` naming the op, the device type and the error against the op's tolerance, and the op
uses the reference on that device type from then on. A kernel that has never run on a GPU is thus caught
before it produces wrong training results.

The check never runs while tracing: under ``torch.compile``, torch.func transforms (vmap, grad), fake, meta or
functional tensors, an active dispatch mode (make_fx, FakeTensorMode), ``torch.jit`` tracing or CUDA graph
capture the kernel is used as it is (or the reference, if an earlier eager check failed), and the check waits
for the next eager call.

``FPL_FAST_SELFCHECK=0`` turns the check off (read at each op's first call); ``python -m fpl_fast.selftest``
runs every check explicitly and prints the results.

The fixed inputs are float32 and the reference runs on float64 copies of them, so the comparison does not
depend on TF32 or autocast settings. Errors are relative to the output's scale, max |kernel - reference| /
max(1, max |reference|); a float32 implementation of the spec (the reference at float32, and the CPU kernels)
stays near 1e-7, and the tolerances are 1e-5 to 1e-3, loosest for the ops with iterations or transcendental
functions (factorisation, noise), whose GPU versions may round differently.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fpl_fast.ops import reference

__all__ = [
    "CHECKS",
    "Check",
    "Result",
    "SelfCheckWarning",
    "enabled",
    "reset",
    "run_check",
    "tracing",
    "use_kernel",
]

ENV = "FPL_FAST_SELFCHECK"
KERNEL_DEVICES = ("cpu", "cuda")


class SelfCheckWarning(RuntimeWarning):
    """A compiled kernel disagreed with the reference on its self-check; the reference is used instead."""


# A case: (kernel call, reference call, arguments); the kernel gets them as built (float32 on the device),
# the reference the same with floating tensors in float64.
Case = tuple[Callable[..., Any], Callable[..., Any], Sequence[Any]]


@dataclass(frozen=True)
class Check:
    """The self-check of one op: its cases on a device and the tolerance on the error of each output,
    max |kernel - reference| / max(1, max |reference|) (for integer outputs: the number of differing entries)."""

    cases: Callable[[torch.device], list[Case]]
    tol: float


@dataclass(frozen=True)
class Result:
    op: str
    device: str
    err: float
    tol: float
    error: str | None = None  # the kernel's exception, if it raised

    @property
    def ok(self) -> bool:
        return self.error is None and self.err <= self.tol

    def describe(self) -> str:
        if self.error is not None:
            return f"the kernel raised {self.error}"
        return f"max error {self.err:.3g} vs tolerance {self.tol:.3g}"


def _ops() -> Any:
    # Looked up at call time: the same path ops.py calls (and tests patch).
    return torch.ops.fpl_fast


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).mul_(scale).float()


def _on(device: torch.device, *ts: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.to(device) for t in ts]


# Odd sizes (tails of the vector loops), two clients, rank 2.
_K, _NCLS, _NCTX, _D, _S, _R, _B = 2, 3, 4, 37, 5, 2, 3


def _prompt_cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(1)
    prefix, suffix = _rand(gen, _NCLS, 1, _D), _rand(gen, _NCLS, _S, _D)
    g, u, v, res = _rand(gen, _K, _NCTX, _D), _rand(gen, _K, _NCTX, _R), _rand(gen, _R, _D), _rand(gen, _NCTX, _D)
    grad_out = _rand(gen, _K, _NCLS, 1 + _NCTX + _S, _D)
    fwd = _on(device, prefix, suffix, g, u, v, res)
    bwd = [*_on(device, grad_out, u.expand(_K, -1, -1).contiguous(), v), _NCTX]
    return [
        (lambda *a: _ops().lowrank_prompt(*a), reference.lowrank_prompt, fwd),
        (lambda *a: _ops().lowrank_prompt(*a), reference.lowrank_prompt, [*fwd[:3], None, None, None]),
        (lambda *a: _ops().lowrank_prompt_backward(*a), reference.lowrank_prompt_backward, bwd),
    ]


def _dp_cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(2)
    grad = _rand(gen, _K, _B, _NCTX, _D, scale=0.3)
    grad_cls = _rand(gen, _K, _B, _NCLS, _NCTX, _D, scale=0.3)
    u, v = _rand(gen, _K, _NCTX, _R), _rand(gen, _K, _R, _D)
    seed, offset = [11, 12], [0, 1000]

    def call(*a: Any) -> Any:
        return _ops().dp_lowrank_clip_noise(*a)

    ref = reference.dp_lowrank_clip_noise
    # Per client and quantity its own clip norm (g_U or g_L, g_V, g_G), float64 on the device as the op takes it.
    clip = torch.tensor([[1.0, 0.6, 1.4], [0.5, 2.0, 0.8]], dtype=torch.float64, device=device)
    # One sample's norm above C, others below, and the noise drawn: clipping, sums and the stream all count;
    # then automatic clipping (normalize) with joint and with separate factors.
    return [
        (call, ref, [*_on(device, grad, u, v), clip, 0.5, seed, offset, 0.0, True, True, False, False, 0.01]),
        (call, ref, [*_on(device, grad_cls, u, v), 2 * clip, 0.7, seed, offset, 4.0, False, True, True, False, 0.01]),
        (call, ref, [*_on(device, grad, None, None), clip, 0.5, seed, offset, 0.0, True, False, False, False, 0.01]),
        (call, ref, [*_on(device, grad, u, v), clip, 0.5, seed, offset, 0.0, False, True, False, True, 0.05]),
        (call, ref, [*_on(device, grad_cls, None, None), clip, 0.5, seed, offset, 0.0, True, True, True, True, 0.01]),
    ]


def _full_grad_cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(3)
    ts = [_rand(gen, _K, _NCTX, _R), _rand(gen, _K, _R, _D), _rand(gen, _K, _NCTX, _R), _rand(gen, _K, _R, _D)]
    return [(lambda *a: _ops().lowrank_full_grad(*a), reference.lowrank_full_grad, [*_on(device, *ts), 0.1])]


def _factorize_cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(4)
    # A clear gap after the top singular values keeps the power iteration well conditioned.
    lo = torch.matmul(_rand(gen, _K, _NCTX, _R), _rand(gen, _K, _R, _D))
    l = lo + _rand(gen, _K, _NCTX, _D, scale=0.05)  # noqa: E741
    return [
        (lambda *a: _ops().lowrank_factorize(*a), reference.lowrank_factorize, [*_on(device, l), _R, [5, 6], [0, 77]])
    ]


def _nn_map_cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(5)
    vocab, b = 29, 9
    emb = _rand(gen, vocab, _D)
    ids = torch.randint(0, vocab, (b,), generator=gen)
    y = emb[ids] + _rand(gen, b, _D, scale=0.05)  # each query sits near one row: no near-ties
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[ids[:2]] = False  # two queries must find their second-nearest allowed row
    call = lambda *a: _ops().nn_map(*a)  # noqa: E731
    return [
        (call, reference.nn_map, [*_on(device, y, emb, allowed), 8]),
        (call, reference.nn_map, [*_on(device, y, emb), None, 4096]),
    ]


def _output_dp_cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(6)
    n_cls, b = 5, 4
    x, t = _rand(gen, _K, b, _D), _rand(gen, _K, n_cls, _D)
    labels = torch.randint(0, n_cls, (_K, b), generator=gen)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    clip = torch.tensor([0.5, 1e3])  # client 0 clips its examples, client 1 none
    seed, offset = [21, 22], [0, 9]

    def call(*a: Any) -> Any:
        return _ops().dp_output_clip_noise(*a)

    def ref(*a: Any) -> Any:  # clip_norm stays float32 (the op's contract) when the rest goes to float64
        args = list(a)
        args[5] = args[5].float()
        return reference.dp_output_clip_noise(*args)

    labels, clip = labels.to(device), clip.to(device)
    return [
        (call, ref, [*_on(device, x, t), labels, mask.to(device), 20.0, clip, 0.0, seed, offset, 4.0]),
        (call, ref, [*_on(device, x, t), labels, None, 20.0, clip.clamp(max=2.0), 0.8, seed, offset, 3.5]),
    ]


CHECKS: dict[str, Check] = {
    "lowrank_prompt": Check(_prompt_cases, tol=1e-5),
    "dp_lowrank_clip_noise": Check(_dp_cases, tol=1e-4),
    "lowrank_full_grad": Check(_full_grad_cases, tol=1e-4),
    "lowrank_factorize": Check(_factorize_cases, tol=1e-3),
    "nn_map": Check(_nn_map_cases, tol=0.0),
    "dp_output_clip_noise": Check(_output_dp_cases, tol=1e-4),
}


def _outputs(x: Any) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def _to64(a: Any) -> Any:
    return a.double() if isinstance(a, Tensor) and a.is_floating_point() else a


def _case_error(case: Case) -> float:
    kernel, ref, args = case
    got = _outputs(kernel(*args))
    want = _outputs(ref(*[_to64(a) for a in args]))
    if len(got) != len(want):
        return math.inf
    err = 0.0
    for o, e in zip(got, want, strict=True):
        wrong_dtype = o.dtype != (torch.float32 if e.is_floating_point() else e.dtype)
        if o.shape != e.shape or wrong_dtype or o.device != e.device:
            return math.inf
        if o.numel() == 0:
            continue
        if e.is_floating_point():
            diff = (o.double() - e).abs().max() / e.abs().max().clamp(min=1.0)
            err = max(err, math.inf if diff.isnan() else diff.item())
        else:
            err = max(err, float((o != e).sum().item()))
    return err


def run_check(op: str, device: torch.device | str) -> Result:
    """Run ``op``'s kernel and the reference on its fixed inputs on ``device``; never raises for the kernel."""
    dev = torch.device(device)
    check = CHECKS[op]
    try:
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            err = max(_case_error(case) for case in check.cases(dev))
    except Exception as exc:  # noqa: BLE001 - a kernel that raises on valid input fails its check
        return Result(op, dev.type, math.inf, check.tol, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    return Result(op, dev.type, err, check.tol)


def enabled() -> bool:
    """False when FPL_FAST_SELFCHECK=0."""
    return os.environ.get(ENV, "1").strip() != "0"


def tracing(tensors: Sequence[Tensor | None]) -> bool:
    """True when the caller is being traced or transformed, where running extra ops must not happen."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch._C._are_functorch_transforms_active():
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return True
    for t in tensors:
        if t is None:
            continue
        # Subclasses (FakeTensor, FunctionalTensor, DTensor, ...) and meta tensors carry no real data.
        if type(t) not in (Tensor, torch.nn.Parameter) or t.device.type == "meta" or torch._is_functional_tensor(t):
            return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


_verdict: dict[tuple[str, str], bool] = {}  # (op, device type) -> may the kernel be used
_lock = threading.Lock()


def use_kernel(op: str, first: Tensor, *rest: Tensor | None) -> bool:
    """Whether ``op`` may run its compiled kernel on the device of ``first`` (its first tensor argument; ``rest``
    are the others); the first eager call per device type runs the self-check (see the module docstring)."""
    device = first.device
    known = _verdict.get((op, device.type))
    if known is not None:
        return known
    # Cheapest first: with the check off this is all an op call pays.
    if torch.compiler.is_compiling() or not enabled():
        return True
    if device.type not in KERNEL_DEVICES or tracing((first, *rest)):
        return True
    with _lock:
        if (op, device.type) not in _verdict:
            result = run_check(op, device)
            _verdict[(op, device.type)] = result.ok
            if not result.ok:
                warnings.warn(
                    f"fpl_fast: the {op} kernel failed its self-check on {device.type} ({result.describe()}); "
                    f"{op} uses the plain-PyTorch reference on {device.type} from now on. "
                    f"`python -m fpl_fast.selftest` checks every op; {ENV}=0 turns the check off.",
                    SelfCheckWarning,
                    stacklevel=3,
                )
    return _verdict[(op, device.type)]


def reset() -> None:
    """Forget every verdict (the next eager call of each op checks again)."""
    with _lock:
        _verdict.clear()
