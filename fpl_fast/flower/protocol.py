"""What travels between the ServerApp and the ClientApps, and the checks on it.

Down (server -> client): the global prompt G (ArrayRecord "global") and a header (ConfigRecord "header": fpl_fast
version, config hash, run name and nonce, the noise multipliers in force, the training unit's tag and step count).
Up (client -> server), and nothing else (tests/test_flower.py inspects every reply):
- "query.info": partition id, number of training examples (for q = b / n and the steps per round, as in the
  in-process runner), the text encoder's width, whether neighbour data is on the node;
- "train" (sync="round"): the client's DP-SGD-trained copy of G; "train.step" (sync="step", simulation): its clipped
  mean gradient of G (the server adds the noise); with either, the noised steps its ledger has counted;
- "evaluate": test accuracies of the released prompts (own test split; others' where the node holds them);
- or, in place of any of these, "error" with one line: a node that cannot take part as set up.
Training loss and clipped fraction are functions of the private data: they stay in the node's own log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, RecordDict
from torch import Tensor

from fpl_fast import __version__
from fpl_fast.config import RunConfig

__all__ = [
    "INFO",
    "TRAIN",
    "TRAIN_STEP",
    "EVALUATE",
    "REPLY_KEYS",
    "NodeSetupError",
    "FederationError",
    "config_hash",
    "header",
    "check_header",
    "AppSettings",
    "from_run_config",
    "prompt_of",
    "value",
]

INFO, TRAIN, TRAIN_STEP, EVALUATE = "query.info", "train", "train.step", "evaluate"

# Every record key a client reply may hold, by message type (ArrayRecord "global" (n_ctx, d) where present).
REPLY_KEYS: dict[str, dict[str, set[str]]] = {
    INFO: {"info": {"partition-id", "n-train", "ctx-dim", "neighbours", "version", "config-hash"}},
    TRAIN: {"global": {"global"}, "ledger": {"partition-id", "steps", "clip-norm-global", "clip-norms"}},
    TRAIN_STEP: {"global": {"global"}, "ledger": {"partition-id", "steps", "clip-norm-global", "clip-norms"}},
    EVALUATE: {"accuracy": {"partition-id", "local-acc", "neighbor-acc"}},
}


class NodeSetupError(ValueError):
    """A node that cannot take part as set up (no partition, another version or config): one line, sent back to
    the server instead of a traceback."""


class FederationError(RuntimeError):
    """The federation cannot run as set up (too few nodes, a node's setup error, a failed node): one line."""


def prompt_of(content: RecordDict) -> Tensor:
    """The prompt (G, a copy of it or its gradient) a message carries, (n_ctx, d)."""
    rec = content["global"]
    assert isinstance(rec, ArrayRecord), f"'global' must be an ArrayRecord, got {type(rec).__name__}"
    return rec.to_torch_state_dict()["global"]


def value(content: RecordDict, record: str, key: str) -> Any:
    """One field of one record of a message's content."""
    return content[record][key]


def config_hash(cfg: RunConfig) -> str:
    """The algorithm's settings, hashed (the device is the node's own business)."""
    d = {k: v for k, v in cfg.to_dict().items() if k != "device"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def header(cfg: RunConfig, run_name: str, nonce: str, **fields: Any) -> dict[str, Any]:
    """The header of a message to a client (a ConfigRecord's content)."""
    return {"version": __version__, "config-hash": config_hash(cfg), "run-name": run_name, "nonce": nonce, **fields}


def check_header(head: Any, cfg: RunConfig) -> None:
    """Refuse a message from a server of another fpl_fast version or with another configuration."""
    if head["version"] != __version__:
        raise NodeSetupError(
            f"fpl_fast version differs: the ServerApp runs {head['version']}, this ClientApp {__version__}; "
            "install the same version on every node"
        )
    if head["config-hash"] != config_hash(cfg):
        raise NodeSetupError(
            f"configuration differs: the ServerApp's hash is {head['config-hash']}, this ClientApp's "
            f"{config_hash(cfg)}; start every app with the same run config"
        )


@dataclass(frozen=True)
class AppSettings:
    """The ServerApp's own settings, beside the algorithm's (run config keys ``run-name``, ``out``, ...).

    Attributes:
        run_name: names the run's state on every node (a new ``flwr run`` of the same name resumes it).
        out: the server's run folder (results.json, rounds.csv, accuracy.png, checkpoint); default runs/<run name>.
        resume: continue the run in ``out`` from its checkpoint (the nodes restore their state of that point).
        node_timeout: seconds to wait for every client's SuperNode to connect before giving up.
        reply_timeout: seconds to wait for the replies of one message round (late replies are dropped).
        progress: show a progress bar.
        tensorboard: a folder for a TensorBoard log of the rounds (:mod:`fpl_fast.tracking`; None: none).
        max_update_norm: the public ceiling on the L2 norm of a client's update (sync="round": its copy of G minus
            the G it was sent; sync="step": its clipped gradient); a reply above it is rejected and logged, and the
            step goes on without it (inf: no ceiling). A client's true norm depends on its private batch size and
            its noise, so the server cannot check it exactly: set the ceiling well above an honest client's.
    """

    run_name: str = "fpl-fast"
    out: str | None = None
    resume: bool = False
    node_timeout: float = 120.0
    reply_timeout: float = 600.0
    progress: bool = True
    tensorboard: str | None = None
    max_update_norm: float = math.inf

    def __post_init__(self) -> None:
        bound = self.max_update_norm
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound) or bound <= 0:
            raise ValueError(f"max-update-norm must be a number > 0 (inf: no ceiling), got {bound!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name


_APP_KEYS = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(AppSettings)}


def from_run_config(run_config: Any) -> tuple[RunConfig, AppSettings]:
    """A Flower run config -> (RunConfig, AppSettings): keys are RunConfig's and AppSettings' field names, with
    '-' or '_' (``flwr run ... --run-config "rounds=5 num-users=2 run-name='a'"``); "none" means None."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    algo: dict[str, Any] = {}
    app: dict[str, Any] = {}
    for key, value in dict(run_config).items():
        value = None if isinstance(value, str) and value.lower() in ("none", "null", "") else value
        name = key.replace("-", "_")
        if key in _APP_KEYS or name in _APP_KEYS.values():
            app[_APP_KEYS.get(key, name)] = value
        elif name in known:
            algo[name] = value
        else:
            allowed = sorted({k.replace("_", "-") for k in known} | set(_APP_KEYS))
            raise ValueError(f"unknown run config key {key!r}; allowed: {', '.join(allowed)}")
    cfg = RunConfig(**algo)
    if cfg.protocol != "personal":  # a Flower server holds no test set beyond the clients' own splits
        raise ValueError(
            f"run config protocol={cfg.protocol!r}: Flower apps evaluate the personal protocol only; run the other "
            "protocols with the in-process engine (python -m fpl_fast.run --protocol ...)"
        )
    return cfg, AppSettings(**app)
