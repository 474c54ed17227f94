"""The strategy: clients sampled by partition id with the server's own generator, only G aggregated.

Not Flower's FedAvg: its node sampling is ``random.sample`` over whatever nodes are connected and its mean is
weighted by example counts; DP-FPL samples clients (partitions, not nodes) with the server's secret generator, as
the in-process runner does, and takes the uniform mean of the clients' copies of G (sync="round") or of their
clipped gradients, noised by the server (sync="step"). The local prompts are not in any message.

Every reply is checked before it is used (:func:`reply_problem`), as far as the server can check it without trusting
the client: the records and keys of ``protocol.REPLY_KEYS`` and nothing else, the partition the replying node holds,
the array's shape and finiteness, the numbers' types and ranges, and the update's L2 norm against the public ceiling
``max-update-norm`` (the run's configuration; a client's true clipped norm depends on its private batch size and
noise, so the server cannot check it exactly). A reply that fails is rejected and logged in one line, and the step
goes on without it. The DP guarantee of an honest client does not depend on these checks: its noise is added on its
own node before anything leaves it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fpl_fast.federated.server import Server
from fpl_fast.flower.protocol import (
    EVALUATE,
    REPLY_KEYS,
    TRAIN,
    TRAIN_STEP,
    FederationError,
    prompt_of,
    value,
)
from fpl_fast.privacy.plan import ClientAccountant, clipped_quantities
from fpl_fast.validation import is_int

__all__ = ["GlobalPromptStrategy", "ReplyCheck", "replies_by_partition", "reply_problem"]

log = logging.getLogger("fpl_fast.flower")

_RECORD_TYPES = {"global": ArrayRecord, "info": ConfigRecord, "ledger": MetricRecord, "accuracy": MetricRecord}
ReplyCheck = Callable[[Message], "str | None"]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _field_problem(key: str, x: Any, n_quantities: int) -> str | None:
    """What is wrong with one field of a reply's record (None: nothing the server can see)."""
    if key in ("partition-id", "steps", "n-train", "ctx-dim"):
        low = 1 if key in ("n-train", "ctx-dim") else 0
        return None if is_int(x) and x >= low else f"{key} must be an integer >= {low}, got {x!r}"
    if key == "neighbours":
        return None if isinstance(x, bool) else f"neighbours must be a bool, got {x!r}"
    if key in ("version", "config-hash"):
        return None if isinstance(x, str) else f"{key} must be a string, got {x!r}"
    if key == "clip-norm-global":
        return (
            None if _number(x) and math.isfinite(x) and x >= 0 else f"clip-norm-global must be finite >= 0, got {x!r}"
        )
    if key == "clip-norms":
        ok = (
            isinstance(x, list) and len(x) == n_quantities and all(_number(v) and math.isfinite(v) and v > 0 for v in x)
        )
        return None if ok else f"clip-norms must be {n_quantities} finite numbers > 0, got {x!r}"
    if key in ("local-acc", "neighbor-acc"):  # neighbour accuracy is nan where the node holds no neighbour data
        ok = _number(x) and (0.0 <= x <= 1.0 or (key == "neighbor-acc" and math.isnan(x)))
        return None if ok else f"{key} must be in [0, 1]{' (or nan)' if key == 'neighbor-acc' else ''}, got {x!r}"
    return f"unexpected key {key!r}"  # REPLY_KEYS and this function must agree


def reply_problem(
    msg: Message,
    kind: str,
    *,
    partitions: Iterable[int],
    node_of: dict[int, int] | None = None,
    sent: torch.Tensor | None = None,
    delta: bool = False,
    max_update_norm: float = math.inf,
    n_quantities: int = 1,
) -> str | None:
    """What the server can see is wrong with a reply of message type ``kind`` (None: nothing), in one line.

    Args:
        partitions: the partition ids this message round may reply for.
        node_of: partition id -> the node that holds it (None: any node, the set-up's query).
        sent: the G the server sent (its shape is the reply array's); ``delta``: the update is the reply's array
            minus ``sent`` (sync="round", a trained copy of G), else the array itself (sync="step", a gradient).
        max_update_norm: the public ceiling on the update's L2 norm.
        n_quantities: how many clip norms a ledger lists.
    """
    if msg.metadata.message_type != kind:
        return f"a reply of type {msg.metadata.message_type!r} to a {kind!r} message"
    allowed = REPLY_KEYS[kind]
    content = msg.content
    if set(content.keys()) != set(allowed):
        return f"records {sorted(content.keys())}, expected {sorted(allowed)}"
    for name, rec in content.items():
        if not isinstance(rec, _RECORD_TYPES[name]):
            return f"record {name!r} is a {type(rec).__name__}, expected a {_RECORD_TYPES[name].__name__}"
        if set(rec.keys()) != allowed[name]:
            return f"record {name!r} has keys {sorted(rec.keys())}, expected {sorted(allowed[name])}"
        if isinstance(rec, ArrayRecord):
            continue
        for key, x in rec.items():
            if problem := _field_problem(key, x, n_quantities):
                return problem
    record = next(n for n in allowed if n != "global")
    k: int = value(content, record, "partition-id")  # an integer: checked above
    if k not in set(partitions):
        return f"partition-id {k} was not asked for in this message round"
    if node_of is not None and node_of.get(k) != msg.metadata.src_node_id:
        return f"partition-id {k} is held by node {node_of.get(k)}, not by the replying node"
    if "global" in allowed:
        arr = prompt_of(content)
        if sent is not None and tuple(arr.shape) != tuple(sent.shape):
            return f"array of shape {tuple(arr.shape)}, expected {tuple(sent.shape)}"
        if sent is not None and arr.dtype != sent.dtype:
            return f"array of dtype {arr.dtype}, expected {sent.dtype}"
        if not torch.isfinite(arr).all():
            return "array with NaN or inf values"
        update = arr.double() - sent.double() if delta and sent is not None else arr.double()
        norm = float(update.norm())
        if norm > max_update_norm:
            return f"update norm {norm:.4g} above the ceiling max-update-norm={max_update_norm:g}"
    return None


def replies_by_partition(
    replies: Iterable[Message],
    record: str,
    expected: list[int],
    check: ReplyCheck | None = None,
    *,
    allow_none: bool = False,
) -> dict[int, RecordDict]:
    """Each replying client's content by partition id; a node's error is raised as one line naming it. A reply
    that ``check`` finds a problem with is rejected and logged (one line), and left out, as are missing replies (a
    timeout drops late ones; the path of a client that drops out): the step goes on with the replies that came and
    passed. No reply at all is an error unless ``allow_none`` (a training step then leaves G as it is)."""
    got: dict[int, RecordDict] = {}
    for msg in replies:
        if msg.has_error():
            reason = str(msg.error.reason).strip().splitlines()
            raise FederationError(f"node {msg.metadata.src_node_id} failed: {reason[-1] if reason else msg.error}")
        if "error" in msg.content:
            raise FederationError(f"node {msg.metadata.src_node_id}: {value(msg.content, 'error', 'message')}")
        if check is not None and (problem := check(msg)):
            log.warning(
                "rejected the %s reply of node %s: %s; going on without it",
                msg.metadata.message_type,
                msg.metadata.src_node_id,
                problem,
            )
            continue
        k = int(value(msg.content, record, "partition-id"))
        if k in got:
            log.warning("rejected a second reply for partition %d (node %s)", k, msg.metadata.src_node_id)
            continue
        got[k] = msg.content
    missing = sorted(set(expected) - set(got))
    if missing:
        log.warning(
            "no reply from clients %s within the reply timeout: going on with the %d that came", missing, len(got)
        )
    if not got and not allow_none:
        raise FederationError(f"no client replied (asked: {expected}); raise reply-timeout or check the SuperNodes")
    return got


class GlobalPromptStrategy(Strategy):
    """Sampling and aggregation of the global prompt, on the same :class:`~fpl_fast.federated.server.Server` as the
    in-process runner.

    Args:
        server: G, its optimiser, the server's noise and its client-sampling generator.
        accountants: one ledger per client (partition id), told the steps each client reports it took.
        node_of: partition id -> node id.
        sync: "round" (clients send their DP-SGD-trained copies of G) or "step" (their clipped gradients).
        max_update_norm: the public ceiling on the L2 norm of a client's update (its copy of G minus the G it was
            sent, or its gradient); a reply above it is rejected.
    """

    def __init__(
        self,
        server: Server,
        accountants: list[ClientAccountant],
        node_of: dict[int, int],
        *,
        sync: str,
        max_update_norm: float = math.inf,
    ) -> None:
        self.server, self.accountants, self.node_of, self.sync = server, accountants, node_of, sync
        self.max_update_norm = max_update_norm
        self.active: list[int] = []
        self.clip_norms: dict[int, list[float]] = {}  # each client's clip norms as its last reply reported them

    def _check(self, kind: str, partitions: list[int], sent: torch.Tensor | None = None) -> ReplyCheck:
        n_quantities = len(clipped_quantities(self.server.cfg))

        def check(msg: Message) -> str | None:
            return reply_problem(
                msg,
                kind,
                partitions=partitions,
                node_of=self.node_of,
                sent=sent,
                delta=self.sync == "round",
                max_update_norm=self.max_update_norm,
                n_quantities=n_quantities,
            )

        return check

    def clip_norm_table(self) -> torch.Tensor:
        """(K, Q) every client's clip norms as last reported; a client that has not trained yet still has the run's
        starting C (public: the configuration's)."""
        cfg = self.server.cfg
        start = [cfg.clip_norm] * len(clipped_quantities(cfg))
        return torch.tensor([self.clip_norms.get(k, start) for k in range(len(self.accountants))], dtype=torch.float64)

    def sample(self) -> list[int]:
        """The clients of the next round: client fraction of all, less the round's drop-outs (--client-drop-rate),
        both from the server's generators as in the in-process runner (a dropped client is sent nothing)."""
        self.active = [int(k) for k in self.server.round_clients(len(self.accountants)).tolist()]
        return self.active

    def _messages(self, kind: str, arrays: ArrayRecord, config: ConfigRecord, clients: list[int]) -> list[Message]:
        return [
            Message(RecordDict({"global": arrays, "header": config}), dst_node_id=self.node_of[k], message_type=kind)
            for k in clients
        ]

    # ------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """G and the header to each client sampled for this round (``sample`` first)."""
        return self._messages(TRAIN if self.sync == "round" else TRAIN_STEP, arrays, config, self.active)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The uniform mean of the replies' G (round) or an SGD step of G on their noised mean gradient (step);
        each client's ledger is told the steps it reports. A reply that fails its checks is left out; with none
        left, G stays as it is."""
        kind = TRAIN if self.sync == "round" else TRAIN_STEP
        sent = self.server.global_ctx.clone()  # G as sent this unit
        checked = self._check(kind, self.active, sent)
        got = replies_by_partition(replies, "ledger", self.active, checked, allow_none=True)
        order = sorted(got)  # the in-process runner's row order
        if not order:  # every client dropped out of this step: G stays, as in the in-process runner
            return ArrayRecord({"global": self.server.global_ctx.clone()}), MetricRecord({"replies": 0})
        for k in order:
            self.accountants[k].steps = int(value(got[k], "ledger", "steps"))
            self.clip_norms[k] = [float(x) for x in value(got[k], "ledger", "clip-norms")]
        released = torch.stack([prompt_of(got[k]) for k in order])
        updates = (released - sent if self.sync == "round" else released).flatten(1).double().norm(dim=1)
        # A function of the releases only; it tells the operator where to set max-update-norm.
        log.info(
            "round %d: largest accepted update norm %.4g (max-update-norm=%g)",
            server_round,
            float(updates.max()),
            self.max_update_norm,
        )
        if self.sync == "round":
            self.server.average(released)
        else:  # the noise covers the largest clip norm of G among this step's clients
            self.server.step(released, max(float(value(got[k], "ledger", "clip-norm-global")) for k in order))
        return ArrayRecord({"global": self.server.global_ctx.clone()}), MetricRecord({"replies": len(order)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """G to every client: each evaluates its own prompt (G plus its local part) on its test data."""
        return self._messages(EVALUATE, arrays, config, sorted(self.node_of))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client accuracies ("local-acc-<k>", "neighbor-acc-<k>"; nan where the node has no neighbour data)."""
        got = replies_by_partition(
            replies, "accuracy", sorted(self.node_of), self._check(EVALUATE, sorted(self.node_of))
        )
        out: dict[str, Any] = {}
        for k, content in sorted(got.items()):
            out[f"local-acc-{k}"] = float(value(content, "accuracy", "local-acc"))
            out[f"neighbor-acc-{k}"] = float(value(content, "accuracy", "neighbor-acc"))
        return MetricRecord(out)

    def summary(self) -> None:
        log.info(
            "GlobalPromptStrategy: %d clients, sync=%s, uniform mean of G, client sampling by the server's generator",
            len(self.accountants),
            self.sync,
        )
