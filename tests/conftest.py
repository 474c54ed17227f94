"""Fixtures shared by the tests; helpers are in support.py (imported first: it turns the kernel self-check off)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from support import DEVICES, JOB_FIELDS

from fpl_fast import ops


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device under test ("cpu", or "cuda" when available)."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def embedded_job() -> Callable[[Any], tuple[Any, list[str], Any]]:
    """``embedded_job(cfg)``: ``fpl_fast.preparation.prepare(cfg)`` (backbone, class names, client data), made once per
    session for every config that agrees on support.JOB_FIELDS; one backbone per model, so the images are encoded
    once for the whole session. Shared: a test must not change the backbone or the data in place."""
    from fpl_fast.preparation import prepare

    backbones: dict[tuple[Any, ...], Any] = {}
    jobs: dict[tuple[Any, ...], tuple[Any, list[str], Any]] = {}

    def get(cfg: Any) -> tuple[Any, list[str], Any]:
        key = tuple(getattr(cfg, name) for name in JOB_FIELDS)
        if key not in jobs:
            model = key[:4]  # model, pretrained, precision, device: what the backbone is
            jobs[key] = prepare(cfg, backbone=backbones.get(model))
            backbones.setdefault(model, jobs[key][0])
        return jobs[key]

    return get


def pytest_report_header(config: pytest.Config) -> str:
    """The CPU path the run took: statistical and training tests are judged against it (ATEN_CPU_CAPABILITY and
    OMP_NUM_THREADS are honoured by torch itself; a test that sets neither inherits them)."""
    return (
        f"torch {torch.__version__}: CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; fpl_fast._C {'built' if ops.has_cpp_ops() else 'not built'}"
    )


@pytest.fixture(autouse=True)
def _factorization_registry_restored():
    """A test may register its own factorization (the API tests, the own-data tutorial); the registry is global, so
    it is put back after each test: a later test (the generated CLI reference's choices) sees the built-ins only."""
    from fpl_fast.prompts import registry

    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


# The files that take longest (seconds to minutes each; pytest --junitxml on 2 CPU cores, 2 workers), longest first.
# Under pytest-xdist (pyproject.toml's addopts: -n auto --dist loadfile --no-loadscope-reorder: whole files to a
# worker, in collection order) they are handed out first, so that the short files fill the end and the workers finish
# together (with only the first listed, a 33 s file came last and one worker idled for 12 s); the other files follow
# in the usual order.
LONG_FILES = [
    "test_flower_runtimes.py",  # 176 s
    "test_audit.py",  # 121 s
    "test_flower.py",  # 65 s
    "test_grid.py",  # 44 s
    "test_text_path.py",  # 34 s
    "test_faults.py",  # 31 s
    "test_accountant.py",  # 29 s
    "test_flower_security.py",  # 29 s
]


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker gets its share of the cores for torch's intra-op threads (1 each with -n auto), so the
    workers do not oversubscribe the machine; so do the processes it starts (a CLI run, a Flower deployment's
    ServerApp and ClientApps, Ray's actors), through OMP_NUM_THREADS, unless the caller set it. Without it each of
    them takes every core and their OpenMP threads spin against each other's: the suite took 861 s of CPU instead
    of 656 s (2 cores)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        workers = int(workerinput.get("workercount", 1))
        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if getattr(config, "workerinput", None) is None:
        return
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order
