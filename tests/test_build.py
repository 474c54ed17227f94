"""The compiled extension: is it loaded, what was built, and the reference fallback when it is missing.

CI sets FPL_FAST_REQUIRE_EXT=1 so that a missing or unloadable ``fpl_fast/_C*.so`` FAILS instead of skipping;
FPL_FAST_EXPECT_CUDA=0/1 (optional) states whether the CUDA kernels must have been built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fpl_fast
from fpl_fast import ops

REPO = Path(__file__).resolve().parents[1]


def registered_ops() -> list[str]:
    """Every op the loaded library defines (csrc/fpl_fast.cpp's schemas), from the dispatcher itself, so that a
    new op cannot be left out; test hooks (a leading underscore, CPU only) excluded."""
    names = (s.name for s in torch._C._jit_get_all_schemas())
    ops_ = sorted(n.split("::", 1)[1] for n in names if n.startswith("fpl_fast::"))
    return [n for n in ops_ if not n.startswith("_")]


def _extension_file_present() -> bool:
    return importlib.util.find_spec("fpl_fast._C") is not None


def _require_ext() -> bool:
    return os.environ.get("FPL_FAST_REQUIRE_EXT", "") == "1"


def test_has_cpp_ops_when_built() -> None:
    present = _extension_file_present()
    if not present and not _require_ext():
        pytest.skip("fpl_fast._C is not built (set FPL_FAST_REQUIRE_EXT=1 to make this a failure)")
    assert present, "FPL_FAST_REQUIRE_EXT=1 but there is no fpl_fast/_C*.so: build the extension first"
    assert ops.has_cpp_ops(), "fpl_fast/_C*.so exists but could not be loaded (see the RuntimeWarning at import)"
    assert fpl_fast.has_cpp_ops() is True


def test_ops_registered_with_the_dispatcher() -> None:
    if not ops.has_cpp_ops():
        if _require_ext():
            pytest.fail("FPL_FAST_REQUIRE_EXT=1 but fpl_fast._C is not loaded")
        pytest.skip("fpl_fast._C is not built")
    names = registered_ops()
    assert "lowrank_prompt" in names and len(names) >= 7, names
    for name in names:
        qual = f"fpl_fast::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"), f"{qual} has no CPU kernel"
        # torch.compile and opcheck need shapes without data: the fake kernel fpl_fast.ops registers.
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Meta"), f"{qual} has no fake kernel"
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA")
        assert has_cuda == ops.has_cuda_kernels(), (
            f"{qual}: CUDA kernel registered = {has_cuda}, but has_cuda_kernels() = {ops.has_cuda_kernels()}"
        )


def test_has_cuda_kernels_agrees_with_the_build() -> None:
    if not ops.has_cpp_ops():
        assert ops.has_cuda_kernels() is False
        if _require_ext():
            pytest.fail("FPL_FAST_REQUIRE_EXT=1 but fpl_fast._C is not loaded")
        pytest.skip("fpl_fast._C is not built (checked only that has_cuda_kernels() is False)")
    from fpl_fast import _C

    assert ops.has_cuda_kernels() == bool(_C.cuda_built())
    if torch.version.cuda is None:
        assert not ops.has_cuda_kernels(), "CUDA kernels cannot have been built against a CPU-only torch"
    expect = os.environ.get("FPL_FAST_EXPECT_CUDA")
    if expect in ("0", "1"):
        assert ops.has_cuda_kernels() == (expect == "1"), f"FPL_FAST_EXPECT_CUDA={expect}"


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys, warnings

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "fpl_fast._C":
                raise ImportError("fpl_fast._C blocked by test_build")
            return None

    sys.meta_path.insert(0, BlockExtension())
    import torch

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        import fpl_fast
        from fpl_fast import ops
        from fpl_fast.ops import reference
        import fpl_fast.ops  # a second import must not warn again

    runtime = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)
    prefix, suffix, gg = rnd(3, 1, 5), rnd(3, 2, 5), rnd(2, 4, 5)
    u, v, lmat = rnd(2, 4, 2), rnd(2, 2, 5), rnd(2, 4, 5)
    grad = rnd(2, 3, 4, 5)
    same = {}
    same["lowrank_prompt"] = torch.equal(
        ops.lowrank_prompt(prefix, suffix, gg, u, v), reference.lowrank_prompt(prefix, suffix, gg, u, v)
    )
    kw = dict(clip_norm=1.0, noise_multiplier=0.5, seed=[3, 5], offset=[4, 6])
    a = ops.dp_lowrank_clip_noise(grad, u, v, **kw)
    b = reference.dp_lowrank_clip_noise(grad, u, v, **kw)
    same["dp_lowrank_clip_noise"] = all(torch.equal(x, y) for x, y in zip(a, b))
    same["lowrank_full_grad"] = torch.equal(
        ops.lowrank_full_grad(u, v, u, v, 0.1), reference.lowrank_full_grad(u, v, u, v, 0.1)
    )
    a = ops.lowrank_factorize(lmat, 2, [1, 7], [2, 0])
    b = reference.lowrank_factorize(lmat, 2, [1, 7], [2, 0])
    same["lowrank_factorize"] = all(torch.equal(x, y) for x, y in zip(a, b))
    leaf = gg.clone().requires_grad_(True)
    ops.lowrank_prompt(prefix, suffix, leaf, u, v).sum().backward()
    same["autograd"] = leaf.grad is not None and bool(torch.all(leaf.grad == 3.0))
    print(json.dumps({
        "runtime_warnings": runtime,
        "has_cpp_ops": fpl_fast.has_cpp_ops(),
        "has_cuda_kernels": fpl_fast.has_cuda_kernels(),
        "registered": hasattr(torch.ops.fpl_fast, "lowrank_prompt"),
        "same": same,
    }))
    """
)


def test_fallback_when_extension_is_unimportable() -> None:
    """With ``fpl_fast._C`` blocked by a meta-path finder, import warns exactly once and the ops still work."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["runtime_warnings"]) == 1, res["runtime_warnings"]
    assert "fpl_fast._C" in res["runtime_warnings"][0] and "reference" in res["runtime_warnings"][0]
    assert res["has_cpp_ops"] is False and res["has_cuda_kernels"] is False
    assert res["registered"] is False, "torch.ops.fpl_fast must not be registered when _C is blocked"
    assert all(res["same"].values()), res["same"]


_MISMATCH_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys, types, warnings
    import torch

    mode = sys.argv[1]
    if mode == "fake":  # a stand-in _C recording another torch (no compiled extension needed)
        fake = types.ModuleType("fpl_fast._C")
        fake.torch_version = lambda: "2.99.0+cu999"
        fake.cuda_built = lambda: False
        sys.modules["fpl_fast._C"] = fake
    elif mode == "real":  # the real _C, with the running torch claiming another version
        torch.__version__ = "2.99.0+cu999"
    else:  # a _C whose loading fails as one built against another torch does

        class UndefinedSymbol(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fpl_fast._C":
                    raise ImportError("fpl_fast/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
                return None

        sys.meta_path.insert(0, UndefinedSymbol())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        import fpl_fast
        from fpl_fast import ops
        from fpl_fast.ops import reference
    g = torch.Generator().manual_seed(0)
    gu, u = torch.randn(2, 4, 2, generator=g), torch.randn(2, 4, 2, generator=g)
    gv, v = torch.randn(2, 2, 5, generator=g), torch.randn(2, 2, 5, generator=g)
    same = torch.equal(ops.lowrank_full_grad(gu, gv, u, v, 0.1), reference.lowrank_full_grad(gu, gv, u, v, 0.1))
    print(json.dumps({
        "runtime_warnings": [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)],
        "has_cpp_ops": fpl_fast.has_cpp_ops(),
        "has_cuda_kernels": fpl_fast.has_cuda_kernels(),
        "same": same,
    }))
    """
)


@pytest.mark.parametrize("mode", ["fake", "real", "undefined_symbol"])
def test_extension_built_against_another_torch_is_refused(mode: str) -> None:
    """A _C recording another torch version (pip's isolated build), or one that does not load because of it,
    warns once, naming the versions and the --no-build-isolation install, and the reference ops run."""
    if mode == "real":
        if not _extension_file_present():
            pytest.skip("fpl_fast._C is not built")
        from fpl_fast import _C

        assert _C.torch_version() == torch.__version__, "the build must record the torch it was built against"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _MISMATCH_SCRIPT, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    (msg,) = res["runtime_warnings"]
    assert "pip install --no-build-isolation ." in msg and "reference" in msg, msg
    if mode == "undefined_symbol":
        assert "undefined symbol" in msg and "another torch" in msg, msg
    else:
        built, running = ("2.99.0+cu999", torch.__version__) if mode == "fake" else (torch.__version__, "2.99.0+cu999")
        assert f"built against torch {built} but torch {running} is running" in msg, msg
    assert res["has_cpp_ops"] is False and res["has_cuda_kernels"] is False
    assert res["same"] is True
