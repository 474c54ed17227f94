"""The settings of a FedDTPT job (:class:`Config`) and the choices they take."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fpl_fast.config import CHOICES, check_trainable
from fpl_fast.data import SCHEMES
from fpl_fast.methods.feddtpt.aggregation import ELBOW_METHODS, SERVER_MODES
from fpl_fast.validation import ConfigError, check_choice, check_finite, check_int

__all__ = ["CLIENT_MODES", "PRECISIONS", "PROPOSERS", "SEED_PROMPTS", "VOCABS", "ZERO_SHOT_PROMPT", "Config"]

SEED_PROMPTS: dict[str, str] = {
    "concise": "a photo of a",
    "moderate": "a small blurry black and white photo of a",
    "detailed": "a low resolution grayscale picture of one centered handwritten digit showing a",
}
"""Seed-prompt presets (the paper's concise / moderate / detailed initialisations); default "concise"."""

ZERO_SHOT_PROMPT = "a photo of a"
"""Prompt of the hand-written zero-shot baseline: the same text as fpl_fast.methods.dpfpl's template
"a photo of a {}."."""

PROPOSERS = ("neighbor", "random")
CLIENT_MODES = ("feedback", "no_feedback")
VOCABS = ("all", "words")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Config:
    """A FedDTPT job. The defaults are the embedded offline run (tiny digits CLIP, 10 IID clients, 10 rounds).

    Attributes:
        num_users: clients K (100% participation).
        rounds: communication rounds R.
        seed: seed of every random choice (splits, batches, proposals, k-means, transfer-model init).
        model: open_clip model of the black-box oracle.
        pretrained: its weights (``"embedded"``: the shipped tiny digits CLIP).
        dataset: dataset name (``"digits"`` is built in).
        data_root: dataset folder (unused for digits).
        batch_size: local batch B per round (all of a smaller client's data).
        partition: ``"iid"``, ``"pathological"`` or ``"dirichlet"`` (by label; ``fpl_fast.data.partition``).
        beta: Dirichlet concentration (the paper's non-IID setting is 0.1).
        device: torch device of the oracle.
        precision: ``"fp32"`` or ``"bf16"``.
        iterations: client iterations T per round (Algorithm 1's max_iterations).
        candidates: candidate tokens K tried per iteration.
        seed_prompt: a preset of :data:`SEED_PROMPTS` or a literal seed text.
        n_max: maximum global prompt length.
        public_per_class: g, images per class of the public set D_g (held out of the training part).
        proposer: ``"neighbor"`` (EmbeddingNeighbor) or ``"random"`` (ablation Client-1).
        client_mode: ``"feedback"`` (Algorithm 1) or ``"no_feedback"`` (ablation Client-2: top-1 edit at a cyclic
            position, accepted unconditionally).
        explore: fraction of EmbeddingNeighbor candidates drawn uniformly from V_a.
        position_beta: beta of the position choice softmax(beta * gain_n).
        server: ``"dbscan"`` (FedDTPT), ``"mean"`` (Server-1), ``"topn"`` (Server-2), ``"kmeans"`` (Server-3).
        min_samples: DBSCAN min_samples (and the neighbour rank of the elbow curve).
        elbow: ``"second_diff"`` or ``"kneedle"``.
        temperature: attention softmax temperature tau (1 in the paper).
        vocab: ``"all"`` (BPE vocabulary minus specials) or ``"words"`` (only alphabetic word-final tokens).
        transfer_model: second open_clip model for the transfer evaluation (None: skip). It must share the BPE
            tokenizer. Offline no second trained CLIP exists, so the default is a random-init tiny config.
        transfer_pretrained: its weights (None: random init, labelled as such in the results).
        text_path: ``"shared"`` (default: [SOT, prompt] through the text tower once per prompt, each class only on
            its own name tokens, where the tower is causal and pools at EOT) or ``"full"`` (each class text whole).
    """

    num_users: int = 10
    rounds: int = 10
    seed: int = 1
    model: str = "tiny-digits-clip"
    pretrained: str | None = "embedded"
    dataset: str = "digits"
    data_root: str = "data"
    batch_size: int = 32
    partition: str = "iid"
    beta: float = 0.1
    device: str = "cpu"
    precision: str = "fp32"
    iterations: int = 20
    candidates: int = 8
    seed_prompt: str = "concise"
    n_max: int = 16
    public_per_class: int = 1
    proposer: str = "neighbor"
    client_mode: str = "feedback"
    explore: float = 0.25
    position_beta: float = 1.0
    server: str = "dbscan"
    min_samples: int = 2
    elbow: str = "second_diff"
    temperature: float = 1.0
    vocab: str = "all"
    transfer_model: str | None = "tiny-bidir-clip"
    transfer_pretrained: str | None = None
    text_path: str = "shared"

    def __post_init__(self) -> None:
        choices = {
            "text_path": CHOICES["text_path"],
            "partition": SCHEMES,
            "precision": PRECISIONS,
            "proposer": PROPOSERS,
            "client_mode": CLIENT_MODES,
            "server": SERVER_MODES,
            "elbow": ELBOW_METHODS,
            "vocab": VOCABS,
        }
        for name, allowed in choices.items():
            check_choice(self, name, allowed)
        check_int(self, "num_users", "rounds", "batch_size", "iterations", "candidates", "n_max", "min_samples")
        check_int(self, "public_per_class", low=0)
        check_finite(self, "beta")
        if not 0 <= self.explore <= 1:
            raise ConfigError("explore", f"explore must be in [0, 1], got {self.explore}")
        check_finite(self, "position_beta", positive=False)
        check_trainable(self.dataset)
        check_finite(self, "temperature")
        if not self.seed_prompt.strip():
            raise ConfigError(
                "seed_prompt", f"seed_prompt must be one of {', '.join(SEED_PROMPTS)} or a non-empty text, got ''"
            )

    @property
    def seed_text(self) -> str:
        """The seed prompt text (the preset's text, or the literal text)."""
        return SEED_PROMPTS.get(self.seed_prompt, self.seed_prompt)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)
