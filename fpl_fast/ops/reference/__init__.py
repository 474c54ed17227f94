"""Plain-PyTorch twins of every fpl_fast op: the specification, the fallback and the test oracle.

One module per op, as csrc/cpu and csrc/cuda have one file per op (``lowrank_prompt_ref.py`` is the twin of
``lowrank_prompt_cpu.cpp`` and ``lowrank_prompt_cuda.cu``); each function has the signature and semantics of
``torch.ops.fpl_fast.<op>`` and checks its inputs with :mod:`fpl_fast.ops.checks`. Shapes use K clients (an optional
leading dimension), b samples, n_cls classes, n_ctx context tokens, width d, rank r. Randomness is data: noise comes
from a Philox4x32-10 stream addressed by (seed, offset) (:mod:`fpl_fast.ops.reference.philox`), so that the
reference, the CPU kernels and the CUDA kernels draw the same numbers.
"""

from fpl_fast.ops.reference.clip import CLIP_EPS
from fpl_fast.ops.reference.dp_lowrank_clip_noise_ref import dp_clip_norms, dp_lowrank_clip_noise, dp_noise_numel
from fpl_fast.ops.reference.dp_output_clip_noise_ref import NORM_EPS, dp_output_clip_noise, output_noise_numel
from fpl_fast.ops.reference.lowrank_factorize_ref import GS_EPS, factorize_noise_numel, lowrank_factorize
from fpl_fast.ops.reference.lowrank_full_grad_ref import lowrank_full_grad
from fpl_fast.ops.reference.lowrank_prompt_ref import lowrank_prompt, lowrank_prompt_backward
from fpl_fast.ops.reference.nn_map_ref import NN_MAP_CHUNK, nn_map
from fpl_fast.ops.reference.philox import philox_normal

__all__ = [
    "CLIP_EPS",
    "GS_EPS",
    "NN_MAP_CHUNK",
    "NORM_EPS",
    "dp_clip_norms",
    "dp_lowrank_clip_noise",
    "dp_noise_numel",
    "dp_output_clip_noise",
    "factorize_noise_numel",
    "lowrank_factorize",
    "lowrank_full_grad",
    "lowrank_prompt",
    "lowrank_prompt_backward",
    "nn_map",
    "output_noise_numel",
    "philox_normal",
]
