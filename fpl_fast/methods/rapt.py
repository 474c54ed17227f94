"""RAPT (arXiv 2305.06212) on a CLIP text tower, federated: privatised prompt tuning with plain-token
reconstruction. The labels R3-R12 name the steps described here; the code cites them.

Per client, once before training (R10): every training sentence x gets m plain tokens k drawn uniformly from the
public reconstruction vocabulary T (R5), and [k; x] is privatised token by token with the d_chi mechanism
(:func:`fpl_fast.privacy.dchi.privatize`, R3) over the backbone's own token-embedding table. Only the privatised ids
are kept. The frozen CLIP text tower reads ``[SOT] P k' x' [EOT]`` (learned soft prompt P, N vectors; R6) and

* the task head (linear on the projected EOT feature, or cosine against label-text features) gives L_task;
* the reconstruction head Linear(h -> c) -> Linear(c -> |T|) (no bias, no activation; R7) on the final states
  (after ``ln_final``) of the m plain-token positions predicts k and gives L_rec, summed over the m positions and
  averaged over the batch;
* L = L_task + lambda L_rec, AdamW on P and the heads only (the backbone gets no gradient).

The server averages P and both heads weighted by n_k (FedAvg). Inference privatises the test sentences with the same
eta and a fresh random k (R9). Privacy: each token's release is eta d_chi-private, i.e. (eta diam(E))-LDP over the
vocabulary (``epsilon_local``); everything shared afterwards is post-processing, so the same bound holds against the
server (``epsilon_global``). Re-privatising every epoch composes: it is refused unless ``compose=True``, which
reports E eta (E = privatisations per sentence). Image variants (R12, not in the paper) and PCT2T (R4) are not
implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpl_fast.backbone.loading import load_backbone
from fpl_fast.backbone.model import FrozenCLIP
from fpl_fast.backbone.text_tower import SuffixPack, text_tower
from fpl_fast.config import CHOICES
from fpl_fast.data.clients import client_split
from fpl_fast.data.topics import TEXT_CLASSNAMES, TEXT_SEED, make_text_dataset
from fpl_fast.federated.metrics import local_neighbor
from fpl_fast.methods.skeleton import run_method
from fpl_fast.privacy import dchi
from fpl_fast.privacy.randomness import party_key, randomness_statement
from fpl_fast.validation import ConfigError, check_choice, check_finite, check_int

__all__ = [
    "Config",
    "Rapt",
    "RaptModel",
    "build_sequences",
    "reconstruction_vocab",
    "run",
]

TASK_HEADS = ("linear", "cosine")
PARTITIONS = ("iid", "dirichlet")
LABEL_TEMPLATE = "a sentence about {}."
TEXT_TOWER_WEIGHTS = str(Path(__file__).resolve().parent.parent / "configs" / "tiny-topics-text.pt")
"""Default backbone weights: ``tiny-digits-clip`` with its text tower pretrained offline on topic sentences of a
separate seed (``python -m fpl_fast.data.pretrain_text_tower``)."""


@dataclass(frozen=True)
class Config:
    """A federated RAPT job. The defaults are the embedded offline run (small: 4 clients, 10 rounds, 2 local epochs,
    on the shipped pretrained tiny text tower).

    Attributes:
        num_users: clients K.
        rounds: federated rounds R.
        local_epochs: local epochs per round.
        partition: ``iid`` or ``dirichlet`` (label skew with concentration ``beta``).
        beta: Dirichlet concentration.
        dataset: ``topics``, the generated four-topic set of :mod:`fpl_fast.data.topics` (the only one offline).
        train_size: training sentences (split over the clients).
        test_size: test sentences.
        data_root: unused by ``topics`` (kept for the shared CLI).
        model: open_clip model name; default ``tiny-digits-clip`` (2 layers, width 64, causal, 77 tokens).
        pretrained: a checkpoint file (default :data:`TEXT_TOWER_WEIGHTS`, the shipped tiny text tower pretrained
            on topic sentences generated with a seed other than the federated data's; a frozen random tower
            carries no topic information and RAPT stays at chance on it), None (seeded random init),
            ``"embedded"`` (the digits weights: their text tower saw digit captions only) or an open_clip tag.
        precision: ``fp32`` or ``bf16``.
        device: ``cpu`` or ``cuda``.
        seed: seeds the public choices (init, splits, calibration sample, batch order).
        noise_seed: None (default): each party's plain tokens k and d_chi noise come from secret keys (OS
            CSPRNG); N: reproducible from N, and the guarantee does not hold against anyone who knows N.
        batch_size: local batch size.
        lr: AdamW learning rate of P and the heads (1e-3).
        weight_decay: AdamW weight decay.
        n_prompt: soft-prompt length N (16).
        n_plain: plain tokens m (8 for CLIP's 77-token context).
        rec_dim: hidden size c of the reconstruction head (128).
        rec_vocab: size of the reconstruction vocabulary T (the first ``rec_vocab`` whole-word alphabetic BPE
            tokens in id order, i.e. in BPE merge order, a proxy for frequency); 0 means the full vocabulary minus
            special tokens.
        rec_weight: lambda; 0 gives plain prompt tuning on privatised text.
        fixed_plain: one fixed k for every sentence (the literal "arbitrary fixed sequence" reading).
        task_head: ``linear`` (on the projected EOT feature) or ``cosine`` (against label-text features).
        eta: d_chi privacy parameter; None calibrates it to ``target_preservation``.
        target_preservation: token preservation rate to calibrate eta for, in (0, 1).
        calibration_tokens: tokens sampled from T (public) for the calibration.
        compose: re-privatise every local epoch (fresh noise and k), reporting the composed E eta.
        bayes_mc: Monte-Carlo draws per candidate of the Bayes inversion attack (0 skips it).
        text_path: ``"shared"`` (default: [SOT, P] through the text tower once per batch, each sentence only on its
            own rows, where the tower is causal and pools at EOT) or ``"full"`` (each sequence whole).
    """

    num_users: int = 4
    rounds: int = 10
    local_epochs: int = 2
    partition: str = "iid"
    beta: float = 0.5
    dataset: str = "topics"
    train_size: int = 800
    test_size: int = 400
    data_root: str = "data"
    model: str = "tiny-digits-clip"
    pretrained: str | None = TEXT_TOWER_WEIGHTS
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 1
    noise_seed: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    n_prompt: int = 16
    n_plain: int = 8
    rec_dim: int = 128
    rec_vocab: int = 1000
    rec_weight: float = 1.0
    fixed_plain: bool = False
    task_head: str = "linear"
    eta: float | None = None
    target_preservation: float = 0.7
    calibration_tokens: int = 256
    compose: bool = False
    bayes_mc: int = 16
    text_path: str = "shared"

    def __post_init__(self) -> None:
        check_int(
            self, "num_users", "rounds", "local_epochs", "batch_size", "n_prompt", "rec_dim", "calibration_tokens"
        )
        check_int(self, "train_size", "test_size", low=len(TEXT_CLASSNAMES), note=" (the classes)")
        check_int(self, "n_plain", "rec_vocab", "bayes_mc", low=0)
        check_choice(self, "partition", PARTITIONS)
        check_choice(self, "task_head", TASK_HEADS)
        check_choice(self, "text_path", CHOICES["text_path"])
        if self.dataset != "topics":
            raise ConfigError(
                "dataset", f"dataset must be topics (the offline text set) for rapt, got {self.dataset!r}"
            )
        check_choice(self, "precision", ("fp32", "bf16"))
        check_finite(self, "beta", "lr")
        check_finite(self, "weight_decay", "rec_weight", positive=False)
        if self.eta is not None and not (self.eta > 0):
            raise ConfigError("eta", f"eta must be a number > 0 (inf: no noise), got {self.eta}")
        if not 0 < self.target_preservation < 1:
            raise ConfigError(
                "target_preservation", f"target_preservation must be in (0, 1), got {self.target_preservation}"
            )
        if self.rec_weight > 0 and self.n_plain == 0:
            raise ConfigError(
                "n_plain",
                "n_plain must be >= 1 when rec_weight > 0 (the reconstruction needs plain tokens)",
                others=("rec_weight",),
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Vocabulary and sequences
# --------------------------------------------------------------------------------------------------------------


def special_ids(backbone: FrozenCLIP) -> list[int]:
    """SOT and EOT ids of the backbone's tokenizer (never privatised nor produced)."""
    tok = backbone.tokenizer
    return [int(tok.sot_token_id), int(tok.eot_token_id)]


def reconstruction_vocab(backbone: FrozenCLIP, size: int) -> Tensor:
    """The reconstruction vocabulary T (R5): sorted int64 ids.

    The first ``size`` ids, in id order, whose BPE string is a whole alphabetic word of at least two letters (CLIP's
    BPE ids follow merge order, a proxy for frequency). ``size = 0``: every id except the special ones.
    """
    V = backbone.model.vocab_size if hasattr(backbone.model, "vocab_size") else None
    table = text_tower(backbone.model).token_embedding.weight
    V = int(table.shape[0]) if V is None else int(V)
    specials = set(special_ids(backbone))
    if size == 0:
        return torch.tensor([i for i in range(V) if i not in specials], dtype=torch.long)
    decoder = getattr(backbone.tokenizer, "decoder", None)
    if decoder is None:
        raise ValueError("the tokenizer has no BPE decoder: use --rec-vocab 0 (the full vocabulary)")
    ids = []
    for i in range(V):
        word = decoder.get(i, "")
        if i not in specials and word.endswith("</w>") and len(word) >= 6 and word[:-4].isalpha() and word.isascii():
            ids.append(i)
            if len(ids) == size:
                break
    if len(ids) < size:
        raise ValueError(f"--rec-vocab must be <= {len(ids)} (whole-word alphabetic tokens), got {size}")
    return torch.tensor(ids, dtype=torch.long)


def build_sequences(body: list[Tensor], sot: int, eot: int, n_prompt: int) -> tuple[Tensor, Tensor]:
    """Token ids of ``[SOT] <N prompt slots> body [EOT] pad..`` for a batch.

    Args:
        body: per example the (privatised) ids [k'; x'].
        sot, eot: special ids.
        n_prompt: prompt slots N (filled with id 0 here; their embeddings are replaced by P).

    Returns:
        (tokens (B, 2 + N + max len), eot_index (B,)).
    """
    lengths = [int(b.numel()) for b in body]
    L = 2 + n_prompt + max(lengths, default=0)
    tokens = torch.zeros(len(body), L, dtype=torch.long)
    tokens[:, 0] = sot
    eot_index = torch.tensor([1 + n_prompt + n for n in lengths], dtype=torch.long)
    for i, b in enumerate(body):
        tokens[i, 1 + n_prompt : 1 + n_prompt + lengths[i]] = b
        tokens[i, eot_index[i]] = eot
    return tokens, eot_index


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


class RaptModel(nn.Module):
    """Soft prompt + reconstruction head + task head around a frozen CLIP text tower (R6-R7).

    Args:
        backbone: frozen CLIP.
        n_cls: number of classes.
        n_prompt: N.
        n_plain: m.
        rec_vocab_size: |T|.
        rec_dim: c.
        task_head: ``linear`` or ``cosine``.
        label_features: (n_cls, embed_dim) label-text features, needed for ``cosine``.
        generator: seeds the prompt and head initialisation.
        text_path: ``"shared"``: the sequences of a batch share [SOT, P], encoded once
            (:meth:`FrozenCLIP.encode_shared`; causal towers pooling at EOT only, others take the
            full path); ``"full"``: each sequence whole.
    """

    label_features: Tensor  # buffer (n_cls, embed_dim), registered for task_head='cosine' only

    def __init__(
        self,
        backbone: FrozenCLIP,
        *,
        n_cls: int,
        n_prompt: int,
        n_plain: int,
        rec_vocab_size: int,
        rec_dim: int,
        task_head: str,
        label_features: Tensor | None = None,
        generator: torch.Generator | None = None,
        text_path: str = "shared",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.shared = text_path == "shared" and backbone.is_causal
        self.n_prompt = n_prompt
        self.n_plain = n_plain
        self.task_head = task_head
        width, embed = backbone.ctx_dim, backbone.embed_dim
        dev = backbone.device
        self.prompt = nn.Parameter(torch.randn(n_prompt, width, generator=generator).mul_(0.02).to(dev))
        self.rec_down = nn.Linear(width, rec_dim, bias=False, device=dev)
        self.rec_up = nn.Linear(rec_dim, max(rec_vocab_size, 1), bias=False, device=dev)
        self.head = nn.Linear(embed, n_cls, device=dev) if task_head == "linear" else None
        if generator is not None:
            with torch.no_grad():
                for lin in (self.rec_down, self.rec_up, self.head):
                    if lin is None:
                        continue
                    bound = 1.0 / math.sqrt(lin.in_features)
                    lin.weight.copy_(
                        torch.empty_like(lin.weight, device="cpu").uniform_(-bound, bound, generator=generator)
                    )
                    if lin.bias is not None:
                        lin.bias.zero_()
        if task_head == "cosine":
            if label_features is None:
                raise ValueError("task_head='cosine' needs label_features (n_cls, embed_dim)")
            self.register_buffer("label_features", F.normalize(label_features.float(), dim=-1))
        self._ln_final = text_tower(backbone.model).ln_final

    def trainable_state(self) -> dict[str, Tensor]:
        """The parameters that are trained and averaged (P and the heads), detached copies."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (from :meth:`trainable_state`) into the parameters."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def forward(self, tokens: Tensor, eot_index: Tensor) -> tuple[Tensor, Tensor]:
        """Task logits and reconstruction logits.

        Args:
            tokens: (B, L) from :func:`build_sequences` (prompt slots at 1..N).
            eot_index: (B,).

        Returns:
            (task logits (B, n_cls), reconstruction logits (B, m, |T|)).
        """
        bb = self.backbone
        tokens = tokens.to(bb.device)
        emb = bb.token_embeddings(tokens)  # (B, L, d), frozen
        if self.shared:
            feats, plain = self._encode_shared(emb, eot_index)
        else:
            feats, plain = self._encode_full(emb, eot_index)
        rec_logits = self.rec_up(self.rec_down(plain.float()))  # (B, m, |T|)
        feats = feats.float()
        if self.head is not None:
            logits = self.head(feats)
        else:
            logits = bb.logit_scale * F.normalize(feats, dim=-1) @ self.label_features.T
        return logits, rec_logits

    def _encode_full(self, emb: Tensor, eot_index: Tensor) -> tuple[Tensor, Tensor]:
        """Every sequence whole: features (B, embed) and the final states of the m plain tokens (B, m, d)."""
        B, P = emb.shape[0], 1 + self.n_prompt
        prompt = self.prompt.to(emb.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, N, d)
        x = torch.cat([emb[:, :1], prompt, emb[:, P:]], dim=1)
        captured: dict[str, Tensor] = {}
        hook = self._ln_final.register_forward_hook(lambda _m, _i, out: captured.__setitem__("states", out))
        try:
            feats = self.backbone.encode_prompts(x, eot_index.to(emb.device))  # (B, embed)
        finally:
            hook.remove()
        states = captured["states"]  # (B, L', d) after ln_final
        return feats, states[:, P : P + self.n_plain]

    def _encode_shared(self, emb: Tensor, eot_index: Tensor) -> tuple[Tensor, Tensor]:
        """[SOT, P] once for the batch, each sentence [k'; x'; EOT] on its own rows: the same features and states."""
        P = 1 + self.n_prompt
        prefix = torch.cat([emb[:1, :1], self.prompt.to(emb.dtype).unsqueeze(0)], dim=1)  # (1, P, d)
        pack = SuffixPack.build([emb[i, P : e + 1] for i, e in enumerate(eot_index.tolist())], P)
        feats, states = self.backbone.encode_shared(prefix, pack, states=True)  # (1, B, embed), (1, rows, d)
        rows = pack.suffix_start[:, None] + torch.arange(self.n_plain, device=pack.suffix_start.device)  # (B, m)
        return feats[0], states[0, rows]


# --------------------------------------------------------------------------------------------------------------
# Privatised client data
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Privatised:
    body: list[Tensor]  # per example [k'; x'] ids
    plain_index: Tensor  # (n, m) indices into T of k (the reconstruction targets)
    original: list[Tensor]  # per example [k; x] ids (kept for the privacy metrics only, never trained on)
    rate: float


def _privatise_texts(
    texts: list[Tensor],
    *,
    emb: Tensor,
    eta: float,
    specials: list[int],
    rec_ids: Tensor,
    n_plain: int,
    fixed_plain: Tensor | None,
    gens: tuple[torch.Generator, torch.Generator],
) -> _Privatised:
    """Draw k per sentence, privatise [k; x] jointly (one mechanism call) and keep only the released ids.

    ``gens``: the owning party's secret generators (CPU for k, emb's device for the d_chi noise)."""
    gen, noise_gen = gens
    n = len(texts)
    if fixed_plain is not None:
        plain_index = fixed_plain.unsqueeze(0).expand(n, -1).clone()
    else:
        plain_index = torch.randint(0, rec_ids.numel(), (n, n_plain), generator=gen)
    seqs = [torch.cat([rec_ids[plain_index[i]], x]) for i, x in enumerate(texts)]
    flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
    released, _ = dchi.privatize(flat.to(emb.device), emb, eta, specials, noise_gen)
    released = released.cpu()
    out, start = [], 0
    for s in seqs:
        out.append(released[start : start + s.numel()])
        start += s.numel()
    rate = dchi.preservation_rate(flat, released, specials)
    return _Privatised(body=out, plain_index=plain_index, original=seqs, rate=rate)


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------


def _losses(
    model: RaptModel, batch_body: list[Tensor], targets: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    bb = model.backbone
    tok = bb.tokenizer
    tokens, eot = build_sequences(batch_body, int(tok.sot_token_id), int(tok.eot_token_id), model.n_prompt)
    logits, rec_logits = model(tokens, eot)
    dev = logits.device
    l_task = F.cross_entropy(logits, labels.to(dev))
    if model.n_plain:
        l_rec = F.cross_entropy(rec_logits.flatten(0, 1), targets.to(dev).flatten(), reduction="sum") / len(batch_body)
        rec_acc = (rec_logits.argmax(-1).cpu() == targets).float().mean()
    else:
        l_rec = logits.new_zeros(())
        rec_acc = torch.tensor(float("nan"))
    return l_task, l_rec, rec_acc


@torch.no_grad()
def _predict(model: RaptModel, body: list[Tensor], batch_size: int = 256) -> Tensor:
    tok = model.backbone.tokenizer
    preds = []
    for s in range(0, len(body), batch_size):
        tokens, eot = build_sequences(
            body[s : s + batch_size], int(tok.sot_token_id), int(tok.eot_token_id), model.n_prompt
        )
        logits, _ = model(tokens, eot)
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


@dataclass
class _State:
    """What RAPT's rounds share: the privatised client data, the model and global state, the privacy numbers."""

    cfg: Config
    backbone: FrozenCLIP
    emb: Tensor
    specials: list[int]
    gen: torch.Generator
    party_gens: dict[str, tuple[torch.Generator, torch.Generator]]
    rec_ids: Tensor
    fixed: Tensor | None
    eta: float
    calib_rate: float | None
    diam: float
    diam_exact: bool
    n_priv: int
    encode: list[Tensor]
    encode_test: list[Tensor]
    y_train: Tensor
    y_test: Tensor
    train_idx: list[np.ndarray]
    test_idx: list[np.ndarray]
    clients: list[_Privatised] = dataclasses.field(default_factory=list)
    test_priv: _Privatised | None = None
    model: RaptModel | None = None
    global_state: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    weights: np.ndarray | None = None
    zero_shot_acc: float = float("nan")
    last: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def eps_local(self) -> float:
        """eta diam(E) per privatisation, times the privatisations per sentence."""
        return self.eta * self.diam * self.n_priv

    def privatise(self, texts: list[Tensor], party: str) -> _Privatised:
        """``texts`` privatised by ``party`` with its own secret generators (keys from the OS unless --noise-seed)."""
        return _privatise_texts(
            texts,
            emb=self.emb,
            eta=self.eta,
            specials=self.specials,
            rec_ids=self.rec_ids,
            n_plain=self.cfg.n_plain,
            fixed_plain=self.fixed,
            gens=self.party_gens[party],
        )


class Rapt:
    """Federated RAPT on the method skeleton (:mod:`fpl_fast.methods.skeleton`)."""

    name = "rapt"
    postfix: tuple[str, ...] = ("test_acc",)
    curves: tuple[str, ...] = ("local_acc",)  # one global model: no personalised model for a neighbour curve

    def setup(self, cfg: Config) -> _State:
        """Backbone, text data and client split, eta, the privatised client and test texts, the model."""
        torch.manual_seed(cfg.seed)  # open_clip's random init draws from the global generator
        backbone = load_backbone(cfg.model, cfg.pretrained, precision=cfg.precision, device=cfg.device)
        emb = text_tower(backbone.model).token_embedding.weight.detach()
        specials = special_ids(backbone)
        tok = backbone.tokenizer
        gen = torch.Generator().manual_seed(cfg.seed)

        # ---- data ----------------------------------------------------------------------------------------
        train_set = make_text_dataset("train", n=cfg.train_size, seed=TEXT_SEED)
        test_set = make_text_dataset("test", n=cfg.test_size, seed=TEXT_SEED)
        max_x = backbone.context_length - 2 - cfg.n_prompt - cfg.n_plain
        if max_x < 1:
            raise ValueError(
                f"--n-prompt + --n-plain must leave room for text: N + m + 2 < {backbone.context_length}, "
                f"got N={cfg.n_prompt}, m={cfg.n_plain}"
            )
        split = client_split(
            np.asarray(train_set.labels),
            cfg.num_users,
            cfg.partition,
            beta=cfg.beta,
            seed=cfg.seed,
            test_labels=np.asarray(test_set.labels),
        )
        rec_ids = reconstruction_vocab(backbone, cfg.rec_vocab)
        fixed = torch.randint(0, rec_ids.numel(), (cfg.n_plain,), generator=gen) if cfg.fixed_plain else None

        # ---- privacy parameter ---------------------------------------------------------------------------
        allowed = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
        allowed[specials] = False
        if cfg.eta is None:
            calib = rec_ids[torch.randint(0, rec_ids.numel(), (cfg.calibration_tokens,), generator=gen)]
            eta, calib_rate = dchi.calibrate_eta(
                emb, cfg.target_preservation, calib, special_ids=specials, seed=cfg.seed, iters=14
            )
        else:
            eta, calib_rate = float(cfg.eta), None
        diam, diam_exact = dchi.diameter(emb, allowed)

        # Each party privatises its own text with its own secret generators (keys from the OS unless --noise-seed).
        party_gens = {
            party: (
                torch.Generator().manual_seed(party_key(cfg.noise_seed, party, "plain")),
                torch.Generator(device=emb.device).manual_seed(party_key(cfg.noise_seed, party, "dchi")),
            )
            for party in [f"client-{k}" for k in range(cfg.num_users)] + ["evaluator"]
        }
        st = _State(
            cfg=cfg,
            backbone=backbone,
            emb=emb,
            specials=specials,
            gen=gen,
            party_gens=party_gens,
            rec_ids=rec_ids,
            fixed=fixed,
            eta=eta,
            calib_rate=calib_rate,
            diam=diam,
            diam_exact=diam_exact,
            n_priv=cfg.rounds * cfg.local_epochs if cfg.compose else 1,
            encode=[torch.tensor(tok.encode(t)[:max_x], dtype=torch.long) for t in train_set.texts],
            encode_test=[torch.tensor(tok.encode(t)[:max_x], dtype=torch.long) for t in test_set.texts],
            y_train=torch.as_tensor(train_set.labels),
            y_test=torch.as_tensor(test_set.labels),
            train_idx=split.train,
            test_idx=split.test,
        )
        st.clients = [st.privatise([st.encode[i] for i in idx], f"client-{k}") for k, idx in enumerate(split.train)]
        st.test_priv = st.privatise(st.encode_test, "evaluator")  # fresh k (R9)

        # ---- model -----------------------------------------------------------------------------------------
        label_texts = [LABEL_TEMPLATE.format(c) for c in train_set.classnames]
        label_feats = backbone.encode_text(label_texts, text_path=cfg.text_path)
        st.model = RaptModel(
            backbone,
            n_cls=len(train_set.classnames),
            n_prompt=cfg.n_prompt,
            n_plain=cfg.n_plain,
            rec_vocab_size=rec_ids.numel(),
            rec_dim=cfg.rec_dim,
            task_head=cfg.task_head,
            label_features=label_feats,
            generator=gen,
            text_path=cfg.text_path,
        )
        st.global_state = st.model.trainable_state()
        n_k = np.array([len(i) for i in split.train], dtype=np.float64)
        st.weights = n_k / n_k.sum()
        st.zero_shot_acc = _zero_shot_acc(backbone, st.test_priv, label_feats, st.y_test, cfg.n_plain)
        return st

    def round(self, st: _State, rnd: int) -> dict[str, Any]:
        """Local AdamW epochs on every client from the global state, FedAvg, evaluation on the privatised test."""
        cfg, model, gen = st.cfg, st.model, st.gen
        weights = st.weights
        assert model is not None and st.test_priv is not None and weights is not None
        states, stats = [], []
        for k in range(cfg.num_users):
            model.load_trainable_state(st.global_state)
            opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
            )
            idx = st.train_idx[k]
            for epoch in range(cfg.local_epochs):
                if cfg.compose and (rnd, epoch) != (1, 0):
                    st.clients[k] = st.privatise([st.encode[i] for i in idx], f"client-{k}")
                data = st.clients[k]
                order = torch.randperm(len(idx), generator=gen)
                for s in range(0, len(idx), cfg.batch_size):
                    sel = order[s : s + cfg.batch_size]
                    body = [data.body[int(i)] for i in sel]
                    l_task, l_rec, rec_acc = _losses(model, body, data.plain_index[sel], st.y_train[idx[sel.numpy()]])
                    loss = l_task + cfg.rec_weight * l_rec
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    stats.append((l_task.item(), l_rec.item(), rec_acc.item()))
            states.append(model.trainable_state())
        st.global_state = {
            n: functools.reduce(operator.add, (w * s[n] for w, s in zip(weights, states, strict=True)))
            for n in st.global_state
        }
        model.load_trainable_state(st.global_state)
        correct = _predict(model, st.test_priv.body) == st.y_test
        local_acc, neighbor_acc = local_neighbor(correct, st.test_idx)
        stat = np.array(stats)
        st.last = {
            "local_acc": local_acc,
            "neighbor_acc": neighbor_acc,
            "epsilon_local": st.eps_local,
            "epsilon_global": st.eps_local,
            "test_acc": float(correct.float().mean()),
            "loss": float((stat[:, 0] + cfg.rec_weight * stat[:, 1]).mean()),  # L = L_task + lambda L_rec
            "loss_task": float(stat[:, 0].mean()),
            "loss_rec": float(stat[:, 1].mean()),
            "rec_acc": float(np.nanmean(stat[:, 2])),
        }
        return st.last

    def final(self, st: _State) -> dict[str, Any]:
        """Clean-text accuracy, the privacy numbers and the inversion attacks on the privatised test sentences."""
        cfg, model, test_priv = st.cfg, st.model, st.test_priv
        assert model is not None and test_priv is not None
        clean_body = [torch.cat([st.rec_ids[test_priv.plain_index[i]], x]) for i, x in enumerate(st.encode_test)]
        clean_acc = float((_predict(model, clean_body) == st.y_test).float().mean())
        test_orig = torch.cat(test_priv.original)
        test_rel = torch.cat(test_priv.body)
        x_mask = torch.cat([torch.arange(b.numel()) >= cfg.n_plain for b in test_priv.body])  # the sentence tokens
        emb, specials = st.emb, st.specials
        bayes = float("nan")
        if cfg.bayes_mc > 0:
            bayes = dchi.bayes_inversion_accuracy(
                test_orig[x_mask], test_rel[x_mask], emb, st.eta, torch.cat(st.encode),
                special_ids=specials, n_mc=cfg.bayes_mc, generator=st.gen if not emb.is_cuda else None,
            )  # fmt: skip
        return {
            "local_acc": st.last["local_acc"],
            "neighbor_acc": st.last["neighbor_acc"],
            "zero_shot_acc": st.zero_shot_acc,
            "epsilon_local": st.eps_local,
            "epsilon_global": st.eps_local,
            "delta": 0.0,
            "accountant": "d_chi (pure eta*d_chi per token; eps = eta*diameter, post-processing for everything shared)",
            "test_acc": st.last["test_acc"],
            "clean_test_acc": clean_acc,
            "eta": st.eta,
            "eps_token": st.eta * st.diam,
            "diameter": st.diam,
            "diameter_exact": st.diam_exact,
            "privatisations_per_sentence": st.n_priv,
            "calibration_rate": st.calib_rate,
            "preservation_rate_train": float(np.mean([c.rate for c in st.clients])),
            "preservation_rate_test": dchi.preservation_rate(test_orig[x_mask], test_rel[x_mask], specials),
            "nn_inversion_acc": dchi.nn_inversion_accuracy(test_orig[x_mask], test_rel[x_mask], specials),
            "bayes_inversion_acc": bayes,
            "rec_acc": st.last["rec_acc"],
            "randomness": randomness_statement(
                cfg.noise_seed,
                "torch.Generator (mt19937 on CPU, Philox on CUDA), 63-bit keys (not proven cryptographic)",
            ),
            "note": (
                "RAPT: local d_chi privatisation of the text (once per client"
                + (", re-privatised every epoch and composed" if cfg.compose else "")
                + "); epsilon_local = epsilon_global = eta * diameter(token embedding) per token"
                + (" (upper bound on the diameter)" if not st.diam_exact else "")
                + ", pure (delta 0). zero_shot_acc: label-text cosine on the privatised test sentence without a "
                "prompt"
                + (" (random-init backbone: chance level expected)" if cfg.pretrained is None else "")
                + ". nn_inversion_acc equals the preservation rate by construction; bayes_inversion_acc: the attacker"
                " knows the training-text vocabulary."
            ),
        }


@torch.no_grad()
def _zero_shot_acc(
    backbone: FrozenCLIP, test_priv: _Privatised, label_feats: Tensor, y_test: Tensor, n_plain: int
) -> float:
    """Zero-shot baseline: the hand-written label prompts, cosine against the privatised test sentence alone."""
    tok = backbone.tokenizer
    tokens, eot = build_sequences(
        [b[n_plain:] for b in test_priv.body], int(tok.sot_token_id), int(tok.eot_token_id), 0
    )
    feats = backbone.encode_prompts(backbone.token_embeddings(tokens), eot.to(backbone.device))
    pred = (F.normalize(feats.float(), dim=-1) @ F.normalize(label_feats.float(), dim=-1).T).argmax(-1).cpu()
    return float((pred == y_test).float().mean())


def run(cfg: Config, *, out: Path, progress: bool = True, tensorboard: str | Path | None = None) -> dict[str, Any]:
    """Train federated RAPT and write results.json, rounds.csv and accuracy.png to ``out`` (``tensorboard``: also
    a TensorBoard log of the rounds in that folder).

    Returns:
        The results dict (shared shape: ``method``, ``config``, ``rounds``, ``final``).
    """
    return run_method(Rapt(), cfg, out=out, progress=progress, tensorboard=tensorboard)
