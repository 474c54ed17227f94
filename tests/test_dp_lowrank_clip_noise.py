"""dp_lowrank_clip_noise: per-sample clipping of g_U, g_V, g_G, sums, local-DP Philox noise, per-sample norms."""

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
    client_streams,
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

N_CTX, D = 3, 7  # odd sizes
SEED, OFFSET = 1234, 17  # client k's stream: client_streams(K, SEED, OFFSET)[.][k]

# K: client dim (None: none); b: batch; r: rank (None: fedotp, no u/v); n_cls: sum_classes input; kw: op options.
CASES: dict[str, dict[str, Any]] = {
    "joint_K2": {"K": 2, "b": 5, "r": 2, "n_cls": None, "kw": {}},
    "separate_K2": {"K": 2, "b": 5, "r": 2, "n_cls": None, "kw": {"joint_uv": False}},
    "batch_mean": {"K": 2, "b": 5, "r": 2, "n_cls": None, "kw": {"per_sample": False}},
    "sum_classes": {"K": 2, "b": 3, "r": 2, "n_cls": 3, "kw": {"sum_classes": True}},
    "full_local_no_uv": {"K": 3, "b": 4, "r": None, "n_cls": None, "kw": {}},
    "plain_b1": {"K": None, "b": 1, "r": 2, "n_cls": None, "kw": {}},
    "empty_b": {"K": 2, "b": 0, "r": 2, "n_cls": None, "kw": {}},
    "empty_b_batch_mean": {"K": 1, "b": 0, "r": 2, "n_cls": None, "kw": {"per_sample": False}},
    "rank1_expected_batch": {"K": 2, "b": 4, "r": 1, "n_cls": None, "kw": {"expected_batch_size": 7.5}},
    "no_clip_inf": {"K": 1, "b": 3, "r": 2, "n_cls": None, "kw": {"clip_norm": math.inf}},
    # Wider, and b > 8: the CPU kernel's SIMD main loops, 4-row blocks and several sample chunks per client run.
    "wide_many_samples": {"K": 2, "b": 11, "r": 5, "n_cls": None, "kw": {}, "n_ctx": 6, "d": 53},
    "wide_sum_classes_fedotp": {"K": 2, "b": 9, "r": None, "n_cls": 2, "kw": {"sum_classes": True}, "d": 53},
    # Widths that are multiples of 16 bytes: the CUDA kernels' vector loads; r > 8: their rank loop in chunks.
    "vector_rank10": {"K": 2, "b": 9, "r": 10, "n_cls": None, "kw": {}, "n_ctx": 12, "d": 64},
    "vector_separate_b1": {"K": 1, "b": 1, "r": 3, "n_cls": None, "kw": {"joint_uv": False}, "n_ctx": 2, "d": 64},
    "paper_width": {"K": 2, "b": 3, "r": 8, "n_cls": None, "kw": {}, "n_ctx": 4, "d": 768},
}


def dims(case: str) -> tuple[int, int]:
    """(n_ctx, d) of a case."""
    return CASES[case].get("n_ctx", N_CTX), CASES[case].get("d", D)


CLIP, SIGMA = 3.0, 0.7


def make_inputs(
    case: str, dtype: torch.dtype = torch.float32, seed: int = 0, *, K: int | None = None
) -> list[Tensor | None]:
    """(grad, u, v) on the CPU; per-sample gradient scales are spread so that some samples get clipped.
    ``K`` overrides the case's client count."""
    c = CASES[case] if K is None else {**CASES[case], "K": K}
    lead = () if c["K"] is None else (c["K"],)
    mid = () if c["n_cls"] is None else (c["n_cls"],)
    n_ctx, d = dims(case)
    grad = make(*lead, c["b"], *mid, n_ctx, d, dtype=torch.float64, seed=seed)
    spread = 0.1 + 0.6 * torch.arange(c["b"], dtype=torch.float64)  # sample i scaled by 0.1 + 0.6 i
    grad = (grad * spread.view(-1, *([1] * (grad.dim() - len(lead) - 1)))).to(dtype)
    if c["r"] is None:
        return [grad, None, None]
    u = make(*lead, n_ctx, c["r"], dtype=dtype, seed=seed + 1)
    v = make(*lead, c["r"], d, dtype=dtype, seed=seed + 2, scale=0.5)
    return [grad, u, v]


def kwargs_of(case: str, **over: Any) -> dict[str, Any]:
    """The op's keyword arguments: the case's options, distinct per-client streams, then ``over``."""
    seeds, offsets = client_streams(CASES[case]["K"], SEED, OFFSET)
    kw: dict[str, Any] = {"clip_norm": CLIP, "noise_multiplier": SIGMA, "seed": seeds, "offset": offsets}
    kw.update(CASES[case]["kw"])
    kw.update(over)
    return kw


def run_ops(args: list[Tensor | None], device: torch.device | str, **kw: Any) -> tuple[Tensor, ...]:
    return tuple(t.cpu() for t in ops.dp_lowrank_clip_noise(*to_device(args, device), **kw))


# ----------------------------------------------------------------------------------------------
# Parity with the reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str, dtype: torch.dtype, device: torch.device) -> None:
    out, _ = assert_parity(
        ops.dp_lowrank_clip_noise,
        reference.dp_lowrank_clip_noise,
        make_inputs(case, dtype),
        kwargs_of(case),
        device=device,
    )
    assert out[3].dtype == torch.float32


@pytest.mark.parametrize(
    "case", ["joint_K2", "sum_classes", "full_local_no_uv", "wide_many_samples", "vector_rank10", "paper_width"]
)
def test_noncontiguous(case: str, device: torch.device) -> None:
    grad, u, v = make_inputs(case)
    nc = [noncontig(grad), None if u is None else transposed(u), None if v is None else transposed(v)]
    assert_parity(ops.dp_lowrank_clip_noise, reference.dp_lowrank_clip_noise, nc, kwargs_of(case), device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["vector_rank10", "paper_width"])
def test_misaligned_pointers(case: str, dtype: torch.dtype, device: torch.device) -> None:
    """Inputs one element off alignment give what aligned inputs give (the vector path's fallback)."""
    args = make_inputs(case, dtype)
    aligned = run_ops(args, device, **kwargs_of(case))
    shifted = run_ops(
        [None if t is None else misaligned(t) for t in to_device(args, device)], device, **kwargs_of(case)
    )
    for a, b in zip(aligned, shifted, strict=True):
        torch.testing.assert_close(b, a, **TOL.get(dtype, {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "case",
    [
        "joint_K2",
        "separate_K2",
        "batch_mean",
        "full_local_no_uv",
        "wide_many_samples",
        "wide_sum_classes_fedotp",
        "vector_rank10",
        "paper_width",
    ],
)
def test_low_precision(case: str, dtype: torch.dtype, device: torch.device) -> None:
    args = make_inputs(case, dtype)
    kw = kwargs_of(case)
    assert_bf16_close(ops.dp_lowrank_clip_noise, reference.dp_lowrank_clip_noise, args, kw, device=device)


# ----------------------------------------------------------------------------------------------
# Clipping semantics, computed by hand (float64, explicit loops)
# ----------------------------------------------------------------------------------------------
def clip_by_hand(grad: Tensor, u: Tensor | None, v: Tensor | None, case: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noise-free outputs of the op for one case, from the DESIGN formulas, K and sum_classes made explicit."""
    c, kw = CASES[case], kwargs_of(case)
    C, joint, per_sample = kw["clip_norm"], kw.get("joint_uv", True), kw.get("per_sample", True)
    x = grad.double() if c["K"] is not None else grad.double().unsqueeze(0)
    if c["n_cls"] is not None:
        x = x.sum(dim=2)
    uu = None if u is None else (u.double() if c["K"] is not None else u.double().unsqueeze(0))
    vv = None if v is None else (v.double() if c["K"] is not None else v.double().unsqueeze(0))
    K, b = x.shape[:2]
    n_ctx, d = dims(case)
    ebs = kw.get("expected_batch_size", 0.0)
    denom = ebs if ebs > 0 else max(b, 1)

    def factor(n: float) -> float:
        return min(1.0, C / (n + 1e-6))

    la, lb, gl, norms = [], [], [], []
    for k in range(K):
        samples = [x[k, i] for i in range(b)] if per_sample else [x[k].mean(0) if b else x.new_zeros(n_ctx, d)]
        a_sum = x.new_zeros(n_ctx, d if uu is None else uu.shape[-1])
        b_sum = x.new_zeros(0 if uu is None else uu.shape[-1], d)
        g_sum = x.new_zeros(n_ctx, d)
        nk = []
        for s in samples:
            ng = s.norm().item()
            g_sum += factor(ng) * s
            if uu is None:
                a_sum += factor(ng) * s
                nk.append([ng, 0.0, ng])
                continue
            ga, gb = s @ vv[k].T, uu[k].T @ s  # g_U,i (n_ctx, r), g_V,i (r, d)
            na, nb = ga.norm().item(), gb.norm().item()
            fa, fb = (factor(math.hypot(na, nb)),) * 2 if joint else (factor(na), factor(nb))
            a_sum += fa * ga
            b_sum += fb * gb
            nk.append([na, nb, ng])
        scale = 1.0 / denom if per_sample else 1.0
        la.append(a_sum * scale)
        lb.append(b_sum * scale)
        gl.append(g_sum * scale)
        norms.append(torch.tensor(nk, dtype=torch.float64).view(len(samples), 3))
    outs = (torch.stack(la), torch.stack(lb), torch.stack(gl), torch.stack(norms).float())
    return outs if c["K"] is not None else tuple(t[0] for t in outs)  # type: ignore[return-value]


@pytest.mark.parametrize("case", list(CASES))
def test_sigma_zero_equals_clip_only_by_hand(case: str, device: torch.device) -> None:
    """sigma = 0 is exactly the clip-only result (float64: equal up to float64 rounding)."""
    args = make_inputs(case, torch.float64)
    got = run_ops(args, device, **kwargs_of(case, noise_multiplier=0.0))
    want = clip_by_hand(*args, case)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, f"output {i}: {tuple(a.shape)} != {tuple(b.shape)}"
        t = TOL[torch.float64] if i < 3 else TOL[torch.float32]
        torch.testing.assert_close(a, b, **t, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize(
    "case", ["joint_K2", "batch_mean", "full_local_no_uv", "plain_b1", "empty_b", "wide_many_samples"]
)
def test_noise_is_the_philox_stream(case: str, device: torch.device) -> None:
    """out(sigma) - out(0) = sigma C / denom * normals 0 .. P - 1 of client k's own stream (seed[k], offset[k]),
    U then V row-major."""
    args = make_inputs(case, torch.float64)
    noisy = run_ops(args, device, **kwargs_of(case))
    clean = run_ops(args, device, **kwargs_of(case, noise_multiplier=0.0))
    c = CASES[case]
    K = c["K"] or 1
    n_ctx, d = dims(case)
    P = reference.dp_noise_numel(1, n_ctx, d, c["r"])
    ebs = c["kw"].get("expected_batch_size", 0.0)
    denom = ebs if ebs > 0 else max(c["b"], 1)
    seeds, offsets = client_streams(c["K"], SEED, OFFSET)
    z = torch.stack([reference.philox_normal(s, o, P) for s, o in zip(seeds, offsets, strict=True)]).double()
    z = z * (SIGMA * CLIP / denom)
    na = n_ctx * (d if c["r"] is None else c["r"])
    for idx, part in ((0, z[:, :na]), (1, z[:, na:])):
        diff = (noisy[idx] - clean[idx]).reshape(K, -1)
        torch.testing.assert_close(diff, part, rtol=1e-9, atol=1e-12)
    assert torch.equal(noisy[2], clean[2]), "the global-prompt gradient must carry no local noise"
    assert torch.equal(noisy[3], clean[3]), "the norms must not depend on the noise"


def test_joint_vs_separate_clipping_factors(device: torch.device) -> None:
    """One sample with |g_U| >> C > |g_V|: separate clipping leaves g_V alone, joint clipping shrinks both."""
    grad = make(1, 1, N_CTX, D, dtype=torch.float64, seed=3)
    u = make(1, N_CTX, 2, dtype=torch.float64, seed=4) * 1e-3  # tiny g_V = U^T grad
    v = make(1, 2, D, dtype=torch.float64, seed=5) * 10.0  # large g_U = grad V^T
    gu, gv = grad[0, 0] @ v[0].T, u[0].T @ grad[0, 0]
    C = 0.5 * gu.norm().item()
    assert gv.norm().item() < C
    kw = {"clip_norm": C, "noise_multiplier": 0.0, "seed": [0], "offset": [0]}
    sep = run_ops([grad, u, v], device, joint_uv=False, **kw)
    joint = run_ops([grad, u, v], device, joint_uv=True, **kw)
    torch.testing.assert_close(sep[0][0], gu * C / (gu.norm() + 1e-6))
    torch.testing.assert_close(sep[1][0], gv)
    f = C / (torch.sqrt(gu.norm() ** 2 + gv.norm() ** 2) + 1e-6)
    torch.testing.assert_close(joint[0][0], gu * f)
    torch.testing.assert_close(joint[1][0], gv * f)


@pytest.mark.parametrize("mode", ["joint", "separate", "full_local"])
def test_huge_gradient_is_clipped_to_exactly_c(mode: str, device: torch.device) -> None:
    """Per-sample mode, sigma = 0, b = 1: the clipped U/V/G sums have norm C (CLIP_EPS is negligible here)."""
    C = 2.5
    grad = make(2, 1, N_CTX, D, dtype=torch.float32, seed=6, scale=1e6)
    u = None if mode == "full_local" else make(2, N_CTX, 3, seed=7)
    v = None if mode == "full_local" else make(2, 3, D, seed=8)
    gu, gv, gg, norms = run_ops(
        [grad, u, v], device, clip_norm=C, noise_multiplier=0.0, seed=[0, 0], offset=[0, 0], joint_uv=mode == "joint"
    )
    per_client = lambda t: t.double().flatten(1).norm(dim=1)  # noqa: E731
    expect = torch.full((2,), C, dtype=torch.float64)
    torch.testing.assert_close(per_client(gg), expect, rtol=1e-5, atol=0)
    if mode == "joint":
        torch.testing.assert_close(torch.hypot(per_client(gu), per_client(gv)), expect, rtol=1e-5, atol=0)
    elif mode == "separate":
        torch.testing.assert_close(per_client(gu), expect, rtol=1e-5, atol=0)
        torch.testing.assert_close(per_client(gv), expect, rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(per_client(gu), expect, rtol=1e-5, atol=0)
        assert gv.shape == (2, 0, D)
    assert norms.shape == (2, 1, 3) and bool((norms[..., 2] > 1e5).all()), "norms are the unclipped norms"


def test_batch_mean_semantics(device: torch.device) -> None:
    """per_sample=False: clip(mean_i grad_i) itself (no division by b), noise sigma C / b, norms of the mean."""
    grad, u, v = make_inputs("batch_mean", torch.float64)
    b = grad.shape[1]
    kw = kwargs_of("batch_mean")
    gu, gv, gg, norms = run_ops([grad, u, v], device, **kw)
    mean = grad.mean(1)  # (K, n_ctx, d)
    ng = mean.flatten(1).norm(dim=1)
    fg = torch.clamp(CLIP / (ng + 1e-6), max=1.0)
    torch.testing.assert_close(gg, fg[:, None, None] * mean, **TOL[torch.float64])
    assert norms.shape == (2, 1, 3)
    torch.testing.assert_close(norms[:, 0, 2], ng.float())
    # The clean part of g_U is clip(mean g_U); the rest is noise with std sigma C / b.
    mu = mean @ v.transpose(-1, -2)
    mv = u.transpose(-1, -2) @ mean
    f = torch.clamp(CLIP / (torch.sqrt(mu.flatten(1).norm(dim=1) ** 2 + mv.flatten(1).norm(dim=1) ** 2) + 1e-6), max=1)
    P = reference.dp_noise_numel(1, N_CTX, D, 2)
    z = torch.stack([reference.philox_normal(s, o, P) for s, o in zip(kw["seed"], kw["offset"], strict=True)])
    z = z.double() * SIGMA * CLIP / b
    na = N_CTX * 2
    torch.testing.assert_close(gu, f[:, None, None] * mu + z[:, :na].view_as(mu), **TOL[torch.float64])
    torch.testing.assert_close(gv, f[:, None, None] * mv + z[:, na:].view_as(mv), **TOL[torch.float64])


@pytest.mark.parametrize("per_sample", [True, False])
def test_sum_classes_equals_presumming(per_sample: bool, device: torch.device) -> None:
    grad, u, v = make_inputs("sum_classes")
    kw = kwargs_of("sum_classes", per_sample=per_sample)
    fused = run_ops([grad, u, v], device, **kw)
    kw["sum_classes"] = False
    pre = run_ops([grad.double().sum(2).float(), u, v], device, **kw)
    for a, b in zip(fused, pre, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_expected_batch_size_divides(device: torch.device) -> None:
    """Every output (clipped sums and noise) is divided by expected_batch_size instead of b."""
    args = make_inputs("joint_K2")
    b, E = args[0].shape[1], 12.5
    by_b = run_ops(args, device, **kwargs_of("joint_K2"))
    by_e = run_ops(args, device, **kwargs_of("joint_K2", expected_batch_size=E))
    for a, bb in zip(by_e[:3], by_b[:3], strict=True):
        torch.testing.assert_close(a * E, bb * b, **TOL[torch.float32])
    torch.testing.assert_close(by_e[3], by_b[3], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------
def test_same_seed_bitwise_equal_other_seed_differs(device: torch.device) -> None:
    args = make_inputs("joint_K2")
    a = run_ops(args, device, **kwargs_of("joint_K2"))
    b = run_ops(args, device, **kwargs_of("joint_K2"))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    seeds, offsets = client_streams(2, SEED, OFFSET)
    for other in ({"seed": [s + 1 for s in seeds]}, {"offset": [o + 1 for o in offsets]}):
        c = run_ops(args, device, **kwargs_of("joint_K2", **other))
        assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1]), other
        assert torch.equal(a[2], c[2])


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize(
    "case", ["joint_K2", "separate_K2", "batch_mean", "sum_classes", "full_local_no_uv", "vector_rank10"]
)
def test_client_alone_equals_client_in_a_launch(case: str, impl: str, device: torch.device) -> None:
    """A client's outputs (noise included) are bitwise the same whether it runs alone (K = 1, and without K)
    with its own (seed, offset) or as one of K = 3 clients with distinct streams. The kernels compute each client
    in a loop of its own; the reference's batched matmuls go through BLAS, whose blocking may depend on the batch
    size (seen on an AMD EPYC: 1 ulp), so there the same noise and the same values to float32 rounding."""
    fn = ops.dp_lowrank_clip_noise if impl == "ops" else reference.dp_lowrank_clip_noise

    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        return torch.equal(x, y) if impl == "ops" else torch.allclose(x, y, rtol=1e-6, atol=1e-7)

    grad, u, v = to_device(make_inputs(case, K=3), device)
    seeds, offsets = client_streams(3, SEED, OFFSET)
    opts = {**kwargs_of(case), "seed": seeds, "offset": offsets}
    together = fn(grad, u, v, **opts)
    uv = u is not None
    for k in range(3):
        one = {**opts, "seed": [seeds[k]], "offset": [offsets[k]]}
        alone = fn(grad[k : k + 1], u[k : k + 1] if uv else None, v[k : k + 1] if uv else None, **one)
        plain = fn(grad[k], u[k] if uv else None, v[k] if uv else None, **one)
        for i, (t, a, p) in enumerate(zip(together, alone, plain, strict=True)):
            assert same(a[0], t[k]), f"output {i} of client {k}: K = 1 launch differs from K = 3"
            assert same(p, t[k]), f"output {i} of client {k}: launch without K differs from K = 3"


@pytest.mark.parametrize("mode", ["per_sample", "batch_mean", "full_local"])
def test_zero_gradient_noise_std(mode: str, device: torch.device) -> None:
    """With zero gradients the outputs are pure noise N(0, (sigma C / b)^2).

    Statistical bound: for n i.i.d. normals with std s, the sample mean has std s / sqrt(n) and the sample std
    has std ~ s / sqrt(2 n); we allow 6 of those standard deviations (two-sided p ~ 2e-9 per check). The Philox
    stream is deterministic, so this test cannot flake: it either always passes or always fails.
    """
    K, b, n_ctx, d, r = 8, 4, 16, 64, 8
    sigma, C = 1.3, 2.0
    grad = torch.zeros(K, b, n_ctx, d)
    u = None if mode == "full_local" else make(K, n_ctx, r, seed=1)
    v = None if mode == "full_local" else make(K, r, d, seed=2)
    gu, gv, gg, _ = run_ops(
        [grad, u, v],
        device,
        clip_norm=C,
        noise_multiplier=sigma,
        seed=list(range(99, 99 + K)),
        offset=[0] * K,
        per_sample=mode != "batch_mean",
    )
    noise = torch.cat([gu.flatten(), gv.flatten()]).double()
    n = noise.numel()
    assert n == reference.dp_noise_numel(K, n_ctx, d, None if mode == "full_local" else r)
    s = sigma * C / b
    assert abs(noise.mean().item()) <= 6 * s / math.sqrt(n)
    assert abs(noise.std().item() - s) <= 6 * s / math.sqrt(2 * n), (noise.std().item(), s)
    assert torch.count_nonzero(gg) == 0


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("case", ["joint_K2", "sum_classes", "full_local_no_uv", "empty_b", "plain_b1"])
def test_opcheck(case: str, device: torch.device) -> None:
    kw = kwargs_of(case)
    args = (
        *to_device(make_inputs(case), device),
        kw["clip_norm"],
        kw["noise_multiplier"],
        kw["seed"],
        kw["offset"],
        kw.get("expected_batch_size", 0.0),
        kw.get("joint_uv", True),
        kw.get("per_sample", True),
        kw.get("sum_classes", False),
    )
    torch.library.opcheck(torch.ops.fpl_fast.dp_lowrank_clip_noise.default, args)


@needs_ext
def test_compile_fullgraph(device: torch.device) -> None:
    grad, u, v = to_device(make_inputs("joint_K2"), device)

    def step(grad: Tensor, u: Tensor, v: Tensor, seed: int) -> tuple[Tensor, ...]:
        return ops.dp_lowrank_clip_noise(
            grad, u, v, clip_norm=CLIP, noise_multiplier=SIGMA, seed=[seed, seed + 1], offset=[3, 0]
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(grad, u, v, 5), step(grad, u, v, 5), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
# Bad per-client stream lists for K = 2 clients: (value, message pattern after "seed " / "offset ").
_BAD_STREAMS: dict[str, tuple[Any, str]] = {
    "too_short": ([1], r"must be a list of 2 integers \(one stream per client\), got \[1\]"),
    "too_long": ([1, 2, 3], r"must be a list of 2 integers \(one stream per client\), got \[1, 2, 3\]"),
    "empty": ([], r"must be a list of 2 integers \(one stream per client\), got \[\]"),
    "an_int": (5, r"must be a list of 2 integers \(one stream per client\), got 5"),
    "negative": ([1, -3], r"entries must be integers in \[0, 2\^63\), got -3"),
    "too_big": ([1, 2**63], r"entries must be integers in \[0, 2\^63\), got 9223372036854775808"),
    "float": ([1, 2.0], r"entries must be integers in \[0, 2\^63\), got 2.0"),
    "bool": ([True, 1], r"entries must be integers in \[0, 2\^63\), got True"),
}


def _bad_cases() -> dict[str, tuple[list[Any], dict[str, Any], str]]:
    grad, u, v = make_inputs("joint_K2")
    ok = kwargs_of("joint_K2")
    return {
        "clip_negative": ([grad, u, v], {**ok, "clip_norm": -1.0}, "clip_norm"),
        "clip_zero": ([grad, u, v], {**ok, "clip_norm": 0.0}, "clip_norm"),
        "clip_nan": ([grad, u, v], {**ok, "clip_norm": math.nan}, "clip_norm"),
        "sigma_negative": ([grad, u, v], {**ok, "noise_multiplier": -0.1}, "noise_multiplier"),
        "sigma_nan": ([grad, u, v], {**ok, "noise_multiplier": math.nan}, "noise_multiplier"),
        "sigma_inf": ([grad, u, v], {**ok, "noise_multiplier": math.inf}, "noise_multiplier"),
        "ebs_negative": ([grad, u, v], {**ok, "expected_batch_size": -2.0}, "expected_batch_size"),
        "ebs_nan": ([grad, u, v], {**ok, "expected_batch_size": math.nan}, "expected_batch_size"),
        "grad_2d": ([grad[0, 0], None, None], ok, "grad"),
        "grad_5d_without_sum_classes": ([grad.unsqueeze(2).unsqueeze(0), None, None], ok, "grad"),
        "grad_int": ([grad.long(), None, None], ok, "grad"),
        "u_without_v": ([grad, u, None], ok, r"\bu\b"),
        "v_without_u": ([grad, None, v], ok, r"\bv\b"),
        "u_unbatched_for_batched_grad": ([grad, u[0], v], ok, r"\bu\b"),
        "u_wrong_rows": ([grad, u[:, :-1], v], ok, r"\bu\b"),
        "u_wrong_K": ([grad, u[:1], v], ok, r"\bu\b"),
        "v_wrong_width": ([grad, u, v[..., :-1]], ok, r"\bv\b"),
        "v_wrong_rank": ([grad, u, v[:, :1]], ok, r"\bv\b"),
        "u_dtype_mismatch": ([grad, u.double(), v], ok, r"\bu\b"),
        "v_dtype_mismatch": ([grad, u, v.double()], ok, r"\bv\b"),
        **{
            f"{key}_{name}": ([grad, u, v], {**ok, key: value}, f"^{key} {pattern}")
            for key in ("seed", "offset")
            for name, (value, pattern) in _BAD_STREAMS.items()
        },
    }


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("bad", list(_bad_cases()))
def test_bad_inputs_raise_value_error(bad: str, impl: str, device: torch.device) -> None:
    args, kw, pattern = _bad_cases()[bad]
    with pytest.raises(ValueError, match=pattern):
        if impl == "reference":
            reference.dp_lowrank_clip_noise(*to_device(args, device), **kw)
        else:
            ops.dp_lowrank_clip_noise(*to_device(args, device), **kw)


@needs_ext
@pytest.mark.parametrize("key", ["seed", "offset"])
@pytest.mark.parametrize("bad", ["too_short", "too_long", "empty", "negative"])
def test_bad_streams_on_the_cpp_op_match_the_reference(bad: str, key: str, device: torch.device) -> None:
    """The C++ checks themselves (torch.ops, no Python wrapper) raise a ValueError for the reference's check: both
    messages start with the same key phrase (the values after "got" are formatted by Python or by c10)."""
    grad, u, v = to_device(make_inputs("joint_K2"), device)
    kw = {**kwargs_of("joint_K2"), key: _BAD_STREAMS[bad][0]}
    phrase = f"^{key} " + _BAD_STREAMS[bad][1].split(", got")[0]
    with pytest.raises(ValueError, match=phrase):
        reference.dp_lowrank_clip_noise(grad, u, v, **kw)
    args = (CLIP, SIGMA, kw["seed"], kw["offset"], 0.0, True, True, False)
    with pytest.raises(ValueError, match=phrase):
        torch.ops.fpl_fast.dp_lowrank_clip_noise(grad, u, v, *args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to put inputs on two devices")
@pytest.mark.parametrize("impl", ["reference", "ops"])
def test_wrong_device_raises(impl: str) -> None:
    grad, u, v = make_inputs("joint_K2")
    fn = reference.dp_lowrank_clip_noise if impl == "reference" else ops.dp_lowrank_clip_noise
    with pytest.raises(ValueError, match=r"\bv\b"):
        fn(grad.cuda(), u.cuda(), v, **kwargs_of("joint_K2"))
