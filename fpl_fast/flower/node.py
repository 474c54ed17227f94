"""One client of a Flower federation on its node: its data, its training state and where that state is kept.

The client is a :class:`~fpl_fast.federated.client.Clients` group of one row (the in-process simulation's math,
its noise stream and batch sampler keyed by the client's number), built from the same public initialisation as
row k of the in-process learner. Its private state (local prompt and factors' parameters, optimiser buffers,
secret noise and sampling keys and their positions, its ledger) lives in ``context.state`` and in a node-local
folder ``state-dir/<run name>/client-<k>/``, one file per training unit (round or step) it took part in, so a
node restart or a new ``flwr run`` of the same run name resumes it. Nothing of it is ever put in a reply.

Every message may start a fresh ClientApp process (deployment): the prepared backbone and image features are kept
per process, and the features are cached on the node's disk (``feature-cache``), so a process encodes nothing
that an earlier one encoded.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fpl_fast import outputs
from fpl_fast.backbone.protocol import Backbone
from fpl_fast.config import RunConfig
from fpl_fast.federated.client import ClientData, Clients, StepStats
from fpl_fast.federated.engine import client_accuracies
from fpl_fast.flower.protocol import NodeSetupError, config_hash
from fpl_fast.privacy.plan import NoisePlan
from fpl_fast.prompts import PromptConfig, PromptLearner
from fpl_fast.prompts.class_prompts import ClassPrompts

__all__ = ["NodeSettings", "NodeStore", "ClientNode", "prepared_data", "initial_learner", "DEFAULT_STATE_DIR"]

DEFAULT_STATE_DIR = Path(os.environ.get("FPL_FAST_NODE_DIR", Path.home() / ".cache" / "fpl_fast" / "flower"))
_KEEP = 3  # state files kept per client (the newest; a server resumed from its last checkpoint needs at most one)


@dataclass(frozen=True)
class NodeSettings:
    """What a node says about itself (``flower-supernode --node-config``; the simulation sets the partition).

    Attributes:
        partition_id: this client's number k in 0 .. num_users - 1 (names its keys and its prompt's row).
        num_partitions: the federation's size as the node was told (must equal num_users).
        data_dir: the node's own data folder (the whole dataset is this client's); None: partition k of the
            configured dataset, split over the clients as the in-process runner splits it.
        state_dir: node-local folder of client state (per run name) and, by default, of the feature cache.
        feature_cache: image-feature cache folder (None: ``state_dir/features``).
    """

    partition_id: int
    num_partitions: int
    data_dir: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    feature_cache: Path | None = None

    @classmethod
    def from_node_config(
        cls, node_config: Any, *, state_dir: Path | None = None, feature_cache: Path | None = None
    ) -> NodeSettings:
        """Read a node config (a mapping); a node without its partition gets one line saying how to start it."""
        cfg = dict(node_config)
        if "partition-id" not in cfg:
            raise NodeSetupError(
                "this SuperNode has no partition-id: start it with --node-config "
                "\"partition-id=K num-partitions=N\" (K = 0 .. N-1, N = num_users), adding data-dir='PATH' for a "
                f"data folder of its own; its node config is {cfg or '{}'}"
            )
        try:
            k, n = int(cfg["partition-id"]), int(cfg.get("num-partitions", -1))
        except (TypeError, ValueError):
            raise NodeSetupError(
                f"partition-id and num-partitions must be integers, got {cfg.get('partition-id')!r} and "
                f"{cfg.get('num-partitions')!r}"
            ) from None
        folder = Path(str(cfg["state-dir"])) if "state-dir" in cfg else (state_dir or DEFAULT_STATE_DIR)
        cache = Path(str(cfg["feature-cache"])) if cfg.get("feature-cache") else feature_cache
        data_dir = cfg.get("data-dir")
        return cls(k, n, str(data_dir) if data_dir else None, folder, cache)

    def check(self, cfg: RunConfig) -> None:
        if self.num_partitions != cfg.num_users:
            raise NodeSetupError(
                f"this SuperNode was started with num-partitions={self.num_partitions} but the run has "
                f"num_users={cfg.num_users}: start one SuperNode per client with num-partitions={cfg.num_users}"
            )
        if not 0 <= self.partition_id < cfg.num_users:
            raise NodeSetupError(
                f"partition-id must be in 0 .. {cfg.num_users - 1} (num_users={cfg.num_users}), got {self.partition_id}"
            )

    @property
    def cache_dir(self) -> Path:
        return self.feature_cache if self.feature_cache is not None else self.state_dir / "features"


class NodeStore:
    """One client's state files for one run: ``<root>/<run name>/client-<k>/state-<tag>.pt``, written atomically.

    A tag numbers the training unit after which the state was saved (a round with sync="round", a step with
    sync="step"). Loading "the state before tag t" serves a resumed server that repeats unit t: the client
    rolls back to where the server's checkpoint stands, with the same keys and stream positions, so the repeated
    release is the same one (no new privacy cost) up to float rounding.
    """

    def __init__(self, root: Path, run_name: str, k: int) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", run_name):
            raise NodeSetupError(f"run-name must be letters, digits, '.', '_' or '-', got {run_name!r}")
        self.folder = root / run_name / f"client-{k}"

    def _tags(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("state-*.pt") if p.stem[6:].isdigit())

    def load_before(self, tag: int, nonce: str) -> dict[str, Any] | None:
        """The newest state of this run (``nonce``) saved before unit ``tag``; None when it has none."""
        for t in reversed([t for t in self._tags() if t < tag]):
            state = torch.load(self.folder / f"state-{t}.pt", map_location="cpu", weights_only=False)
            if state.get("nonce") == nonce:
                return state
        return None

    def save(self, tag: int, state: dict[str, Any]) -> bytes:
        """Write the state after unit ``tag``; drop states of later units (a crashed attempt's) and old ones.
        Returns the serialised state (context.state keeps the same bytes)."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        outputs.atomic_write_bytes(self.folder / f"state-{tag}.pt", data)
        tags = self._tags()
        for t in [t for t in tags if t > tag] + [t for t in tags if t < tag][: -(_KEEP - 1)]:
            (self.folder / f"state-{t}.pt").unlink(missing_ok=True)
        return data

    def write_ledger(self, node: ClientNode) -> None:
        """The client's own account of what it has spent (its accountant, on its node), beside its state."""
        a = node.clients.accountants[0]
        e = a.epsilons()
        ledger = {"steps": a.steps, "sample_rate": a.sample_rate, "delta": a.delta}
        ledger.update(epsilon_local=e.local, epsilon_global=e.global_, epsilon_total=e.total)
        outputs.write_json(self.folder / "ledger.json", ledger)

    def log(self, tag: int, stats: list[StepStats]) -> None:
        """The client's own training log (loss, clipped fraction: private, never sent)."""
        path = self.folder / "train_log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["tag", "step", "loss", "clipped_fraction", "batch_size"])
            for i, s in enumerate(stats):
                w.writerow([tag, i + 1, f"{s.loss:.6g}", f"{s.clipped_fraction:.4g}", sum(s.batch_sizes)])


_PREPARED: dict[tuple, tuple[Backbone, list[str], ClientData]] = {}  # per process: a Ray worker serves many


def prepared_data(cfg: RunConfig, node: NodeSettings) -> tuple[Backbone, list[str], ClientData]:
    """The backbone, class names and this node's data, prepared once per process (cached on the node's disk).

    With a partition, the node prepares the configured dataset exactly as the in-process runner does and keeps
    every client's indices (client k trains on its own; the others' test splits give neighbour accuracy). With
    ``data_dir``, the whole folder is this client's and no neighbour data is on the node.
    """
    from fpl_fast.preparation import prepare  # a run's data path, shared with the in-process runs

    key = (config_hash(cfg), cfg.device, node.data_dir, str(node.cache_dir))
    if key not in _PREPARED:
        run_cfg = cfg.replace(data_root=node.data_dir) if node.data_dir else cfg
        _PREPARED[key] = prepare(run_cfg, feature_cache=node.cache_dir, whole=node.data_dir is not None)
    return _PREPARED[key]


def initial_learner(cfg: RunConfig, ctx_dim: int, device: torch.device | str = "cpu") -> PromptLearner:
    """The public initialisation of all K clients' prompts (``--seed``), as the in-process Federation builds it."""
    return PromptLearner(
        PromptConfig(cfg.factorization, cfg.n_ctx, cfg.rank, full_grad_scale=cfg.full_grad_scale),
        cfg.num_users,
        ctx_dim,
        generator=torch.Generator().manual_seed(cfg.seed),
        device=device,
    )


class ClientNode:
    """Client k of the federation on its node, with the noise plan the server announced.

    Args:
        cfg: the run configuration.
        node: the node's settings (partition, data folder, state folder).
        plan: the noise multipliers in force (from the server's header).
        backbone, classnames, data: from :func:`prepared_data`.
    """

    def __init__(
        self,
        cfg: RunConfig,
        node: NodeSettings,
        plan: NoisePlan,
        backbone: Backbone,
        classnames: list[str],
        data: ClientData,
    ) -> None:
        self.cfg, self.node, self.data = cfg, node, data
        k = self.k = node.partition_id
        row = 0 if node.data_dir else k
        own = ClientData(
            data.train_feats,
            data.train_labels,
            data.test_feats,
            data.test_labels,
            [data.train_idx[row]],
            [data.test_idx[row]],
            data.augment_fn,
        )
        self.row = row
        self.text = ClassPrompts(backbone, classnames, cfg.n_ctx, cfg.text_path)
        learner = initial_learner(cfg, backbone.ctx_dim, cfg.device).select([k])
        # Fresh secret keys (OS CSPRNG) unless --noise-seed; replaced by the saved ones when the client resumes.
        self.clients = Clients(cfg, self.text, own, learner, plan, ids=[k])
        self.rows = torch.zeros(1, dtype=torch.long, device=self.clients.device)

    @property
    def steps(self) -> int:
        """Noised steps this client's ledger has counted."""
        return self.clients.accountants[0].steps

    def state_dict(self, nonce: str) -> dict[str, Any]:
        return {"nonce": nonce, "clients": self.clients.state_dict(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clients.load_state_dict(state["clients"])
        torch.set_rng_state(state["torch_rng"])  # augmentation draws from torch's global generator

    # ------------------------------------------------------------------------------------------
    def train_round(self, global_ctx: Tensor, steps: int) -> tuple[Tensor, list[StepStats]]:
        """sync="round": ``steps`` DP-SGD steps from the server's G; returns the client's copy of G (its release)."""
        stats = self.clients.local_round(self.rows, global_ctx.to(self.clients.device), steps)
        return self.clients.learner.client_global[0].clone(), stats

    def train_step(self, global_ctx: Tensor) -> tuple[Tensor, StepStats]:
        """sync="step": one local step at the server's G; returns the clipped mean gradient of G (the server
        averages and noises it)."""
        self.clients.learner.client_global[0] = global_ctx.to(self.clients.device)
        grad_global, stats = self.clients.local_step(self.rows)
        return grad_global[0].clone(), stats

    @torch.no_grad()
    def evaluate(self, global_ctx: Tensor, eval_seed: int) -> tuple[float, float | None]:
        """Local accuracy (own test split) and, where the node holds them, neighbour accuracy (the other
        partitions' test splits) of this client's prompt at the server's G."""
        self.clients.learner.client_global[0] = global_ctx.to(self.clients.device)
        text = self.clients.text_features(eval_seed)
        local, neighbor = client_accuracies(text, self.data, [self.row])
        return local[0], (None if self.node.data_dir else neighbor[0])
