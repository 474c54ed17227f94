"""Prompt state of a set of clients: each client's copy of the global prompt G and its local parameters.

All clients are held as stacked tensors (client dimension first), so one op launch serves them all. What the
local part is and how it is trained is the factorisation's (:mod:`fpl_fast.prompts.registry`); this class only
holds the tensors and assembles contexts and prompts from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fpl_fast import ops
from fpl_fast.prompts.registry import Factorization, StepFactors, factorization_names, get_factorization

__all__ = ["PromptConfig", "PromptLearner"]


@dataclass(frozen=True)
class PromptConfig:
    """Prompt hyper-parameters.

    Attributes:
        factorization: a registered factorisation (``factorization_names()``).
        n_ctx: number of learned context tokens (CoOp default 16).
        rank: rank r of U V (factorisations with ``uses_rank``).
        init_std: context initialisation N(0, init_std^2) (CoOp: 0.02).
        full_grad_scale: scale of g_L = scale (g_U V + U g_V + U U^T g_U V) (authors: 0.1).
    """

    factorization: str = "dpfpl"
    n_ctx: int = 16
    rank: int = 8
    init_std: float = 0.02
    full_grad_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.factorization not in factorization_names():
            raise ValueError(
                f"factorization must be one of {', '.join(factorization_names())}, got {self.factorization!r}"
            )
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.uses_rank and not 1 <= self.rank <= self.n_ctx:
            raise ValueError(f"rank must be in [1, n_ctx={self.n_ctx}] for {self.factorization}, got {self.rank}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @property
    def scheme(self) -> Factorization:
        return get_factorization(self.factorization)

    @property
    def uses_rank(self) -> bool:
        return self.scheme.uses_rank

    @property
    def has_local(self) -> bool:
        return self.scheme.has_local


class PromptLearner:
    """Prompt state of K clients: the initial global prompt, each client's copy of it and its local prompt.

    Args:
        cfg: prompt hyper-parameters.
        num_clients: K.
        ctx_dim: token-embedding width d of the text encoder.
        generator: initialisation randomness (G first, then the local parameters).
        device, dtype: where the prompt lives (fp32 by default: the prompt is the trained state).

    ``global_ctx`` is G at initialisation; the server owns it from then on (``federated.server``).
    """

    def __init__(
        self,
        cfg: PromptConfig,
        num_clients: int,
        ctx_dim: int,
        *,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.cfg = cfg
        self.scheme = cfg.scheme
        self.num_clients = num_clients
        self.ctx_dim = ctx_dim
        n, std = cfg.n_ctx, cfg.init_std

        def normal(*shape: int) -> Tensor:
            return (torch.randn(*shape, generator=generator, dtype=torch.float32) * std).to(device, dtype)

        self.global_ctx = normal(n, ctx_dim)
        # Each client's working copy of G (they differ inside a round with sync="round").
        self.client_global = self.global_ctx.expand(num_clients, n, ctx_dim).clone()
        self.local: dict[str, Tensor] = self.scheme.init_local(normal, num_clients, n, ctx_dim, cfg.rank)

    # ------------------------------------------------------------------------------------------
    def factors(self, clients: Tensor, *, seed: list[int], offset: list[int]) -> StepFactors:
        """This step's (U, V, R) for the given client indices; random factors of client ``clients[j]`` come from
        its own stream (seed[j], offset[j])."""
        return self.scheme.factors(self.local, clients, rank=self.cfg.rank, seed=seed, offset=offset)

    def factorize_draws(self) -> int:
        """Normals one ``factors`` call consumes per client (for advancing its noise stream)."""
        return self.scheme.factorize_draws(self.ctx_dim, self.cfg.rank)

    def context(self, clients: Tensor, factors: StepFactors) -> Tensor:
        """ctx = G_c + U V + R for the given clients, (K_a, n_ctx, d)."""
        ctx = self.client_global[clients]
        if factors.u is not None and factors.v is not None:
            ctx = ctx + torch.matmul(factors.u, factors.v)
        if factors.residual is not None:
            ctx = ctx + factors.residual
        return ctx

    def prompts(self, prefix: Tensor, suffix: Tensor, clients: Tensor, factors: StepFactors) -> Tensor:
        """Assembled class prompts (K_a, n_cls, 1 + n_ctx + S, d) through the fused op."""
        g = self.client_global[clients].to(prefix.dtype)
        cast = lambda t: None if t is None else t.to(prefix.dtype)  # noqa: E731
        return ops.lowrank_prompt(prefix, suffix, g, cast(factors.u), cast(factors.v), cast(factors.residual))

    def local_update_direction(
        self, factors: StepFactors, grad_local_a: Tensor | None, grad_local_b: Tensor | None
    ) -> dict[str, Tensor]:
        """Map the privatised local gradients (the first two outputs of the privatisation: (g_U, g_V), or
        (g_L, empty) without u, v) to gradients of the stored local parameters."""
        return self.scheme.local_update(factors, grad_local_a, grad_local_b, full_grad_scale=self.cfg.full_grad_scale)

    def select(self, rows: list[int]) -> PromptLearner:
        """A learner of these clients' rows only (a federation node holding some clients of a K-client init)."""
        out = object.__new__(PromptLearner)
        out.cfg, out.scheme, out.ctx_dim, out.num_clients = self.cfg, self.scheme, self.ctx_dim, len(rows)
        ix = torch.as_tensor(rows, dtype=torch.long, device=self.global_ctx.device)
        out.global_ctx = self.global_ctx.clone()
        out.client_global = self.client_global[ix].clone()
        out.local = {k: t[ix].clone() for k, t in self.local.items()}
        return out

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "client_global": self.client_global.clone(),
            "local": {k: t.clone() for k, t in self.local.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.client_global = state["client_global"].clone()
        self.local = {k: t.clone() for k, t in state["local"].items()}
