"""Prompt learner: the global prompt G and the five local-prompt factorisations of DP-FPL.

All clients of a federation are held as stacked tensors (client dimension K first), so one op launch
serves them all. The table (DESIGN.md section 1):

| name     | client context ctx_c                   | trained locally | shared |
|----------|----------------------------------------|-----------------|--------|
| promptfl | G                                      | -               | G      |
| fedotp   | G + L_c                                | L_c             | G      |
| fedpgp   | G + U_c V_c                            | U_c, V_c        | G      |
| dplora   | G + U_c V_c, (U_c, V_c) = lowrank(L_c) | L_c via U, V    | G      |
| dpfpl    | G + U_c V_c + R_c, R_c = L_c - U_c V_c | L_c via U, V    | G      |

lowrank() is redone at every step with fresh randomness; R carries no gradient; the gradient of L is
rebuilt from those of U and V with ``ops.lowrank_full_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fpl_fast import ops, reference

__all__ = ["FACTORIZATIONS", "PromptConfig", "StepFactors", "PromptLearner"]

FACTORIZATIONS = ("promptfl", "fedotp", "fedpgp", "dplora", "dpfpl")


@dataclass(frozen=True)
class PromptConfig:
    """Prompt hyper-parameters.

    Attributes:
        factorization: one of FACTORIZATIONS.
        n_ctx: number of learned context tokens (CoOp default 16).
        rank: rank r of U V (fedpgp, dplora, dpfpl).
        init_std: context initialisation N(0, init_std^2) (CoOp: 0.02).
        full_grad_scale: scale of g_L = scale (g_U V + U g_V + U U^T g_U V) (authors: 0.1).
    """

    factorization: str = "dpfpl"
    n_ctx: int = 16
    rank: int = 8
    init_std: float = 0.02
    full_grad_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"factorization must be one of {', '.join(FACTORIZATIONS)}, got {self.factorization!r}")
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.uses_rank and not 1 <= self.rank <= self.n_ctx:
            raise ValueError(f"rank must be in [1, n_ctx={self.n_ctx}] for {self.factorization}, got {self.rank}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @property
    def uses_rank(self) -> bool:
        return self.factorization in ("fedpgp", "dplora", "dpfpl")

    @property
    def has_local(self) -> bool:
        return self.factorization != "promptfl"


@dataclass
class StepFactors:
    """The factors of one step for a set of clients (None where the factorisation has none).

    u (K, n_ctx, r), v (K, r, d), residual (K, n_ctx, d): ctx = G + u v + residual.
    """

    u: Tensor | None
    v: Tensor | None
    residual: Tensor | None


class PromptLearner:
    """Prompt state of K clients: the server's global prompt and every client's local prompt.

    Args:
        cfg: prompt hyper-parameters.
        num_clients: K.
        ctx_dim: token-embedding width d of the text encoder.
        generator: initialisation randomness.
        device, dtype: where the prompt lives (fp32 by default: the prompt is the trained state).
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
        self.num_clients = num_clients
        n, d, r, std = cfg.n_ctx, ctx_dim, cfg.rank, cfg.init_std

        def normal(*shape: int) -> Tensor:
            return (torch.randn(*shape, generator=generator, dtype=torch.float32) * std).to(device, dtype)

        self.global_ctx = normal(n, d)  # G held by the server, (n_ctx, d)
        # Each client's working copy of G (they differ inside a round with sync="round").
        self.client_global = self.global_ctx.expand(num_clients, n, d).clone()
        self.local: dict[str, Tensor] = {}
        if cfg.factorization in ("fedotp", "dplora", "dpfpl"):
            self.local["l"] = normal(num_clients, n, d)
        elif cfg.factorization == "fedpgp":
            self.local["u"] = normal(num_clients, n, r)
            self.local["v"] = normal(num_clients, r, d)

    # ------------------------------------------------------------------------------------------
    def factors(self, clients: Tensor, *, seed: list[int], offset: list[int]) -> StepFactors:
        """This step's (U, V, R) for the given client indices; lowrank() draws fresh V0 for client
        ``clients[j]`` from its own stream (seed[j], offset[j])."""
        f = self.cfg.factorization
        if f == "promptfl":
            return StepFactors(None, None, None)
        if f == "fedotp":
            return StepFactors(None, None, self.local["l"][clients])
        if f == "fedpgp":
            return StepFactors(self.local["u"][clients], self.local["v"][clients], None)
        u, v, res = ops.lowrank_factorize(self.local["l"][clients], self.cfg.rank, seed, offset)
        return StepFactors(u, v, res if f == "dpfpl" else None)

    def factorize_draws(self) -> int:
        """Normals one ``factors`` call consumes per client (for advancing its noise stream)."""
        if self.cfg.factorization in ("dplora", "dpfpl"):
            return reference.factorize_noise_numel(1, self.global_ctx.shape[-1], self.cfg.rank)
        return 0

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

    # ------------------------------------------------------------------------------------------
    def local_update_direction(self, factors: StepFactors, grad_local_a: Tensor, grad_local_b: Tensor) -> dict:
        """Map the privatised local gradients to the gradients of the stored local parameters.

        grad_local_a / grad_local_b are the first two outputs of ``dp_lowrank_clip_noise``: (g_U, g_V), or
        (g_L, empty) without u, v. dplora/dpfpl rebuild g_L = scale (g_U V + U g_V + U U^T g_U V).
        """
        f = self.cfg.factorization
        if f == "promptfl":
            return {}
        if f == "fedotp":
            return {"l": grad_local_a}
        if f == "fedpgp":
            return {"u": grad_local_a, "v": grad_local_b}
        assert factors.u is not None and factors.v is not None
        g_l = ops.lowrank_full_grad(grad_local_a, grad_local_b, factors.u, factors.v, self.cfg.full_grad_scale)
        return {"l": g_l}

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "global_ctx": self.global_ctx.clone(),
            "client_global": self.client_global.clone(),
            "local": {k: t.clone() for k, t in self.local.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_ctx = state["global_ctx"].clone()
        self.client_global = state["client_global"].clone()
        self.local = {k: t.clone() for k, t in state["local"].items()}
