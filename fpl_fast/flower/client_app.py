"""The ClientApp: one DP-FPL client per SuperNode, over :class:`~fpl_fast.flower.node.ClientNode`.

``app`` (``fpl_fast.flower.client_app:app``) reads the algorithm's settings from the run config; the simulation
builds its own with :func:`make_client_app`. Each handler restores the client's state for the unit it is asked to
run, runs it, saves the state (``context.state`` and the node-local folder) and replies with the release only
(:mod:`fpl_fast.flower.protocol` lists what each reply holds). A node that cannot take part as set up replies with
one line (``error``) instead of a traceback.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fpl_fast import __version__
from fpl_fast.config import RunConfig
from fpl_fast.flower.node import ClientNode, NodeSettings, NodeStore, prepared_data
from fpl_fast.flower.protocol import INFO, NodeSetupError, check_header, config_hash, from_run_config, prompt_of
from fpl_fast.privacy.plan import NoisePlan

__all__ = ["make_client_app", "app"]

_STATE_KEY = "fpl_fast"  # the client's state in context.state: its tag, run nonce and serialised state


def _reply(msg: Message, **records: Any) -> Message:
    return Message(RecordDict(records), reply_to=msg)


def _handler(fn: Callable[..., Message]) -> Callable[[Message, Context], Message]:
    """A node's setup errors become a one-line ``error`` reply (the server raises it with the node named)."""

    @functools.wraps(fn)
    def run(msg: Message, context: Context) -> Message:
        try:
            return fn(msg, context)
        except NodeSetupError as exc:
            return _reply(msg, error=ConfigRecord({"message": str(exc)}))

    return run


def _restore(node: ClientNode, store: NodeStore, context: Context, tag: int, nonce: str) -> None:
    """Load the client's newest state of this run from before unit ``tag``: from context.state when it holds it,
    else from the node-local folder (a new run id or a restarted node has an empty context.state)."""
    rec: Any = context.state.get(_STATE_KEY)
    if rec is not None and rec["nonce"] == nonce and int(rec["tag"]) < tag:
        state = torch.load(io.BytesIO(rec["blob"]), map_location="cpu", weights_only=False)
    else:
        state = store.load_before(tag, nonce)
    if state is not None:
        node.load_state_dict(state)


def _save(node: ClientNode, store: NodeStore, context: Context, tag: int, nonce: str) -> None:
    blob = store.save(tag, node.state_dict(nonce))  # serialised once, for the folder and for context.state
    context.state[_STATE_KEY] = ConfigRecord({"tag": tag, "nonce": nonce, "blob": blob})


def make_client_app(
    cfg: RunConfig | None = None, *, state_dir: Path | None = None, feature_cache: Path | None = None
) -> ClientApp:
    """A ClientApp for ``cfg`` (None: read it from the run config), keeping node state under ``state_dir`` and
    image features under ``feature_cache`` (None: the node config's ``state-dir`` / ``feature-cache``, else
    ``~/.cache/fpl_fast/flower`` and its ``features`` folder)."""
    client_app = ClientApp()

    def setup(msg: Message, context: Context) -> tuple[RunConfig, NodeSettings, Any]:
        run_cfg = cfg if cfg is not None else from_run_config(context.run_config)[0]
        head = msg.content["header"]
        check_header(head, run_cfg)
        node = NodeSettings.from_node_config(context.node_config, state_dir=state_dir, feature_cache=feature_cache)
        node.check(run_cfg)
        torch.set_num_threads(max(1, int(context.node_config.get("threads", torch.get_num_threads()))))
        return run_cfg, node, head

    def client(run_cfg: RunConfig, node: NodeSettings, head: Any) -> tuple[ClientNode, NodeStore]:
        plan = NoisePlan.from_sigmas(run_cfg, float(head["sigma-local"]), float(head["sigma-global"]))
        backbone, names, data = prepared_data(run_cfg, node)
        return ClientNode(run_cfg, node, plan, backbone, names, data), NodeStore(
            node.state_dir, str(head["run-name"]), node.partition_id
        )

    @client_app.query(INFO.split(".")[1])
    @_handler
    def info(msg: Message, context: Context) -> Message:
        run_cfg, node, _ = setup(msg, context)
        backbone, _, data = prepared_data(run_cfg, node)
        row = 0 if node.data_dir else node.partition_id
        info: dict[str, Any] = {
            "partition-id": node.partition_id,
            "n-train": len(data.train_idx[row]),
            "ctx-dim": int(backbone.ctx_dim),
            "neighbours": node.data_dir is None,
            "version": __version__,
            "config-hash": config_hash(run_cfg),
        }
        return _reply(msg, info=ConfigRecord(info))

    def train_unit(msg: Message, context: Context, *, step: bool) -> Message:
        run_cfg, node, head = setup(msg, context)
        c, store = client(run_cfg, node, head)
        tag, nonce = int(head["tag"]), str(head["nonce"])
        _restore(c, store, context, tag, nonce)
        g = prompt_of(msg.content)
        if step:
            out, stat = c.train_step(g)
            stats = [stat]
        else:
            out, stats = c.train_round(g, int(head["steps"]))
        _save(c, store, context, tag, nonce)
        store.log(tag, stats)  # loss and clipped fraction stay on the node
        store.write_ledger(c)
        return _reply(
            msg,
            **{
                "global": ArrayRecord({"global": out.cpu()}),
                "ledger": MetricRecord(
                    {
                        "partition-id": node.partition_id,
                        "steps": c.steps,
                        # The C of g_G its step was clipped to (the server's noise covers the largest) and its clip
                        # norms now: fixed, or adaptive ones, post-processing of its noised counts.
                        "clip-norm-global": stats[-1].global_clip_norm if stats else 0.0,
                        "clip-norms": [float(x) for x in c.clients.clip_norms[0].tolist()],
                    }
                ),
            },
        )

    @client_app.train()
    @_handler
    def train(msg: Message, context: Context) -> Message:
        return train_unit(msg, context, step=False)

    @client_app.train("step")
    @_handler
    def train_step(msg: Message, context: Context) -> Message:
        return train_unit(msg, context, step=True)

    @client_app.evaluate()
    @_handler
    def evaluate(msg: Message, context: Context) -> Message:
        run_cfg, node, head = setup(msg, context)
        c, store = client(run_cfg, node, head)
        _restore(c, store, context, int(head["tag"]) + 1, str(head["nonce"]))
        local, neighbor = c.evaluate(prompt_of(msg.content), int(head["eval-seed"]))
        acc: dict[str, Any] = {
            "partition-id": node.partition_id,
            "local-acc": local,
            "neighbor-acc": math.nan if neighbor is None else neighbor,
        }
        return _reply(msg, accuracy=MetricRecord(acc))

    return client_app


# `flwr run` / flower-supernode: the algorithm's settings come from the run config.
app = make_client_app()
