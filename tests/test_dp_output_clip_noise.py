"""dp_output_clip_noise: closed-form per-example cotangent norms of the logit head, clipping, the rank-one class
sums, one Philox draw per client and the division by the denominator."""

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
from support import TOL, client_streams, make, needs_ext, noncontig, to_device
from torch import Tensor

from fpl_fast import ops
from fpl_fast.ops import reference

REPO = Path(__file__).resolve().parents[1]
SEED, OFFSET = 4321, 29
SCALE, SIGMA = 20.0, 0.9

# K clients, b examples, n_cls classes, width D; clip: "some" (clips some examples), "none" (C above every norm),
# "inf" (no clipping); mask: padding rows.
CASES: dict[str, dict[str, Any]] = {
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


def make_inputs(case: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Any]:
    """(image_feats, text_feats, labels, mask) on the CPU; the last row of every client is padding (mask 0)."""
    c = CASES[case]
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


def clip_of(case: str) -> Tensor:
    """(K,) clip norms: per client the median of its real examples' norms ("some": clips about half of them), far
    above every norm ("none"), or inf."""
    c = CASES[case]
    kind = c["clip"]
    if kind == "inf":
        return torch.full((c["K"],), math.inf)
    if kind == "none":
        return torch.full((c["K"],), 1e6)
    x, t, labels, mask = make_inputs(case, torch.float64)
    ones = torch.ones(c["K"])
    seeds, offsets = client_streams(c["K"], SEED, OFFSET)
    _, norms, _ = reference.dp_output_clip_noise(x, t, labels, mask, SCALE, ones, 0.0, seeds, offsets, 1.0)
    live = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask.bool()
    return torch.stack(
        [n[m].median() if m.any() else torch.tensor(1.0) for n, m in zip(norms, live, strict=True)]
    ).clamp(min=1e-3)


def kwargs_of(case: str, **over: Any) -> dict[str, Any]:
    c = CASES[case]
    seeds, offsets = client_streams(c["K"], SEED, OFFSET)
    kw: dict[str, Any] = {
        "logit_scale": SCALE,
        "clip_norm": clip_of(case),
        "noise_multiplier": SIGMA,
        "seed": seeds,
        "offset": offsets,
        "denominator": max(c["b"], 1) + 0.5,
    }
    kw.update(over)
    return kw


def run_ops(args: list[Any], device: torch.device | str, **kw: Any) -> tuple[Tensor, ...]:
    kw = {**kw, "clip_norm": kw["clip_norm"].to(device)}
    return tuple(t.cpu() for t in ops.dp_output_clip_noise(*to_device(args, device), **kw))


def check_close(got: tuple[Tensor, ...], want: tuple[Tensor, ...], dtype: torch.dtype) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        tol = TOL[dtype] if i == 0 else TOL[torch.float32]
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"output {i}: {m}")


# ----------------------------------------------------------------------------------------------
# Parity with the reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [True, False], ids=["noise", "no_noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str, dtype: torch.dtype, noise: bool, device: torch.device) -> None:
    args = make_inputs(case, dtype)
    kw = kwargs_of(case, noise_multiplier=SIGMA if noise else 0.0)
    got = run_ops(args, device, **kw)
    want = reference.dp_output_clip_noise(*args, **kw)
    check_close(got, want, dtype)
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_inf_clip_without_noise(dtype: torch.dtype, device: torch.device) -> None:
    """C = inf: no example is clipped; the release is the plain sum of the cotangents / denominator."""
    args = make_inputs("K3_mask", dtype)
    kw = kwargs_of("K3_mask", clip_norm=torch.full((3,), math.inf), noise_multiplier=0.0)
    got = run_ops(args, device, **kw)
    check_close(got, reference.dp_output_clip_noise(*args, **kw), dtype)
    assert torch.isfinite(got[0]).all()


def test_noncontiguous_and_bfloat16(device: torch.device) -> None:
    x, t, labels, mask = make_inputs("wide")
    kw = kwargs_of("wide")
    got = run_ops([noncontig(x), noncontig(t), noncontig(labels), noncontig(mask)], device, **kw)
    check_close(got, reference.dp_output_clip_noise(x, t, labels, mask, **kw), torch.float32)
    bf = [x.bfloat16(), t.bfloat16(), labels, mask.bfloat16()]
    got_bf = run_ops(bf, device, **kw)
    want_bf = reference.dp_output_clip_noise(*bf, **kw)
    assert got_bf[0].dtype == torch.bfloat16
    torch.testing.assert_close(got_bf[0].float(), want_bf[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_bf[1], want_bf[1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Semantics, by hand: float64 per-example autograd
# ----------------------------------------------------------------------------------------------
def by_autograd(x: Tensor, t: Tensor, labels: Tensor, mask: Tensor | None, s: float, clip: Tensor, denom: float):
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
def test_no_noise_equals_per_example_autograd(case: str, device: torch.device) -> None:
    args = make_inputs(case, torch.float64)
    kw = kwargs_of(case, noise_multiplier=0.0)
    got = run_ops(args, device, **kw)
    want = by_autograd(*args, kw["logit_scale"], kw["clip_norm"], kw["denominator"])
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-7)
    if case in ("K3_mask", "wide"):
        clip = kw["clip_norm"][:, None].double()
        live = got[1] > 0
        assert bool((got[1].double()[live] > clip.expand_as(got[1])[live]).any()), "no example was clipped"
        assert bool((got[1].double()[live] < clip.expand_as(got[1])[live]).any()), "every example was clipped"


@pytest.mark.parametrize("case", ["K3_mask", "K1", "wide", "paper_width", "empty_b"])
def test_noise_is_the_philox_stream(case: str, device: torch.device) -> None:
    """release(sigma) - release(0) = sigma C_k / denom * normals 0 .. n_cls D - 1 of client k's stream."""
    args = make_inputs(case, torch.float64)
    kw = kwargs_of(case)
    noisy = run_ops(args, device, **kw)
    clean = run_ops(args, device, **{**kw, "noise_multiplier": 0.0})
    c = CASES[case]
    P = reference.output_noise_numel(1, c["n_cls"], c["D"])
    z = torch.stack([reference.philox_normal(s, o, P) for s, o in zip(kw["seed"], kw["offset"], strict=True)])
    want = z.double() * (SIGMA * kw["clip_norm"].double() / kw["denominator"])[:, None]
    torch.testing.assert_close((noisy[0] - clean[0]).reshape(c["K"], -1), want, rtol=1e-9, atol=1e-12)
    assert torch.equal(noisy[1], clean[1]) and torch.equal(noisy[2], clean[2])


# The CPU kernel's float32 Box-Muller (csrc/cpu/box_muller_f32.h) is within a few float ulps of the double one
# that reference.philox_normal rounds to float (CUDA keeps double and matches it bitwise but for ties).
F32_NORMAL_TOL = 4e-6


def assert_normals_close(got: Tensor, want: Tensor) -> None:
    err = (got.double() - want.double()).abs() / want.double().abs().clamp(min=1.0)
    assert float(err.max()) <= F32_NORMAL_TOL, f"max |err| / max(1, |z|) = {float(err.max()):.3g}"


def test_noise_normals_match_the_stream_over_many_counters(device: torch.device) -> None:
    """With b = 0 the float32 release is sigma C z / denom exactly for C = denom, sigma = 1: the vectorised normals
    match the reference's over 2 x 3 x 517 draws (unaligned row starts, vector chunks and their tails)."""
    K, n_cls, D = 2, 3, 517
    x, t = torch.zeros(K, 0, D), make(K, n_cls, D)
    labels = torch.zeros(K, 0, dtype=torch.int64)
    seeds, offsets = client_streams(K, SEED, OFFSET)
    kw = {"logit_scale": 1.0, "clip_norm": torch.full((K,), 2.0), "noise_multiplier": 1.0}
    got = run_ops([x, t, labels, None], device, **kw, seed=seeds, offset=offsets, denominator=2.0)[0]
    z = torch.stack([reference.philox_normal(s, o, n_cls * D) for s, o in zip(seeds, offsets, strict=True)])
    assert_normals_close(got.reshape(K, -1).cpu(), z)


def test_noise_normals_over_a_million_draws() -> None:
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
def test_float32_box_muller_on_crafted_words() -> None:
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


# ----------------------------------------------------------------------------------------------
# Streams, clients, threads
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("case", ["K3_mask", "wide", "paper_width"])
def test_client_alone_equals_client_in_a_launch(case: str, impl: str, device: torch.device) -> None:
    """Bitwise for the kernels (a loop per client); the reference's batched BLAS matmuls may block differently for
    other batch sizes (1 ulp seen on an AMD EPYC): there the same noise and the same values to float32 rounding."""
    fn = ops.dp_output_clip_noise if impl == "ops" else reference.dp_output_clip_noise

    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        return torch.equal(x, y) if impl == "ops" else torch.allclose(x, y, rtol=1e-6, atol=1e-7)

    args = to_device(make_inputs(case), device)
    K = CASES[case]["K"]
    kw = {**kwargs_of(case), "clip_norm": clip_of(case).to(device)}
    together = fn(*args, **kw)
    for k in range(K):
        one = [None if a is None else a[k : k + 1] for a in args]
        streams = {"seed": [kw["seed"][k]], "offset": [kw["offset"][k]]}
        alone = fn(*one, **{**kw, "clip_norm": kw["clip_norm"][k : k + 1], **streams})
        for i, (t, a) in enumerate(zip(together, alone, strict=True)):
            assert same(a[0], t[k]), f"output {i} of client {k}: K = 1 launch differs from K = {K}"


def test_same_stream_bitwise_other_stream_differs(device: torch.device) -> None:
    args = make_inputs("K3_mask")
    kw = kwargs_of("K3_mask")
    a, b = run_ops(args, device, **kw), run_ops(args, device, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for key in ("seed", "offset"):
        other = run_ops(args, device, **{**kw, key: [v + 1 for v in kw[key]]})
        assert not torch.equal(a[0], other[0]), key
        assert torch.equal(a[1], other[1]) and torch.equal(a[2], other[2])


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
def test_results_do_not_depend_on_the_thread_count() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    outs = []
    for n in (1, 2, 3):
        proc = subprocess.run(
            [sys.executable, "-c", _THREADS, str(n)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1] == outs[2]


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.skipif(not ops._HAS_OUTPUT_DP, reason="this _C has no dp_output_clip_noise kernel")
@pytest.mark.parametrize("case", ["K3_mask", "K1", "empty_b", "one_class_b1"])
def test_opcheck(case: str, device: torch.device) -> None:
    kw = kwargs_of(case)
    x, t, labels, mask = to_device(make_inputs(case), device)
    args = (x, t, labels, mask, SCALE, kw["clip_norm"].to(device), SIGMA, kw["seed"], kw["offset"], kw["denominator"])
    torch.library.opcheck(torch.ops.fpl_fast.dp_output_clip_noise.default, args)


@needs_ext
def test_compile_fullgraph(device: torch.device) -> None:
    x, t, labels, mask = to_device(make_inputs("K3_mask"), device)
    clip = clip_of("K3_mask").to(device)

    def step(x: Tensor, t: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        return ops.dp_output_clip_noise(
            x, t, labels, mask, logit_scale=SCALE, clip_norm=clip, noise_multiplier=SIGMA, seed=[1, 2, 3],
            offset=[0, 5, 9], denominator=6.0,
        )  # fmt: skip

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, t, labels, mask), step(x, t, labels, mask), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Bad inputs: the C++ op raises a ValueError for the reference's check (the same key phrase)
# ----------------------------------------------------------------------------------------------
def _bad_cases() -> dict[str, tuple[list[Any], dict[str, Any], str]]:
    """(args, kwargs, the key phrase both the reference's and the C++ message start with)."""
    x, t, labels, mask = make_inputs("K3_mask")
    ok, xs = kwargs_of("K3_mask"), [x, t, labels, mask]
    return {
        "sigma_negative": (xs, {**ok, "noise_multiplier": -1.0}, "noise_multiplier must be finite and >= 0"),
        "sigma_nan": (xs, {**ok, "noise_multiplier": math.nan}, "noise_multiplier must be finite and >= 0"),
        "scale_zero": (xs, {**ok, "logit_scale": 0.0}, "logit_scale must be finite and > 0"),
        "scale_inf": (xs, {**ok, "logit_scale": math.inf}, "logit_scale must be finite and > 0"),
        "denominator_zero": (xs, {**ok, "denominator": 0.0}, "denominator must be finite and > 0"),
        "denominator_nan": (xs, {**ok, "denominator": math.nan}, "denominator must be finite and > 0"),
        "image_2d": ([x[0], t, labels, mask], ok, r"image_feats must be 3-D \(K, b, D\)"),
        "text_2d": ([x, t[0], labels, mask], ok, r"text_feats must be 3-D \(K, n_cls, D\)"),
        "text_int": ([x.long(), t.long(), labels, mask], ok, "text_feats must be floating point"),
        "image_dtype": ([x.double(), t, labels, mask], ok, "image_feats must have dtype"),
        "text_K": ([x, t[:2], labels, mask], ok, r"text_feats must be \(3, n_cls, 37\) to match image_feats"),
        "text_D": ([x, t[..., :-1], labels, mask], ok, r"text_feats must be \(3, n_cls, 37\) to match image_feats"),
        "no_classes": ([x, t[:, :0], labels, mask], ok, "text_feats must hold at least one class"),
        "labels_int32": ([x, t, labels.int(), mask], ok, "labels must have dtype"),
        "labels_shape": ([x, t, labels[:, :-1], mask], ok, r"labels must have shape \(3, 6\) to match image_feats"),
        "labels_range_high": (
            [x, t, labels.index_fill(1, torch.tensor([2]), 5), mask],
            ok,
            r"labels must lie in \[0, 5\)",
        ),
        "labels_negative": ([x, t, labels - 10, mask], ok, r"labels must lie in \[0, 5\)"),
        "mask_dtype": ([x, t, labels, mask.double()], ok, "mask must have dtype"),
        "mask_shape": ([x, t, labels, mask[:, :-1]], ok, r"mask must have shape \(3, 6\) to match image_feats"),
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


@pytest.mark.parametrize("bad", list(_bad_cases()))
def test_bad_inputs_raise_the_same_check(bad: str, device: torch.device) -> None:
    """The reference, ops and the C++ op itself raise a ValueError for the same precondition (its key phrase; the
    values after "got" are formatted by Python or by c10)."""
    args, kw, phrase = _bad_cases()[bad]
    with pytest.raises(ValueError, match="^" + phrase):
        reference.dp_output_clip_noise(*args, **kw)
    dev_args = to_device(args, device)
    dev_kw = {**kw, "clip_norm": kw["clip_norm"].to(device)}
    with pytest.raises(ValueError, match="^" + phrase):
        ops.dp_output_clip_noise(*dev_args, **dev_kw)
    if ops._HAS_OUTPUT_DP:  # the C++ checks themselves, without the Python wrapper
        with pytest.raises(ValueError, match="^" + phrase):
            torch.ops.fpl_fast.dp_output_clip_noise(
                *dev_args, dev_kw["logit_scale"], dev_kw["clip_norm"], dev_kw["noise_multiplier"], dev_kw["seed"],
                dev_kw["offset"], dev_kw["denominator"],
            )  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to put inputs on two devices")
@pytest.mark.parametrize("impl", ["reference", "ops"])
def test_wrong_device_raises(impl: str) -> None:
    x, t, labels, mask = make_inputs("K3_mask")
    fn = reference.dp_output_clip_noise if impl == "reference" else ops.dp_output_clip_noise
    with pytest.raises(ValueError, match=r"\blabels must be on cuda"):
        fn(x.cuda(), t.cuda(), labels, mask.cuda(), **{**kwargs_of("K3_mask"), "clip_norm": clip_of("K3_mask").cuda()})
