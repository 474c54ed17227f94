"""A FedDTPT client (F3, F4): the accuracy of prompts on its batch and D_g, and its token search of a round."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fpl_fast.methods.feddtpt.oracle import Oracle
from fpl_fast.methods.feddtpt.proposers import HistoryEntry, Proposer, banned

__all__ = ["Batch", "ClientResult", "batch_accuracy", "client_update"]


@dataclass(frozen=True)
class Batch:
    """Images (by split and index) with their labels: the client's local batch, or D_g."""

    split: str
    indices: np.ndarray
    labels: np.ndarray


def batch_accuracy(oracle: Oracle, prompts: Sequence[Sequence[int]], batches: Sequence[Batch]) -> np.ndarray:
    """A(P; B u D_g) for each prompt: the fraction of images of all ``batches`` the oracle labels correctly, (P,)."""
    correct = np.zeros(len(prompts))
    total = 0
    for b in batches:
        if len(b.indices) == 0:
            continue
        pred = oracle.predict_many(prompts, b.split, b.indices).numpy()  # (P, B)
        correct += (pred == b.labels[None, :]).sum(1)
        total += len(b.indices)
    if total == 0:
        raise ValueError("the accuracy batch B u D_g is empty")
    return correct / total


@dataclass
class ClientResult:
    """What a client returns: its best prompt of the round, its accuracy, the round's history and its queries."""

    prompt: list[int]
    acc: float
    history: list[HistoryEntry] = field(default_factory=list)
    queries: int = 0


def client_update(
    oracle: Oracle,
    prompt: Sequence[int],
    batches: Sequence[Batch],
    proposer: Proposer,
    *,
    iterations: int,
    candidates: int,
    rng: np.random.Generator,
    feedback: bool = True,
    position_beta: float = 1.0,
) -> ClientResult:
    """Algorithm 1 with inference feedback (F4), or the no-feedback ablation (Client-2).

    With feedback, each iteration picks a position n ~ softmax(beta * gain_n) (gain_n: mean positive Delta acc at
    n in this round's history, uniform for proposers that ignore the history), tries ``candidates`` replacements
    (history-banned pairs removed), logs all of them, and accepts the best one if its accuracy is >= the current
    one. Without feedback, each iteration replaces position ``it mod N`` by the proposer's top-1, unconditionally;
    the final prompt is evaluated once for the report.

    Args:
        oracle: the label-only oracle.
        prompt: the global prompt P_global (start point).
        batches: B and D_g.
        proposer: candidate generator.
        iterations: T.
        candidates: K candidates per iteration.
        rng: random generator of the position choice.
        feedback: False for the Client-2 ablation.
        position_beta: beta of the position softmax.

    Returns:
        The round's best prompt, its accuracy, the history and the oracle queries spent.
    """
    start = oracle.queries
    cur = [int(t) for t in prompt]
    if not feedback:
        for it in range(iterations):
            n = it % len(cur)
            proposal = proposer.propose(cur, n, [], 1)
            if proposal:
                cur[n] = proposal[0]
        acc = float(batch_accuracy(oracle, [cur], batches)[0])
        return ClientResult(cur, acc, [], oracle.queries - start)

    acc_cur = float(batch_accuracy(oracle, [cur], batches)[0])
    history: list[HistoryEntry] = []
    for _ in range(iterations):
        n_pos = len(cur)
        if proposer.uses_history:
            gain = np.zeros(n_pos)
            for n in range(n_pos):
                pos = [h.delta for h in history if h.position == n and h.delta > 0]
                gain[n] = float(np.mean(pos)) if pos else 0.0
            logits = position_beta * gain
            p = np.exp(logits - logits.max())
            n = int(rng.choice(n_pos, p=p / p.sum()))
            banned_here = banned(history, n)
        else:
            n = int(rng.integers(n_pos))
            banned_here = set()
        cands = [c for c in proposer.propose(cur, n, history, candidates) if c not in banned_here and c != cur[n]]
        if not cands:
            continue
        trial = [cur[:n] + [c] + cur[n + 1 :] for c in cands]
        accs = batch_accuracy(oracle, trial, batches)
        history.extend(
            HistoryEntry(n, cur[n], c, float(a), float(a) - acc_cur) for c, a in zip(cands, accs, strict=True)
        )
        best = int(np.argmax(accs))
        if accs[best] >= acc_cur:
            cur, acc_cur = trial[best], float(accs[best])
    return ClientResult(cur, acc_cur, history, oracle.queries - start)
