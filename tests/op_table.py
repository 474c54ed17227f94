"""The op table: one OpInfo entry per registered ``torch.ops.fpl_fast`` op, as PyTorch's OpInfo does.

An entry names the op's Python face (``ops.<name>``), its reference twin (``ops.reference.<name>``), how
to build its sample inputs (cases x dtypes, on the CPU), the views, tolerances, bad inputs and the coverage the
generic tests in test_ops.py run for it. Checks that only make sense for one op (by-hand formulas, the noise
statistics) are named tests in test_ops_specific.py, which imports the sample builders from here.

Adding an op: write its sample builder and one ``OpInfo`` in ``OPS``; test_ops.py fails until every op the
extension registers has an entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from support import FLOAT_DTYPES, TOL, client_streams, make, needs_ext, noncontig, to_device, transposed
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops import reference

View = Callable[[Tensor], Tensor] | None  # a view of one positional argument (None: the argument as it is)
EXACT = {"rtol": 0.0, "atol": 0.0}


@dataclass(frozen=True)
class Sample:
    """One call of the Python face: positional and keyword arguments, CPU tensors."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadInput:
    """A call that must fail: the Python face raises ValueError matching ``match`` (so does the reference)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    match: str


@dataclass(frozen=True)
class CompileCase:
    """A function with the op inside, compiled with fullgraph=True (backend aot_eager) and compared with eager
    (or with ``expect``); ``backward``: its scalar output is differentiated w.r.t. every tensor argument too."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    exact: bool = False
    backward: bool = False
    expect: Callable[..., Any] | None = None


@dataclass(frozen=True)
class OpInfo:
    name: str  # the registered name: torch.ops.fpl_fast.<name>
    op: Callable[..., Any]  # the Python face (for an op without one, a call of torch.ops.fpl_fast.<name>)
    ref: Callable[..., Any]  # the reference twin, called like ``op``
    sample: Callable[[str, torch.dtype], Sample]  # (case, dtype) -> sample
    cases: tuple[str, ...]  # parity cases, each run in every dtype of ``dtypes``
    schema_args: Callable[[Sample], tuple[Any, ...]]  # the sample as the positional args of the registered op
    dtypes: tuple[torch.dtype, ...] = tuple(FLOAT_DTYPES)
    tol: Callable[[torch.dtype], dict[str, float] | None] = lambda dtype: None  # None: support.TOL by output dtype
    check: Callable[[str, torch.dtype, Sample, tuple[Tensor, ...]], None] | None = None  # extra output checks
    has_face: bool = True  # False: the op is called through torch.ops only (needs the extension)
    # Views: each variant gives one view per positional argument; ``noncontig_bitwise``: equal to the
    # contiguous call bit for bit.
    noncontig_cases: tuple[str, ...] = ()
    noncontig_views: tuple[tuple[View, ...], ...] = ()
    noncontig_bitwise: bool = False
    misaligned_cases: tuple[str, ...] = ()  # run in float32 and bfloat16
    low_precision_cases: tuple[str, ...] = ()  # assert_bf16_close in every dtype of low_precision_dtypes
    low_precision_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
    bad_inputs: Callable[[], dict[str, BadInput]] = dict
    cpp_bad_inputs: tuple[str, ...] = ()  # of bad_inputs, those also passed to torch.ops.fpl_fast.<name> itself
    wrong_device: tuple[str, int | str, str] | None = None  # (case, the argument left on the CPU, match)
    opcheck_cases: tuple[str, ...] = ()
    opcheck_grad: bool = False  # opcheck also with inputs that require grad (the op has autograd)
    compile: Callable[[torch.device], CompileCase] | None = None
    grad_cases: tuple[str, ...] = ()  # backward vs the reference's autograd, float64
    gradcheck: Callable[[], dict[str, tuple[Any, ...]]] | None = None  # tiny float64 inputs for gradcheck
    gradgrad_cases: tuple[str, ...] = ()  # gradgradcheck, float64
    # A client's outputs do not depend on the launch: every tensor and list argument of a launch sample is
    # per client (dim 0 / entry k). ``launch_plain``: also without K; ``launch_ref_exact``: the reference too
    # bit for bit (else to float32 rounding: its batched BLAS may block by batch size).
    launch_cases: tuple[tuple[str, torch.dtype], ...] = ()
    launch_sample: Callable[[str, torch.dtype], Sample] | None = None
    launch_plain: bool = True
    launch_ref_exact: bool = False
    # Streams: the same (seed, offset) gives the same bits; another one for client 0 changes its noisy outputs
    # and nothing else. ``stream_at``: where seed and offset are (positional index or keyword).
    stream_case: str | None = None
    stream_at: tuple[int | str, int | str] = ("seed", "offset")
    noisy_outputs: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.name


def run(fn: Callable[..., Any], s: Sample, device: torch.device | str) -> tuple[Tensor, ...]:
    """fn on ``device`` (tensors in args and kwargs moved there), outputs back on the CPU as a tuple."""
    out = fn(*to_device(list(s.args), device), **to_device(s.kwargs, device))
    return tuple(t.cpu() for t in (out if isinstance(out, tuple) else (out,)))


def with_views(args: Sequence[Any], views: Sequence[View]) -> tuple[Any, ...]:
    return tuple(a if (v is None or a is None) else v(a) for a, v in zip(args, views, strict=True))


def _registered(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(torch.ops.fpl_fast, name)(*args, **kwargs)

    call.__name__ = name
    return call


# Bad per-client stream lists: (value, message pattern after "seed " / "offset "), for K = 2 and K = 3 clients.
BAD_STREAMS: dict[int, dict[str, tuple[Any, str]]] = {
    2: {
        "too_short": ([1], r"must be a list of 2 integers \(one stream per client\), got \[1\]"),
        "too_long": ([1, 2, 3], r"must be a list of 2 integers \(one stream per client\), got \[1, 2, 3\]"),
        "empty": ([], r"must be a list of 2 integers \(one stream per client\), got \[\]"),
        "an_int": (5, r"must be a list of 2 integers \(one stream per client\), got 5"),
        "negative": ([1, -3], r"entries must be integers in \[0, 2\^63\), got -3"),
        "too_big": ([1, 2**63], r"entries must be integers in \[0, 2\^63\), got 9223372036854775808"),
        "float": ([1, 2.0], r"entries must be integers in \[0, 2\^63\), got 2.0"),
        "bool": ([True, 1], r"entries must be integers in \[0, 2\^63\), got True"),
    },
    3: {
        "too_short": ([1, 2], r"must be a list of 3 integers \(one stream per client\), got \[1, 2\]"),
        "too_long": ([0] * 4, r"must be a list of 3 integers \(one stream per client\), got \[0, 0, 0, 0\]"),
        "an_int": (0, r"must be a list of 3 integers \(one stream per client\), got 0"),
        "negative": ([0, -1, 0], r"entries must be integers in \[0, 2\^63\), got -1"),
        "too_big": ([0, 0, 2**64], r"entries must be integers in \[0, 2\^63\), got 18446744073709551616"),
        "float": ([0.5, 0, 0], r"entries must be integers in \[0, 2\^63\), got 0.5"),
        "bool": ([0, False, 0], r"entries must be integers in \[0, 2\^63\), got False"),
    },
}


# ==============================================================================================
# lowrank_prompt and lowrank_prompt_backward
# ==============================================================================================
N_CLS, P_CTX, P_D, P_S = 5, 3, 7, 4  # odd sizes on purpose

# Per input: an int is its client dimension K; None / "plain" means no K ("res": None means no residual at all).
# "r" is the rank, None for no u, v.
PROMPT_CASES: dict[str, dict[str, Any]] = {
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


def prompt_dims(case: str) -> tuple[int, int]:
    """(n_ctx, d) of a case."""
    return PROMPT_CASES[case].get("n_ctx", P_CTX), PROMPT_CASES[case].get("d", P_D)


def _shape(k: Any, *rest: int) -> tuple[int, ...]:
    return tuple(rest) if k in (None, "plain") else (k, *rest)


def prompt_inputs(case: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Tensor | None]:
    """(prefix, suffix, g, u, v, residual) on the CPU for one PROMPT_CASES entry."""
    c = PROMPT_CASES[case]
    n_ctx, d = prompt_dims(case)
    prefix = make(N_CLS, 1, d, dtype=dtype, seed=seed)
    suffix = make(N_CLS, P_S, d, dtype=dtype, seed=seed + 1)
    g = make(*_shape(c["g"], n_ctx, d), dtype=dtype, seed=seed + 2)
    u = v = res = None
    if c["r"] is not None:
        u = make(*_shape(c["uv"], n_ctx, c["r"]), dtype=dtype, seed=seed + 3)
        v = make(*_shape(c["uv"], c["r"], d), dtype=dtype, seed=seed + 4)
    if c["res"] is not None:
        res = make(*_shape(c["res"], n_ctx, d), dtype=dtype, seed=seed + 5)
    return [prefix, suffix, g, u, v, res]


def prompt_out_shape(case: str) -> tuple[int, ...]:
    c = PROMPT_CASES[case]
    ks = {k for k in (c["g"], c["uv"] if c["r"] else None, c["res"]) if isinstance(k, int)}
    n_ctx, d = prompt_dims(case)
    L = 1 + n_ctx + P_S
    return (ks.pop(), N_CLS, L, d) if ks else (N_CLS, L, d)


def _prompt_check(case: str, dtype: torch.dtype, s: Sample, out: tuple[Tensor, ...]) -> None:
    assert out[0].shape == prompt_out_shape(case)


def _prompt_bad() -> dict[str, BadInput]:
    p, s, g, u, v, _ = prompt_inputs("fedpgp_per_client")
    cases = {
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
    return {k: BadInput(a, {}, m) for k, (a, m) in cases.items()}


def _prompt_gradcheck() -> dict[str, tuple[Any, ...]]:
    """Tiny float64 leaves: 2 classes, 2 context tokens, width 3, suffix 2."""
    out = {}
    for case in ("fedpgp_per_client", "mixed_shared_g_and_uv", "dpfpl_plain_rank1"):
        c = PROMPT_CASES[case]
        gen = torch.Generator().manual_seed(3)
        k = {key: c[key] if not isinstance(c[key], int) else 2 for key in ("g", "uv", "res")}

        def t(*shape: int, gen: torch.Generator = gen) -> Tensor:
            return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

        r = c["r"]
        out[case] = (
            t(2, 1, 3),
            t(2, 2, 3),
            t(*_shape(k["g"], 2, 3)),
            None if r is None else t(*_shape(k["uv"], 2, r)),
            None if r is None else t(*_shape(k["uv"], r, 3)),
            None if c["res"] is None else t(*_shape(k["res"], 2, 3)),
        )
    return out


def _prompt_compile(device: torch.device) -> CompileCase:
    args = to_device(prompt_inputs("mixed_shared_g_and_uv"), device)
    w = to_device(make(*prompt_out_shape("mixed_shared_g_and_uv"), seed=6), device)

    def loss(prefix: Tensor, suffix: Tensor, g: Tensor, u: Tensor, v: Tensor, res: Tensor) -> Tensor:
        return (ops.lowrank_prompt(prefix, suffix, g, u, v, res) * w).sum()

    return CompileCase(loss, tuple(args), backward=True)


def prompt_backward_sample(case: str, dtype: torch.dtype, seed: int = 11) -> Sample:
    """(grad_out, u, v, n_ctx) of lowrank_prompt_backward for one PROMPT_CASES entry."""
    _, _, _, u, v, _ = prompt_inputs(case, dtype)
    return Sample((make(*prompt_out_shape(case), dtype=dtype, seed=seed), u, v, prompt_dims(case)[0]))


def _prompt_backward_bad() -> dict[str, BadInput]:
    grad_out = make(N_CLS, 1 + P_CTX + P_S, P_D)
    return {
        "n_ctx_too_big": BadInput((grad_out, None, None, 1 + P_CTX + P_S), {}, "n_ctx"),
        "grad_out_2d": BadInput((grad_out[0], None, None, P_CTX), {}, "grad_out"),
    }


# ==============================================================================================
# lowrank_factorize
# ==============================================================================================
F_CTX, F_D = 6, 11  # odd sizes
F_SEED, F_OFFSET = 7, 3  # client k's stream: client_streams(K, F_SEED, F_OFFSET)[.][k]
F32_FACTORIZE_TOL = {"rtol": 1e-4, "atol": 1e-4}  # Gram-Schmidt amplifies rounding by the conditioning of L V0

# K: client dim (None: none); r: rank.
FACTORIZE_CASES: dict[str, dict[str, Any]] = {
    "K3_r2": {"K": 3, "r": 2},
    "plain_r4": {"K": None, "r": 4},
    "K1_rank1": {"K": 1, "r": 1},
    "full_rank": {"K": 2, "r": F_CTX},
    "paper_shape": {"K": 2, "r": 8, "n_ctx": 16, "d": 512},
}


def factorize_dims(case: str) -> tuple[int, int]:
    return FACTORIZE_CASES[case].get("n_ctx", F_CTX), FACTORIZE_CASES[case].get("d", F_D)


def factorize_streams(case: str) -> list[list[int]]:
    """[seeds, offsets]: distinct per-client streams of a case."""
    return list(client_streams(FACTORIZE_CASES[case]["K"], F_SEED, F_OFFSET))


def factorize_l(case: str, dtype: torch.dtype = torch.float32) -> Tensor:
    c = FACTORIZE_CASES[case]
    lead = () if c["K"] is None else (c["K"],)
    return make(*lead, *factorize_dims(case), dtype=dtype, seed=1)


def factorize_sample(case: str, dtype: torch.dtype) -> Sample:
    return Sample((factorize_l(case, dtype), FACTORIZE_CASES[case]["r"], *factorize_streams(case)))


def factorize_tol(dtype: torch.dtype) -> dict[str, float]:
    return TOL[dtype] if dtype == torch.float64 else F32_FACTORIZE_TOL


def orthonormal_checks(u: Tensor, v: Tensor, res: Tensor, lmat: Tensor, tol: dict[str, float]) -> None:
    """U^T U = I, V V^T = I and U V + R = L."""
    r = u.shape[-1]
    eye = torch.eye(r, dtype=u.dtype).expand(*u.shape[:-2], r, r)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, eye, **tol, msg=lambda m: f"U^T U != I: {m}")
    torch.testing.assert_close(v @ v.transpose(-1, -2), eye, **tol, msg=lambda m: f"V V^T != I: {m}")
    torch.testing.assert_close(u @ v + res, lmat, **tol, msg=lambda m: f"U V + R != L: {m}")


def _factorize_check(case: str, dtype: torch.dtype, s: Sample, out: tuple[Tensor, ...]) -> None:
    u, v, res = out
    lmat = s.args[0]
    c = FACTORIZE_CASES[case]
    lead = () if c["K"] is None else (c["K"],)
    n_ctx, d = factorize_dims(case)
    assert u.shape == (*lead, n_ctx, c["r"]) and v.shape == (*lead, c["r"], d) and res.shape == lmat.shape
    orthonormal_checks(u, v, res, lmat, factorize_tol(dtype))


def _factorize_bad() -> dict[str, BadInput]:
    lmat = factorize_l("K3_r2")
    ok = [[0] * 3, [0] * 3]
    out = {
        "l_1d": BadInput((lmat[0, 0], 1, [0], [0]), {}, r"\bl\b"),
        "l_4d": BadInput((lmat.unsqueeze(0), 1, *ok), {}, r"\bl\b"),
        "l_int": BadInput((lmat.long(), 1, *ok), {}, r"\bl\b"),
        "rank_0": BadInput((lmat, 0, *ok), {}, "rank"),
        "rank_negative": BadInput((lmat, -1, *ok), {}, "rank"),
        "rank_too_big": BadInput((lmat, F_CTX + 1, *ok), {}, "rank"),
    }
    for i, key in enumerate(("seed", "offset")):
        for name, (value, pattern) in BAD_STREAMS[3].items():
            lists = [value if i == j else ok[j] for j in range(2)]
            out[f"{key}_{name}"] = BadInput((lmat, 2, *lists), {}, f"^{key} {pattern}")
    return out


def _factorize_compile(device: torch.device) -> CompileCase:
    def step(lmat: Tensor, offset: int) -> Tensor:
        u, v, res = ops.lowrank_factorize(lmat, 2, [F_SEED, F_SEED + 1, F_SEED], [offset, offset, offset + 1])
        return u @ v + res

    return CompileCase(step, (factorize_l("K3_r2").to(device), F_OFFSET))


def _factorize_launch(case: str, dtype: torch.dtype) -> Sample:
    return Sample((make(3, F_CTX, F_D, dtype=dtype, seed=8), 3, *client_streams(3, F_SEED, F_OFFSET)))


# ==============================================================================================
# lowrank_full_grad
# ==============================================================================================
G_CTX, G_D = 5, 9  # odd sizes

# K: client dim (None: none); r: rank; scale.
FULL_GRAD_CASES: dict[str, dict[str, Any]] = {
    "K3_r2": {"K": 3, "r": 2, "scale": 0.1},
    "plain_r3": {"K": None, "r": 3, "scale": -2.5},
    "K1_rank1": {"K": 1, "r": 1, "scale": 0.1},
    "full_rank_scale0": {"K": 2, "r": G_CTX, "scale": 0.0},
    "paper_shape": {"K": 2, "r": 8, "scale": 0.1, "n_ctx": 16, "d": 512},
}


def full_grad_dims(case: str) -> tuple[int, int]:
    return FULL_GRAD_CASES[case].get("n_ctx", G_CTX), FULL_GRAD_CASES[case].get("d", G_D)


def full_grad_inputs(case: str, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """(grad_u, grad_v, u, v) on the CPU."""
    c = FULL_GRAD_CASES[case]
    lead = () if c["K"] is None else (c["K"],)
    r = c["r"]
    n_ctx, d = full_grad_dims(case)
    return [
        make(*lead, n_ctx, r, dtype=dtype, seed=1),
        make(*lead, r, d, dtype=dtype, seed=2),
        make(*lead, n_ctx, r, dtype=dtype, seed=3),
        make(*lead, r, d, dtype=dtype, seed=4),
    ]


def full_grad_sample(case: str, dtype: torch.dtype) -> Sample:
    return Sample((*full_grad_inputs(case, dtype), FULL_GRAD_CASES[case]["scale"]))


def _full_grad_bad() -> dict[str, BadInput]:
    gu, gv, u, v = full_grad_inputs("K3_r2")
    cases = {
        "scale_nan": ((gu, gv, u, v, math.nan), "scale"),
        "scale_inf": ((gu, gv, u, v, math.inf), "scale"),
        "u_1d": ((gu[0, 0], gv, u[0, 0], v, 0.1), r"\bu\b"),
        "u_4d": ((gu, gv, u.unsqueeze(0), v, 0.1), r"\bu\b"),
        "grad_u_wrong_shape": ((gu[:, :-1], gv, u, v, 0.1), "grad_u"),
        "grad_u_unbatched": ((gu[0], gv, u, v, 0.1), "grad_u"),
        "v_wrong_rank": ((gu, gv, u, v[:, :1], 0.1), r"\bv\b"),
        "v_wrong_K": ((gu, gv, u, v[:2], 0.1), r"\bv\b"),
        "grad_v_wrong_shape": ((gu, gv[..., :-1], u, v, 0.1), "grad_v"),
        "grad_v_dtype": ((gu, gv.double(), u, v, 0.1), "grad_v"),
        "v_dtype": ((gu, gv, u, v.double(), 0.1), r"\bv\b"),
    }
    return {k: BadInput(a, {}, m) for k, (a, m) in cases.items()}


def _full_grad_gradcheck() -> dict[str, tuple[Any, ...]]:
    out = {}
    for case in ("K3_r2", "plain_r3"):
        gen = torch.Generator().manual_seed(5)
        lead = () if FULL_GRAD_CASES[case]["K"] is None else (2,)
        r = FULL_GRAD_CASES[case]["r"]
        shapes = [(*lead, 3, r), (*lead, r, 4), (*lead, 3, r), (*lead, r, 4)]
        xs = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True) for s in shapes]
        out[case] = (*xs, 0.7)
    return out


def _full_grad_compile(device: torch.device) -> CompileCase:
    """The fused SGD-style update: L <- L - lr * g_L, compiled with the custom op inside."""
    gu, gv, u, v = to_device(full_grad_inputs("K3_r2"), device)

    def sgd(lmat: Tensor, gu: Tensor, gv: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return lmat - 0.01 * ops.lowrank_full_grad(gu, gv, u, v, 0.1)

    return CompileCase(sgd, (make(3, G_CTX, G_D, seed=8).to(device), gu, gv, u, v))


# ==============================================================================================
# dp_lowrank_clip_noise
# ==============================================================================================
DP_CTX, DP_D = 3, 7  # odd sizes
DP_SEED, DP_OFFSET = 1234, 17  # client k's stream: client_streams(K, DP_SEED, DP_OFFSET)[.][k]
DP_CLIP, DP_SIGMA = 3.0, 0.7

# K: client dim (None: none); b: batch; r: rank (None: fedotp, no u/v); n_cls: sum_classes input; kw: op options;
# "table": clip_norm is a (K, 3) tensor of distinct clip norms per client and quantity (dp_clip_table).
DP_CASES: dict[str, dict[str, Any]] = {
    "joint_K2": {"K": 2, "b": 5, "r": 2, "n_cls": None, "kw": {}},
    "separate_K2": {"K": 2, "b": 5, "r": 2, "n_cls": None, "kw": {"joint_uv": False}},
    "batch_mean": {"K": 2, "b": 5, "r": 2, "n_cls": None, "kw": {"per_sample": False}},
    "sum_classes": {"K": 2, "b": 3, "r": 2, "n_cls": 3, "kw": {"sum_classes": True}},
    "full_local_no_uv": {"K": 3, "b": 4, "r": None, "n_cls": None, "kw": {}},
    "plain_b1": {"K": None, "b": 1, "r": 2, "n_cls": None, "kw": {}},
    "empty_b": {"K": 2, "b": 0, "r": 2, "n_cls": None, "kw": {}},
    "empty_b_batch_mean": {"K": 1, "b": 0, "r": 2, "n_cls": None, "kw": {"per_sample": False}},
    "rank1_expected_batch": {"K": 2, "b": 4, "r": 1, "n_cls": None, "kw": {"expected_batch_size": 7.5}},
    "no_clip_inf": {"K": 1, "b": 3, "r": 2, "n_cls": None, "kw": {"clip_norm": math.inf, "noise_multiplier": 0.0}},
    # Per-client clip norms, one per quantity, in every mode; automatic clipping (normalize).
    "table_joint": {"K": 3, "b": 5, "r": 2, "n_cls": None, "kw": {}, "table": True},
    "table_separate": {"K": 3, "b": 5, "r": 2, "n_cls": None, "kw": {"joint_uv": False}, "table": True},
    "table_batch_mean": {"K": 3, "b": 5, "r": 2, "n_cls": None, "kw": {"per_sample": False}, "table": True},
    "table_batch_separate": {
        "K": 2,
        "b": 4,
        "r": 2,
        "n_cls": None,
        "kw": {"per_sample": False, "joint_uv": False},
        "table": True,
    },  # fmt: skip
    "table_sum_classes": {
        "K": 2,
        "b": 3,
        "r": 2,
        "n_cls": 3,
        "kw": {"sum_classes": True, "joint_uv": False},
        "table": True,
    },  # fmt: skip
    "table_fedotp": {"K": 3, "b": 4, "r": None, "n_cls": None, "kw": {}, "table": True},
    "table_fedotp_batch_mean": {"K": 2, "b": 4, "r": None, "n_cls": None, "kw": {"per_sample": False}, "table": True},
    "table_plain": {"K": None, "b": 3, "r": 2, "n_cls": None, "kw": {"joint_uv": False}, "table": True},
    "table_wide": {
        "K": 2,
        "b": 11,
        "r": 5,
        "n_cls": None,
        "kw": {"joint_uv": False},
        "n_ctx": 6,
        "d": 53,
        "table": True,
    },
    "normalize_joint": {"K": 3, "b": 5, "r": 2, "n_cls": None, "kw": {"normalize": True}, "table": True},
    "normalize_separate_wide": {
        "K": 2,
        "b": 9,
        "r": 3,
        "n_cls": None,
        "kw": {"normalize": True, "joint_uv": False, "stability": 0.5},
        "n_ctx": 6,
        "d": 53,
        "table": True,
    },  # fmt: skip
    "normalize_fedotp_sum_classes": {
        "K": 2,
        "b": 4,
        "r": None,
        "n_cls": 2,
        "kw": {"normalize": True, "sum_classes": True},
        "table": True,
    },  # fmt: skip
    "normalize_scalar_clip": {"K": 2, "b": 5, "r": 2, "n_cls": None, "kw": {"normalize": True}},
    "normalize_vector_rank10": {
        "K": 2,
        "b": 9,
        "r": 10,
        "n_cls": None,
        "kw": {"normalize": True},
        "n_ctx": 12,
        "d": 64,
        "table": True,
    },  # fmt: skip
    # Wider, and b > 8: the CPU kernel's SIMD main loops, 4-row blocks and several sample chunks per client run.
    "wide_many_samples": {"K": 2, "b": 11, "r": 5, "n_cls": None, "kw": {}, "n_ctx": 6, "d": 53},
    "wide_sum_classes_fedotp": {"K": 2, "b": 9, "r": None, "n_cls": 2, "kw": {"sum_classes": True}, "d": 53},
    # Widths that are multiples of 16 bytes: the CUDA kernels' vector loads; r > 8: their rank loop in chunks.
    "vector_rank10": {"K": 2, "b": 9, "r": 10, "n_cls": None, "kw": {}, "n_ctx": 12, "d": 64},
    "vector_separate_b1": {"K": 1, "b": 1, "r": 3, "n_cls": None, "kw": {"joint_uv": False}, "n_ctx": 2, "d": 64},
    "paper_width": {"K": 2, "b": 3, "r": 8, "n_cls": None, "kw": {}, "n_ctx": 4, "d": 768},
}


def dp_dims(case: str) -> tuple[int, int]:
    return DP_CASES[case].get("n_ctx", DP_CTX), DP_CASES[case].get("d", DP_D)


def dp_inputs(case: str, dtype: torch.dtype = torch.float32, seed: int = 0, *, K: int | None = None) -> list[Any]:
    """(grad, u, v) on the CPU; per-sample gradient scales are spread so that some samples get clipped.
    ``K`` overrides the case's client count."""
    c = DP_CASES[case] if K is None else {**DP_CASES[case], "K": K}
    lead = () if c["K"] is None else (c["K"],)
    mid = () if c["n_cls"] is None else (c["n_cls"],)
    n_ctx, d = dp_dims(case)
    grad = make(*lead, c["b"], *mid, n_ctx, d, dtype=torch.float64, seed=seed)
    spread = 0.1 + 0.6 * torch.arange(c["b"], dtype=torch.float64)  # sample i scaled by 0.1 + 0.6 i
    grad = (grad * spread.view(-1, *([1] * (grad.dim() - len(lead) - 1)))).to(dtype)
    if c["r"] is None:
        return [grad, None, None]
    u = make(*lead, n_ctx, c["r"], dtype=dtype, seed=seed + 1)
    v = make(*lead, c["r"], d, dtype=dtype, seed=seed + 2, scale=0.5)
    return [grad, u, v]


def dp_clip_table(K: int | None) -> Tensor:
    """(K, 3) float64 clip norms ((3,) for K None), distinct per client and quantity, spread around DP_CLIP from
    0.25 to 2 times it so that each clips some samples of dp_inputs and leaves others."""
    n = 1 if K is None else K
    idx = torch.arange(n * 3, dtype=torch.float64).view(n, 3)
    table = DP_CLIP * (0.25 + torch.remainder(0.37 * idx + 0.11, 1.75))
    return table[0] if K is None else table


def dp_kwargs(case: str, K: int | None = None, **over: Any) -> dict[str, Any]:
    """The op's keyword arguments: the case's options, distinct per-client streams (and clip norms for a "table"
    case), then ``over``. ``K`` overrides the case's client count."""
    c = DP_CASES[case]
    n_clients = c["K"] if K is None else K
    seeds, offsets = client_streams(n_clients, DP_SEED, DP_OFFSET)
    kw: dict[str, Any] = {"clip_norm": DP_CLIP, "noise_multiplier": DP_SIGMA, "seed": seeds, "offset": offsets}
    if c.get("table"):
        kw["clip_norm"] = dp_clip_table(n_clients)
    kw.update(c["kw"])
    kw.update(over)
    return kw


def dp_sample(case: str, dtype: torch.dtype) -> Sample:
    return Sample(tuple(dp_inputs(case, dtype)), dp_kwargs(case))


def _dp_schema(s: Sample) -> tuple[Any, ...]:
    kw = s.kwargs
    return (
        *s.args,
        reference.dp_clip_norms(kw["clip_norm"], s.args[0], kw.get("sum_classes", False)),
        kw["noise_multiplier"],
        kw["seed"],
        kw["offset"],
        kw.get("expected_batch_size", 0.0),
        kw.get("joint_uv", True),
        kw.get("per_sample", True),
        kw.get("sum_classes", False),
        kw.get("normalize", False),
        kw.get("stability", 0.01),
    )


def _dp_check(case: str, dtype: torch.dtype, s: Sample, out: tuple[Tensor, ...]) -> None:
    assert out[3].dtype == torch.float32


def _dp_bad() -> dict[str, BadInput]:
    grad, u, v = dp_inputs("joint_K2")
    ok = dp_kwargs("joint_K2")
    xs = (grad, u, v)
    out = {
        "clip_negative": BadInput(xs, {**ok, "clip_norm": -1.0}, "clip_norm"),
        "clip_zero": BadInput(xs, {**ok, "clip_norm": 0.0}, "clip_norm"),
        "clip_nan": BadInput(xs, {**ok, "clip_norm": math.nan}, "clip_norm"),
        "clip_inf_with_noise": BadInput(xs, {**ok, "clip_norm": math.inf}, "^clip_norm entries must be finite when"),
        "clip_table_wrong_K": BadInput(
            xs, {**ok, "clip_norm": dp_clip_table(3)}, r"^clip_norm must have shape \(2, 3\)"
        ),
        "clip_table_two_columns": BadInput(
            xs, {**ok, "clip_norm": dp_clip_table(2)[:, :2]}, "^clip_norm must have shape"
        ),
        "clip_table_3d": BadInput(xs, {**ok, "clip_norm": dp_clip_table(2)[..., None]}, "^clip_norm must have shape"),
        "clip_table_unbatched_for_batched_grad": BadInput(
            xs, {**ok, "clip_norm": dp_clip_table(None)}, "^clip_norm must have shape"
        ),
        "clip_table_negative_entry": BadInput(
            xs, {**ok, "clip_norm": -dp_clip_table(2)}, "^clip_norm entries must be > 0"
        ),
        "clip_table_zero_entry": BadInput(
            xs, {**ok, "clip_norm": dp_clip_table(2).index_fill(1, torch.tensor([1]), 0.0)}, "^clip_norm entries"
        ),
        "clip_table_nan_entry": BadInput(
            xs, {**ok, "clip_norm": dp_clip_table(2).index_fill(0, torch.tensor([1]), math.nan)}, "^clip_norm entries"
        ),
        "clip_table_inf_with_noise": BadInput(
            xs,
            {**ok, "clip_norm": dp_clip_table(2).index_fill(1, torch.tensor([2]), math.inf)},
            "^clip_norm entries must be finite when noise_multiplier > 0",
        ),
        "normalize_batch_mean": BadInput(xs, {**ok, "normalize": True, "per_sample": False}, "^normalize=True"),
        "normalize_inf_clip": BadInput(
            xs,
            {**ok, "normalize": True, "noise_multiplier": 0.0, "clip_norm": math.inf},
            "^clip_norm entries must be finite with normalize",
        ),
        "stability_zero": BadInput(xs, {**ok, "normalize": True, "stability": 0.0}, "^stability must be"),
        "stability_negative": BadInput(xs, {**ok, "normalize": True, "stability": -0.1}, "^stability must be"),
        "stability_nan": BadInput(xs, {**ok, "normalize": True, "stability": math.nan}, "^stability must be"),
        "stability_inf": BadInput(xs, {**ok, "normalize": True, "stability": math.inf}, "^stability must be"),
        "sigma_negative": BadInput(xs, {**ok, "noise_multiplier": -0.1}, "noise_multiplier"),
        "sigma_nan": BadInput(xs, {**ok, "noise_multiplier": math.nan}, "noise_multiplier"),
        "sigma_inf": BadInput(xs, {**ok, "noise_multiplier": math.inf}, "noise_multiplier"),
        "ebs_negative": BadInput(xs, {**ok, "expected_batch_size": -2.0}, "expected_batch_size"),
        "ebs_nan": BadInput(xs, {**ok, "expected_batch_size": math.nan}, "expected_batch_size"),
        "grad_2d": BadInput((grad[0, 0], None, None), ok, "grad"),
        "grad_5d_without_sum_classes": BadInput((grad.unsqueeze(2).unsqueeze(0), None, None), ok, "grad"),
        "grad_int": BadInput((grad.long(), None, None), ok, "grad"),
        "u_without_v": BadInput((grad, u, None), ok, r"\bu\b"),
        "v_without_u": BadInput((grad, None, v), ok, r"\bv\b"),
        "u_unbatched_for_batched_grad": BadInput((grad, u[0], v), ok, r"\bu\b"),
        "u_wrong_rows": BadInput((grad, u[:, :-1], v), ok, r"\bu\b"),
        "u_wrong_K": BadInput((grad, u[:1], v), ok, r"\bu\b"),
        "v_wrong_width": BadInput((grad, u, v[..., :-1]), ok, r"\bv\b"),
        "v_wrong_rank": BadInput((grad, u, v[:, :1]), ok, r"\bv\b"),
        "u_dtype_mismatch": BadInput((grad, u.double(), v), ok, r"\bu\b"),
        "v_dtype_mismatch": BadInput((grad, u, v.double()), ok, r"\bv\b"),
    }
    for key in ("seed", "offset"):
        for name, (value, pattern) in BAD_STREAMS[2].items():
            out[f"{key}_{name}"] = BadInput(xs, {**ok, key: value}, f"^{key} {pattern}")
    return out


def _dp_compile(device: torch.device) -> CompileCase:
    grad, u, v = to_device(dp_inputs("joint_K2"), device)

    def step(grad: Tensor, u: Tensor, v: Tensor, seed: int) -> tuple[Tensor, ...]:
        return ops.dp_lowrank_clip_noise(
            grad, u, v, clip_norm=DP_CLIP, noise_multiplier=DP_SIGMA, seed=[seed, seed + 1], offset=[3, 0]
        )

    return CompileCase(step, (grad, u, v, 5), exact=True)


def _dp_launch(case: str, dtype: torch.dtype) -> Sample:
    return Sample(tuple(dp_inputs(case, dtype, K=3)), dp_kwargs(case, K=3))


# ==============================================================================================
# dp_output_clip_noise
# ==============================================================================================
O_SEED, O_OFFSET = 4321, 29
O_SCALE, O_SIGMA = 20.0, 0.9

# K clients, b examples, n_cls classes, width D; clip: "some" (clips some examples), "none" (C above every norm),
# "inf" (no clipping); mask: padding rows.
OUTPUT_CASES: dict[str, dict[str, Any]] = {
    "K3_mask": {"K": 3, "b": 6, "n_cls": 5, "D": 37, "clip": "some", "mask": True},
    "K3_none_clipped": {"K": 3, "b": 5, "n_cls": 7, "D": 19, "clip": "none", "mask": False},
    "K1": {"K": 1, "b": 4, "n_cls": 3, "D": 11, "clip": "some", "mask": True},
    # Widths and sizes that run the CPU kernel's vector main loops, register blocks and their tails.
    "wide": {"K": 2, "b": 11, "n_cls": 13, "D": 101, "clip": "some", "mask": True},
    "vector_width": {"K": 2, "b": 9, "n_cls": 17, "D": 128, "clip": "some", "mask": False},
    "paper_width": {"K": 2, "b": 8, "n_cls": 10, "D": 512, "clip": "some", "mask": True},
    "one_class_b1": {"K": 2, "b": 1, "n_cls": 1, "D": 8, "clip": "none", "mask": False},
    "empty_b": {"K": 2, "b": 0, "n_cls": 4, "D": 16, "clip": "some", "mask": False},
}


def output_inputs(case: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Any]:
    """(image_feats, text_feats, labels, mask) on the CPU; the last row of every client is padding (mask 0)."""
    c = OUTPUT_CASES[case]
    K, b, n_cls, D = c["K"], c["b"], c["n_cls"], c["D"]
    x = make(K, b, D, dtype=torch.float64, seed=seed) * (1.0 + torch.arange(b, dtype=torch.float64)).view(1, b, 1)
    t = make(K, n_cls, D, dtype=torch.float64, seed=seed + 1, scale=0.3)
    labels = torch.randint(0, n_cls, (K, b), generator=torch.Generator().manual_seed(seed + 2))
    mask = None
    if c["mask"]:
        mask = torch.ones(K, b, dtype=dtype)
        mask[:, -1] = 0.0
        x[:, -1] = 0.0  # a padding row holds a zero feature, as a padded Poisson batch does
    return [x.to(dtype), t.to(dtype), labels, mask]


def output_clip(case: str) -> Tensor:
    """(K,) clip norms: per client the median of its real examples' norms ("some": clips about half of them), far
    above every norm ("none"), or inf."""
    c = OUTPUT_CASES[case]
    kind = c["clip"]
    if kind == "inf":
        return torch.full((c["K"],), math.inf)
    if kind == "none":
        return torch.full((c["K"],), 1e6)
    x, t, labels, mask = output_inputs(case, torch.float64)
    ones = torch.ones(c["K"])
    seeds, offsets = client_streams(c["K"], O_SEED, O_OFFSET)
    _, norms, _ = reference.dp_output_clip_noise(x, t, labels, mask, O_SCALE, ones, 0.0, seeds, offsets, 1.0)
    live = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask.bool()
    return torch.stack(
        [n[m].median() if m.any() else torch.tensor(1.0) for n, m in zip(norms, live, strict=True)]
    ).clamp(min=1e-3)


def output_kwargs(case: str, **over: Any) -> dict[str, Any]:
    c = OUTPUT_CASES[case]
    seeds, offsets = client_streams(c["K"], O_SEED, O_OFFSET)
    kw: dict[str, Any] = {
        "logit_scale": O_SCALE,
        "clip_norm": output_clip(case),
        "noise_multiplier": O_SIGMA,
        "seed": seeds,
        "offset": offsets,
        "denominator": max(c["b"], 1) + 0.5,
    }
    kw.update(over)
    return kw


def output_sample(case: str, dtype: torch.dtype) -> Sample:
    """A case, optionally ":no_noise" (sigma = 0) or ":inf_clip" (C = inf without noise: the plain sum / denom)."""
    base, _, variant = case.partition(":")
    over: dict[str, Any] = {}
    if variant == "no_noise":
        over = {"noise_multiplier": 0.0}
    elif variant == "inf_clip":
        over = {"clip_norm": torch.full((OUTPUT_CASES[base]["K"],), math.inf), "noise_multiplier": 0.0}
    return Sample(tuple(output_inputs(base, dtype)), output_kwargs(base, **over))


def _output_schema(s: Sample) -> tuple[Any, ...]:
    kw = s.kwargs
    return (
        *s.args,
        kw["logit_scale"],
        kw["clip_norm"],
        kw["noise_multiplier"],
        kw["seed"],
        kw["offset"],
        kw["denominator"],
    )


def _output_check(case: str, dtype: torch.dtype, s: Sample, out: tuple[Tensor, ...]) -> None:
    assert out[0].dtype == dtype and out[1].dtype == out[2].dtype == torch.float32
    if case.endswith(":inf_clip"):
        assert torch.isfinite(out[0]).all()


def _output_bad() -> dict[str, BadInput]:
    """The key phrase the message starts with (the values after "got" are formatted by Python or by c10)."""
    x, t, labels, mask = output_inputs("K3_mask")
    ok, xs = output_kwargs("K3_mask"), (x, t, labels, mask)
    cases: dict[str, tuple[tuple[Any, ...], dict[str, Any], str]] = {
        "sigma_negative": (xs, {**ok, "noise_multiplier": -1.0}, "noise_multiplier must be finite and >= 0"),
        "sigma_nan": (xs, {**ok, "noise_multiplier": math.nan}, "noise_multiplier must be finite and >= 0"),
        "scale_zero": (xs, {**ok, "logit_scale": 0.0}, "logit_scale must be finite and > 0"),
        "scale_inf": (xs, {**ok, "logit_scale": math.inf}, "logit_scale must be finite and > 0"),
        "denominator_zero": (xs, {**ok, "denominator": 0.0}, "denominator must be finite and > 0"),
        "denominator_nan": (xs, {**ok, "denominator": math.nan}, "denominator must be finite and > 0"),
        "image_2d": ((x[0], t, labels, mask), ok, r"image_feats must be 3-D \(K, b, D\)"),
        "text_2d": ((x, t[0], labels, mask), ok, r"text_feats must be 3-D \(K, n_cls, D\)"),
        "text_int": ((x.long(), t.long(), labels, mask), ok, "text_feats must be floating point"),
        "image_dtype": ((x.double(), t, labels, mask), ok, "image_feats must have dtype"),
        "text_K": ((x, t[:2], labels, mask), ok, r"text_feats must be \(3, n_cls, 37\) to match image_feats"),
        "text_D": ((x, t[..., :-1], labels, mask), ok, r"text_feats must be \(3, n_cls, 37\) to match image_feats"),
        "no_classes": ((x, t[:, :0], labels, mask), ok, "text_feats must hold at least one class"),
        "labels_int32": ((x, t, labels.int(), mask), ok, "labels must have dtype"),
        "labels_shape": ((x, t, labels[:, :-1], mask), ok, r"labels must have shape \(3, 6\) to match image_feats"),
        "labels_range_high": (
            (x, t, labels.index_fill(1, torch.tensor([2]), 5), mask),
            ok,
            r"labels must lie in \[0, 5\)",
        ),
        "labels_negative": ((x, t, labels - 10, mask), ok, r"labels must lie in \[0, 5\)"),
        "mask_dtype": ((x, t, labels, mask.double()), ok, "mask must have dtype"),
        "mask_shape": ((x, t, labels, mask[:, :-1]), ok, r"mask must have shape \(3, 6\) to match image_feats"),
        "clip_dtype": (xs, {**ok, "clip_norm": ok["clip_norm"].double()}, "clip_norm must have dtype"),
        "clip_shape": (
            xs,
            {**ok, "clip_norm": ok["clip_norm"][:2]},
            r"clip_norm must have shape \(3,\) \(one per client\)",
        ),
        "clip_zero": (xs, {**ok, "clip_norm": torch.tensor([1.0, 0.0, 2.0])}, r"clip_norm entries must be > 0"),
        "clip_nan": (xs, {**ok, "clip_norm": torch.tensor([1.0, math.nan, 0.1])}, r"clip_norm entries must be > 0"),
        "clip_inf_with_noise": (
            xs,
            {**ok, "clip_norm": torch.tensor([1.0, math.inf, 0.1])},
            r"clip_norm entries must be finite when noise_multiplier > 0",
        ),
        "seed_short": (xs, {**ok, "seed": [1, 2]}, "seed must be a list of 3 integers"),
        "offset_negative": (xs, {**ok, "offset": [1, -2, 3]}, r"offset entries must be integers in \[0, 2\^63\)"),
    }
    return {k: BadInput(a, kw, "^" + m) for k, (a, kw, m) in cases.items()}


def _output_compile(device: torch.device) -> CompileCase:
    clip = output_clip("K3_mask").to(device)

    def step(x: Tensor, t: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        return ops.dp_output_clip_noise(
            x, t, labels, mask, logit_scale=O_SCALE, clip_norm=clip, noise_multiplier=O_SIGMA, seed=[1, 2, 3],
            offset=[0, 5, 9], denominator=6.0,
        )  # fmt: skip

    return CompileCase(step, tuple(to_device(output_inputs("K3_mask"), device)), exact=True)


# ==============================================================================================
# nn_map
# ==============================================================================================
# (B, V, d, chunk): odd sizes, one query, chunk 1, chunk larger than V, chunk not dividing V; "allowed_mask"
# bans every third id and id 3.
NN_CASES: dict[str, tuple[int, int, int, int]] = {
    "odd": (37, 101, 13, 16),
    "single_query": (1, 50, 8, 7),
    "chunk1": (9, 23, 5, 1),
    "chunk_gt_V": (70, 40, 6, 4096),
    "many_rows": (150, 257, 4, 64),
    "allowed_mask": (9, 20, 6, 64),
}


def nn_sample(case: str, dtype: torch.dtype) -> Sample:
    """Random data (no near-ties at float64 precision)."""
    B, V, d, chunk = NN_CASES[case]
    y, emb = make(B, d, dtype=dtype, seed=1), make(V, d, dtype=dtype, seed=2)
    allowed = None
    if case == "allowed_mask":
        allowed = torch.arange(V) % 3 != 0
        allowed[3] = False
    return Sample((y, emb, allowed), {"chunk": chunk})


def brute_force(y: Tensor, emb: Tensor, allowed: Tensor | None = None) -> Tensor:
    """torch.cdist(...).argmin in float64, disallowed ids at +inf."""
    dist = torch.cdist(y.double(), emb.double())  # (B, V)
    if allowed is not None:
        dist[:, ~allowed] = float("inf")
    return dist.argmin(dim=1)


def _nn_check(case: str, dtype: torch.dtype, s: Sample, out: tuple[Tensor, ...]) -> None:
    assert out[0].dtype == torch.int64 and out[0].shape == (s.args[0].shape[0],)


def _nn_bad() -> dict[str, BadInput]:
    """The key phrase the message starts with (the values after "got" are formatted by Python or by c10)."""
    y, emb = make(3, 4), make(6, 4)
    cases = {
        "chunk0": ((y, emb, None, 0), r"chunk must be >= 1 \(vocabulary rows per block\)"),
        "y1d": ((y[0], emb, None, 8), r"y must be 2-D \(B, d\)"),
        "emb3d": ((y, emb[None], None, 8), r"emb must be 2-D \(V, d\)"),
        "int_y": ((y.long(), emb.long(), None, 8), "y must be floating point"),
        "dtype": ((y, emb.double(), None, 8), "emb must have dtype"),
        "width": ((y, make(6, 5), None, 8), "emb must have width 4 to match y"),
        "allowed_shape": ((y, emb, torch.ones(5, dtype=torch.bool), 8), r"allowed must be 1-D \(6,\) like emb's rows"),
        "allowed_dtype": ((y, emb, torch.ones(6), 8), "allowed must have dtype"),
        "none_allowed": ((y, emb, torch.zeros(6, dtype=torch.bool), 8), "nn_map needs at least one allowed id"),
        "empty_vocab": ((y, emb[:0], None, 8), "nn_map needs at least one allowed id"),
    }
    return {k: BadInput(a[:3], {"chunk": a[3]}, "^" + m) for k, (a, m) in cases.items()}


def _nn_compile(device: torch.device) -> CompileCase:
    y, emb = make(5, 4, dtype=torch.float64, seed=11), make(12, 4, dtype=torch.float64, seed=12)
    return CompileCase(
        lambda a, b: ops.nn_map(a, b, chunk=5),
        (y.to(device), emb.to(device)),
        exact=True,
        expect=lambda a, b: brute_force(a.cpu(), b.cpu()),
    )


# ==============================================================================================
# The table
# ==============================================================================================
_PROMPT_NONCONTIG = ((noncontig, noncontig, transposed, transposed, transposed, noncontig),)

OPS: tuple[OpInfo, ...] = (
    OpInfo(
        name="lowrank_prompt",
        op=ops.lowrank_prompt,
        ref=reference.lowrank_prompt,
        sample=lambda case, dtype: Sample(tuple(prompt_inputs(case, dtype))),
        cases=tuple(PROMPT_CASES),
        schema_args=lambda s: s.args,
        check=_prompt_check,
        noncontig_cases=("fedpgp_per_client", "mixed_shared_g_and_uv", "dpfpl_plain_rank1", "wide_per_client"),
        noncontig_views=_PROMPT_NONCONTIG,
        noncontig_bitwise=True,
        misaligned_cases=("vector_rank10", "paper_width_shared_g"),
        low_precision_cases=("fedpgp_per_client", "dpfpl_plain_rank1", "fedotp_shared_g", "wide_per_client"),
        bad_inputs=_prompt_bad,
        wrong_device=("fedpgp_per_client", 3, r"\bu\b"),
        opcheck_cases=("fedpgp_per_client", "mixed_shared_g_and_uv", "fedotp_shared_g"),
        opcheck_grad=True,
        compile=_prompt_compile,
        grad_cases=tuple(PROMPT_CASES),
        gradcheck=_prompt_gradcheck,
        gradgrad_cases=("fedpgp_per_client", "mixed_shared_g_and_uv", "promptfl_plain"),
    ),
    OpInfo(
        name="lowrank_prompt_backward",  # the op lowrank_prompt's autograd formula calls
        op=_registered("lowrank_prompt_backward"),
        ref=reference.lowrank_prompt_backward,
        sample=prompt_backward_sample,
        cases=("fedpgp_per_client", "mixed_shared_g_and_uv", "promptfl_plain", "wide_per_client"),
        schema_args=lambda s: s.args,
        has_face=False,
        noncontig_cases=("fedpgp_per_client",),
        noncontig_views=((noncontig, transposed, transposed, None),),
        low_precision_cases=("fedpgp_per_client",),
        low_precision_dtypes=(torch.bfloat16,),
        bad_inputs=_prompt_backward_bad,
        cpp_bad_inputs=("n_ctx_too_big", "grad_out_2d"),
        opcheck_cases=("fedpgp_per_client", "mixed_shared_g_and_uv", "fedotp_shared_g"),
    ),
    OpInfo(
        name="lowrank_factorize",
        op=ops.lowrank_factorize,
        ref=reference.lowrank_factorize,
        sample=factorize_sample,
        cases=tuple(FACTORIZE_CASES),
        schema_args=lambda s: s.args,
        tol=factorize_tol,
        check=_factorize_check,
        noncontig_cases=("K3_r2",),
        noncontig_views=((noncontig, None, None, None), (transposed, None, None, None)),
        low_precision_cases=("K3_r2", "K1_rank1", "paper_shape"),
        bad_inputs=_factorize_bad,
        cpp_bad_inputs=tuple(f"{k}_{b}" for k in ("seed", "offset") for b in ("too_short", "too_long", "negative")),
        opcheck_cases=("K3_r2", "plain_r4"),
        compile=_factorize_compile,
        launch_cases=tuple(("three_clients", d) for d in (torch.float32, torch.float64, torch.bfloat16)),
        launch_sample=_factorize_launch,
        launch_ref_exact=True,
        stream_case="K3_r2",
        stream_at=(2, 3),
        noisy_outputs=(0, 1, 2),
    ),
    OpInfo(
        name="lowrank_full_grad",
        op=ops.lowrank_full_grad,
        ref=reference.lowrank_full_grad,
        sample=full_grad_sample,
        cases=tuple(FULL_GRAD_CASES),
        schema_args=lambda s: s.args,
        noncontig_cases=("K3_r2",),
        noncontig_views=((noncontig, transposed, transposed, noncontig, None),),
        low_precision_cases=("K3_r2", "plain_r3", "paper_shape"),
        bad_inputs=_full_grad_bad,
        wrong_device=("K3_r2", 1, "grad_v"),
        opcheck_cases=("K3_r2", "plain_r3"),
        opcheck_grad=True,
        compile=_full_grad_compile,
        grad_cases=("K3_r2", "plain_r3", "K1_rank1"),
        gradcheck=_full_grad_gradcheck,
    ),
    OpInfo(
        name="dp_lowrank_clip_noise",
        op=ops.dp_lowrank_clip_noise,
        ref=reference.dp_lowrank_clip_noise,
        sample=dp_sample,
        cases=tuple(DP_CASES),
        schema_args=_dp_schema,
        check=_dp_check,
        noncontig_cases=(
            "joint_K2",
            "sum_classes",
            "full_local_no_uv",
            "wide_many_samples",
            "vector_rank10",
            "paper_width",
        ),  # fmt: skip
        noncontig_views=((noncontig, transposed, transposed),),
        misaligned_cases=("vector_rank10", "paper_width"),
        low_precision_cases=(
            "joint_K2",
            "separate_K2",
            "batch_mean",
            "full_local_no_uv",
            "wide_many_samples",
            "wide_sum_classes_fedotp",
            "vector_rank10",
            "paper_width",
            "table_separate",
            "table_fedotp",
            "normalize_separate_wide",
            "normalize_fedotp_sum_classes",
        ),  # fmt: skip
        bad_inputs=_dp_bad,
        cpp_bad_inputs=tuple(
            f"{k}_{b}" for k in ("seed", "offset") for b in ("too_short", "too_long", "empty", "negative")
        )
        + ("clip_table_wrong_K", "clip_table_two_columns", "clip_table_3d", "clip_table_unbatched_for_batched_grad"),
        wrong_device=("joint_K2", 2, r"\bv\b"),
        opcheck_cases=(
            "joint_K2",
            "sum_classes",
            "full_local_no_uv",
            "empty_b",
            "plain_b1",
            "table_separate",
            "table_plain",
            "normalize_joint",
        ),  # fmt: skip
        compile=_dp_compile,
        launch_cases=tuple(
            (c, torch.float32)
            for c in (
                "joint_K2",
                "separate_K2",
                "batch_mean",
                "sum_classes",
                "full_local_no_uv",
                "vector_rank10",
                "table_separate",
                "table_fedotp",
                "table_batch_separate",
                "normalize_joint",
            )
        ),
        launch_sample=_dp_launch,
        stream_case="joint_K2",
        noisy_outputs=(0, 1),
    ),
    OpInfo(
        name="dp_output_clip_noise",
        op=ops.dp_output_clip_noise,
        ref=reference.dp_output_clip_noise,
        sample=output_sample,
        cases=(*OUTPUT_CASES, *(f"{c}:no_noise" for c in OUTPUT_CASES), "K3_mask:inf_clip"),
        schema_args=_output_schema,
        check=_output_check,
        noncontig_cases=("wide",),
        noncontig_views=((noncontig, noncontig, noncontig, noncontig),),
        bad_inputs=_output_bad,
        # Bad numbers (sigma, scale, denominator, clip values) are the Python layer's to reject: the registered op
        # checks only what keeps its memory accesses safe.
        cpp_bad_inputs=tuple(
            b
            for b in _output_bad()
            if not b.startswith(("sigma_", "scale_", "denominator_", "clip_zero", "clip_nan", "clip_inf"))
        ),
        wrong_device=("K3_mask", 2, r"\blabels must be on cuda"),
        opcheck_cases=("K3_mask", "K1", "empty_b", "one_class_b1"),
        compile=_output_compile,
        launch_cases=tuple((c, torch.float32) for c in ("K3_mask", "wide", "paper_width")),
        launch_sample=output_sample,
        launch_plain=False,
        stream_case="K3_mask",
        noisy_outputs=(0,),
    ),
    OpInfo(
        name="nn_map",
        op=ops.nn_map,
        ref=reference.nn_map,
        sample=nn_sample,
        cases=tuple(NN_CASES),
        schema_args=lambda s: (*s.args, s.kwargs["chunk"]),
        dtypes=(torch.float64,),
        tol=lambda dtype: EXACT,
        check=_nn_check,
        noncontig_cases=("odd", "allowed_mask"),
        noncontig_views=((noncontig, noncontig, None),),
        bad_inputs=_nn_bad,
        opcheck_cases=("single_query", "allowed_mask"),
        compile=_nn_compile,
    ),
)

BY_NAME = {info.name: info for info in OPS}

# Registered ops that are test hooks, not ops: each is covered by the named test given here.
HOOKS = {"_box_muller_f32_words": "test_ops_specific.py::test_output_float32_box_muller_on_crafted_words"}


def registered_ops() -> set[str]:
    """The names the loaded extension registers under torch.ops.fpl_fast (its schema)."""
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fpl_fast::")}


# ----------------------------------------------------------------------------------------------
# Parameter lists for the generic tests
# ----------------------------------------------------------------------------------------------
def _marks(info: OpInfo) -> list[Any]:
    return [] if info.has_face else [needs_ext]


def _id(*parts: Any) -> str:
    return "-".join(str(p).removeprefix("torch.") for p in parts)


def params(kind: str) -> list[Any]:
    """pytest.param lists over the table for one generic test ("parity", "noncontig", ...)."""
    out = []
    for info in OPS:
        m = _marks(info)
        if kind == "parity":
            out += [pytest.param(info, c, d, id=_id(info, c, d), marks=m) for c in info.cases for d in info.dtypes]
        elif kind == "noncontig":
            out += [
                pytest.param(info, c, i, id=_id(info, c, f"view{i}"), marks=m)
                for c in info.noncontig_cases
                for i in range(len(info.noncontig_views))
            ]
        elif kind == "misaligned":
            out += [
                pytest.param(info, c, d, id=_id(info, c, d), marks=m)
                for c in info.misaligned_cases
                for d in (torch.float32, torch.bfloat16)
            ]
        elif kind == "low_precision":
            out += [
                pytest.param(info, c, d, id=_id(info, c, d), marks=m)
                for c in info.low_precision_cases
                for d in info.low_precision_dtypes
            ]
        elif kind == "bad":
            out += [pytest.param(info, b, id=_id(info, b)) for b in info.bad_inputs()]
        elif kind == "cpp_bad":
            out += [pytest.param(info, b, id=_id(info, b)) for b in info.cpp_bad_inputs]
        elif kind == "wrong_device":
            out += [pytest.param(info, id=info.name) for _ in [0] if info.wrong_device is not None]
        elif kind == "opcheck":
            out += [
                pytest.param(info, c, g, id=_id(info, c, "grad" if g else "nograd"))
                for c in info.opcheck_cases
                for g in ((False, True) if info.opcheck_grad else (False,))
            ]
        elif kind == "compile":
            out += [pytest.param(info, id=info.name) for _ in [0] if info.compile is not None]
        elif kind == "grad":
            out += [pytest.param(info, c, id=_id(info, c), marks=m) for c in info.grad_cases]
        elif kind == "gradcheck":
            out += [pytest.param(info, c, id=_id(info, c)) for c in (info.gradcheck() if info.gradcheck else {})]
        elif kind == "gradgrad":
            out += [pytest.param(info, c, id=_id(info, c)) for c in info.gradgrad_cases]
        elif kind == "launch":
            out += [pytest.param(info, c, d, id=_id(info, c, d), marks=m) for c, d in info.launch_cases]
        elif kind == "streams":
            out += [pytest.param(info, id=info.name) for _ in [0] if info.stream_case is not None]
        else:
            raise ValueError(kind)
    return out
