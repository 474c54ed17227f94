"""FedDTPT (arXiv 2411.00985) transplanted to CLIP: federated discrete prompt tuning through a label-only oracle.

The black-box "LLM API" is a frozen CLIP zero-shot classifier (:class:`Oracle`, spec F1): the text of class c is
``[SOT] + P + ids("classname.") + [EOT]`` with P a list of real BPE token ids (the prompt stays exactly discrete:
no detokenize/retokenize), and the prediction is argmax_c cos(f_img(x), f_txt(t_c)). The optimiser only ever sees
predicted labels, and the oracle counts its queries. Everything else follows the spec (F2-F8):

* F2 prompts: token ids over the allowed vocabulary V_a (the CLIP BPE vocabulary minus SOT, EOT and the pad id 0;
  optionally only alphabetic word-final tokens), seeded from a preset text (default "a photo of a", N = 4).
* F3/F4 clients: accuracy on a local batch B plus the balanced public set D_g; per round ``iterations`` token
  edits, each trying ``candidates`` replacements at one position chosen from the feedback history, keeping the
  best candidate if it does not lower the accuracy (Algorithm 1 with inference feedback).
* F5 proposers: :class:`EmbeddingNeighbor` (default: cosine neighbours in the token-embedding table, 25% uniform
  exploration), :class:`RandomProposer` (ablation Client-1) and the no-feedback mode (ablation Client-2). The
  paper's MLM proposer needs fill-mask weights that are not available offline; it is not implemented.
* F6 server: :mod:`fpl_fast.methods.feddtpt_server` (attention weights, elbow-eps DBSCAN, ablations).
* F7 rounds: K clients, 100% participation, IID or Dirichlet label split; per round: broadcast, local search,
  upload, aggregation, evaluation of the global prompt through the oracle.
* F8 transfer: the final prompt ids scored on a second open_clip model sharing the BPE tokenizer.

There is no differential privacy in FedDTPT (privacy is architectural: only token ids leave a client), so every
epsilon field of the results is None.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_fast.config import CHOICES
from fpl_fast.data import SCHEMES, load_dataset
from fpl_fast.data.clients import client_split
from fpl_fast.federated.metrics import local_neighbor
from fpl_fast.methods.feddtpt_server import ELBOW_METHODS, SERVER_MODES, aggregate
from fpl_fast.methods.skeleton import run_method
from fpl_fast.validation import ConfigError, check_choice, check_finite, check_int

__all__ = [
    "CLIENT_MODES",
    "PROPOSERS",
    "SEED_PROMPTS",
    "ZERO_SHOT_PROMPT",
    "ClientResult",
    "Config",
    "EmbeddingNeighbor",
    "FedDTPT",
    "HistoryEntry",
    "Oracle",
    "Proposer",
    "RandomProposer",
    "allowed_vocabulary",
    "client_update",
    "run",
    "token_table",
]

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
PAD_ID = 0  # open_clip pads token sequences with id 0


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Vocabulary and the black-box oracle (F1, F2)
# --------------------------------------------------------------------------------------------------------------


def token_table(backbone: Any) -> Tensor:
    """The static token-embedding table z of a FrozenCLIP's text tower, (V, d) float32 on the CPU."""
    from fpl_fast.backbone.model import text_tower

    return text_tower(backbone.model).token_embedding.weight.detach().float().cpu()


def allowed_vocabulary(tokenizer: Any, *, words_only: bool = False) -> Tensor:
    """The allowed vocabulary V_a: every BPE id except SOT, EOT and the pad id 0.

    Args:
        tokenizer: an open_clip ``SimpleTokenizer`` (it has ``encoder``, ``sot_token_id``, ``eot_token_id``).
        words_only: keep only alphabetic ASCII tokens that end a word (``</w>``).

    Returns:
        (A,) sorted long ids.
    """
    encoder = getattr(tokenizer, "encoder", None)
    if not isinstance(encoder, dict):
        raise ValueError(f"FedDTPT needs a CLIP BPE tokenizer with an 'encoder' table, got {type(tokenizer).__name__}")
    special = {int(tokenizer.sot_token_id), int(tokenizer.eot_token_id), PAD_ID}
    ids = []
    for token, i in encoder.items():
        if i in special:
            continue
        if words_only:
            word = token[:-4] if token.endswith("</w>") else ""
            if not (word.isascii() and word.isalpha()):
                continue
        ids.append(int(i))
    return torch.as_tensor(sorted(ids), dtype=torch.long)


class Oracle:
    """Label-only black-box classifier around a frozen CLIP (spec F1).

    Images are registered once per split (the simulation caches their features: the "API" sees the images, the
    caller only names them by index). :meth:`predict` and :meth:`predict_many` return predicted class indices
    (``torch.long``) and nothing else: no scores, features or logits are reachable through the public interface.

    Query accounting: ``queries`` grows by 1 per (prompt, image) evaluation; ``text_encodings`` by C (the number of
    classes) per prompt whose class texts were not encoded before (text features are cached per prompt), whichever
    text path computes them.

    The class texts of one prompt are ``[SOT, prompt, classname, '.', EOT]``: on a causal tower pooling at EOT the
    shared-prefix path (``text_path="shared"``) encodes [SOT, prompt] once per prompt and each class only on its own
    name tokens (:meth:`FrozenCLIP.encode_shared`); other towers, or ``text_path="full"``, encode
    each class text whole.

    Args:
        backbone: a :class:`fpl_fast.backbone.model.FrozenCLIP`.
        classnames: class names in label order (underscores become spaces).
        cache_size: prompts whose text features are kept (least recently used dropped first).
        chunk: text sequences (prompt x class pairs) per encoder call.
        text_path: ``"shared"`` (where the tower allows it) or ``"full"``.
    """

    def __init__(
        self,
        backbone: Any,
        classnames: Sequence[str],
        *,
        cache_size: int = 4096,
        chunk: int = 1024,
        text_path: str = "shared",
    ) -> None:
        if not classnames:
            raise ValueError("classnames must be a non-empty list of class names")
        self._backbone = backbone
        tok = backbone.tokenizer
        self._sot = int(tok.sot_token_id)
        self._eot = int(tok.eot_token_id)
        self._context = int(backbone.context_length)
        self._vocab = int(token_table(backbone).shape[0])
        self._class_ids = [list(tok.encode(f"{c.replace('_', ' ')}.")) for c in classnames]
        self.num_classes = len(self._class_ids)
        self._images: dict[str, Tensor] = {}
        self._text: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._chunk = chunk
        self._shared = text_path == "shared" and bool(backbone.is_causal)
        self._packs: dict[int, Any] = {}  # shared path: the class suffixes packed behind prefixes of each length
        self.queries = 0
        self.text_encodings = 0

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt that fits the context with every class name."""
        return self._context - 2 - max(len(c) for c in self._class_ids)

    def register(self, split: str, dataset: torch.utils.data.Dataset, *, dataset_key: str = "data") -> None:
        """Make the images of ``dataset`` (items ``(image, label)``) available as ``split``; labels are ignored."""
        feats = self._backbone.image_features(dataset_key, split, dataset)
        self._images[split] = F.normalize(feats.float(), dim=-1)

    def num_images(self, split: str) -> int:
        """Number of registered images of ``split``."""
        return int(self._split(split).shape[0])

    def _split(self, split: str) -> Tensor:
        if split not in self._images:
            raise ValueError(f"split must be one of the registered splits {sorted(self._images)}, got {split!r}")
        return self._images[split]

    def _check_prompt(self, ids: Sequence[int]) -> tuple[int, ...]:
        key = tuple(int(i) for i in ids)
        if not key:
            raise ValueError("a prompt must hold at least one token id")
        if len(key) > self.max_prompt_len:
            raise ValueError(f"prompt length must be <= {self.max_prompt_len} for these class names, got {len(key)}")
        if min(key) < 0 or max(key) >= self._vocab or self._sot in key or self._eot in key:
            raise ValueError(f"prompt ids must lie in [0, {self._vocab}) without SOT/EOT, got {list(key)}")
        return key

    def _encode_full(self, prompts: list[tuple[int, ...]]) -> Tensor:
        """(U, C, D) features of every class text of each prompt, each text whole."""
        rows, eots = [], []
        for p in prompts:
            for cls in self._class_ids:
                seq = [self._sot, *p, *cls, self._eot]
                eots.append(len(seq) - 1)
                rows.append(seq + [PAD_ID] * (self._context - len(seq)))
        tokens = torch.as_tensor(rows, dtype=torch.long)  # (U * C, context_length)
        eot = torch.as_tensor(eots, dtype=torch.long)
        feats = []
        for s in range(0, len(rows), self._chunk):
            emb = self._backbone.token_embeddings(tokens[s : s + self._chunk])
            feats.append(self._backbone.encode_prompts(emb, eot[s : s + self._chunk].to(emb.device)).float())
        return torch.cat(feats).reshape(len(prompts), self.num_classes, -1)

    def _encode_shared(self, prompts: list[tuple[int, ...]]) -> Tensor:
        """(U, C, D) features of every class text of each prompt: [SOT, prompt] once per prompt (prompts of one
        length in one call per chunk), the class suffixes [classname, '.', EOT] packed behind it."""
        from fpl_fast.backbone.text_tower import SuffixPack

        by_len: dict[int, list[int]] = {}
        for j, p in enumerate(prompts):
            by_len.setdefault(1 + len(p), []).append(j)
        out = torch.empty(len(prompts), self.num_classes, self._backbone.embed_dim, device=self._backbone.device)
        step = max(1, self._chunk // self.num_classes)
        for P, members in by_len.items():
            if P not in self._packs:
                suffixes = [self._backbone.token_embeddings(torch.as_tensor([*c, self._eot])) for c in self._class_ids]
                self._packs[P] = SuffixPack.build(suffixes, P)
            for s in range(0, len(members), step):
                part = members[s : s + step]
                prefix = self._backbone.token_embeddings(torch.as_tensor([[self._sot, *prompts[j]] for j in part]))
                out[part] = self._backbone.encode_shared(prefix, self._packs[P]).float()
        return out

    @torch.no_grad()
    def _encode(self, prompts: list[tuple[int, ...]]) -> None:
        """Encode the class texts of prompts that are not cached, all in as few encoder calls as possible."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            feats = self._encode_shared(new) if self._shared else self._encode_full(new)
            text = F.normalize(feats, dim=-1)  # (U, C, D)
            for p, t in zip(new, text, strict=True):
                self._text[p] = t
            self.text_encodings += len(new) * self.num_classes
        for p in prompts:
            self._text.move_to_end(p)
        while len(self._text) > max(self._cache_size, len(set(prompts))):
            self._text.popitem(last=False)

    @torch.no_grad()
    def predict_many(
        self, prompts: Sequence[Sequence[int]], split: str, indices: Sequence[int] | np.ndarray | Tensor
    ) -> Tensor:
        """Predicted labels of images ``indices`` of ``split`` under each prompt.

        Args:
            prompts: P prompts (token-id lists).
            split: a registered split.
            indices: B image indices.

        Returns:
            (P, B) ``torch.long`` predicted class indices.
        """
        keys = [self._check_prompt(p) for p in prompts]
        images = self._split(split)
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= images.shape[0]):
            raise ValueError(f"indices must lie in [0, {images.shape[0]}) for split {split!r}")
        if not keys:
            return torch.zeros(0, idx.numel(), dtype=torch.long)
        self._encode(keys)
        text = torch.stack([self._text[k] for k in keys])  # (P, C, D)
        x = images[idx.to(images.device)]  # (B, D)
        pred = torch.einsum("bd,pcd->pbc", x, text.to(x.device)).argmax(-1)  # (P, B)
        self.queries += len(keys) * idx.numel()
        return pred.to(device="cpu", dtype=torch.long)

    def predict(
        self, prompt_ids: Sequence[int] | Tensor, split: str, indices: Sequence[int] | np.ndarray | Tensor
    ) -> Tensor:
        """Predicted labels (B,) ``torch.long`` of images ``indices`` of ``split`` under one prompt."""
        ids = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else prompt_ids
        return self.predict_many([ids], split, indices)[0]


# --------------------------------------------------------------------------------------------------------------
# Proposers (F5)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    """One tried edit: position n, old token, new token, the candidate's accuracy and its change Delta acc."""

    position: int
    old: int
    new: int
    acc: float
    delta: float


class Proposer(Protocol):
    """Proposes replacement tokens for position n of a prompt."""

    uses_history: bool

    def propose(self, prompt: Sequence[int], n: int, history: Sequence[HistoryEntry], k: int) -> list[int]:
        """Up to k distinct candidate ids for ``prompt[n]`` (never the current token)."""
        ...


def _banned(history: Sequence[HistoryEntry], n: int) -> set[int]:
    return {h.new for h in history if h.position == n and h.delta < 0}


class EmbeddingNeighbor:
    """Default proposer: cosine neighbours of the current token in the token-embedding table z.

    Of k candidates, ``round(explore * k)`` are uniform draws from V_a and the rest are the nearest neighbours of
    z[prompt[n]], skipping the current token and every token that lowered the accuracy at n (history).
    Neighbours come first, so the top-1 proposal is the nearest neighbour.

    Args:
        z: (V, d) token-embedding table.
        allowed: (A,) allowed ids.
        rng: random generator of the exploration draws.
        explore: exploration fraction epsilon_explore.
    """

    uses_history = True

    def __init__(self, z: Tensor, allowed: Tensor, *, rng: np.random.Generator, explore: float = 0.25) -> None:
        if not 0 <= explore <= 1:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        self.allowed = allowed.cpu()
        self._z = F.normalize(z.detach().float().cpu(), dim=-1)
        self._za = self._z[self.allowed]  # (A, d)
        self.rng = rng
        self.explore = explore

    def propose(self, prompt: Sequence[int], n: int, history: Sequence[HistoryEntry], k: int) -> list[int]:
        skip = _banned(history, n) | {int(prompt[n])}
        n_rand = round(self.explore * k)
        sims = self._za @ self._z[int(prompt[n])]  # (A,)
        order = torch.argsort(sims, descending=True, stable=True)
        out: list[int] = []
        for j in order[: k + len(skip) + 1].tolist():
            tok = int(self.allowed[j])
            if tok not in skip and len(out) < k - n_rand:
                out.append(tok)
        while len(out) < k and len(out) + len(skip) < self.allowed.numel():
            tok = int(self.allowed[int(self.rng.integers(self.allowed.numel()))])
            if tok not in skip and tok not in out:
                out.append(tok)
        return out


class RandomProposer:
    """Ablation Client-1: k distinct uniform draws from V_a (never the current token); the history is ignored."""

    uses_history = False

    def __init__(self, allowed: Tensor, *, rng: np.random.Generator) -> None:
        self.allowed = allowed.cpu()
        self.rng = rng

    def propose(self, prompt: Sequence[int], n: int, history: Sequence[HistoryEntry], k: int) -> list[int]:
        draws = self.rng.choice(self.allowed.numel(), size=min(k + 1, self.allowed.numel()), replace=False)
        out = [int(self.allowed[int(j)]) for j in draws if int(self.allowed[int(j)]) != int(prompt[n])]
        return out[:k]


# --------------------------------------------------------------------------------------------------------------
# Client (F3, F4)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Images (by split and index) with their labels: the client's local batch, or D_g."""

    split: str
    indices: np.ndarray
    labels: np.ndarray


def batch_accuracy(oracle: Oracle, prompts: Sequence[Sequence[int]], batches: Sequence[Batch]) -> np.ndarray:
    """A(P; B u D_g) for each prompt: the fraction of images of all ``batches`` the oracle labels correctly, (P,)."""
    correct = np.zeros(len(prompts))
    total = 0
    for b in batches:
        if len(b.indices) == 0:
            continue
        pred = oracle.predict_many(prompts, b.split, b.indices).numpy()  # (P, B)
        correct += (pred == b.labels[None, :]).sum(1)
        total += len(b.indices)
    if total == 0:
        raise ValueError("the accuracy batch B u D_g is empty")
    return correct / total


@dataclass
class ClientResult:
    """What a client returns: its best prompt of the round, its accuracy, the round's history and its queries."""

    prompt: list[int]
    acc: float
    history: list[HistoryEntry] = field(default_factory=list)
    queries: int = 0


def client_update(
    oracle: Oracle,
    prompt: Sequence[int],
    batches: Sequence[Batch],
    proposer: Proposer,
    *,
    iterations: int,
    candidates: int,
    rng: np.random.Generator,
    feedback: bool = True,
    position_beta: float = 1.0,
) -> ClientResult:
    """Algorithm 1 with inference feedback (spec F4), or the no-feedback ablation (Client-2).

    With feedback, each iteration picks a position n ~ softmax(beta * gain_n) (gain_n: mean positive Delta acc at
    n in this round's history, uniform for proposers that ignore the history), tries ``candidates`` replacements
    (history-banned pairs removed), logs all of them, and accepts the best one if its accuracy is >= the current
    one. Without feedback, each iteration replaces position ``it mod N`` by the proposer's top-1, unconditionally;
    the final prompt is evaluated once for the report.

    Args:
        oracle: the label-only oracle.
        prompt: the global prompt P_global (start point).
        batches: B and D_g.
        proposer: candidate generator.
        iterations: T.
        candidates: K candidates per iteration.
        rng: random generator of the position choice.
        feedback: False for the Client-2 ablation.
        position_beta: beta of the position softmax.

    Returns:
        The round's best prompt, its accuracy, the history and the oracle queries spent.
    """
    start = oracle.queries
    cur = [int(t) for t in prompt]
    if not feedback:
        for it in range(iterations):
            n = it % len(cur)
            proposal = proposer.propose(cur, n, [], 1)
            if proposal:
                cur[n] = proposal[0]
        acc = float(batch_accuracy(oracle, [cur], batches)[0])
        return ClientResult(cur, acc, [], oracle.queries - start)

    acc_cur = float(batch_accuracy(oracle, [cur], batches)[0])
    history: list[HistoryEntry] = []
    for _ in range(iterations):
        n_pos = len(cur)
        if proposer.uses_history:
            gain = np.zeros(n_pos)
            for n in range(n_pos):
                pos = [h.delta for h in history if h.position == n and h.delta > 0]
                gain[n] = float(np.mean(pos)) if pos else 0.0
            logits = position_beta * gain
            p = np.exp(logits - logits.max())
            n = int(rng.choice(n_pos, p=p / p.sum()))
            banned = _banned(history, n)
        else:
            n = int(rng.integers(n_pos))
            banned = set()
        cands = [c for c in proposer.propose(cur, n, history, candidates) if c not in banned and c != cur[n]]
        if not cands:
            continue
        trial = [cur[:n] + [c] + cur[n + 1 :] for c in cands]
        accs = batch_accuracy(oracle, trial, batches)
        history.extend(
            HistoryEntry(n, cur[n], c, float(a), float(a) - acc_cur) for c, a in zip(cands, accs, strict=True)
        )
        best = int(np.argmax(accs))
        if accs[best] >= acc_cur:
            cur, acc_cur = trial[best], float(accs[best])
    return ClientResult(cur, acc_cur, history, oracle.queries - start)


# --------------------------------------------------------------------------------------------------------------
# Data, splits
# --------------------------------------------------------------------------------------------------------------


def _labels_of(dataset: torch.utils.data.Dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    return np.asarray(labels, dtype=np.int64)


def _public_set(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """g indices per class (balanced D_g), drawn from ``labels``' positions."""
    picks = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def _evaluate(oracle: Oracle, prompt: Sequence[int], test_labels: np.ndarray, test_idx: list[np.ndarray]) -> dict:
    """Global-prompt accuracy: on the whole test part, per client on its own split (local) and on the others'."""
    pred = oracle.predict(prompt, "test", np.arange(len(test_labels))).numpy()
    correct = pred == test_labels
    local, neighbor = local_neighbor(correct, test_idx)
    return {"test_acc": float(correct.mean()), "local_acc": local, "neighbor_acc": neighbor}


def _same_tokenizer(a: Any, b: Any) -> bool:
    enc_a, enc_b = getattr(a, "encoder", None), getattr(b, "encoder", None)
    return isinstance(enc_a, dict) and enc_a == enc_b


def _transfer(
    cfg: Config, data: Any, test_labels: np.ndarray, backbone: Any, prompt: list[int], seed_ids: list[int]
) -> dict[str, Any]:
    """F8: score the final prompt ids (and the seed prompt) on a second open_clip model sharing the tokenizer."""
    from fpl_fast.backbone.model import load_backbone

    if cfg.transfer_model is None:
        raise ValueError("_transfer needs cfg.transfer_model (None skips the transfer evaluation)")
    torch.manual_seed(cfg.seed)
    other = load_backbone(cfg.transfer_model, cfg.transfer_pretrained, precision=cfg.precision, device=cfg.device)
    if not _same_tokenizer(backbone.tokenizer, other.tokenizer):
        raise ValueError(f"--transfer-model must share the BPE tokenizer of {cfg.model!r}, got {cfg.transfer_model!r}")
    oracle = Oracle(other, data.classnames, text_path=cfg.text_path)
    oracle.register("test", data.test, dataset_key=f"{cfg.dataset}:{cfg.data_root}")
    labels = test_labels
    every = np.arange(len(labels))
    acc = float((oracle.predict(prompt, "test", every).numpy() == labels).mean())
    seed_acc = float((oracle.predict(seed_ids, "test", every).numpy() == labels).mean())
    weights = cfg.transfer_pretrained or "random init (no second pretrained CLIP offline: chance-level is expected)"
    return {"model": cfg.transfer_model, "weights": weights, "acc": acc, "seed_prompt_acc": seed_acc}


# --------------------------------------------------------------------------------------------------------------
# The federated run (F7)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """What FedDTPT's rounds share: the oracle, the clients' data, the search tools and the running totals."""

    cfg: Config
    backbone: Any
    data: Any
    oracle: Oracle
    train_labels: np.ndarray
    test_labels: np.ndarray
    train_idx: list[np.ndarray]
    test_idx: list[np.ndarray]
    weights: np.ndarray
    public: np.ndarray
    public_batch: Batch
    z: Tensor
    allowed: Tensor
    n_max: int
    bits_per_token: int
    rng: np.random.Generator
    proposer: Proposer
    seed_ids: list[int]
    zero_shot: dict[str, float]
    seed_eval: dict[str, float]
    eval_queries: int
    global_prompt: list[int]
    train_queries: int = 0
    upload_bits: int = 0
    download_bits: int = 0
    last: dict[str, Any] = field(default_factory=dict)


class FedDTPT:
    """FedDTPT on the method skeleton (:mod:`fpl_fast.methods.skeleton`)."""

    name = "feddtpt"
    postfix: tuple[str, ...] = ("test_acc", "prompt_len", "queries")

    def setup(self, cfg: Config) -> _State:
        """Oracle, public set D_g, client split, proposer and the zero-shot / seed-prompt baselines."""
        from fpl_fast.backbone.model import load_backbone

        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        backbone = load_backbone(cfg.model, cfg.pretrained, precision=cfg.precision, device=cfg.device)
        tok = backbone.tokenizer
        data = load_dataset(cfg.dataset, cfg.data_root)
        train_labels, test_labels = _labels_of(data.train), _labels_of(data.test)

        # D_g: g images per class held out of the training part before it is split over the clients.
        public = _public_set(train_labels, cfg.public_per_class, rng) if cfg.public_per_class else np.zeros(0, int)
        private = np.setdiff1d(np.arange(len(train_labels)), public)
        split = client_split(
            train_labels[private], cfg.num_users, cfg.partition, beta=cfg.beta, seed=cfg.seed, test_labels=test_labels
        )
        train_idx = [private[ix] for ix in split.train]
        weights = np.asarray([len(ix) for ix in train_idx], dtype=np.float64)
        weights /= weights.sum()  # w_k = |D_k| / sum_j |D_j|

        oracle = Oracle(backbone, data.classnames, text_path=cfg.text_path)
        key = f"{cfg.dataset}:{cfg.data_root}"
        oracle.register("train", data.train, dataset_key=key)
        oracle.register("test", data.test, dataset_key=key)

        z = token_table(backbone)  # (V, d)
        allowed = allowed_vocabulary(tok, words_only=cfg.vocab == "words")
        allowed = allowed[allowed < z.shape[0]]
        n_max = min(cfg.n_max, oracle.max_prompt_len)
        if cfg.proposer == "random":
            proposer: Proposer = RandomProposer(allowed, rng=rng)
        else:
            proposer = EmbeddingNeighbor(z, allowed, rng=rng, explore=cfg.explore)

        seed_ids = list(tok.encode(cfg.seed_text))
        if not 1 <= len(seed_ids) <= n_max:
            raise ValueError(
                f"--seed-prompt must tokenize to 1..{n_max} tokens, got {len(seed_ids)}: {cfg.seed_text!r}"
            )
        test_idx = list(split.test)
        eval_start = oracle.queries
        zero_shot = _evaluate(oracle, list(tok.encode(ZERO_SHOT_PROMPT)), test_labels, test_idx)
        seed_eval = _evaluate(oracle, seed_ids, test_labels, test_idx)
        return _State(
            cfg=cfg,
            backbone=backbone,
            data=data,
            oracle=oracle,
            train_labels=train_labels,
            test_labels=test_labels,
            train_idx=train_idx,
            test_idx=test_idx,
            weights=weights,
            public=public,
            public_batch=Batch("train", public, train_labels[public]),
            z=z,
            allowed=allowed,
            n_max=n_max,
            bits_per_token=math.ceil(math.log2(z.shape[0])),
            rng=rng,
            proposer=proposer,
            seed_ids=seed_ids,
            zero_shot=zero_shot,
            seed_eval=seed_eval,
            eval_queries=oracle.queries - eval_start,
            global_prompt=list(seed_ids),
        )

    def round(self, st: _State, rnd: int) -> dict[str, Any]:
        """Broadcast, local search on every client, upload, aggregation, evaluation of the new global prompt."""
        cfg, rng = st.cfg, st.rng
        st.download_bits += cfg.num_users * len(st.global_prompt) * st.bits_per_token
        results = []
        for own in st.train_idx:
            batch_ix = np.sort(rng.choice(own, size=min(cfg.batch_size, len(own)), replace=False))
            res = client_update(
                st.oracle,
                st.global_prompt,
                [Batch("train", batch_ix, st.train_labels[batch_ix]), st.public_batch],
                st.proposer,
                iterations=cfg.iterations,
                candidates=cfg.candidates,
                rng=rng,
                feedback=cfg.client_mode == "feedback",
                position_beta=cfg.position_beta,
            )
            st.train_queries += res.queries
            st.upload_bits += len(res.prompt) * st.bits_per_token
            results.append(res)
        agg = aggregate(
            [res.prompt for res in results],
            st.z,
            previous=st.global_prompt,
            mode=cfg.server,
            min_samples=cfg.min_samples,
            elbow=cfg.elbow,
            temperature=cfg.temperature,
            n_max=st.n_max,
            allowed=st.allowed,
            seed=cfg.seed,
        )
        st.global_prompt = agg.prompt
        eval_start = st.oracle.queries
        metrics = _evaluate(st.oracle, st.global_prompt, st.test_labels, st.test_idx)
        st.eval_queries += st.oracle.queries - eval_start
        st.last = {
            "local_acc": metrics["local_acc"],
            "neighbor_acc": metrics["neighbor_acc"],
            "epsilon_local": None,
            "epsilon_global": None,
            "test_acc": metrics["test_acc"],
            "client_acc": float(np.dot(st.weights, [res.acc for res in results])),
            "queries": st.train_queries,
            "text_encodings": st.oracle.text_encodings,
            "upload_bits": st.upload_bits,
            "download_bits": st.download_bits,
            **self._prompt(st),
            "prompt_len": len(st.global_prompt),
            "eps": agg.eps,
            "n_clusters": agg.n_clusters,
            "n_noise": agg.n_noise,
            "fallback": agg.fallback,
        }
        return st.last

    @staticmethod
    def _prompt(st: _State) -> dict[str, Any]:
        return {"prompt": list(st.global_prompt), "prompt_text": st.backbone.tokenizer.decode(st.global_prompt).strip()}

    def final(self, st: _State) -> dict[str, Any]:
        """Last round's accuracies, query and communication totals, the final prompt and its transfer (F8)."""
        cfg = st.cfg
        transfer = None
        if cfg.transfer_model:
            transfer = _transfer(cfg, st.data, st.test_labels, st.backbone, st.global_prompt, st.seed_ids)
        return {
            "local_acc": st.last["local_acc"],
            "neighbor_acc": st.last["neighbor_acc"],
            "zero_shot_acc": st.zero_shot["test_acc"],
            "epsilon_local": None,
            "epsilon_global": None,
            "delta": None,
            "accountant": None,
            "note": "FedDTPT has no differential privacy (only discrete token ids leave a client), so epsilon, delta "
            "and accountant do not apply. zero_shot_acc: the hand-written prompt 'a photo of a {}.' through the "
            "oracle.",
            "test_acc": st.last["test_acc"],
            "seed_prompt_acc": st.seed_eval["test_acc"],
            "queries": st.train_queries,
            "eval_queries": st.eval_queries,
            "text_encodings": st.oracle.text_encodings,
            "bits_per_token": st.bits_per_token,
            "upload_bits": st.upload_bits,
            "download_bits": st.download_bits,
            "total_bits": st.upload_bits + st.download_bits,
            **self._prompt(st),
            "seed_prompt": cfg.seed_text,
            "num_classes": len(st.data.classnames),
            "public_set_size": len(st.public),
            "proposer": f"{cfg.proposer} ({cfg.client_mode}); the MLM proposer is not implemented (no offline weights)",
            "transfer": transfer,
        }


def run(cfg: Config, *, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run FedDTPT and write results.json, rounds.csv and accuracy.png to ``out``.

    Args:
        cfg: the job.
        out: output folder (created).
        progress: show a tqdm progress bar over rounds.

    Returns:
        The results dict (``{"method", "config", "rounds", "final"}``).
    """
    return run_method(FedDTPT(), cfg, out=out, progress=progress)
