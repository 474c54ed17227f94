"""The kernels' first-run self-check (fpl_fast.ops.first_use_check) and ``python -m fpl_fast.selftest``.

A wrong kernel is simulated by patching the ``torch.ops.fpl_fast.<op>`` attribute that ops.py and the check both
call. The two noise ops are checked through their reference (patched in as the "kernel") where the compiled
kernel does not take per-client stream lists yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from support import make, needs_ext

from fpl_fast import ops, selftest
from fpl_fast.ops import first_use_check, reference
from fpl_fast.ops.first_use_check import SelfCheckWarning

REPO = Path(__file__).resolve().parents[1]
SEED_OPS = ("dp_lowrank_clip_noise", "lowrank_factorize")
# The self-check itself runs on CPU and CUDA alike; CUDA rows run where a GPU and the CUDA kernels are.
CHECK_DEVICES = selftest.devices()


def _kernel_takes_stream_lists(name: str) -> bool:
    schema = str(getattr(torch.ops.fpl_fast, name).default._schema)
    return "int seed," not in schema


def kernel_ops() -> list[str]:
    """Ops whose compiled kernel matches ops.py's signature (the noise ops once their kernels take lists)."""
    if not ops.has_cpp_ops():
        return []
    return [n for n in first_use_check.CHECKS if n not in SEED_OPS or _kernel_takes_stream_lists(n)]


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch: pytest.MonkeyPatch):
    """Every test starts with no verdicts and the check on (tests/support.py turns it off for the kernel tests)."""
    monkeypatch.setenv(first_use_check.ENV, "1")
    first_use_check.reset()
    yield
    first_use_check.reset()


def _perturbed(fn):
    """``fn`` with every floating output off by 1e-2 (relative and absolute)."""

    def wrong(*args):
        out = fn(*args)
        bend = lambda t: t * 1.01 + 1e-2 if t.is_floating_point() else t  # noqa: E731
        return bend(out) if isinstance(out, torch.Tensor) else tuple(bend(t) for t in out)

    return wrong


def _full_grad_inputs(device: str) -> list[torch.Tensor]:
    """grad_u, grad_v, u, v."""
    gu, gv, u, v = make(2, 6, 3, seed=1), make(2, 3, 9, seed=2), make(2, 6, 3, seed=3), make(2, 3, 9, seed=4)
    return [t.to(device) for t in (gu, gv, u, v)]


def _dp_inputs(device: str) -> tuple[list, dict]:
    grad, u, v = make(2, 3, 6, 9, seed=1), make(2, 6, 2, seed=2), make(2, 2, 9, seed=3)
    kw = dict(clip_norm=1.0, noise_multiplier=0.5, seed=[3, 9], offset=[0, 40])
    return [grad.to(device), u.to(device), v.to(device)], kw


@needs_ext
@pytest.mark.parametrize("device", CHECK_DEVICES)
def test_real_kernels_pass_their_check(device: str) -> None:
    for name in kernel_ops():
        r = first_use_check.run_check(name, device)
        assert r.ok, f"{name} on {device}: {r.describe()}"


@pytest.mark.parametrize("device", CHECK_DEVICES)
@pytest.mark.parametrize("name", SEED_OPS)
def test_noise_op_check_through_the_reference(name: str, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise ops' fixed inputs are valid for the list signature and their tolerance passes a float32
    implementation of the spec (the reference at float32) and catches a perturbed one."""
    ref = getattr(reference, name)
    monkeypatch.setattr(torch.ops.fpl_fast, name, ref, raising=False)
    good = first_use_check.run_check(name, device)
    assert good.ok and good.error is None, good.describe()
    monkeypatch.setattr(torch.ops.fpl_fast, name, _perturbed(ref), raising=False)
    bad = first_use_check.run_check(name, device)
    assert not bad.ok and bad.err > bad.tol, bad.describe()


@pytest.mark.parametrize("device", CHECK_DEVICES)
def test_wrong_noise_kernel_is_replaced_by_the_reference(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path through ops.dp_lowrank_clip_noise: warning once, then the reference's result."""
    name = "dp_lowrank_clip_noise"
    monkeypatch.setattr(ops, "_HAS_C", True)
    monkeypatch.setattr(torch.ops.fpl_fast, name, _perturbed(reference.dp_lowrank_clip_noise), raising=False)
    args, kw = _dp_inputs(device)
    with pytest.warns(SelfCheckWarning, match=rf"{name} kernel failed its self-check on {device} \(max error"):
        out = ops.dp_lowrank_clip_noise(*args, **kw)
    want = reference.dp_lowrank_clip_noise(*args, **kw)
    assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        ops.dp_lowrank_clip_noise(*args, **kw)


@needs_ext
@pytest.mark.parametrize("device", CHECK_DEVICES)
def test_wrong_kernel_is_caught_and_replaced(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "lowrank_full_grad"
    monkeypatch.setattr(torch.ops.fpl_fast, name, _perturbed(torch.ops.fpl_fast.lowrank_full_grad))
    args = _full_grad_inputs(device)
    with pytest.warns(SelfCheckWarning) as rec:
        out = ops.lowrank_full_grad(*args, 0.1)
    (msg,) = [str(w.message) for w in rec]
    assert f"{name} kernel failed its self-check on {device}" in msg and "tolerance" in msg, msg
    assert torch.equal(out, reference.lowrank_full_grad(*args, 0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ops.lowrank_full_grad(*args, 0.1)
        # The other ops keep their (correct) kernels and check silently.
        prefix, suffix, g = make(3, 1, 9).to(device), make(3, 2, 9).to(device), make(2, 4, 9).to(device)
        ops.lowrank_prompt(prefix, suffix, g)
    assert torch.equal(again, reference.lowrank_full_grad(*args, 0.1))
    assert first_use_check._verdict == {(name, device): False, ("lowrank_prompt", device): True}


@needs_ext
def test_kernel_that_raises_fails_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(torch.ops.fpl_fast, "lowrank_full_grad", boom)
    with pytest.warns(SelfCheckWarning, match="raised RuntimeError: no kernel image"):
        out = ops.lowrank_full_grad(*_full_grad_inputs("cpu"), 0.1)
    assert torch.equal(out, reference.lowrank_full_grad(*_full_grad_inputs("cpu"), 0.1))


@needs_ext
def test_env_var_turns_the_check_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(first_use_check.ENV, "0")
    wrong = _perturbed(torch.ops.fpl_fast.lowrank_full_grad)
    monkeypatch.setattr(torch.ops.fpl_fast, "lowrank_full_grad", wrong)
    args = _full_grad_inputs("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.lowrank_full_grad(*args, 0.1)
    assert not torch.equal(out, reference.lowrank_full_grad(*args, 0.1))  # the (wrong) kernel ran unchecked
    assert first_use_check._verdict == {}


@needs_ext
def test_no_check_while_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile, vmap and fake tensors run the kernel path without the check (no verdict, no extra ops in
    the graph); the next eager call checks. (torch.func.grad is left out: the registered autograd of the custom
    ops does not support functorch transforms.)"""
    checks: list[str] = []
    real = first_use_check.run_check
    monkeypatch.setattr(first_use_check, "run_check", lambda op, dev: checks.append(op) or real(op, dev))
    gu, gv, u, v = _full_grad_inputs("cpu")

    compiled = torch.compile(lambda *a: ops.lowrank_full_grad(*a, 0.1), fullgraph=True)
    torch.testing.assert_close(compiled(gu, gv, u, v), reference.lowrank_full_grad(gu, gv, u, v, 0.1))
    torch.func.vmap(lambda *a: ops.lowrank_full_grad(*a, 0.1))(gu, gv, u, v)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (gu, gv, u, v)]
        assert ops.lowrank_full_grad(*fakes, 0.1).shape == (2, 6, 9)
    assert checks == [] and first_use_check._verdict == {}
    ops.lowrank_full_grad(gu, gv, u, v, 0.1)
    assert checks == ["lowrank_full_grad"] and first_use_check._verdict == {("lowrank_full_grad", "cpu"): True}


@needs_ext
def test_compiled_code_follows_a_failed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.fpl_fast, "lowrank_full_grad", _perturbed(torch.ops.fpl_fast.lowrank_full_grad))
    args = _full_grad_inputs("cpu")
    with pytest.warns(SelfCheckWarning):
        ops.lowrank_full_grad(*args, 0.1)
    compiled = torch.compile(lambda *a: ops.lowrank_full_grad(*a, 0.1), fullgraph=True)
    torch.testing.assert_close(compiled(*args), reference.lowrank_full_grad(*args, 0.1))


# ----------------------------------------------------------------------------------------------
# python -m fpl_fast.selftest
# ----------------------------------------------------------------------------------------------
@needs_ext
def test_selftest_passes_on_the_real_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    names = kernel_ops()
    assert selftest.main(["--ops", ",".join(names)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in names]
    assert len(rows) == len(names) * len(CHECK_DEVICES), out
    assert all(row.endswith("pass") for row in rows), out
    assert out.rstrip().endswith("all passed")


@needs_ext
def test_selftest_fails_on_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.ops.fpl_fast, "nn_map", lambda y, emb, allowed, chunk: torch.zeros_like(y[:, 0]).long())
    assert selftest.main(["--ops", ",".join(kernel_ops()), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("nn_map")]
    assert row.split()[1] == "cpu" and "FAIL" in row, out
    assert "lowrank_prompt" in out and out.rstrip().endswith("1 failed")


def test_selftest_rejects_an_unknown_op(capsys: pytest.CaptureFixture[str]) -> None:
    assert selftest.main(["--ops", "nope"]) == 2
    assert "unknown op" in capsys.readouterr().err


@needs_ext
def test_selftest_cli() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "fpl_fast.selftest", "--ops", ",".join(kernel_ops())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "lowrank_prompt" in proc.stdout and "all passed" in proc.stdout
