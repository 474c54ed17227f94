"""The factorisation registry: one object per way of building a client's local prompt, registered by name.

A factorisation says which local parameters a client stores, how this step's factors (U, V, residual) are
made from them, how the privatised gradients of those factors become updates of the stored parameters, and
how many normals making the factors draws. Everything else (clipping, noise, the server, accounting) reads
only these answers, so a new factorisation is one file with one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

__all__ = ["Factorization", "StepFactors", "register", "get_factorization", "factorization_names"]


@dataclass
class StepFactors:
    """The factors of one step for a set of clients (None where the factorisation has none).

    u (K, n_ctx, r), v (K, r, d), residual (K, n_ctx, d): ctx = G + u v + residual.
    """

    u: Tensor | None
    v: Tensor | None
    residual: Tensor | None


class Factorization:
    """How a client's context ctx_c = G + (its local part) is built and trained.

    Class attributes:
        name: the registry key (``--factorization NAME``).
        uses_rank: the rank r of a U V product applies (and must be in [1, n_ctx]).
        has_local: the client trains a local prompt (its local DP release exists).
        clips_factors: the locally released gradients are the pair (g_U, g_V) (the op clips over both and the
            accountant counts the pair); otherwise one gradient of the whole local context.
    """

    name: ClassVar[str]
    uses_rank: ClassVar[bool] = False
    has_local: ClassVar[bool] = True
    clips_factors: ClassVar[bool] = False

    def init_local(self, normal: Callable[..., Tensor], K: int, n_ctx: int, d: int, rank: int) -> dict[str, Tensor]:
        """The stored local parameters of K clients, drawn with ``normal(*shape)``."""
        return {}

    def factorize_draws(self, d: int, rank: int) -> int:
        """Normals one ``factors`` call draws per client (to advance its noise stream)."""
        return 0

    def factors(
        self, local: dict[str, Tensor], clients: Tensor, *, rank: int, seed: Sequence[int], offset: Sequence[int]
    ) -> StepFactors:
        """This step's factors of the given clients (random ones draw from client j's stream seed[j], offset[j])."""
        return StepFactors(None, None, None)

    def local_update(
        self, factors: StepFactors, grad_a: Tensor | None, grad_b: Tensor | None, *, full_grad_scale: float
    ) -> dict[str, Tensor]:
        """Map the privatised local gradients to gradients of the stored parameters (name -> (K_a, ...)).

        grad_a / grad_b: (g_U, g_V) when ``clips_factors``, else (g_ctx_local, None); both None without a local
        release.
        """
        return {}


_REGISTRY: dict[str, Factorization] = {}


def register(factorization: Factorization) -> Factorization:
    """Make ``factorization`` available under its ``name`` (``--factorization`` and ``RunConfig``)."""
    name = getattr(factorization, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a factorization needs a non-empty string name, got {name!r}")
    if name in _REGISTRY and type(_REGISTRY[name]) is not type(factorization):
        raise ValueError(f"factorization {name!r} is already registered (by {type(_REGISTRY[name]).__name__})")
    _REGISTRY[name] = factorization
    return factorization


def get_factorization(name: str) -> Factorization:
    if name not in _REGISTRY:
        raise ValueError(f"factorization must be one of {', '.join(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def factorization_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)
