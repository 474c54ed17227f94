"""Helpers shared by the tests (imported as ``from support import ...``; fixtures live in conftest.py).

Every op test is parametrised over devices: "cpu" always, "cuda" only when a GPU is visible (and, if the
compiled extension is loaded, only when it was built with its CUDA kernels). On CUDA the oracle is the
reference run on the CPU: the Philox stream makes the noise identical up to float rounding.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

# The kernel tests compare the kernels themselves with the reference; the first-run self-check would swap a
# kernel that fails it for the reference and leave those tests comparing the reference with itself.
# tests/test_first_use_check.py turns the check back on.
os.environ.setdefault("FPL_FAST_SELFCHECK", "0")

from fpl_fast import ops  # noqa: E402

__all__ = [
    "DEVICES",
    "FLOAT_DTYPES",
    "TOL",
    "needs_ext",
    "make",
    "noncontig",
    "transposed",
    "to_device",
    "assert_parity",
    "assert_bf16_close",
    "max_abs_err",
    "client_streams",
    "JOB_FIELDS",
    "train_job",
    "tensorboard_scalars",
    "Processes",
    "free_loopback_ports",
    "listening",
    "assert_tensorboard_matches_rounds_csv",
]


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if ops.has_cpp_ops() and not ops.has_cuda_kernels():
        return "fpl_fast._C was built without its CUDA kernels"
    return None


_CUDA_REASON = _cuda_skip_reason()

# Device parameter list shared by all op tests.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(_CUDA_REASON is not None, reason=_CUDA_REASON or "")],
    ),
]

# Dtypes compared with assert_close; bfloat16 has its own error-ratio check (assert_bf16_close).
FLOAT_DTYPES = [torch.float32, torch.float64]

# Kernel vs reference: both accumulate in float32 (float64 for float64 inputs) but in a different order.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}

needs_ext = pytest.mark.skipif(
    not ops.has_cpp_ops(),
    reason="fpl_fast._C is not built (ops fall back to the reference); build it with "
    "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`",
)


# The RunConfig fields that fpl_fast.preparation.prepare reads (backbone, dataset, client split): two configs that
# agree on them prepare the same job, so the session's embedded_job fixture (conftest.py) keys its jobs by them.
JOB_FIELDS = (
    "model",
    "pretrained",
    "precision",
    "device",
    "dataset",
    "data_root",
    "num_users",
    "partition",
    "beta",
    "seed",
    "num_shots",
    "pathological_split",
    "augment",
    "protocol",  # base2novel keeps the base classes only
)


def train_job(job: tuple[Any, list[str], Any], cfg: Any, out: Any, **kwargs: Any) -> dict[str, Any]:
    """``fpl_fast.train`` of ``cfg`` on a prepared job (backbone, class names, client data), quiet, into ``out``;
    results.json's dict. ``kwargs``: ``resume``, ``tensorboard`` (RunSettings fields) or ``stop_after_round``."""
    from fpl_fast.config import RunSettings
    from fpl_fast.job import train

    backbone, classnames, data = job
    settings = RunSettings(
        out=str(out),
        resume=kwargs.pop("resume", False),
        progress=False,
        tensorboard=kwargs.pop("tensorboard", None),
    )
    r = train(cfg, settings=settings, features=data, classnames=classnames, backbone=backbone, **kwargs)
    return {"method": r.method, "config": r.config, "rounds": r.rounds, "final": r.final}


def tensorboard_scalars(logdir: Any) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``logdir``, read back with TensorBoard's own EventAccumulator:
    tag -> [(step, value)] in step order (purged steps of a resumed run left out, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_matches_rounds_csv(logdir: Any, rounds_csv: Any) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard log in ``logdir`` holds exactly rounds.csv's values: one scalar per non-empty cell, at step
    ``round``, under the column's tag (fpl_fast.tracking.TAGS; a protocol's columns after the shared ones under
    ``released/<column>``), equal to the cell at float32, TensorBoard's scalar precision. Returns the scalars."""
    import csv

    import numpy as np

    from fpl_fast.outputs import ROUND_FIELDS
    from fpl_fast.tracking import TAGS

    with open(rounds_csv) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        extra = [k for k in reader.fieldnames or () if k not in ROUND_FIELDS]
    want: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, tag in [*TAGS.items(), *((k, f"released/{k}") for k in extra)]:
            if row.get(key) not in (None, ""):
                want.setdefault(tag, []).append((int(row["round"]), float(np.float32(float(row[key])))))
    got = tensorboard_scalars(logdir)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for tag, points in want.items():
        assert [(s, float(np.float32(v))) for s, v in got[tag]] == points, tag
    return got


def make(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> Tensor:
    """Deterministic N(0, scale^2) CPU tensor (generated in float64, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def client_streams(K: int | None, seed: int, offset: int) -> tuple[list[int], list[int]]:
    """Distinct Philox streams for K clients (one when K is None): client k gets seed + k (2^40 + 1) and
    offset + 5 k, so seeds differ in both 32-bit halves and offsets differ too."""
    n = 1 if K is None else K
    return [seed + k * ((1 << 40) + 1) for k in range(n)], [offset + 5 * k for k in range(n)]


def noncontig(t: Tensor) -> Tensor:
    """Same values as ``t`` in a strided (every other element) non-contiguous view."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
    buf[..., 0] = t
    out = buf[..., 0]
    assert t.numel() <= 1 or not out.is_contiguous()
    return out


def misaligned(t: Tensor) -> Tensor:
    """Same values as ``t``, contiguous, one element into its storage: a data pointer off 16-byte alignment
    (the kernels must leave their vector loads for it). Make it on the target device: a copy re-aligns."""
    buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.storage_offset() == 1
    return out


def transposed(t: Tensor) -> Tensor:
    """Same values as ``t`` stored column-major in its last two dims (a non-contiguous transpose view)."""
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert min(t.shape[-2:]) <= 1 or not out.is_contiguous()
    return out


def to_device(x: Any, device: torch.device | str) -> Any:
    """Move tensors (possibly nested in tuples/lists/dicts) to ``device``; other values unchanged."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(y, device) for y in x)
    if isinstance(x, dict):
        return {k: to_device(y, device) for k, y in x.items()}
    return x


def _as_tuple(x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def assert_parity(
    op: Callable[..., Any],
    ref: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    device: torch.device | str,
    ref_kwargs: dict[str, Any] | None = None,
    tol: dict[str, float] | None = None,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Run ``op`` on ``device`` and ``ref`` on the CPU with the same (CPU-built) inputs and compare.

    Returns:
        (outputs of op moved to the CPU, outputs of ref).
    """
    kwargs = kwargs or {}
    out = _as_tuple(op(*to_device(list(args), device), **kwargs))
    expected = _as_tuple(ref(*args, **(kwargs if ref_kwargs is None else ref_kwargs)))
    assert len(out) == len(expected)
    out = tuple(o.cpu() for o in out)
    for i, (o, e) in enumerate(zip(out, expected, strict=True)):
        assert o.device.type == "cpu"
        assert o.shape == e.shape, f"output {i}: shape {tuple(o.shape)} != reference {tuple(e.shape)}"
        assert o.dtype == e.dtype, f"output {i}: dtype {o.dtype} != reference {e.dtype}"
        t = tol if tol is not None else TOL.get(e.dtype, TOL[torch.float32])
        torch.testing.assert_close(o, e, **t, msg=lambda m, i=i: f"output {i}: {m}")
    return out, expected


def max_abs_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| computed in float64 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_bf16_close(
    op: Callable[..., Any],
    ref: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    device: torch.device | str,
    ref_kwargs: dict[str, Any] | None = None,
    factor: float = 2.0,
) -> None:
    """Flash-attention style low-precision check (bfloat16 or float16 inputs).

    The kernel's error against the float64 reference (run on the same rounded inputs cast to float64) must be
    at most ``factor`` times the error of the same-precision reference, plus a floor of one rounding step
    (2^-8 relative for bf16, 2^-11 for fp16) for outputs the low-precision reference happens to get exact.
    """
    kwargs = kwargs or {}
    rk = kwargs if ref_kwargs is None else ref_kwargs
    args64 = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    exact = _as_tuple(ref(*args64, **rk))
    ref_bf16 = _as_tuple(ref(*args, **rk))
    out = tuple(o.cpu() for o in _as_tuple(op(*to_device(list(args), device), **kwargs)))
    for i, (o, r, e) in enumerate(zip(out, ref_bf16, exact, strict=True)):
        assert o.shape == e.shape and o.dtype == r.dtype, f"output {i}: {o.shape}/{o.dtype} vs {e.shape}/{r.dtype}"
        err_kernel = max_abs_err(o, e)
        err_ref = max_abs_err(r, e)
        low = next(a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point())
        step = 2.0**-11 if low == torch.float16 else 2.0**-8
        floor = step * (e.abs().max().item() if e.numel() else 0.0)
        assert err_kernel <= factor * err_ref + floor, (
            f"output {i}: {low} kernel error {err_kernel:.3e} > {factor} x reference error {err_ref:.3e}"
            f" + floor {floor:.3e}"
        )


class Processes:
    """Processes a test starts (each the leader of its own session, so its children go with it), stopped by PID:
    SIGTERM to each group, then SIGKILL to what is left after ``grace`` seconds."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with its stdout and stderr in ``log`` (a file, not a pipe: a full pipe would block it)."""
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the group's other members (a superexec) may outlive their leader for a moment
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 now."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def save_openai_files(src: Any, markers: dict[str, int], state_dict_path: Path, jit_path: Path) -> None:
    """Write the open_clip CLIP ``src`` as OpenAI distributes it: its state dict with OpenAI's three entries
    (``markers``: input_resolution, context_length, vocab_size) at ``state_dict_path``, and a TorchScript archive at
    ``jit_path`` (the causal mask a constant, not a state entry; the markers state entries)."""
    import copy
    import warnings

    state = src.state_dict()
    torch.save({**state, **{k: torch.tensor(v) for k, v in markers.items()}}, state_dict_path)
    jit_src = copy.deepcopy(src)
    mask = jit_src.attn_mask
    del jit_src._buffers["attn_mask"]
    jit_src.attn_mask = mask
    del jit_src.context_length, jit_src.vocab_size
    for key, value in markers.items():
        jit_src.register_buffer(key, torch.tensor(value))
    size = markers["input_resolution"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* deprecation notices
        traced = torch.jit.trace_module(
            jit_src,
            inputs={
                "encode_image": (torch.ones(2, 3, size, size),),
                "encode_text": (torch.zeros(2, 77, dtype=torch.long),),
            },
        )
        torch.jit.save(traced, str(jit_path))
