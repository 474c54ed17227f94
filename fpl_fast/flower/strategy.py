"""The strategy: clients sampled by partition id with the server's own generator, only G aggregated.

Not Flower's FedAvg: its node sampling is ``random.sample`` over whatever nodes are connected and its mean is
weighted by example counts; DP-FPL samples clients (partitions, not nodes) with the server's secret generator, as
the in-process runner does, and takes the uniform mean of the clients' copies of G (sync="round") or of their
clipped gradients, noised by the server (sync="step"). The local prompts are not in any message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fpl_fast.federated.server import Server
from fpl_fast.flower.protocol import EVALUATE, TRAIN, TRAIN_STEP, FederationError, prompt_of, value
from fpl_fast.privacy.plan import ClientAccountant, clipped_quantities

__all__ = ["GlobalPromptStrategy", "replies_by_partition"]

log = logging.getLogger("fpl_fast.flower")


def replies_by_partition(
    replies: Iterable[Message], record: str, expected: list[int], *, allow_none: bool = False
) -> dict[int, RecordDict]:
    """Each replying client's content by partition id; a node's error is raised as one line naming it. Missing
    replies (a timeout drops late ones) are logged and left out: the step goes on with the replies that came (the
    path of a client that drops out). No reply at all is an error unless ``allow_none`` (a training step then
    leaves G as it is)."""
    got: dict[int, RecordDict] = {}
    for msg in replies:
        if msg.has_error():
            reason = str(msg.error.reason).strip().splitlines()
            raise FederationError(f"node {msg.metadata.src_node_id} failed: {reason[-1] if reason else msg.error}")
        if "error" in msg.content:
            raise FederationError(f"node {msg.metadata.src_node_id}: {value(msg.content, 'error', 'message')}")
        got[int(value(msg.content, record, "partition-id"))] = msg.content
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
    """

    def __init__(
        self,
        server: Server,
        accountants: list[ClientAccountant],
        node_of: dict[int, int],
        *,
        sync: str,
    ) -> None:
        self.server, self.accountants, self.node_of, self.sync = server, accountants, node_of, sync
        self.active: list[int] = []
        self.clip_norms: dict[int, list[float]] = {}  # each client's clip norms as its last reply reported them

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
        each client's ledger is told the steps it reports."""
        got = replies_by_partition(replies, "ledger", self.active, allow_none=True)
        order = sorted(got)  # the in-process runner's row order
        if not order:  # every client dropped out of this step: G stays, as in the in-process runner
            return ArrayRecord({"global": self.server.global_ctx.clone()}), MetricRecord({"replies": 0})
        for k in order:
            self.accountants[k].steps = int(value(got[k], "ledger", "steps"))
            self.clip_norms[k] = [float(x) for x in value(got[k], "ledger", "clip-norms")]
        released = torch.stack([prompt_of(got[k]) for k in order])
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
        got = replies_by_partition(replies, "accuracy", sorted(self.node_of))
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
