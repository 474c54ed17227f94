"""``--engine flower-sim``: the same federation on Flower's simulation runtime (Ray), in one command.

One SuperNode per client (partition ids 0 .. K-1), each client on a Ray worker of 1 CPU; the ServerApp writes the
run folder as the in-process runner does, and the nodes keep their state under ``<out>/nodes``. Flower 1.42 marks
``run_simulation`` as deprecated in favour of ``flwr run`` with a simulation federation; it is the one entry that
runs a ServerApp and ClientApp built in this process (with the config in hand), so it is used here.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fpl_fast import outputs
from fpl_fast.config import RunConfig, RunSettings
from fpl_fast.flower.protocol import AppSettings, FederationError

__all__ = ["run_flower_simulation"]


def run_flower_simulation(
    cfg: RunConfig, run: RunSettings, *, out: Path, node_timeout: float = 120.0
) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation runtime and return its results (what results.json holds)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray runs its workers (here: the clients, i.e. the run's work) at nice 15, behind every other process on the
    # machine: the embedded default's 2 rounds took 27 s alone and 216 s beside two busy processes on 2 cores, 48 s
    # at nice 0. The raylet, started by ray.init below, reads this from the environment.
    os.environ.setdefault("RAY_worker_niceness", "0")
    from flwr.simulation import run_simulation

    from fpl_fast.flower.client_app import make_client_app
    from fpl_fast.flower.server_app import make_server_app

    outputs.check_out_dir(out, resume=run.resume)
    settings = AppSettings(
        run_name=out.name,
        out=str(out),
        resume=run.resume,
        node_timeout=node_timeout,
        progress=run.progress,
        tensorboard=run.tensorboard,
    )
    errors: list[BaseException] = []
    server_app = make_server_app(cfg, settings, errors=errors)
    cache = Path(run.feature_cache) if run.feature_cache else None
    client_app = make_client_app(cfg, state_dir=out / "nodes", feature_cache=cache)
    node_cfg: dict[str, Any] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_simulation(server_app, client_app, num_supernodes=cfg.num_users, backend_config=node_cfg)
    if errors:
        exc = errors[0]
        if isinstance(exc, (FederationError, ValueError)):
            raise exc
        raise FederationError(f"the Flower simulation failed: {type(exc).__name__}: {exc}") from exc
    path = out / "results.json"
    if not path.is_file():
        raise FederationError(f"the Flower simulation ended without writing {path} (see the log above)")
    return json.loads(path.read_text())
