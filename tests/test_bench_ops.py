"""bench/bench_ops.py's plain-PyTorch eager version of dp_lowrank_clip_noise computes the reference's math.

Correctness only (no timings): with sigma = 0 it must equal fpl_fast.ops.reference, and its torch.randn noise must have
the reference's scale sigma C / b on the U and V sums and none on the global prompt's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fpl_fast.ops import reference

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_ops.py"


@pytest.fixture(scope="module")
def bench_ops():  # noqa: ANN201 - a module
    spec = importlib.util.spec_from_file_location("bench_ops", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ops"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("joint_uv", [True, False])
@pytest.mark.parametrize("clip_norm", [0.5, 100.0])  # clipping active / inactive
def test_eager_dp_matches_reference(bench_ops, per_sample: bool, joint_uv: bool, clip_norm: float) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    K, b, n, d, r = 3, 11, 6, 53, 5
    grad = torch.randn(K, b, n, d, generator=g) * 0.5
    u, v = torch.randn(K, n, r, generator=g), torch.randn(K, r, d, generator=g)
    kw = {"joint_uv": joint_uv, "per_sample": per_sample}
    want = reference.dp_lowrank_clip_noise(grad, u, v, clip_norm, 0.0, [1, 2, 3], [0, 0, 0], **kw)
    got = bench_ops.eager_dp_lowrank_clip_noise(grad, u, v, clip_norm, 0.0, **kw)
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"output {i}: {m}")

    torch.manual_seed(1)
    noisy = bench_ops.eager_dp_lowrank_clip_noise(grad, u, v, clip_norm, 2.0, **kw)
    z = torch.cat([(noisy[0] - got[0]).flatten(), (noisy[1] - got[1]).flatten()])
    assert abs(z.std().item() / (2.0 * clip_norm / b) - 1) < 0.1  # 1,005 normals: std error ~2%
    assert torch.equal(noisy[2], got[2]) and torch.equal(noisy[3], got[3])
