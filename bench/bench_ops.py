"""Microbenchmarks of the fused fpl_fast ops against plain PyTorch, eager and compiled.

For every op and case these implementations are timed with ``torch.utils.benchmark``: ``fused``
(``fpl_fast.ops``, the compiled C++/CUDA op), ``eager`` (plain PyTorch) and ``compile`` (``eager`` under
``torch.compile``; a compile failure is reported as such, not raised). ``eager`` is ``fpl_fast.ops.reference`` except
for the DP ops, whose reference draws its Philox normals in int64 tensor arithmetic for exactness, not speed:
there ``eager`` is the best plain-PyTorch version of the same math with torch's own RNG (``torch.randn``; see
``eager_dp_lowrank_clip_noise``) and the reference is timed as a further row, ``reference``. Cases use the
DP-FPL paper's shapes (K = 10 clients, b = 32, n_cls = 100, n_ctx = 16, d = 512, r = 8, suffix S = 60) and a
larger federation (K = 50, b = 64). Timings are printed as a ``Compare`` table and a ratio table
(eager / fused, compile / fused, reference / fused where there is a separate reference row, and the fused op's
GB/s from the bytes it must read and write at least).

Usage, from the repository root::

    python bench/bench_ops.py [--quick] [--device cpu,cuda] [--ops NAME,...] [--cases paper,large] [--json out.json]

``--json`` writes ``{"date", "command", "cpu_model", "gpu_model", "records"}``, the records
``{"op", "case", "device", "impl", "median_us"}`` (``median_us`` is null and ``error`` says why when an
implementation could not run). Benchmarks never assert anything about timings.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
import torch.utils.benchmark as benchmark
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

with warnings.catch_warnings(record=True) as _import_warnings:
    warnings.simplefilter("always")
    from provenance import provenance  # noqa: E402

    from fpl_fast import ops  # noqa: E402
    from fpl_fast.ops import reference  # noqa: E402

__all__ = ["CASES", "IMPLS", "OPS", "Case", "Setup", "eager_dp_lowrank_clip_noise", "main"]


@dataclass(frozen=True)
class Case:
    """Problem sizes of one benchmark case."""

    name: str
    K: int
    b: int
    n_cls: int = 100
    n_ctx: int = 16
    d: int = 512
    r: int = 8
    S: int = 60


CASES: dict[str, Case] = {"paper": Case("paper", K=10, b=32), "large": Case("large", K=50, b=64)}


@dataclass
class Setup:
    """What one op needs for one case: a callable per implementation and the minimal bytes moved."""

    fused: Callable[[], Any]
    eager: Callable[[], Any]
    compile: Callable[[], Any] | None  # None: torch.compile failed (see compile_error)
    nbytes: int
    compile_error: str | None = None
    reference: Callable[[], Any] | None = None  # fpl_fast.ops.reference, when eager is a different implementation


IMPLS = ("fused", "eager", "reference", "compile")  # timed in this order; a Setup without a reference skips it


def _nbytes(*ts: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _randn(*shape: int, device: torch.device, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, device=device) * scale


def _short_error(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


class CompileTimeout(Exception):
    """torch.compile ran past --compile-timeout."""


# Compile budget in seconds (set from --compile-timeout) and reference functions whose compile timed out: a
# function that timed out once is not compiled again for the other cases.
COMPILE_TIMEOUT_S = 90
_COMPILE_TIMED_OUT: dict[str, str] = {}


def _on_alarm(signum: int, frame: Any) -> None:
    raise CompileTimeout(f"torch.compile took longer than {COMPILE_TIMEOUT_S} s")


def _try_compile(fn: Callable[..., Any], warmup: Callable[[Callable[..., Any]], Any]) -> tuple[Any, str | None]:
    """torch.compile(fn) and run it once (that is when compilation happens); (None, reason) on failure.

    The compilation gets COMPILE_TIMEOUT_S seconds (SIGALRM, main thread): Inductor can take many minutes on the
    reference's int64 Philox arithmetic, and that is reported as a compile failure rather than waited for.
    """
    name = getattr(fn, "__name__", repr(fn))
    if name in _COMPILE_TIMED_OUT:
        return None, f"skipped: {_COMPILE_TIMED_OUT[name]} (an earlier case)"
    use_alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    if use_alarm:
        # Re-arm every 5 s: an exception raised inside a weakref callback or __del__ is swallowed by Python.
        signal.setitimer(signal.ITIMER_REAL, COMPILE_TIMEOUT_S, 5.0)
    try:
        compiled = torch.compile(fn, fullgraph=False, dynamic=False)
        warmup(compiled)
        return compiled, None
    except Exception as exc:  # noqa: BLE001 - any compiler failure is reported, not raised
        torch._dynamo.reset()
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, CompileTimeout):  # Inductor wraps it
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            _COMPILE_TIMED_OUT[name] = str(cause)
            return None, f"CompileTimeout: {cause}"
        return None, _short_error(exc)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _prompt_inputs(c: Case, device: torch.device) -> dict[str, Tensor]:
    # dpfpl: shared G, per-client U, V and residual R.
    return {
        "prefix": _randn(c.n_cls, 1, c.d, device=device),
        "suffix": _randn(c.n_cls, c.S, c.d, device=device),
        "g": _randn(c.n_ctx, c.d, device=device, scale=0.02),
        "u": _randn(c.K, c.n_ctx, c.r, device=device),
        "v": _randn(c.K, c.r, c.d, device=device),
        "residual": _randn(c.K, c.n_ctx, c.d, device=device),
    }


def setup_lowrank_prompt_fwd(c: Case, device: torch.device) -> Setup:
    x = _prompt_inputs(c, device)
    args = (x["prefix"], x["suffix"], x["g"], x["u"], x["v"], x["residual"])
    out_bytes = c.K * c.n_cls * (1 + c.n_ctx + c.S) * c.d * 4
    compiled, err = _try_compile(reference.lowrank_prompt, lambda f: f(*args))
    return Setup(
        fused=lambda: ops.lowrank_prompt(*args),
        eager=lambda: reference.lowrank_prompt(*args),
        compile=None if compiled is None else (lambda: compiled(*args)),
        nbytes=_nbytes(*args) + out_bytes,
        compile_error=err,
    )


def setup_lowrank_prompt_fwd_bwd(c: Case, device: torch.device) -> Setup:
    x = _prompt_inputs(c, device)
    leaves = {k: t.requires_grad_(k in ("g", "u", "v", "residual")) for k, t in x.items()}
    args = tuple(leaves[k] for k in ("prefix", "suffix", "g", "u", "v", "residual"))
    grad_out = _randn(c.K, c.n_cls, 1 + c.n_ctx + c.S, c.d, device=device)

    def run(fn: Callable[..., Tensor]) -> None:
        for t in args:
            t.grad = None
        fn(*args).backward(grad_out)

    out_bytes = grad_out.numel() * 4
    # Backward reads the context slice of grad_out, u and v, and writes the grads of g, u, v and residual.
    bwd_bytes = c.K * c.n_cls * c.n_ctx * c.d * 4 + _nbytes(x["u"], x["v"]) * 2 + _nbytes(x["g"], x["residual"])
    compiled, err = _try_compile(reference.lowrank_prompt, lambda f: run(f))
    return Setup(
        fused=lambda: run(ops.lowrank_prompt),
        eager=lambda: run(reference.lowrank_prompt),
        compile=None if compiled is None else (lambda: run(compiled)),
        nbytes=_nbytes(*args) + out_bytes + bwd_bytes,
        compile_error=err,
    )


def eager_dp_lowrank_clip_noise(
    grad: Tensor,
    u: Tensor,
    v: Tensor,
    clip_norm: float,
    noise_multiplier: float,
    per_sample: bool = True,
    joint_uv: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dp_lowrank_clip_noise's math (fpl_fast.ops.reference) in the fastest plain PyTorch we found, torch.randn noise.

    grad (K, b, n_ctx, d), u (K, n_ctx, r), v (K, r, d); no sum_classes, denominator b. Same outputs as the
    reference but for the noise values. Products by batched GEMMs: g_U,i = X_i V^T; |g_V,i|^2 = |U^T X_i|^2 =
    <U U^T, X_i X_i^T> from the Gram matrices (one bmm that also gives |X_i|^2 on its diagonal, cheaper than
    forming U^T X_i, a (K, b, r, d) tensor, and its norm); the clipped sums weight the samples in one bmm, and
    sum_i c_i U^T X_i = U^T (sum_i c_i X_i), so U^T X_i is never formed.
    """
    K, b, n, d = grad.shape
    r = u.shape[-1]
    x = grad if per_sample else grad.mean(dim=1, keepdim=True)
    bb = x.shape[1]
    a = torch.bmm(x.reshape(K, bb * n, d), v.transpose(1, 2)).view(K, bb, n, r)  # g_U,i
    xf = x.reshape(K * bb, n, d)
    gram = torch.bmm(xf, xf.transpose(1, 2)).view(K, bb, n, n)  # X_i X_i^T
    sq_u = a.square().sum((2, 3))
    sq_v = (gram * (u @ u.transpose(1, 2)).unsqueeze(1)).sum((2, 3)).clamp_min(0)
    sq_g = gram.diagonal(dim1=2, dim2=3).sum(2)
    norm_u, norm_v, norm_g = sq_u.sqrt(), sq_v.sqrt(), sq_g.sqrt()

    def clip(norm: Tensor) -> Tensor:
        return (clip_norm / (norm + 1e-6)).clamp(max=1.0)

    cu, cv = (clip((sq_u + sq_v).sqrt()),) * 2 if joint_uv else (clip(norm_u), clip(norm_v))
    sum_u = torch.bmm(cu.unsqueeze(1), a.reshape(K, bb, n * r)).view(K, n, r)
    sums = torch.bmm(torch.stack([cv, clip(norm_g)], 1), x.reshape(K, bb, n * d)).view(K, 2, n, d)
    sum_v = u.transpose(1, 2) @ sums[:, 0]
    denom = float(max(b, 1))
    scale = 1.0 / denom if per_sample else 1.0
    z = torch.randn(K, n * r + r * d, device=grad.device, dtype=grad.dtype) * (noise_multiplier * clip_norm / denom)
    out_u = sum_u * scale + z[:, : n * r].view(K, n, r)
    out_v = sum_v * scale + z[:, n * r :].view(K, r, d)
    return out_u, out_v, sums[:, 1] * scale, torch.stack([norm_u, norm_v, norm_g], -1).float()


def _setup_dp(c: Case, device: torch.device, per_sample: bool) -> Setup:
    grad = _randn(c.K, c.b, c.n_ctx, c.d, device=device, scale=0.1)
    u = _randn(c.K, c.n_ctx, c.r, device=device)
    v = _randn(c.K, c.r, c.d, device=device)
    seeds, offsets = list(range(1, c.K + 1)), [0] * c.K  # one stream per client
    hyper = {"clip_norm": 10.0, "noise_multiplier": 0.4, "per_sample": per_sample}
    kw = {**hyper, "seed": seeds, "offset": offsets}
    out_bytes = (c.K * (c.n_ctx * c.r + c.r * c.d + c.n_ctx * c.d) + c.K * (c.b if per_sample else 1) * 3) * 4
    compiled, err = _try_compile(eager_dp_lowrank_clip_noise, lambda f: f(grad, u, v, **hyper))
    return Setup(
        fused=lambda: ops.dp_lowrank_clip_noise(grad, u, v, **kw),
        eager=lambda: eager_dp_lowrank_clip_noise(grad, u, v, **hyper),
        reference=lambda: reference.dp_lowrank_clip_noise(grad, u, v, **kw),
        compile=None if compiled is None else (lambda: compiled(grad, u, v, **hyper)),
        nbytes=_nbytes(grad, u, v) + out_bytes,
        compile_error=err,
    )


def setup_dp_per_sample(c: Case, device: torch.device) -> Setup:
    return _setup_dp(c, device, per_sample=True)


def setup_dp_batch(c: Case, device: torch.device) -> Setup:
    return _setup_dp(c, device, per_sample=False)


def setup_lowrank_full_grad(c: Case, device: torch.device) -> Setup:
    gu, u = _randn(c.K, c.n_ctx, c.r, device=device), _randn(c.K, c.n_ctx, c.r, device=device)
    gv, v = _randn(c.K, c.r, c.d, device=device), _randn(c.K, c.r, c.d, device=device)
    compiled, err = _try_compile(reference.lowrank_full_grad, lambda f: f(gu, gv, u, v, 0.1))
    return Setup(
        fused=lambda: ops.lowrank_full_grad(gu, gv, u, v, 0.1),
        eager=lambda: reference.lowrank_full_grad(gu, gv, u, v, 0.1),
        compile=None if compiled is None else (lambda: compiled(gu, gv, u, v, 0.1)),
        nbytes=_nbytes(gu, gv, u, v) + c.K * c.n_ctx * c.d * 4,
        compile_error=err,
    )


def setup_lowrank_factorize(c: Case, device: torch.device) -> Setup:
    lmat = _randn(c.K, c.n_ctx, c.d, device=device, scale=0.02)
    seeds, offsets = list(range(1, c.K + 1)), [0] * c.K  # one stream per client
    compiled, err = _try_compile(reference.lowrank_factorize, lambda f: f(lmat, c.r, seeds, offsets))
    out_bytes = c.K * (c.n_ctx * c.r + c.r * c.d + c.n_ctx * c.d) * 4
    return Setup(
        fused=lambda: ops.lowrank_factorize(lmat, c.r, seeds, offsets),
        eager=lambda: reference.lowrank_factorize(lmat, c.r, seeds, offsets),
        compile=None if compiled is None else (lambda: compiled(lmat, c.r, seeds, offsets)),
        nbytes=_nbytes(lmat) + out_bytes,
        compile_error=err,
    )


def _output_dp_eager(
    x: Tensor, t: Tensor, labels: Tensor, mask: Tensor, s: float, clip: Tensor, sigma: float, denom: float
) -> tuple[Tensor, Tensor, Tensor]:
    """dp_output_clip_noise in plain PyTorch with torch's own RNG (torch.randn, not the Philox stream): the same
    closed form as the reference, including T^_c . A_c = sum_i f_i w_ic cos_ic, with the elementwise work fused
    where PyTorch allows it (in-place ops, addcmul)."""
    x_hat = torch.nn.functional.normalize(x, dim=-1)
    t_norm = t.norm(dim=-1).clamp_(min=reference.NORM_EPS)
    t_hat = t / t_norm[..., None]
    cos = torch.bmm(x_hat, t_hat.transpose(1, 2))  # (K, b, n_cls)
    logp = torch.log_softmax(cos * s, dim=-1)
    w = logp.exp()
    w.scatter_add_(-1, labels[..., None], torch.full_like(w[..., :1], -1.0))
    losses = -logp.gather(-1, labels[..., None])[..., 0] * mask
    sq = (w * w * (1.0 - cos * cos).clamp_(min=0) / (t_norm * t_norm)[:, None, :]).sum(-1)
    norms = sq.sqrt_().mul_(s).mul_(mask)
    fw = w.mul_((clip[:, None] / (norms + reference.CLIP_EPS)).clamp_(max=1.0).mul_(mask)[..., None])
    a = torch.bmm(fw.transpose(1, 2), x_hat)  # (K, n_cls, D)
    proj = (fw * cos).sum(1)  # (K, n_cls)
    release = torch.addcmul(a, proj[..., None], t_hat, value=-1.0).mul_((s / denom / t_norm)[..., None])
    release.add_(torch.randn_like(release).mul_((sigma / denom * clip)[:, None, None]))
    return release, norms, losses


def setup_dp_output_clip_noise(c: Case, device: torch.device) -> Setup:
    # The logit head of frozen CLIP: D = c.d features, CLIP's logit scale 100, clip norms that clip some examples.
    x = _randn(c.K, c.b, c.d, device=device)
    t = _randn(c.K, c.n_cls, c.d, device=device)
    labels = torch.randint(0, c.n_cls, (c.K, c.b), device=device)
    mask = torch.ones(c.K, c.b, device=device)
    clip = torch.full((c.K,), 5.0, device=device)
    seeds, offsets = list(range(1, c.K + 1)), [0] * c.K  # one stream per client
    kw = {"logit_scale": 100.0, "clip_norm": clip, "noise_multiplier": 1.0, "seed": seeds, "offset": offsets}
    kw["denominator"] = float(c.b)

    def eager(x: Tensor, t: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _output_dp_eager(x, t, labels, mask, 100.0, clip, 1.0, float(c.b))

    compiled, err = _try_compile(eager, lambda f: f(x, t, labels, mask))
    out_bytes = c.K * c.n_cls * c.d * 4 + 2 * c.K * c.b * 4
    return Setup(
        fused=lambda: ops.dp_output_clip_noise(x, t, labels, mask, **kw),
        eager=lambda: eager(x, t, labels, mask),
        compile=None if compiled is None else (lambda: compiled(x, t, labels, mask)),
        nbytes=_nbytes(x, t, labels, mask, clip) + out_bytes,
        compile_error=err,
    )


OPS: dict[str, Callable[[Case, torch.device], Setup]] = {
    "lowrank_prompt_fwd": setup_lowrank_prompt_fwd,
    "lowrank_prompt_fwd_bwd": setup_lowrank_prompt_fwd_bwd,
    "dp_clip_noise_per_sample": setup_dp_per_sample,
    "dp_clip_noise_batch": setup_dp_batch,
    "lowrank_full_grad": setup_lowrank_full_grad,
    "lowrank_factorize": setup_lowrank_factorize,
    "dp_output_clip_noise": setup_dp_output_clip_noise,
}


def _parse_list(value: str, allowed: list[str], what: str) -> list[str]:
    items = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated subset of {allowed}, got {value!r}")
    return items


def _fmt(x: float | None, spec: str) -> str:
    """Format a ratio; '-' (right-aligned to the same width) when it is missing."""
    width = int(spec.split(".")[0]) if spec[0].isdigit() else 0
    return "-".rjust(width) if x is None or math.isnan(x) else format(x, spec)


def _over_fused(medians: dict[str, float | None], impl: str) -> float | None:
    """medians[impl] / medians["fused"]; None when either is missing."""
    fused, other = medians.get("fused"), medians.get(impl)
    return None if not fused or other is None else other / fused


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every (op, case, device, impl); print the tables; return the JSON records."""
    measurements: list[benchmark.Measurement] = []
    records: list[dict[str, Any]] = []
    ratios: list[tuple[str, str, str, float | None, float | None, float | None, float | None]] = []
    for dev in args.device:
        device = torch.device(dev)
        if dev == "cuda" and not torch.cuda.is_available():
            print("skipping cuda: torch.cuda.is_available() is False")
            continue
        fused_ok = ops.has_cpp_ops() and (dev == "cpu" or ops.has_cuda_kernels())
        if not ops.has_cpp_ops():
            print("WARNING: fpl_fast._C is not loaded; 'fused' runs the reference (build the extension first)")
        elif not fused_ok:
            print(f"WARNING: fpl_fast._C has no {dev} kernels; 'fused' is skipped on {dev}")
        for case_name in args.cases:
            case = CASES[case_name]
            for op_name in args.ops:
                t0 = time.perf_counter()
                torch.manual_seed(0)
                setup = OPS[op_name](case, device)
                callables: dict[str, Callable[[], Any] | None] = {
                    "fused": setup.fused if fused_ok or not ops.has_cpp_ops() else None,
                    "eager": setup.eager,
                    "reference": setup.reference,
                    "compile": setup.compile,
                }
                # No reference row where eager is the reference itself.
                impls = {k: callables[k] for k in IMPLS if k != "reference" or setup.reference is not None}
                medians: dict[str, float | None] = {}
                for impl, fn in impls.items():
                    rec: dict[str, Any] = {"op": op_name, "case": case_name, "device": dev, "impl": impl}
                    if fn is None:
                        rec["median_us"] = None
                        rec["error"] = setup.compile_error if impl == "compile" else f"no {dev} kernel"
                        medians[impl] = None
                        records.append(rec)
                        continue
                    try:
                        fn()  # warm-up (allocator, lazy init); also where a missing kernel shows up
                    except Exception as exc:  # noqa: BLE001 - report and go on with the other implementations
                        rec["median_us"] = None
                        rec["error"] = _short_error(exc)
                        medians[impl] = None
                        records.append(rec)
                        print(f"  {op_name} {case_name} {dev} {impl} failed: {rec['error']}")
                        continue
                    timer = benchmark.Timer(
                        stmt="fn()",
                        globals={"fn": fn},
                        label=op_name,
                        sub_label=f"{case_name} K={case.K} b={case.b} ({dev})",
                        description=impl,
                        num_threads=torch.get_num_threads(),
                    )
                    m = timer.blocked_autorange(min_run_time=args.min_run_time)
                    measurements.append(m)
                    medians[impl] = m.median * 1e6
                    rec["median_us"] = round(m.median * 1e6, 3)
                    records.append(rec)
                fused = medians["fused"]
                ratios.append(
                    (
                        op_name,
                        case_name,
                        dev,
                        _over_fused(medians, "eager"),
                        _over_fused(medians, "compile"),
                        _over_fused(medians, "reference"),
                        None if not fused else setup.nbytes / (fused * 1e-6) / 1e9,
                    )
                )
                err = f"  [compile failed: {setup.compile_error}]" if setup.compile_error else ""
                print(
                    f"done {op_name:26s} {case_name:6s} {dev:4s} in {time.perf_counter() - t0:6.1f} s{err}", flush=True
                )
                del setup, impls, callables
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    if measurements:
        compare = benchmark.Compare(measurements)
        compare.trim_significant_figures()
        compare.print()
    print(
        f"{'op':26s} {'case':6s} {'dev':4s} {'eager/fused':>12s} {'compile/fused':>14s} {'reference/fused':>16s}"
        f" {'fused GB/s':>11s}"
    )
    for op_name, case_name, dev, r_e, r_c, r_r, gbs in ratios:
        print(
            f"{op_name:26s} {case_name:6s} {dev:4s} {_fmt(r_e, '12.2f')} {_fmt(r_c, '14.2f')} {_fmt(r_r, '16.2f')}"
            f" {_fmt(gbs, '11.2f')}"
        )
    return records


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timing runs (min_run_time 0.05 s)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per blocked_autorange")
    parser.add_argument(
        "--device",
        type=lambda s: _parse_list(s, ["cpu", "cuda"], "--device"),
        default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"],
        help="comma-separated: cpu,cuda (default: cpu, plus cuda when available)",
    )
    parser.add_argument(
        "--ops", type=lambda s: _parse_list(s, list(OPS), "--ops"), default=list(OPS), help=", ".join(OPS)
    )
    parser.add_argument(
        "--cases", type=lambda s: _parse_list(s, list(CASES), "--cases"), default=list(CASES), help="paper,large"
    )
    parser.add_argument(
        "--compile-timeout", type=int, default=None, help="seconds allowed per torch.compile (default 90, quick 45)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the timing records to this JSON file")
    args = parser.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 0.3
    if args.min_run_time <= 0:
        parser.error(f"--min-run-time must be > 0, got {args.min_run_time}")
    if args.compile_timeout is None:
        args.compile_timeout = 45 if args.quick else 90
    if args.compile_timeout <= 0:
        parser.error(f"--compile-timeout must be > 0, got {args.compile_timeout}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    global COMPILE_TIMEOUT_S
    COMPILE_TIMEOUT_S = args.compile_timeout
    # Compile in this process so that the timeout also stops the C++ compiler (subprocess.run kills its child).
    torch._inductor.config.compile_threads = 1
    for w in _import_warnings:
        print(f"import warning: {w.message}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fpl_fast._C loaded: {ops.has_cpp_ops()}, "
        f"CUDA kernels: {ops.has_cuda_kernels()}"
    )
    records = run(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {**provenance(__file__, argv), "records": records}
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
