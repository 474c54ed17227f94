"""DP-FPL's factorisation and its baselines (docs/design.md section 1), registered at import.

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

from fpl_fast import ops
from fpl_fast.prompts.registry import Factorization, StepFactors, register

__all__ = ["PromptFL", "FedOTP", "FedPGP", "DPLoRA", "DPFPL"]


class PromptFL(Factorization):
    """The global prompt alone: nothing local."""

    name = "promptfl"
    has_local = False


class FedOTP(Factorization):
    """A full local prompt L_c added to G."""

    name = "fedotp"

    def init_local(self, normal, K, n_ctx, d, rank):
        return {"l": normal(K, n_ctx, d)}

    def factors(self, local, clients, *, rank, seed, offset):
        return StepFactors(None, None, local["l"][clients])

    def local_update(self, factors, grad_a, grad_b, *, full_grad_scale):
        return {"l": grad_a}


class FedPGP(Factorization):
    """Stored low-rank factors U_c V_c, trained directly."""

    name = "fedpgp"
    uses_rank = clips_factors = True

    def init_local(self, normal, K, n_ctx, d, rank):
        return {"u": normal(K, n_ctx, rank), "v": normal(K, rank, d)}

    def factors(self, local, clients, *, rank, seed, offset):
        return StepFactors(local["u"][clients], local["v"][clients], None)

    def local_update(self, factors, grad_a, grad_b, *, full_grad_scale):
        return {"u": grad_a, "v": grad_b}


class DPLoRA(Factorization):
    """A full L_c seen through this step's lowrank(L_c) = U V; g_L rebuilt from g_U, g_V."""

    name = "dplora"
    uses_rank = clips_factors = True
    keeps_residual = False

    def init_local(self, normal, K, n_ctx, d, rank):
        return {"l": normal(K, n_ctx, d)}

    def factorize_draws(self, d, rank):
        return ops.factorize_noise_numel(1, d, rank)

    def factors(self, local, clients, *, rank, seed, offset):
        u, v, res = ops.lowrank_factorize(local["l"][clients], rank, seed, offset)
        return StepFactors(u, v, res if self.keeps_residual else None)

    def local_update(self, factors, grad_a, grad_b, *, full_grad_scale):
        assert factors.u is not None and factors.v is not None
        return {"l": ops.lowrank_full_grad(grad_a, grad_b, factors.u, factors.v, full_grad_scale)}


class DPFPL(DPLoRA):
    """DP-FPL: dplora plus the residual R_c = L_c - U_c V_c (no gradient through R)."""

    name = "dpfpl"
    keeps_residual = True


for _f in (PromptFL(), FedOTP(), FedPGP(), DPLoRA(), DPFPL()):
    register(_f)
