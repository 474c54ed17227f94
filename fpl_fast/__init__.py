"""fpl_fast: private, personalized federated prompt learning on frozen CLIP, with fused C++/CUDA ops.

The Python API (README "Python API")::

    import fpl_fast
    result = fpl_fast.train({"rounds": 5, "factorization": "dpfpl"}, settings={"out": "runs/demo"})
    print(result.local_acc, result.epsilon)

``train`` runs a job, ``load_backbone`` loads a frozen CLIP, ``register`` adds a factorisation
(a :class:`Factorization`), ``RunConfig`` / ``RunSettings`` are the algorithm's settings and the run's.
Heavy modules load on first use, so ``import fpl_fast`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from fpl_fast.ops import cpu_isa, has_cpp_ops, has_cuda_kernels

# The package version, one source: pyproject.toml reads it (tool.setuptools.dynamic), results.json records it.
__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "train": "fpl_fast.job",
    "Result": "fpl_fast.job",
    "load_backbone": "fpl_fast.backbone.loading",
    "Backbone": "fpl_fast.backbone.protocol",
    "RunConfig": "fpl_fast.config",
    "RunSettings": "fpl_fast.config",
    "ClientData": "fpl_fast.federated.client",
    "DatasetBundle": "fpl_fast.data",
    "Factorization": "fpl_fast.prompts",
    "StepFactors": "fpl_fast.prompts",
    "register": "fpl_fast.prompts",
    "factorization_names": "fpl_fast.prompts",
}

__all__ = ["has_cpp_ops", "has_cuda_kernels", "cpu_isa", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fpl_fast' has no attribute {name!r}")
