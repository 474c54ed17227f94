"""The server: the global prompt G, its optimiser, the server's noise, client sampling and aggregation.

With sync="step" the server averages the clients' clipped gradients of G, adds the global-DP noise (it is then
trusted with the clipped gradients) and steps G with the same SGD as the clients; with sync="round" it only
averages the clients' DP-SGD-trained copies of G (FedAvg, post-processing). Only G passes through it.

Drop-out (--client-drop-rate P): of the m clients sampled for a round, floor(P m) drop out for the whole round, drawn
by a generator of the server's own ("server", "dropout" key: secret unless --noise-seed), so the draw moves neither
the client sampling nor any client's randomness, and at P = 0 nothing is drawn. The server aggregates the clients
that report; its noise on G is calibrated for them (std sigma_g C / (b K_r) for K_r reporting clients).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fpl_fast.config import RunConfig, clients_dropped, clients_per_round
from fpl_fast.federated.optim import ClientSGD
from fpl_fast.privacy.global_noise import server_aggregate_global
from fpl_fast.privacy.randomness import PartyRandomness, party_key

__all__ = ["Server"]


class Server:
    """The server's state: G (n_ctx, d), the momentum of its SGD and its own secret randomness.

    Args:
        cfg: the run configuration (lr, momentum, client fraction, clip norm, batch size).
        global_ctx: the initial G.
        noise_multiplier: sigma_g added to the mean of the clients' clipped gradients (0: none).
    """

    def __init__(self, cfg: RunConfig, global_ctx: Tensor, *, noise_multiplier: float) -> None:
        self.cfg = cfg
        self.noise_multiplier = noise_multiplier
        self.rand = PartyRandomness.create("server", cfg.noise_seed)  # secret unless --noise-seed
        self.dropout = np.random.Generator(np.random.PCG64(party_key(cfg.noise_seed, "server", "dropout")))
        self.dropped: list[list[int]] = []  # the clients that dropped out of each round so far
        self._g = global_ctx[None].clone()  # one row: the server is a client-indexed SGD of one
        self.opt = ClientSGD({"g": self._g}, lr=cfg.learning_rate, momentum=cfg.momentum)
        self._row = torch.zeros(1, dtype=torch.long, device=global_ctx.device)

    @property
    def global_ctx(self) -> Tensor:
        return self._g[0]

    def sample_clients(self, num_clients: int) -> Tensor:
        """Clients taking part in this round (client fraction, at least one), from the server's generator."""
        m = clients_per_round(self.cfg.client_fraction, num_clients)
        chosen = (
            np.sort(self.rand.sampling.choice(num_clients, size=m, replace=False))
            if m < num_clients
            else np.arange(num_clients)
        )
        return torch.as_tensor(chosen, dtype=torch.long, device=self._g.device)

    def drop_out(self, sampled: Tensor) -> Tensor:
        """The clients of ``sampled`` that report this round: floor(P m) of the m sampled, chosen uniformly by the
        server's drop-out generator, drop out (recorded in :attr:`dropped`; nothing is drawn at P = 0)."""
        n = clients_dropped(self.cfg.client_drop_rate, len(sampled))
        gone = self.dropout.choice(len(sampled), size=n, replace=False) if n else np.empty(0, dtype=np.int64)
        ids = sampled.tolist()
        self.dropped.append(sorted(ids[i] for i in gone))
        keep = np.setdiff1d(np.arange(len(sampled)), gone)
        return sampled[torch.as_tensor(keep, dtype=torch.long, device=sampled.device)]

    def round_clients(self, num_clients: int) -> Tensor:
        """The clients that train this round: those sampled (:meth:`sample_clients`) less those that drop out
        (:meth:`drop_out`)."""
        return self.drop_out(self.sample_clients(num_clients))

    def aggregate(self, grads: Tensor, clip_norm: float | None = None) -> Tensor:
        """The mean of the clients' clipped gradients of G (K_a, n_ctx, d), noised N(0, (sigma_g C / (b K_a))^2);
        C is the largest clip norm among the clients (adaptive clipping: theirs this step; default the run's C)."""
        if self.noise_multiplier > 0:
            return server_aggregate_global(
                grads,
                clip_norm=self.cfg.clip_norm if clip_norm is None else clip_norm,
                noise_multiplier=self.noise_multiplier,
                batch_size=float(self.cfg.batch_size),
                stream=self.rand.noise,
            )
        return grads.mean(0)

    def step(self, grads: Tensor, clip_norm: float | None = None) -> None:
        """sync="step": one SGD step of G on the aggregate of this step's client gradients (clipped to at most
        ``clip_norm``)."""
        self.opt.step(self._row, {"g": self.aggregate(grads, clip_norm)[None]})

    @torch.no_grad()
    def average(self, copies: Tensor) -> None:
        """sync="round": G becomes the mean of the clients' copies (FedAvg)."""
        self._g[0] = copies.mean(0)

    def state_dict(self) -> dict:
        return {
            "g": self._g.clone(),
            "opt": self.opt.state_dict(),
            "randomness": self.rand.state_dict(),
            "dropout": self.dropout.bit_generator.state,  # secret: which clients drop out next
            "dropped": [list(d) for d in self.dropped],
        }

    def load_state_dict(self, state: dict) -> None:
        self._g = state["g"].clone()
        self.opt.params = {"g": self._g}
        self.opt.load_state_dict(state["opt"])
        self.rand.load_state_dict(state["randomness"])
        if "dropout" in state:  # a checkpoint from before drop-out: none dropped
            self.dropout.bit_generator.state = state["dropout"]
            self.dropped = [list(d) for d in state["dropped"]]
