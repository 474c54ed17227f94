"""FedDTPT (arXiv 2411.00985) transplanted to CLIP: federated discrete prompt tuning through a label-only oracle.

The black-box "LLM API" is a frozen CLIP zero-shot classifier (F1, :mod:`.oracle`): the text of class c is
``[SOT] + P + ids("classname.") + [EOT]`` with P a list of real BPE token ids (the prompt stays exactly discrete:
no detokenize/retokenize), and the prediction is argmax_c cos(f_img(x), f_txt(t_c)). The optimiser only ever sees
predicted labels, and the oracle counts its queries. The other steps, labelled F2-F8 in the code:

* F2 prompts (:mod:`.oracle`): token ids over the allowed vocabulary V_a (the CLIP BPE vocabulary minus SOT, EOT
  and the pad id 0; optionally only alphabetic word-final tokens), seeded from a preset text (default "a photo of
  a", N = 4).
* F3/F4 clients (:mod:`.client_search`): accuracy on a local batch B plus the balanced public set D_g; per round
  ``iterations`` token edits, each trying ``candidates`` replacements at one position chosen from the feedback
  history, keeping the best candidate if it does not lower the accuracy (Algorithm 1 with inference feedback).
* F5 proposers (:mod:`.proposers`): :class:`EmbeddingNeighbor` (default: cosine neighbours in the token-embedding
  table, 25% uniform exploration), :class:`RandomProposer` (ablation Client-1) and the no-feedback mode (ablation
  Client-2). The paper's MLM proposer needs fill-mask weights that are not available offline; it is not implemented.
* F6 server (:mod:`.aggregation`): attention weights, elbow-eps DBSCAN, ablations.
* F7 rounds (:mod:`.rounds`): K clients, 100% participation, IID or Dirichlet label split; per round: broadcast,
  local search, upload, aggregation, evaluation of the global prompt through the oracle (:mod:`.evaluation`).
* F8 transfer (:mod:`.evaluation`): the final prompt ids scored on a second open_clip model sharing the BPE
  tokenizer.

There is no differential privacy in FedDTPT (privacy is architectural: only token ids leave a client), so every
epsilon field of the results is None. The settings are :class:`Config` (:mod:`.config`); :func:`run` runs a job.
"""

from __future__ import annotations

from fpl_fast.methods.feddtpt.client_search import Batch, ClientResult, batch_accuracy, client_update
from fpl_fast.methods.feddtpt.config import CLIENT_MODES, PROPOSERS, SEED_PROMPTS, ZERO_SHOT_PROMPT, Config
from fpl_fast.methods.feddtpt.oracle import Oracle, allowed_vocabulary, token_table
from fpl_fast.methods.feddtpt.proposers import EmbeddingNeighbor, HistoryEntry, Proposer, RandomProposer
from fpl_fast.methods.feddtpt.rounds import FedDTPT, run

__all__ = [
    "CLIENT_MODES",
    "PROPOSERS",
    "SEED_PROMPTS",
    "ZERO_SHOT_PROMPT",
    "Batch",
    "ClientResult",
    "Config",
    "EmbeddingNeighbor",
    "FedDTPT",
    "HistoryEntry",
    "Oracle",
    "Proposer",
    "RandomProposer",
    "allowed_vocabulary",
    "batch_accuracy",
    "client_update",
    "run",
    "token_table",
]
