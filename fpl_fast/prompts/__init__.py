"""Prompts: the factorisation registry, the built-in factorisations and the stacked prompt state of clients."""

from fpl_fast.prompts import builtin as _builtin  # noqa: F401  (registers the five built-in factorisations)
from fpl_fast.prompts.learner import PromptConfig, PromptLearner
from fpl_fast.prompts.registry import (
    Factorization,
    StepFactors,
    factorization_names,
    get_factorization,
    register,
)

# The built-in factorisations (the registry may hold more: factorization_names()).
FACTORIZATIONS = factorization_names()

__all__ = [
    "FACTORIZATIONS",
    "Factorization",
    "StepFactors",
    "register",
    "get_factorization",
    "factorization_names",
    "PromptConfig",
    "PromptLearner",
]
