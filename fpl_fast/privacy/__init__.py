"""fpl_fast.privacy: per-sample prompt gradients, clipping + noise, the noise plan and privacy accounting.

per_sample.py (per-example gradients and cotangents), noise_stream.py (each party's Philox noise stream),
clipping.py (local clipping and noise on the client), global_noise.py (the global prompt's noise), output_dp.py
(output-space clipping and noise), sensitivity.py (what the accountant is told for each release), plan.py (the
noise plan of a run and each client's ledger), accountant.py (dp_accounting's RDP / PLD), randomness.py (each
party's secret keys), dchi.py (RAPT's d_chi privatisation). Knows nothing about CLIP: it gets a differentiable
text function, tensors and configs.
"""

from fpl_fast.privacy.accountant import (
    PrivacyAccountant,
    calibrate_noise,
    epsilon_for,
    paper_noise_multiplier,
)
from fpl_fast.privacy.clipping import LocalDP, LocalDPResult, privatize_local
from fpl_fast.privacy.global_noise import server_aggregate_global
from fpl_fast.privacy.noise_stream import NoiseStream
from fpl_fast.privacy.per_sample import (
    batch_prompt_grad,
    logit_cotangents,
    per_sample_prompt_grads,
    per_sample_prompt_grads_from,
)
from fpl_fast.privacy.sensitivity import accountant_noise_multiplier, global_accountant_noise_multiplier

__all__ = [
    "PrivacyAccountant",
    "calibrate_noise",
    "epsilon_for",
    "paper_noise_multiplier",
    "LocalDP",
    "LocalDPResult",
    "NoiseStream",
    "accountant_noise_multiplier",
    "global_accountant_noise_multiplier",
    "privatize_local",
    "server_aggregate_global",
    "batch_prompt_grad",
    "logit_cotangents",
    "per_sample_prompt_grads",
    "per_sample_prompt_grads_from",
]
