"""Fixtures shared by the tests; helpers are in support.py (imported first: it turns the kernel self-check off)."""

from __future__ import annotations

import pytest
import torch
from support import DEVICES

from fpl_fast import ops


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device under test ("cpu", or "cuda" when available)."""
    return torch.device(request.param)


def pytest_report_header(config: pytest.Config) -> str:
    """The CPU path the run took: statistical and training tests are judged against it (ATEN_CPU_CAPABILITY and
    OMP_NUM_THREADS are honoured by torch itself; a test that sets neither inherits them)."""
    return (
        f"torch {torch.__version__}: CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; fpl_fast._C {'built' if ops.has_cpp_ops() else 'not built'}"
    )
