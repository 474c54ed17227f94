"""Proposers of replacement tokens for a client's prompt (F5), and the feedback history they read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EmbeddingNeighbor", "HistoryEntry", "Proposer", "RandomProposer", "banned"]


@dataclass(frozen=True)
class HistoryEntry:
    """One tried edit: position n, old token, new token, the candidate's accuracy and its change Delta acc."""

    position: int
    old: int
    new: int
    acc: float
    delta: float


class Proposer(Protocol):
    """Proposes replacement tokens for position n of a prompt."""

    uses_history: bool

    def propose(self, prompt: Sequence[int], n: int, history: Sequence[HistoryEntry], k: int) -> list[int]:
        """Up to k distinct candidate ids for ``prompt[n]`` (never the current token)."""
        ...


def banned(history: Sequence[HistoryEntry], n: int) -> set[int]:
    return {h.new for h in history if h.position == n and h.delta < 0}


class EmbeddingNeighbor:
    """Default proposer: cosine neighbours of the current token in the token-embedding table z.

    Of k candidates, ``round(explore * k)`` are uniform draws from V_a and the rest are the nearest neighbours of
    z[prompt[n]], skipping the current token and every token that lowered the accuracy at n (history).
    Neighbours come first, so the top-1 proposal is the nearest neighbour.

    Args:
        z: (V, d) token-embedding table.
        allowed: (A,) allowed ids.
        rng: random generator of the exploration draws.
        explore: exploration fraction epsilon_explore.
    """

    uses_history = True

    def __init__(self, z: Tensor, allowed: Tensor, *, rng: np.random.Generator, explore: float = 0.25) -> None:
        if not 0 <= explore <= 1:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        self.allowed = allowed.cpu()
        self._z = F.normalize(z.detach().float().cpu(), dim=-1)
        self._za = self._z[self.allowed]  # (A, d)
        self.rng = rng
        self.explore = explore

    def propose(self, prompt: Sequence[int], n: int, history: Sequence[HistoryEntry], k: int) -> list[int]:
        skip = banned(history, n) | {int(prompt[n])}
        n_rand = round(self.explore * k)
        sims = self._za @ self._z[int(prompt[n])]  # (A,)
        order = torch.argsort(sims, descending=True, stable=True)
        out: list[int] = []
        for j in order[: k + len(skip) + 1].tolist():
            tok = int(self.allowed[j])
            if tok not in skip and len(out) < k - n_rand:
                out.append(tok)
        while len(out) < k and len(out) + len(skip) < self.allowed.numel():
            tok = int(self.allowed[int(self.rng.integers(self.allowed.numel()))])
            if tok not in skip and tok not in out:
                out.append(tok)
        return out


class RandomProposer:
    """Ablation Client-1: k distinct uniform draws from V_a (never the current token); the history is ignored."""

    uses_history = False

    def __init__(self, allowed: Tensor, *, rng: np.random.Generator) -> None:
        self.allowed = allowed.cpu()
        self.rng = rng

    def propose(self, prompt: Sequence[int], n: int, history: Sequence[HistoryEntry], k: int) -> list[int]:
        draws = self.rng.choice(self.allowed.numel(), size=min(k + 1, self.allowed.numel()), replace=False)
        out = [int(self.allowed[int(j)]) for j in draws if int(self.allowed[int(j)]) != int(prompt[n])]
        return out[:k]
