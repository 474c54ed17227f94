"""The CPU kernels' ISA switch: FPL_FAST_CPU_ISA, else ATEN_CPU_CAPABILITY, else the best the CPU supports.

Each case runs in a fresh interpreter (the level is chosen once, when ``fpl_fast._C`` loads), reports
``fpl_fast.cpu_isa()`` and checks the CPU kernel of every op against the reference under that level.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fpl_fast import ops

REPO = Path(__file__).resolve().parents[1]
LEVELS = ["default", "avx2", "avx512"]  # in increasing order
ENV_VARS = ("FPL_FAST_CPU_ISA", "ATEN_CPU_CAPABILITY")

needs_ext = pytest.mark.skipif(not ops.has_cpp_ops(), reason="fpl_fast._C is not built")


def _best_supported() -> str:
    """The best level of this CPU from /proc/cpuinfo: all of x86-64-v4 (v3), which the variants are built for."""
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        return "default"  # one plain build: the level is always "default"
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    return "avx512" if v4 else "avx2" if v3 else "default"


BEST = _best_supported()


def _clamped(level: str) -> str:
    return LEVELS[min(LEVELS.index(level), LEVELS.index(BEST))]


# Every op's CPU kernel against the reference, at sizes that run the SIMD main loops and their tails (d = 53,
# 64), several 4-row blocks and sample chunks (b = 11 > 8), in float32 and float64.
_PARITY = textwrap.dedent(
    """
    import json, sys
    import torch
    import fpl_fast
    from fpl_fast import ops
    from fpl_fast.ops import reference

    g = torch.Generator().manual_seed(0)
    failures = []
    covered = set()

    def rnd(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    def check(name, got, want, tol):
        covered.add(name.split()[0])
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            try:
                torch.testing.assert_close(a, b, **tol)
            except AssertionError as e:
                failures.append(f"{name} output {i}: {str(e).splitlines()[0]}")

    for dtype in (torch.float32, torch.float64):
        tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
        for K, n_cls, n_ctx, S, d, r in ((2, 3, 6, 4, 53, 5), (3, 2, 9, 3, 64, 8)):
            prefix, suffix = rnd(n_cls, 1, d, dtype=dtype), rnd(n_cls, S, d, dtype=dtype)
            gg, res = rnd(K, n_ctx, d, dtype=dtype), rnd(K, n_ctx, d, dtype=dtype)
            u, v = rnd(K, n_ctx, r, dtype=dtype), rnd(K, r, d, dtype=dtype, scale=0.5)
            tag = f"{dtype}, d={d}"
            args = (prefix, suffix, gg, u, v, res)
            check(f"lowrank_prompt {tag}", ops.lowrank_prompt(*args), reference.lowrank_prompt(*args), tol)
            grad_out = rnd(K, n_cls, 1 + n_ctx + S, d, dtype=dtype)
            check(
                f"lowrank_prompt_backward {tag}",
                torch.ops.fpl_fast.lowrank_prompt_backward(grad_out, u, v, n_ctx),
                reference.lowrank_prompt_backward(grad_out, u, v, n_ctx),
                tol,
            )
            b = 11
            spread = (0.1 + 0.6 * torch.arange(b, dtype=torch.float64)).to(dtype).view(1, b, 1, 1)
            grad = rnd(K, b, n_ctx, d, dtype=dtype) * spread
            streams = {"seed": [5 + 7 * k for k in range(K)], "offset": [3 * k for k in range(K)]}
            for uv, opts in (
                ((u, v), {}),
                ((u, v), {"joint_uv": False}),
                ((u, v), {"per_sample": False}),
                ((None, None), {}),
            ):
                kw = {"clip_norm": 3.0, "noise_multiplier": 0.7, **streams, **opts}
                check(
                    f"dp_lowrank_clip_noise {tag} {opts} uv={uv[0] is not None}",
                    ops.dp_lowrank_clip_noise(grad, *uv, **kw),
                    reference.dp_lowrank_clip_noise(grad, *uv, **kw),
                    tol,
                )
            grad5 = rnd(K, 3, n_cls, n_ctx, d, dtype=dtype)
            kw = {"clip_norm": 3.0, "noise_multiplier": 0.7, "sum_classes": True, **streams}
            check(
                f"dp_lowrank_clip_noise sum_classes {tag}",
                ops.dp_lowrank_clip_noise(grad5, u, v, **kw),
                reference.dp_lowrank_clip_noise(grad5, u, v, **kw),
                tol,
            )
            gu, gv = rnd(K, n_ctx, r, dtype=dtype), rnd(K, r, d, dtype=dtype)
            check(
                f"lowrank_full_grad {tag}",
                ops.lowrank_full_grad(gu, gv, u, v, 0.1),
                reference.lowrank_full_grad(gu, gv, u, v, 0.1),
                tol,
            )
            # Gram-Schmidt amplifies rounding: float32 gets a looser tolerance, as op_table.factorize_tol.
            ftol = tol if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
            check(
                f"lowrank_factorize {tag}",
                ops.lowrank_factorize(gg, r, streams["seed"], streams["offset"]),
                reference.lowrank_factorize(gg, r, streams["seed"], streams["offset"]),
                ftol,
            )
            # dp_output_clip_noise: the blocked dot products and class sums, and the vectorised normals (n_cls d).
            feats, texts = rnd(K, b, d, dtype=dtype), rnd(K, n_cls + 7, d, dtype=dtype, scale=0.3)
            labels = torch.randint(0, n_cls + 7, (K, b), generator=g)
            mask = torch.ones(K, b, dtype=dtype)
            mask[:, -1] = 0
            kw = {"logit_scale": 20.0, "clip_norm": torch.full((K,), 0.5), "noise_multiplier": 0.7, **streams,
                  "denominator": float(b)}  # fmt: skip
            check(
                f"dp_output_clip_noise {tag}",
                ops.dp_output_clip_noise(feats, texts, labels, mask, **kw),
                reference.dp_output_clip_noise(feats, texts, labels, mask, **kw),
                tol,
            )
            y, emb = rnd(9, d, dtype=dtype), rnd(40, d, dtype=dtype)
            allowed = torch.arange(40) % 3 != 0
            check(f"nn_map {tag}", ops.nn_map(y, emb, allowed, chunk=16), reference.nn_map(y, emb, allowed, 16), {})

    # Every op the library registers (test hooks, with a leading underscore, aside) must be covered above.
    registered = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("fpl_fast::")}
    failures += [f"{name}: not covered" for name in sorted(registered - covered) if not name.startswith("_")]
    print(json.dumps({"cpu_isa": fpl_fast.cpu_isa(), "has_cpp_ops": fpl_fast.has_cpp_ops(), "failures": failures}))
    """
)


def _run(env_over: dict[str, str], script: str = _PARITY) -> tuple[dict, str]:
    """Run ``script`` in a fresh interpreter with the ISA variables replaced by ``env_over``."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(env_over)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_cpu_isa_is_reported() -> None:
    got = ops.cpu_isa()
    assert got in (LEVELS if ops.has_cpp_ops() else ["reference"])
    import fpl_fast

    assert fpl_fast.cpu_isa() == got


@needs_ext
@pytest.mark.parametrize(
    "env,want",
    [
        ({"FPL_FAST_CPU_ISA": "avx512"}, "avx512"),
        ({"FPL_FAST_CPU_ISA": "avx2"}, "avx2"),
        ({"FPL_FAST_CPU_ISA": "default"}, "default"),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
        ({"ATEN_CPU_CAPABILITY": "default"}, "default"),
        ({"FPL_FAST_CPU_ISA": "default", "ATEN_CPU_CAPABILITY": "avx2"}, "default"),
        ({"FPL_FAST_CPU_ISA": "", "ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
        ({}, BEST),
    ],
    ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) or "unset" if isinstance(x, dict) else x,
)
def test_level_follows_the_environment_and_kernels_match_the_reference(env: dict[str, str], want: str) -> None:
    """The requested level (clamped to what this CPU supports) is the one in use, and under it the CPU kernel
    of every op matches the reference."""
    res, stderr = _run(env)
    assert res["has_cpp_ops"] is True
    assert res["cpu_isa"] == _clamped(want), (env, res["cpu_isa"], f"best supported here: {BEST}")
    assert res["failures"] == [], res["failures"]
    assert "not a CPU ISA level" not in stderr


@needs_ext
def test_unknown_value_warns_once_and_takes_the_best() -> None:
    script = "import fpl_fast, fpl_fast.ops; import json; print(json.dumps({'cpu_isa': fpl_fast.cpu_isa()}))"
    res, stderr = _run({"FPL_FAST_CPU_ISA": "sse9"}, script)
    assert res["cpu_isa"] == BEST
    lines = [line for line in stderr.splitlines() if "not a CPU ISA level" in line]
    assert len(lines) == 1, stderr
    assert 'FPL_FAST_CPU_ISA="sse9"' in lines[0] and "avx512, avx2, default" in lines[0], lines[0]
    assert f"using {BEST}" in lines[0]
