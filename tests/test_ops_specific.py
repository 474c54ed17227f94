"""Op checks that do not fit the table of test_ops.py: formulas by hand, the noise and its statistics, properties
one op alone promises. Samples come from op_table; names read test_<op>_<property>."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from op_table import (
    BY_NAME,
    DP_CASES,
    DP_CLIP,
    DP_CTX,
    DP_D,
    DP_OFFSET,
    DP_SEED,
    DP_SIGMA,
    F_CTX,
    F_D,
    F_OFFSET,
    F_SEED,
    FACTORIZE_CASES,
    FULL_GRAD_CASES,
    N_CLS,
    NN_CASES,
    O_OFFSET,
    O_SEED,
    O_SIGMA,
    OUTPUT_CASES,
    P_CTX,
    P_D,
    P_S,
    brute_force,
    dp_dims,
    dp_inputs,
    dp_kwargs,
    factorize_l,
    factorize_streams,
    full_grad_inputs,
    nn_sample,
    orthonormal_checks,
    output_inputs,
    output_kwargs,
    prompt_inputs,
)
from support import TOL, client_streams, make, needs_ext, noncontig, to_device
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops import reference

REPO = Path(__file__).resolve().parents[1]


# ==============================================================================================
# lowrank_prompt
# ==============================================================================================
def test_prompt_forward_layout_by_hand(device: torch.device) -> None:
    """Independent of the reference: prefix, G + U V + R, suffix land at the right positions."""
    prefix, suffix, g, u, v, res = prompt_inputs("fedpgp_per_client", torch.float64)
    res = make(2, P_CTX, P_D, dtype=torch.float64, seed=9)
    out = ops.lowrank_prompt(*to_device([prefix, suffix, g, u, v, res], device)).cpu()
    for k in range(2):
        ctx = g[k] + u[k] @ v[k] + res[k]
        for c in range(N_CLS):
            torch.testing.assert_close(out[k, c, 0], prefix[c, 0])
            torch.testing.assert_close(out[k, c, 1 : 1 + P_CTX], ctx)
            torch.testing.assert_close(out[k, c, 1 + P_CTX :], suffix[c])


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
def _prompt_grads(fn: Any, args: list[Tensor | None], w: Tensor) -> list[Tensor | None]:
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in args]
    out = fn(*leaves)
    (out * w).sum().backward()
    return [None if t is None else t.grad for t in leaves]


def test_prompt_backward_shared_vs_per_client_g(device: torch.device) -> None:
    """A shared G receives the sum over clients of what per-client copies of G receive."""
    prefix, suffix, _, u, v, res = prompt_inputs("fedpgp_per_client", torch.float64)
    g = make(P_CTX, P_D, dtype=torch.float64, seed=7)
    w = make(2, N_CLS, 1 + P_CTX + P_S, P_D, dtype=torch.float64, seed=8)
    shared = _prompt_grads(ops.lowrank_prompt, to_device([prefix, suffix, g, u, v, res], device), w.to(device))[2]
    per_client = _prompt_grads(
        ops.lowrank_prompt, to_device([prefix, suffix, g.expand(2, P_CTX, P_D), u, v, res], device), w.to(device)
    )[2]
    assert shared.shape == (P_CTX, P_D) and per_client.shape == (2, P_CTX, P_D)
    torch.testing.assert_close(shared, per_client.sum(0))
    # By hand: dL/dG_k = sum over classes of w at the context positions.
    torch.testing.assert_close(per_client.cpu(), w[:, :, 1 : 1 + P_CTX].sum(1))


# ==============================================================================================
# lowrank_factorize
# ==============================================================================================
@pytest.mark.parametrize("case", list(FACTORIZE_CASES))
def test_factorize_factor_properties_float64(case: str, device: torch.device) -> None:
    """U has orthonormal columns, V orthonormal rows, U V + R == L (tight, in float64)."""
    lmat = factorize_l(case, torch.float64)
    u, v, res = (
        t.cpu() for t in ops.lowrank_factorize(lmat.to(device), FACTORIZE_CASES[case]["r"], *factorize_streams(case))
    )
    orthonormal_checks(u, v, res, lmat, TOL[torch.float64])
    if FACTORIZE_CASES[case]["r"] == F_CTX:  # U is square orthogonal: U U^T = I
        eye = torch.eye(F_CTX, dtype=torch.float64).expand_as(u)
        torch.testing.assert_close(u @ u.transpose(-1, -2), eye, **TOL[torch.float64])


def test_factorize_matches_qr_by_hand(device: torch.device) -> None:
    """Independent of the reference: Gram-Schmidt is QR with a positive diagonal of R; client k's V0 is normals
    0 .. d r - 1 of its own stream (seed[k], offset[k]), row-major."""
    K, r = 2, 3
    lmat = make(K, F_CTX, F_D, dtype=torch.float64, seed=2)
    seeds, offsets = client_streams(K, F_SEED, F_OFFSET)
    u, v, _ = (t.cpu() for t in ops.lowrank_factorize(lmat.to(device), r, seeds, offsets))
    v0 = torch.stack([reference.philox_normal(s, o, F_D * r) for s, o in zip(seeds, offsets, strict=True)])
    v0 = v0.double().view(K, F_D, r)

    def orth(m: Tensor) -> Tensor:
        q, rr = torch.linalg.qr(m)
        return q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-2)

    u_want = orth(lmat @ v0)
    v_want = orth(lmat.transpose(-1, -2) @ u_want).transpose(-1, -2)
    torch.testing.assert_close(u, u_want, **TOL[torch.float64])
    torch.testing.assert_close(v, v_want, **TOL[torch.float64])


def test_factorize_rank_r_matrix_subspaces_are_recovered_exactly(device: torch.device) -> None:
    """For a rank-r L, U spans its column space and V its row space exactly: U U^T L = L = L V^T V.

    Note: R = L - U V itself is NOT ~0 under the contract (docs/design.md, the reference): V = orth(L^T U)^T
    has orthonormal rows, so U V has all singular values 1 and only equals L when L's are (checked below).
    """
    K, r = 3, 2
    lmat = make(K, F_CTX, r, dtype=torch.float64, seed=3) @ make(K, r, F_D, dtype=torch.float64, seed=4)
    seeds, offsets = client_streams(K, F_SEED, F_OFFSET)
    u, v, res = (t.cpu() for t in ops.lowrank_factorize(lmat.to(device), r, seeds, offsets))
    ut, vt = u.transpose(-1, -2), v.transpose(-1, -2)
    torch.testing.assert_close(u @ (ut @ lmat), lmat, **TOL[torch.float64])
    torch.testing.assert_close((lmat @ vt) @ v, lmat, **TOL[torch.float64])
    # A rank-r L with unit singular values (a product of orthonormal factors) is reproduced: R ~ 0.
    q1 = torch.linalg.qr(make(K, F_CTX, r, dtype=torch.float64, seed=5))[0]
    q2 = torch.linalg.qr(make(K, F_D, r, dtype=torch.float64, seed=6))[0]
    unit = q1 @ q2.transpose(-1, -2)
    _, _, res = (t.cpu() for t in ops.lowrank_factorize(unit.to(device), r, seeds, offsets))
    torch.testing.assert_close(res, torch.zeros_like(res), rtol=0, atol=1e-10)


def test_factorize_zero_matrix_gives_no_nan(device: torch.device) -> None:
    """An all-zero L hits the Gram-Schmidt guard: U = V = R = 0, nothing NaN."""
    u, v, res = (
        t.cpu()
        for t in ops.lowrank_factorize(torch.zeros(2, F_CTX, F_D, device=device), 2, [F_SEED] * 2, [F_OFFSET] * 2)
    )
    for t in (u, v, res):
        assert torch.isfinite(t).all() and torch.count_nonzero(t) == 0


# ==============================================================================================
# lowrank_full_grad
# ==============================================================================================
@pytest.mark.parametrize("case", ["K3_r2", "plain_r3", "paper_shape"])
def test_full_grad_formula_by_hand(case: str, device: torch.device) -> None:
    """Per client, in float64: scale (gU V + U gV + U U^T gU V) with explicit matrix products."""
    gu, gv, u, v = full_grad_inputs(case, torch.float64)
    scale = FULL_GRAD_CASES[case]["scale"]
    out = ops.lowrank_full_grad(*to_device([gu, gv, u, v], device), scale).cpu()
    batched = FULL_GRAD_CASES[case]["K"] is not None
    gu, gv, u, v = (t if batched else t.unsqueeze(0) for t in (gu, gv, u, v))
    want = torch.stack([scale * (gu[k] @ v[k] + u[k] @ gv[k] + u[k] @ u[k].T @ gu[k] @ v[k]) for k in range(len(u))])
    torch.testing.assert_close(out, want if batched else want[0], **TOL[torch.float64])


@needs_ext
def test_full_grad_compile_inductor_with_backward() -> None:
    """The one inductor test of the suite (CPU): forward and the registered backward through Inductor."""
    args = [t.requires_grad_(True) for t in full_grad_inputs("K3_r2")]

    def loss(gu: Tensor, gv: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return ops.lowrank_full_grad(gu, gv, u, v, 0.1).square().sum()

    # Compiled afresh: torch's on-disk caches key a custom op by its name, not by its Python autograd formula, so a
    # cache written by another version of fpl_fast on this machine could hand back that version's backward.
    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(loss(*args), args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ==============================================================================================
# nn_map
# ==============================================================================================
def nn_separated(B: int, V: int, d: int, *, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """Queries within 1% of the typical row spacing of a random row: every nearest id is unique by a wide margin,
    so any summation order (and float32 or bf16 rounding) gives the exact brute-force answer."""
    emb = make(V, d, dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, V, (B,), generator=gen)
    y = emb[target] + 0.01 * make(B, d, dtype=torch.float64, seed=seed + 2)
    return y.to(dtype), emb.to(dtype)


@pytest.mark.parametrize("case", list(NN_CASES))
def test_nn_map_equals_brute_force_float64(case: str, device: torch.device) -> None:
    """Random float64 data (no near-ties at float64 precision): exactly cdist's argmin."""
    (y, emb, allowed), chunk = (s := nn_sample(case, torch.float64)).args, s.kwargs["chunk"]
    got = ops.nn_map(*to_device([y, emb, allowed], device), chunk=chunk).cpu()
    assert got.dtype == torch.int64 and got.shape == (y.shape[0],)
    torch.testing.assert_close(got, brute_force(y, emb, allowed), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nn_map_equals_brute_force_separated(dtype: torch.dtype, device: torch.device) -> None:
    y, emb = nn_separated(200, 333, 24, dtype=dtype, seed=3)
    got = ops.nn_map(y.to(device), emb.to(device), chunk=50).cpu()
    torch.testing.assert_close(got, brute_force(y, emb), rtol=0, atol=0)


def test_nn_map_allowed_mask(device: torch.device) -> None:
    B, V, d = 40, 64, 7
    y, emb = make(B, d, dtype=torch.float64, seed=4), make(V, d, dtype=torch.float64, seed=5)
    allowed = torch.rand(V, generator=torch.Generator().manual_seed(6)) < 0.3
    allowed[0] = False
    got = ops.nn_map(y.to(device), emb.to(device), allowed.to(device), chunk=9).cpu()
    assert bool(allowed[got].all())
    torch.testing.assert_close(got, brute_force(y, emb, allowed), rtol=0, atol=0)
    torch.testing.assert_close(got, reference.nn_map(y, emb, allowed, 9), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_nn_map_ties_go_to_smaller_id(chunk: int, device: torch.device) -> None:
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


def test_nn_map_empty_batch_and_noncontiguous(device: torch.device) -> None:
    emb = make(30, 5, dtype=torch.float64, seed=7)
    empty = ops.nn_map(torch.zeros(0, 5, dtype=torch.float64, device=device), emb.to(device))
    assert empty.shape == (0,) and empty.dtype == torch.int64
    y = make(11, 5, dtype=torch.float64, seed=8)
    got = ops.nn_map(noncontig(y.to(device)), noncontig(emb.to(device)), chunk=4).cpu()
    torch.testing.assert_close(got, brute_force(y, emb), rtol=0, atol=0)


# ==============================================================================================
# dp_lowrank_clip_noise
# ==============================================================================================
def dp_run(args: list[Tensor | None], device: torch.device | str, **kw: Any) -> tuple[Tensor, ...]:
    return tuple(t.cpu() for t in ops.dp_lowrank_clip_noise(*to_device(args, device), **kw))


# ----------------------------------------------------------------------------------------------
# Clipping semantics, computed by hand (float64, explicit loops)
# ----------------------------------------------------------------------------------------------
def dp_clip_by_hand(
    grad: Tensor, u: Tensor | None, v: Tensor | None, case: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noise-free outputs of the op for one case, by the formulas of docs/design.md, K and sum_classes explicit."""
    c, kw = DP_CASES[case], dp_kwargs(case)
    joint, per_sample = kw.get("joint_uv", True), kw.get("per_sample", True)
    normalize, stability = kw.get("normalize", False), kw.get("stability", 0.01)
    clip = kw["clip_norm"]  # a float, or per client (g_U or g_L, g_V, g_G)
    table = (
        torch.full((c["K"] or 1, 3), clip, dtype=torch.float64)
        if isinstance(clip, float)
        else clip.double().reshape(-1, 3)
    )
    x = grad.double() if c["K"] is not None else grad.double().unsqueeze(0)
    if c["n_cls"] is not None:
        x = x.sum(dim=2)
    uu = None if u is None else (u.double() if c["K"] is not None else u.double().unsqueeze(0))
    vv = None if v is None else (v.double() if c["K"] is not None else v.double().unsqueeze(0))
    K, b = x.shape[:2]
    n_ctx, d = dp_dims(case)
    ebs = kw.get("expected_batch_size", 0.0)
    denom = ebs if ebs > 0 else max(b, 1)

    def factor(n: float, C: float) -> float:
        return C / (n + stability) if normalize else min(1.0, C / (n + 1e-6))

    la, lb, gl, norms = [], [], [], []
    for k in range(K):
        c_u, c_v, c_g = (float(x) for x in table[k])
        samples = [x[k, i] for i in range(b)] if per_sample else [x[k].mean(0) if b else x.new_zeros(n_ctx, d)]
        a_sum = x.new_zeros(n_ctx, d if uu is None else uu.shape[-1])
        b_sum = x.new_zeros(0 if uu is None else uu.shape[-1], d)
        g_sum = x.new_zeros(n_ctx, d)
        nk = []
        for s in samples:
            ng = s.norm().item()
            g_sum += factor(ng, c_g) * s
            if uu is None:
                a_sum += factor(ng, c_u) * s
                nk.append([ng, 0.0, ng])
                continue
            ga, gb = s @ vv[k].T, uu[k].T @ s  # g_U,i (n_ctx, r), g_V,i (r, d)
            na, nb = ga.norm().item(), gb.norm().item()
            fa, fb = (factor(math.hypot(na, nb), c_u),) * 2 if joint else (factor(na, c_u), factor(nb, c_v))
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


@pytest.mark.parametrize("case", list(DP_CASES))
def test_dp_sigma_zero_equals_clip_only_by_hand(case: str, device: torch.device) -> None:
    """sigma = 0 is exactly the clip-only result (float64: equal up to float64 rounding)."""
    args = dp_inputs(case, torch.float64)
    got = dp_run(args, device, **dp_kwargs(case, noise_multiplier=0.0))
    want = dp_clip_by_hand(*args, case)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, f"output {i}: {tuple(a.shape)} != {tuple(b.shape)}"
        t = TOL[torch.float64] if i < 3 else TOL[torch.float32]
        torch.testing.assert_close(a, b, **t, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize(
    "case",
    [
        "joint_K2",
        "batch_mean",
        "full_local_no_uv",
        "plain_b1",
        "empty_b",
        "wide_many_samples",
        "table_joint",
        "table_separate",
        "table_batch_separate",
        "table_fedotp",
        "table_plain",
        "normalize_separate_wide",
    ],
)
def test_dp_noise_is_the_philox_stream(case: str, device: torch.device) -> None:
    """out(sigma) - out(0) = sigma C / denom * normals 0 .. P - 1 of client k's own stream (seed[k], offset[k]),
    U then V row-major; C is client k's clip norm of g_U (g_L), resp. of g_V (of g_U with joint_uv)."""
    args = dp_inputs(case, torch.float64)
    noisy = dp_run(args, device, **dp_kwargs(case))
    clean = dp_run(args, device, **dp_kwargs(case, noise_multiplier=0.0))
    c = DP_CASES[case]
    K = c["K"] or 1
    n_ctx, d = dp_dims(case)
    P = reference.dp_noise_numel(1, n_ctx, d, c["r"])
    ebs = c["kw"].get("expected_batch_size", 0.0)
    denom = ebs if ebs > 0 else max(c["b"], 1)
    seeds, offsets = client_streams(c["K"], DP_SEED, DP_OFFSET)
    z = torch.stack([reference.philox_normal(s, o, P) for s, o in zip(seeds, offsets, strict=True)]).double()
    table = dp_kwargs(case)["clip_norm"]
    table = torch.full((K, 3), table, dtype=torch.float64) if isinstance(table, float) else table.double().reshape(K, 3)
    col_b = 0 if c["kw"].get("joint_uv", True) else 1
    na = n_ctx * (d if c["r"] is None else c["r"])
    std_a, std_b = DP_SIGMA * table[:, 0:1] / denom, DP_SIGMA * table[:, col_b : col_b + 1] / denom
    for idx, part in ((0, z[:, :na] * std_a), (1, z[:, na:] * std_b)):
        diff = (noisy[idx] - clean[idx]).reshape(K, -1)
        torch.testing.assert_close(diff, part, rtol=1e-9, atol=1e-12)
    assert torch.equal(noisy[2], clean[2]), "the global-prompt gradient must carry no local noise"
    assert torch.equal(noisy[3], clean[3]), "the norms must not depend on the noise"


def test_dp_joint_vs_separate_clipping_factors(device: torch.device) -> None:
    """One sample with |g_U| >> C > |g_V|: separate clipping leaves g_V alone, joint clipping shrinks both."""
    grad = make(1, 1, DP_CTX, DP_D, dtype=torch.float64, seed=3)
    u = make(1, DP_CTX, 2, dtype=torch.float64, seed=4) * 1e-3  # tiny g_V = U^T grad
    v = make(1, 2, DP_D, dtype=torch.float64, seed=5) * 10.0  # large g_U = grad V^T
    gu, gv = grad[0, 0] @ v[0].T, u[0].T @ grad[0, 0]
    C = 0.5 * gu.norm().item()
    assert gv.norm().item() < C
    kw = {"clip_norm": C, "noise_multiplier": 0.0, "seed": [0], "offset": [0]}
    sep = dp_run([grad, u, v], device, joint_uv=False, **kw)
    joint = dp_run([grad, u, v], device, joint_uv=True, **kw)
    torch.testing.assert_close(sep[0][0], gu * C / (gu.norm() + 1e-6))
    torch.testing.assert_close(sep[1][0], gv)
    f = C / (torch.sqrt(gu.norm() ** 2 + gv.norm() ** 2) + 1e-6)
    torch.testing.assert_close(joint[0][0], gu * f)
    torch.testing.assert_close(joint[1][0], gv * f)


@pytest.mark.parametrize("mode", ["joint", "separate", "full_local"])
def test_dp_huge_gradient_is_clipped_to_exactly_c(mode: str, device: torch.device) -> None:
    """Per-sample mode, sigma = 0, b = 1: the clipped U/V/G sums have norm C (CLIP_EPS is negligible here)."""
    C = 2.5
    grad = make(2, 1, DP_CTX, DP_D, dtype=torch.float32, seed=6, scale=1e6)
    u = None if mode == "full_local" else make(2, DP_CTX, 3, seed=7)
    v = None if mode == "full_local" else make(2, 3, DP_D, seed=8)
    gu, gv, gg, norms = dp_run(
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
        assert gv.shape == (2, 0, DP_D)
    assert norms.shape == (2, 1, 3) and bool((norms[..., 2] > 1e5).all()), "norms are the unclipped norms"


def test_dp_batch_mean_semantics(device: torch.device) -> None:
    """per_sample=False: clip(mean_i grad_i) itself (no division by b), noise sigma C / b, norms of the mean."""
    grad, u, v = dp_inputs("batch_mean", torch.float64)
    b = grad.shape[1]
    kw = dp_kwargs("batch_mean")
    gu, gv, gg, norms = dp_run([grad, u, v], device, **kw)
    mean = grad.mean(1)  # (K, n_ctx, d)
    ng = mean.flatten(1).norm(dim=1)
    fg = torch.clamp(DP_CLIP / (ng + 1e-6), max=1.0)
    torch.testing.assert_close(gg, fg[:, None, None] * mean, **TOL[torch.float64])
    assert norms.shape == (2, 1, 3)
    torch.testing.assert_close(norms[:, 0, 2], ng.float())
    # The clean part of g_U is clip(mean g_U); the rest is noise with std sigma C / b.
    mu = mean @ v.transpose(-1, -2)
    mv = u.transpose(-1, -2) @ mean
    f = torch.clamp(
        DP_CLIP / (torch.sqrt(mu.flatten(1).norm(dim=1) ** 2 + mv.flatten(1).norm(dim=1) ** 2) + 1e-6), max=1
    )
    P = reference.dp_noise_numel(1, DP_CTX, DP_D, 2)
    z = torch.stack([reference.philox_normal(s, o, P) for s, o in zip(kw["seed"], kw["offset"], strict=True)])
    z = z.double() * DP_SIGMA * DP_CLIP / b
    na = DP_CTX * 2
    torch.testing.assert_close(gu, f[:, None, None] * mu + z[:, :na].view_as(mu), **TOL[torch.float64])
    torch.testing.assert_close(gv, f[:, None, None] * mv + z[:, na:].view_as(mv), **TOL[torch.float64])


@pytest.mark.parametrize("per_sample", [True, False])
def test_dp_sum_classes_equals_presumming(per_sample: bool, device: torch.device) -> None:
    grad, u, v = dp_inputs("sum_classes")
    kw = dp_kwargs("sum_classes", per_sample=per_sample)
    fused = dp_run([grad, u, v], device, **kw)
    kw["sum_classes"] = False
    pre = dp_run([grad.double().sum(2).float(), u, v], device, **kw)
    for a, b in zip(fused, pre, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_dp_expected_batch_size_divides(device: torch.device) -> None:
    """Every output (clipped sums and noise) is divided by expected_batch_size instead of b."""
    args = dp_inputs("joint_K2")
    b, E = args[0].shape[1], 12.5
    by_b = dp_run(args, device, **dp_kwargs("joint_K2"))
    by_e = dp_run(args, device, **dp_kwargs("joint_K2", expected_batch_size=E))
    for a, bb in zip(by_e[:3], by_b[:3], strict=True):
        torch.testing.assert_close(a * E, bb * b, **TOL[torch.float32])
    torch.testing.assert_close(by_e[3], by_b[3], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["per_sample", "batch_mean", "full_local"])
def test_dp_zero_gradient_noise_std(mode: str, device: torch.device) -> None:
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
    gu, gv, gg, _ = dp_run(
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


@pytest.mark.parametrize("mode", ["joint", "separate", "full_local", "batch_mean"])
def test_dp_zero_gradient_noise_std_per_client(mode: str, device: torch.device) -> None:
    """Distinct clip norms per client: client k's local noise has std sigma C_k / b, C_k its clip norm of g_U (of
    g_L without u, v) for the U block and of g_V for the V block (of g_U with joint_uv).

    Statistical bound as above, per client and block: n normals of std s give a sample std within
    6 s / sqrt(2 n) of s, and a sample mean within 6 s / sqrt(n) of 0. The normals are Philox's, so this either
    always passes or always fails; the tiny differences between the CPU's instruction sets (AVX2, AVX-512) and
    thread counts are far inside the margin. The stds of different clients differ by far more than the margin,
    so a kernel that used another client's (or another column's) clip norm fails.
    """
    K, b, n_ctx, d, r = 4, 4, 16, 64, 8
    sigma = 1.3
    table = torch.tensor([[0.5, 3.0, 7.0], [2.0, 0.25, 1.0], [4.0, 1.5, 0.3], [1.0, 6.0, 2.5]])
    grad = torch.zeros(K, b, n_ctx, d)
    fedotp = mode == "full_local"
    u = None if fedotp else make(K, n_ctx, r, seed=1)
    v = None if fedotp else make(K, r, d, seed=2)
    gu, gv, gg, _ = dp_run(
        [grad, u, v],
        device,
        clip_norm=table.to(device),
        noise_multiplier=sigma,
        seed=list(range(99, 99 + K)),
        offset=[0] * K,
        joint_uv=mode != "separate",
        per_sample=mode != "batch_mean",
    )
    col_b = 1 if mode == "separate" else 0
    for k in range(K):
        blocks = [(gu[k], table[k, 0].item())]
        if not fedotp:
            blocks.append((gv[k], table[k, col_b].item()))
        for block, C in blocks:
            noise = block.flatten().double()
            n = noise.numel()
            want = sigma * C / b
            assert abs(noise.mean().item()) <= 6 * want / math.sqrt(n), (k, noise.mean().item(), want)
            assert abs(noise.std().item() - want) <= 6 * want / math.sqrt(2 * n), (k, noise.std().item(), want)
    assert torch.count_nonzero(gg) == 0


@pytest.mark.parametrize("mode", ["joint", "separate", "full_local"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6])
def test_dp_automatic_clipping_contribution_below_c(mode: str, scale: float, device: torch.device) -> None:
    """normalize=True: every per-example term is scaled by C / (norm + stability), so its norm is
    C norm / (norm + stability) < C however large the gradient; one example per client (b = 1) shows each
    example's contribution alone. The returned norms stay the unclipped ones."""
    K, stab = 3, 0.01
    table = torch.tensor([[2.5, 0.7, 1.5], [0.4, 3.0, 0.9], [1.0, 1.0, 5.0]])
    grad = make(K, 1, DP_CTX, DP_D, dtype=torch.float64, seed=6) * scale
    u = None if mode == "full_local" else make(K, DP_CTX, 3, dtype=torch.float64, seed=7)
    v = None if mode == "full_local" else make(K, 3, DP_D, dtype=torch.float64, seed=8)
    gu, gv, gg, norms = dp_run(
        [grad, u, v],
        device,
        clip_norm=table.to(device),
        noise_multiplier=0.0,
        seed=[0] * K,
        offset=[0] * K,
        joint_uv=mode == "joint",
        normalize=True,
        stability=stab,
    )
    per_client = lambda t: t.flatten(1).norm(dim=1)  # noqa: E731
    n = norms.double()[:, 0]  # (K, 3): the unclipped norms of g_U (g_L), g_V, g_G
    torch.testing.assert_close(n[:, 2], grad.flatten(1).norm(dim=1), rtol=1e-6, atol=0)
    if mode == "joint":
        joint = torch.hypot(n[:, 0], n[:, 1])
        got, C, want = torch.hypot(per_client(gu), per_client(gv)), table[:, 0].double(), joint
    elif mode == "separate":
        got = torch.cat([per_client(gu), per_client(gv)])
        C, want = torch.cat([table[:, 0], table[:, 1]]).double(), torch.cat([n[:, 0], n[:, 1]])
    else:
        got, C, want = per_client(gu), table[:, 0].double(), n[:, 2]
    got_g, C_g = per_client(gg), table[:, 2].double()
    for g, c, nn in ((got, C, want), (got_g, C_g, n[:, 2])):
        assert bool((g < c).all()), (g, c)
        torch.testing.assert_close(g, c * nn / (nn + stab), rtol=1e-6, atol=1e-12)


def test_dp_clip_norm_forms_broadcast(device: torch.device) -> None:
    """The Python face's clip_norm: a float is the (K, 3) table full of it, a (K,) or (K, 1) tensor gives each
    client one C for all its quantities; all bitwise equal to passing the full table, on the kernel and the
    reference."""
    grad, u, v = dp_inputs("separate_K2")
    kw = dp_kwargs("separate_K2")
    per_client = torch.tensor([0.8, 2.5])
    forms = {
        "float": (DP_CLIP, torch.full((2, 3), DP_CLIP)),
        "(K,)": (per_client, per_client[:, None].expand(2, 3)),
        "(K, 1)": (per_client[:, None].double(), per_client[:, None].expand(2, 3)),
    }
    for name, (short, full) in forms.items():
        for fn in (ops.dp_lowrank_clip_noise, reference.dp_lowrank_clip_noise):
            a = fn(*to_device([grad, u, v], device), **{**kw, "clip_norm": to_device(short, device)})
            b = fn(*to_device([grad, u, v], device), **{**kw, "clip_norm": full.contiguous().to(device)})
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize(
    "bad",
    [
        "clip_inf_with_noise",
        "clip_table_wrong_K",
        "clip_table_two_columns",
        "clip_table_3d",
        "clip_table_unbatched_for_batched_grad",
        "clip_table_negative_entry",
        "clip_table_zero_entry",
        "clip_table_nan_entry",
        "clip_table_inf_with_noise",
        "normalize_batch_mean",
        "normalize_inf_clip",
        "stability_zero",
        "stability_negative",
        "stability_nan",
    ],
)
def test_dp_clip_norm_errors_are_one_line(bad: str, impl: str, device: torch.device) -> None:
    """A bad clip norm table, automatic clipping without per_sample or a bad stability: one ValueError line that
    names the argument and the value."""
    b = BY_NAME["dp_lowrank_clip_noise"].bad_inputs()[bad]
    fn = reference.dp_lowrank_clip_noise if impl == "reference" else ops.dp_lowrank_clip_noise
    with pytest.raises(ValueError, match=b.match) as info:
        fn(*to_device(list(b.args), device), **to_device(b.kwargs, device))
    assert "\n" not in str(info.value), str(info.value)


# ==============================================================================================
# dp_output_clip_noise
# ==============================================================================================
def output_run(args: list[Any], device: torch.device | str, **kw: Any) -> tuple[Tensor, ...]:
    kw = {**kw, "clip_norm": kw["clip_norm"].to(device)}
    return tuple(t.cpu() for t in ops.dp_output_clip_noise(*to_device(args, device), **kw))


# ----------------------------------------------------------------------------------------------
# Semantics, by hand: float64 per-example autograd
# ----------------------------------------------------------------------------------------------
def output_by_autograd(x: Tensor, t: Tensor, labels: Tensor, mask: Tensor | None, s: float, clip: Tensor, denom: float):
    """Per example: CE(s cos(x_i, T), y_i), its gradient w.r.t. T by torch.autograd, clipped and summed."""
    K, b, _ = x.shape
    release = torch.zeros_like(t, dtype=torch.float64)
    norms = torch.zeros(K, b, dtype=torch.float64)
    losses = torch.zeros(K, b, dtype=torch.float64)
    for k in range(K):
        for i in range(b):
            m = 1.0 if mask is None else float(mask[k, i])
            if m == 0.0:
                continue
            tk = t[k].double().clone().requires_grad_(True)
            cos = F.normalize(x[k, i].double(), dim=-1) @ F.normalize(tk, dim=-1).T
            loss = F.cross_entropy((s * cos)[None], labels[k, i : i + 1])
            (g,) = torch.autograd.grad(loss, tk)
            n = g.norm().item()
            norms[k, i], losses[k, i] = n, loss.item()
            release[k] += min(1.0, float(clip[k]) / (n + reference.CLIP_EPS)) * g
    return release / denom, norms.float(), losses.float()


@pytest.mark.parametrize("case", ["K3_mask", "K3_none_clipped", "K1", "wide", "one_class_b1", "empty_b"])
def test_output_no_noise_equals_per_example_autograd(case: str, device: torch.device) -> None:
    args = output_inputs(case, torch.float64)
    kw = output_kwargs(case, noise_multiplier=0.0)
    got = output_run(args, device, **kw)
    want = output_by_autograd(*args, kw["logit_scale"], kw["clip_norm"], kw["denominator"])
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-7)
    if case in ("K3_mask", "wide"):
        clip = kw["clip_norm"][:, None].double()
        live = got[1] > 0
        assert bool((got[1].double()[live] > clip.expand_as(got[1])[live]).any()), "no example was clipped"
        assert bool((got[1].double()[live] < clip.expand_as(got[1])[live]).any()), "every example was clipped"


@pytest.mark.parametrize("case", ["K3_mask", "K1", "wide", "paper_width", "empty_b"])
def test_output_noise_is_the_philox_stream(case: str, device: torch.device) -> None:
    """release(sigma) - release(0) = sigma C_k / denom * normals 0 .. n_cls D - 1 of client k's stream."""
    args = output_inputs(case, torch.float64)
    kw = output_kwargs(case)
    noisy = output_run(args, device, **kw)
    clean = output_run(args, device, **{**kw, "noise_multiplier": 0.0})
    c = OUTPUT_CASES[case]
    P = reference.output_noise_numel(1, c["n_cls"], c["D"])
    z = torch.stack([reference.philox_normal(s, o, P) for s, o in zip(kw["seed"], kw["offset"], strict=True)])
    want = z.double() * (O_SIGMA * kw["clip_norm"].double() / kw["denominator"])[:, None]
    torch.testing.assert_close((noisy[0] - clean[0]).reshape(c["K"], -1), want, rtol=1e-9, atol=1e-12)
    assert torch.equal(noisy[1], clean[1]) and torch.equal(noisy[2], clean[2])


# The CPU kernel's float32 Box-Muller (csrc/cpu/box_muller_f32.h) is within a few float ulps of the double one
# that reference.philox_normal rounds to float (CUDA keeps double and matches it bitwise but for ties).
F32_NORMAL_TOL = 4e-6


def assert_normals_close(got: Tensor, want: Tensor) -> None:
    err = (got.double() - want.double()).abs() / want.double().abs().clamp(min=1.0)
    assert float(err.max()) <= F32_NORMAL_TOL, f"max |err| / max(1, |z|) = {float(err.max()):.3g}"


def test_output_noise_normals_match_the_stream_over_many_counters(device: torch.device) -> None:
    """With b = 0 the float32 release is sigma C z / denom exactly for C = denom, sigma = 1: the vectorised normals
    match the reference's over 2 x 3 x 517 draws (unaligned row starts, vector chunks and their tails)."""
    K, n_cls, D = 2, 3, 517
    x, t = torch.zeros(K, 0, D), make(K, n_cls, D)
    labels = torch.zeros(K, 0, dtype=torch.int64)
    seeds, offsets = client_streams(K, O_SEED, O_OFFSET)
    kw = {"logit_scale": 1.0, "clip_norm": torch.full((K,), 2.0), "noise_multiplier": 1.0}
    got = output_run([x, t, labels, None], device, **kw, seed=seeds, offset=offsets, denominator=2.0)[0]
    z = torch.stack([reference.philox_normal(s, o, n_cls * D) for s, o in zip(seeds, offsets, strict=True)])
    assert_normals_close(got.reshape(K, -1).cpu(), z)


def test_output_noise_normals_over_a_million_draws() -> None:
    """About 10^6 normals of the op (b = 0, float32, 64-bit seeds and offsets) against the reference stream."""
    K, n_cls, D = 2, 1024, 512
    x, t = torch.zeros(K, 0, D), torch.zeros(K, n_cls, D)
    labels = torch.zeros(K, 0, dtype=torch.int64)
    seeds, offsets = [(5 << 40) + 11, 3], [(7 << 33) + 1, 0]
    kw = {"logit_scale": 1.0, "clip_norm": torch.full((K,), 2.0), "noise_multiplier": 1.0}
    got = ops.dp_output_clip_noise(x, t, labels, None, **kw, seed=seeds, offset=offsets, denominator=2.0)[0]
    z = torch.stack([reference.philox_normal(s, o, n_cls * D) for s, o in zip(seeds, offsets, strict=True)])
    assert_normals_close(got.reshape(K, -1), z)


def _box_muller_double(words: Tensor) -> Tensor:
    """csrc/philox.h's Box-Muller in double on (n, 2) words (x0, x1), rounded to float, as the reference does."""
    a, b = words[:, 0].double(), words[:, 1].double()
    r = torch.sqrt(-2.0 * torch.log((a + 1.0) * 2.0**-32))
    u2 = b * 2.0**-32
    return torch.stack([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)], dim=1).float()


@needs_ext
@pytest.mark.skipif(not hasattr(torch.ops.fpl_fast, "_box_muller_f32_words"), reason="no float32 Box-Muller hook")
def test_output_float32_box_muller_on_crafted_words() -> None:
    """The float32 path on words no seed search would reach: x0 near 0 (the tail: max |z| must be the 32-bit u1's
    6.66, not a 24-bit u1's 5.8), near 2^31 (the branch switch) and near 2^32 (u1 near 1), x1 at every octant edge."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    x0 = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    x1 = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    m = n // 8
    x0[:m] = torch.arange(m)
    x0[m : 2 * m] = 2**32 - 1 - torch.arange(m)
    x0[2 * m : 2 * m + 8192] = 2**31 + torch.arange(-4096, 4096)
    edges = (torch.arange(8, dtype=torch.int64) << 29)[:, None] + torch.arange(-512, 512)[None, :]
    x1[3 * m : 3 * m + edges.numel()] = edges.flatten() % 2**32
    x1[4 * m : 4 * m + 2] = torch.tensor([0, 2**32 - 1])
    words = torch.stack([x0, x1], dim=1)
    got, want = torch.ops.fpl_fast._box_muller_f32_words(words), _box_muller_double(words)
    assert_normals_close(got, want)
    tail = torch.tensor([[0, 0], [0, 2**31], [2**32 - 1, 12345]])
    got_t, want_t = torch.ops.fpl_fast._box_muller_f32_words(tail), _box_muller_double(tail)
    # Exact where every step is (r = sqrt(64 ln 2) at x0 = 0, r = 0 at x0 = 2^32 - 1); sin(pi) is exactly 0 here.
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=1e-15)
    assert torch.equal(got_t[:, 0], want_t[:, 0])
    assert float(got.abs().max()) == float(want.abs().max())
    assert float(got_t.abs().max()) == pytest.approx(math.sqrt(64 * math.log(2)), rel=1e-7)


_THREADS = """
import json, sys, torch
from fpl_fast import ops
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
K, b, n_cls, D = 5, 13, 21, 77
x, t = torch.randn(K, b, D, generator=g), torch.randn(K, n_cls, D, generator=g)
labels = torch.randint(0, n_cls, (K, b), generator=g)
out = ops.dp_output_clip_noise(x, t, labels, None, logit_scale=30.0, clip_norm=torch.full((K,), 0.3),
                               noise_multiplier=0.5, seed=list(range(K)), offset=[7] * K, denominator=13.0)
print(json.dumps([o.double().flatten().tolist() for o in out]))
"""


@needs_ext
def test_output_results_do_not_depend_on_the_thread_count() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    outs = []
    for n in (1, 2, 3):
        proc = subprocess.run(
            [sys.executable, "-c", _THREADS, str(n)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1] == outs[2]


def test_output_bfloat16(device: torch.device) -> None:
    """bfloat16 features: the release stays bfloat16, close to the bfloat16 reference (the norms in float32)."""
    x, t, labels, mask = output_inputs("wide")
    kw = output_kwargs("wide")
    bf = [x.bfloat16(), t.bfloat16(), labels, mask.bfloat16()]
    got_bf = output_run(bf, device, **kw)
    want_bf = reference.dp_output_clip_noise(*bf, **kw)
    assert got_bf[0].dtype == torch.bfloat16
    torch.testing.assert_close(got_bf[0].float(), want_bf[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_bf[1], want_bf[1], rtol=1e-4, atol=1e-5)
