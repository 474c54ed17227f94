"""In-process simulation of a DP-FPL federation: it only drives the clients and the server.

Every client is a row of one :class:`~fpl_fast.federated.client.Clients` group, so all clients of a step go
through the text encoder together; the :class:`~fpl_fast.federated.server.Server` holds G. Per step:
clients -> (clipped mean gradient of G) -> server aggregates, noises and steps G -> broadcast (sync="step");
or the clients step their own copies of G and the server averages them at the round's end (sync="round").
Local prompts never leave their client's rows; only G (or its gradient) is aggregated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fpl_fast.backbone.protocol import Backbone
from fpl_fast.config import RunConfig
from fpl_fast.federated.client import ClientData, Clients, StepStats, steps_per_round
from fpl_fast.federated.metrics import split_accuracies
from fpl_fast.federated.server import Server
from fpl_fast.privacy.plan import NoisePlan
from fpl_fast.prompts import PromptConfig, PromptLearner
from fpl_fast.prompts.class_prompts import ClassPrompts

__all__ = ["ClientData", "Federation", "StepStats", "client_accuracies"]


@torch.no_grad()
def client_accuracies(text: Tensor, data: ClientData, clients: list[int]) -> tuple[list[float], list[float]]:
    """Accuracy of each prompt ``text[j]`` (normalised text features (n_cls, D)) on client ``clients[j]``'s own test
    split (local) and on every other client's test split in ``data`` (neighbour; nan where there is none)."""
    x = torch.nn.functional.normalize(data.test_feats.to(text.device), dim=-1)
    correct = torch.einsum("nd,kcd->knc", x, text).argmax(-1).cpu() == data.test_labels.cpu()[None]
    return split_accuracies(correct, data.test_idx, clients)


class Federation:
    """K clients and a server, stepping together.

    Args:
        cfg: the run configuration.
        backbone: a frozen CLIP (``fpl_fast.backbone.model.FrozenCLIP``).
        classnames: class names in label order.
        data: cached image features and client splits.
        noise_local, noise_global: the noise multipliers in force (already calibrated).
        make_clients, make_server: the classes of the two roles (the privacy audit instruments them).
    """

    def __init__(
        self,
        cfg: RunConfig,
        backbone: Backbone,
        classnames: list[str],
        data: ClientData,
        *,
        noise_local: float,
        noise_global: float,
        make_clients: Callable[..., Clients] = Clients,
        make_server: Callable[..., Server] = Server,
    ) -> None:
        self.cfg, self.backbone, self.data = cfg, backbone, data
        self.device = torch.device(cfg.device)
        K = cfg.num_users
        self.text = ClassPrompts(backbone, classnames, cfg.n_ctx, cfg.text_path)
        learner = PromptLearner(
            PromptConfig(cfg.factorization, cfg.n_ctx, cfg.rank, full_grad_scale=cfg.full_grad_scale),
            K,
            backbone.ctx_dim,
            generator=torch.Generator().manual_seed(cfg.seed),
            device=self.device,
        )
        self.plan = NoisePlan.from_sigmas(cfg, noise_local, noise_global)
        self.clients = make_clients(cfg, self.text, data, learner, self.plan, ids=list(range(K)))
        self.server = make_server(cfg, learner.global_ctx, noise_multiplier=self.clients.global_noise)
        self.sizes = [len(ix) for ix in data.train_idx]

    @property
    def learner(self) -> PromptLearner:
        return self.clients.learner

    @property
    def steps_per_round(self) -> int:
        return steps_per_round(self.cfg, self.sizes)

    @property
    def steps_taken(self) -> np.ndarray:
        """Noised steps per client (what each client's accountant has counted)."""
        return np.asarray([a.steps for a in self.clients.accountants], dtype=np.int64)

    def sample_clients(self) -> Tensor:
        """The clients that train this round: the server's sample less its drop-outs (``server.dropped[-1]``)."""
        return self.server.round_clients(self.cfg.num_users)

    # ------------------------------------------------------------------------------------------
    def train_step(self, clients: Tensor, *, server_average: bool) -> StepStats:
        """One local step of every client in ``clients`` (sync="step": with server averaging of G)."""
        grad_global, stats = self.clients.local_step(clients)
        if server_average:
            self.server.step(grad_global, stats.global_clip_norm)
            self.learner.client_global[:] = self.server.global_ctx  # broadcast to every client (idle ones too)
        else:
            self.clients.own_global_step(clients, grad_global)
        return stats

    def train_round(self, clients: Tensor, on_step=None) -> list[StepStats]:
        """One round: E local epochs of the active clients (G synchronised per step or at the end). With none
        (every sampled client dropped out) nobody steps and G stays (the round's steps still tick ``on_step``)."""
        if len(clients) == 0:
            if on_step is not None:
                for _ in range(self.steps_per_round):
                    on_step()
            return []
        if self.cfg.sync == "round":
            stats = self.clients.local_round(clients, self.server.global_ctx, self.steps_per_round, on_step)
            self.server.average(self.learner.client_global[clients])  # FedAvg of the (DP-SGD trained) copies
            self.learner.client_global[:] = self.server.global_ctx
            return stats
        stats = []
        for _ in range(self.steps_per_round):
            stats.append(self.train_step(clients, server_average=True))
            if on_step is not None:
                on_step()
        return stats

    # ------------------------------------------------------------------------------------------
    def client_text_features(self, eval_seed: int, text: ClassPrompts | None = None) -> Tensor:
        """(K, n_cls, D) normalised text features of every client's current prompt, on ``text``'s class names
        (default: the federation's)."""
        return self.clients.text_features(eval_seed, text)

    @torch.no_grad()
    def global_text_features(self, text: ClassPrompts | None = None) -> Tensor:
        """(1, n_cls, D) normalised text features of the global prompt G alone (the server's, no local part), on
        ``text``'s class names (default: the federation's)."""
        text = self.text if text is None else text
        return torch.nn.functional.normalize(text.features(self.server.global_ctx[None]), dim=-1)

    @torch.no_grad()
    def evaluate(self, eval_seed: int) -> dict:
        """Per-client local accuracy (own test split) and neighbour accuracy (the others' test splits)."""
        local, neighbor = client_accuracies(
            self.client_text_features(eval_seed), self.data, list(range(self.cfg.num_users))
        )
        return {
            "local_acc": float(np.nanmean(local)),
            "neighbor_acc": float(np.nanmean(neighbor)),
            "local_acc_per_client": local,
            "neighbor_acc_per_client": neighbor,
        }

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "clients": self.clients.state_dict(),
            "server": self.server.state_dict(),
            "torch_rng": torch.get_rng_state(),  # augmentation draws from torch's global generator
        }

    def load_state_dict(self, state: dict) -> None:
        self.clients.load_state_dict(state["clients"])
        self.server.load_state_dict(state["server"])
        torch.set_rng_state(state["torch_rng"])
