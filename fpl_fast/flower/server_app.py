"""The ServerApp: DP-FPL's server over Flower, on the method skeleton (:func:`fpl_fast.methods.skeleton.run_method`),
so its results.json, rounds.csv, accuracy.png, checkpoints and resume are the in-process runner's.

Set-up: wait (``node-timeout``) for one SuperNode per client, ask each for its partition id, training-set size and
the text encoder's width (refusing another fpl_fast version or configuration), compute the sampling rates and steps
per round exactly as the in-process runner does, plan the noise, and build the server's G from the public
initialisation. Each round: sample clients (:class:`~fpl_fast.flower.strategy.GlobalPromptStrategy`) and draw the
drop-outs among them (--client-drop-rate: the in-process runner's draw, so a dropped client is sent nothing), send G
to the others, take the releases that come back (a missing reply is a drop-out too: the server aggregates those that
came, and with none G stays), aggregate; on evaluated rounds, ask every client for its accuracies. Each client's ledger
counts the steps the client reports it took (a client that missed a round is accounted for what it did).
"""

from __future__ import annotations

import logging
import math
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fpl_fast.config import RunConfig
from fpl_fast.federated.client import sample_rates, steps_per_round
from fpl_fast.federated.server import Server
from fpl_fast.flower.node import initial_learner
from fpl_fast.flower.protocol import INFO, AppSettings, FederationError, from_run_config, header
from fpl_fast.flower.strategy import GlobalPromptStrategy, replies_by_partition, reply_problem
from fpl_fast.methods.dpfpl import dropped, eval_record, eval_seed, privacy_summary, recent_accuracy_means
from fpl_fast.methods.skeleton import run_method
from fpl_fast.privacy.plan import ClientAccountant, NoisePlan, global_release_noise, plan_noise

__all__ = ["FlowerDPFPL", "make_server_app", "app", "wait_for_nodes"]

log = logging.getLogger("fpl_fast.flower")


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The connected node ids once ``count`` are there; a one-line error after ``timeout`` seconds (not a hang)."""
    t0 = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - t0 > timeout:
            raise FederationError(
                f"only {len(nodes)} of {count} SuperNodes connected within {timeout:g} s (num_users={count}): start "
                "one SuperNode per client, or raise node-timeout"
            )
        time.sleep(0.2)
    return nodes


@dataclass
class _State:
    cfg: RunConfig
    server: Server
    strategy: GlobalPromptStrategy
    plan: NoisePlan
    qs: list[float]
    sizes: list[int]
    steps_per_round: int
    neighbours: bool
    nonce: str
    last_eval: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the evaluated rounds' records, resumes included


class FlowerDPFPL:
    """DP-FPL's server side on Flower, as a :class:`~fpl_fast.methods.skeleton.Method` (resumable)."""

    name = "dpfpl"
    postfix = ("local_acc", "neighbor_acc", "epsilon_total")
    curves = ("local_acc", "neighbor_acc")

    def __init__(self, grid: Grid, settings: AppSettings) -> None:
        self.grid, self.settings = grid, settings
        self.refused: set[int] = set()  # nodes that claimed a partition another connected node holds

    def _send(self, messages: Iterable[Message]) -> Iterable[Message]:
        return self.grid.send_and_receive(list(messages), timeout=self.settings.reply_timeout)

    def _header(self, st_cfg: RunConfig, nonce: str, plan: NoisePlan | None = None, **fields: Any) -> ConfigRecord:
        sigmas = {"sigma-local": plan.sigma_local, "sigma-global": plan.sigma_global} if plan else {}
        return ConfigRecord(header(st_cfg, self.settings.run_name, nonce, **sigmas, **fields))

    def _ask_info(self, cfg: RunConfig, nonce: str, nodes: Iterable[int]) -> dict[int, tuple[Any, int]]:
        """partition id -> (its info record, its node id), from the nodes asked; two nodes of one partition fail,
        a reply that fails its checks is left out (logged)."""
        ask = RecordDict({"header": self._header(cfg, nonce)})
        got: dict[int, tuple[Any, int]] = {}
        partitions = range(cfg.num_users)
        check = lambda m: reply_problem(m, INFO, partitions=partitions)  # noqa: E731
        for msg in self._send(Message(ask, dst_node_id=n, message_type=INFO) for n in nodes):
            if not (one := replies_by_partition([msg], "info", [], check)):
                continue
            ((k, content),) = one.items()
            if k in got:
                raise FederationError(f"nodes {got[k][1]} and {msg.metadata.src_node_id} both hold partition-id {k}")
            got[k] = (content["info"], msg.metadata.src_node_id)
        return got

    def _rejoin(self, st: _State) -> None:
        """A restarted SuperNode comes back under a new node id: map its partition to it (same data required). A
        new node that claims a partition whose node is still connected is refused (logged) and never sent a
        message."""
        node_of = st.strategy.node_of
        online = set(self.grid.get_node_ids())
        new = sorted(online - set(node_of.values()) - self.refused)
        if not new:
            return
        for k, (info, node) in self._ask_info(st.cfg, st.nonce, new).items():
            if node_of.get(k) in online:
                log.warning(
                    "refused node %s: partition-id %d is held by node %s, which is still connected", node, k, node_of[k]
                )
                self.refused.add(node)
                continue
            if int(info["n-train"]) != st.sizes[k]:
                raise FederationError(
                    f"node {node} rejoined as partition {k} with {info['n-train']} training examples, not "
                    f"{st.sizes[k]}: it must hold the same data"
                )
            node_of[k] = node

    def setup(self, cfg: RunConfig) -> _State:
        K = cfg.num_users
        nodes = wait_for_nodes(self.grid, K, self.settings.node_timeout)
        nonce = secrets.token_hex(8)  # names this run's node state (a resumed run takes the checkpoint's)
        got = self._ask_info(cfg, nonce, nodes)
        missing = sorted(set(range(K)) - set(got))
        if missing:
            raise FederationError(f"no SuperNode answered for partitions {missing} of 0 .. {K - 1}")
        infos = {k: info for k, (info, _) in got.items()}
        node_of = {k: node for k, (_, node) in got.items()}
        widths = {int(info["ctx-dim"]) for info in infos.values()}
        if len(widths) > 1:
            by_width = {k: int(info["ctx-dim"]) for k, info in sorted(infos.items())}
            raise FederationError(f"the nodes report different text encoder widths (partition: ctx-dim) {by_width}")
        sizes = [int(infos[k]["n-train"]) for k in range(K)]
        qs, spr = sample_rates(cfg, sizes), steps_per_round(cfg, sizes)
        plan = plan_noise(cfg, sample_rate=max(qs), steps=cfg.rounds * spr)
        g0 = initial_learner(cfg, int(infos[0]["ctx-dim"])).global_ctx
        server = Server(cfg, g0, noise_multiplier=global_release_noise(cfg, plan))
        accountants = [ClientAccountant(cfg, plan, q) for q in qs]
        strategy = GlobalPromptStrategy(
            server, accountants, node_of, sync=cfg.sync, max_update_norm=self.settings.max_update_norm
        )
        neighbours = all(bool(infos[k]["neighbours"]) for k in range(K))
        return _State(cfg, server, strategy, plan, qs, sizes, spr, neighbours, nonce)

    def state_dict(self, st: _State) -> dict[str, Any]:
        return {
            "server": st.server.state_dict(),
            "steps": [a.steps for a in st.strategy.accountants],
            "nonce": st.nonce,
        }

    def load_state_dict(self, st: _State, saved: dict[str, Any]) -> None:
        st.server.load_state_dict(saved["server"])
        for a, n in zip(st.strategy.accountants, saved["steps"], strict=True):
            a.steps = int(n)
        st.nonce = saved["nonce"]
        st.history = list(saved["rounds"])  # the driver's records of the rounds before the resume

    def round(self, st: _State, rnd: int) -> dict[str, Any] | None:
        """Sample, train (one message round per round, or per step with sync="step"), aggregate; evaluate every
        ``eval_every`` rounds and on the last."""
        cfg, strategy = st.cfg, st.strategy
        self._rejoin(st)
        reporting = strategy.sample()  # sampled, less the clients that drop out of this round
        units = (
            [(rnd, st.steps_per_round)]
            if cfg.sync == "round"
            else [((rnd - 1) * st.steps_per_round + s + 1, 1) for s in range(st.steps_per_round)]
        )
        for tag, steps in units if reporting else []:  # none reporting: G stays
            arrays = ArrayRecord({"global": st.server.global_ctx.clone()})
            config = self._header(cfg, st.nonce, st.plan, tag=tag, steps=steps)
            strategy.aggregate_train(rnd, self._send(strategy.configure_train(rnd, arrays, config, self.grid)))
        if rnd % cfg.eval_every != 0 and rnd != cfg.rounds:
            return None
        st.last_eval = self._evaluate(st, rnd, units[-1][0])
        record = {
            **eval_record(st.last_eval, strategy.accountants, None, strategy.clip_norm_table()),
            **dropped(st.server),
        }
        st.history.append({"round": rnd, **record})
        return record

    def _evaluate(self, st: _State, rnd: int, tag: int) -> dict[str, Any]:
        cfg, strategy = st.cfg, st.strategy
        arrays = ArrayRecord({"global": st.server.global_ctx.clone()})
        config = self._header(cfg, st.nonce, st.plan, tag=tag, **{"eval-seed": eval_seed(cfg, rnd - 1)})
        metrics = strategy.aggregate_evaluate(
            rnd, self._send(strategy.configure_evaluate(rnd, arrays, config, self.grid))
        )
        assert metrics is not None
        K = cfg.num_users
        got: dict[str, Any] = dict(metrics)
        local = [float(got.get(f"local-acc-{k}", math.nan)) for k in range(K)]
        neighbor = [float(got.get(f"neighbor-acc-{k}", math.nan)) for k in range(K)]
        return {
            "local_acc": float(np.nanmean(local)),
            "neighbor_acc": float(np.nanmean(neighbor)) if st.neighbours else None,
            "local_acc_per_client": local,
            "neighbor_acc_per_client": neighbor if st.neighbours else None,
        }

    def final(self, st: _State) -> dict[str, Any]:
        cfg = st.cfg
        ev = (
            st.last_eval
            if st.last_eval is not None
            else self._evaluate(st, cfg.rounds, cfg.rounds * st.steps_per_round)
        )
        return {
            "engine": "flower",
            "local_acc": ev["local_acc"],
            "neighbor_acc": ev["neighbor_acc"],
            **recent_accuracy_means(st.history),
            "neighbor_note": (
                "the other partitions' test splits, which every node holds (it partitions the shared dataset)"
                if st.neighbours
                else "not available: a node with its own data folder holds no other client's test data"
            ),
            "zero_shot_acc": None,  # the server holds no test data
            **privacy_summary(cfg, st.plan, st.qs, st.strategy.accountants),
            "clients_dropped_per_round": [list(d) for d in st.server.dropped],
            "local_acc_per_client": ev["local_acc_per_client"],
            "neighbor_acc_per_client": ev["neighbor_acc_per_client"],
            "run_name": self.settings.run_name,
        }


def _log_to_stderr() -> None:
    """The strategy's lines (rejected replies, refused nodes, update norms) in the ServerApp's output (``flwr log``),
    where nothing else configured logging: Python's default shows no INFO and no logger name."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s fpl_fast: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def make_server_app(
    cfg: RunConfig | None = None, settings: AppSettings | None = None, *, errors: list[BaseException] | None = None
) -> ServerApp:
    """A ServerApp for ``cfg`` and ``settings`` (None: read both from the run config); an exception that ends the
    run is also appended to ``errors`` (the simulation runtime only logs it)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None:  # flwr run (a deployment): the simulation's process has its own output
            _log_to_stderr()
        try:
            run_cfg, app_settings = from_run_config(context.run_config) if cfg is None else (cfg, settings)
            assert app_settings is not None
            method = FlowerDPFPL(grid, app_settings)
            out = app_settings.out_dir
            run_method(
                method,
                run_cfg,
                out=out,
                progress=app_settings.progress,
                resume=app_settings.resume,
                tensorboard=app_settings.tensorboard,
            )
        except BaseException as exc:
            if errors is not None:
                errors.append(exc)
            raise

    return server_app


# `flwr run`: the algorithm's and the app's settings come from the run config.
app = make_server_app()
