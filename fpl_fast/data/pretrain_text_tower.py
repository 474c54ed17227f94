"""Recipe of the shipped topic text tower: pretrain the TEXT tower of ``tiny-digits-clip`` on topic sentences.

RAPT trains a soft prompt and heads on a FROZEN CLIP text tower; on a randomly initialised tower it stays at chance
(a linear probe on its EOT features of clean topic text reaches only ~0.42 on 4 classes). A frozen backbone must
already carry useful text features, as the real CLIP does, so fpl_fast ships a tiny text tower that has learned
sentence-topic alignment offline. Recipe (deterministic: seeded, CPU):

* model: ``fpl_fast/configs/tiny-digits-clip.json`` (causal text transformer, 2 layers, width 64, pooling at EOT),
  random init from ``--seed``; only the text tower (token embedding, positional embedding, blocks, ``ln_final``,
  projection) and the logit scale are trained; the image tower keeps its seeded initialisation (it is stored in the
  file only because the compact checkpoint holds the whole model);
* data: a PRETRAINING set of :data:`PRETRAIN_SIZE` topic sentences from :func:`fpl_fast.data.topics.make_text_dataset`
  generated with seed :data:`PRETRAIN_SEED`, a different seed from RAPT's federated train/test data
  (:data:`fpl_fast.data.topics.TEXT_SEED`), so the sentences are drawn independently of the federated data (the
  word lists and templates are the same, so a short sentence may coincide by chance, as between train and test);
* captions: each topic name in the templates :data:`PRETRAIN_TEMPLATES` (one random template per topic and step);
* augmentation, so that the tower tolerates RAPT's inputs: with probability :data:`PREFIX_P` a sentence is preceded
  by up to ``n_plain`` random whole-word tokens (like RAPT's plain tokens), and each sentence token is replaced by
  a random vocabulary token with probability ``replace_p`` (like d_chi privatisation);
* loss: cross-entropy of each sentence against the caption features of all 4 topics (the digits recipe of
  :mod:`fpl_fast.data.pretrain_tiny_clip` with sentences in place of images);
* AdamW, cosine schedule; the token embedding gets no weight decay and only the rows of tokens occurring in the
  pretraining sentences and captions get gradient, so every other row keeps its seeded initialisation
  (seed :data:`TOKEN_SEED_OFFSET` + ``seed``) and the shipped file stores only the trained rows (fp16).

Run ``python -m fpl_fast.data.pretrain_text_tower --out fpl_fast/configs/tiny-topics-text.pt``; it prints the
accuracy of a linear probe on EOT features of the CLEAN federated test sentences.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpl_fast.backbone.checkpoints import init_token_embedding
from fpl_fast.backbone.protocol import Backbone
from fpl_fast.backbone.shipped_models import CONFIG_DIR, EMBEDDED_MODEL
from fpl_fast.backbone.text_tower import text_encoder_forward, text_tower
from fpl_fast.data.recipe import adamw_warmup_cosine, recipe_main
from fpl_fast.data.topics import TEXT_CLASSNAMES, TEXT_SEED, make_text_dataset

__all__ = [
    "PREFIX_P",
    "PRETRAIN_SEED",
    "PRETRAIN_SIZE",
    "PRETRAIN_TEMPLATES",
    "TOKEN_SEED_OFFSET",
    "TEXT_TOWER_WEIGHTS",
    "PretrainConfig",
    "linear_probe_accuracy",
    "main",
    "pretrain",
]

TEXT_TOWER_WEIGHTS = CONFIG_DIR / "tiny-topics-text.pt"
"""The shipped weights (``tiny-digits-clip`` architecture, text tower pretrained on topic sentences)."""

PRETRAIN_SEED = 9001
"""Seed of the pretraining sentences (different from :data:`fpl_fast.data.topics.TEXT_SEED`)."""

PRETRAIN_SIZE = 4000
"""Pretraining sentences (class-balanced)."""

PRETRAIN_TEMPLATES = ("a sentence about {}.", "{}", "this text is about {}", "a story on {}")
"""Caption templates of the pretraining."""

PREFIX_P = 0.5
"""Probability that a pretraining sentence is preceded by random plain tokens."""

TOKEN_SEED_OFFSET = 7919
"""The token embedding is initialised from seed ``TOKEN_SEED_OFFSET + seed``, far from the small seeds of RAPT's
runs: a table drawn from ``torch.Generator().manual_seed(s)`` with ``randn`` is exactly correlated with d_chi noise
drawn from a generator with the same seed ``s`` (the noise directions are then the table's own rows), which skews
the eta calibration (e.g. RAPT's default seed 1 with token seed 1 gave a calibrated rate of 0.70 but ~1.0 under
fresh noise)."""

assert PRETRAIN_SEED != TEXT_SEED


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of the text-tower pretraining.

    Attributes:
        steps: optimiser steps.
        batch_size: sentences per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only; never the token embedding).
        warmup: linear warm-up steps before the cosine decay.
        replace_p: per-token probability of replacing a sentence token by a random vocabulary token.
        n_plain: maximum number of random prefix tokens.
        seed: seed of the model initialisation and of the data order.
        token_std: standard deviation of the seeded token-embedding initialisation.
    """

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 40
    replace_p: float = 0.15
    n_plain: int = 8
    seed: int = 0
    token_std: float = 0.2

    @property
    def token_seed(self) -> int:
        """Seed of the token-embedding initialisation, :data:`TOKEN_SEED_OFFSET` + ``seed``."""
        return TOKEN_SEED_OFFSET + self.seed


def _prefix_vocab(tokenizer, size: int = 1000) -> Tensor:
    """The first ``size`` whole-word alphabetic BPE ids (RAPT's default reconstruction vocabulary T)."""
    specials = {int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)}
    ids = []
    for i in range(len(tokenizer.decoder)):
        word = tokenizer.decoder.get(i, "")
        if i not in specials and word.endswith("</w>") and len(word) >= 6 and word[:-4].isalpha() and word.isascii():
            ids.append(i)
            if len(ids) == size:
                break
    return torch.tensor(ids, dtype=torch.long)


def pretrain(cfg: PretrainConfig, *, log_every: int = 100) -> tuple[nn.Module, Tensor]:
    """Pretrain the text tower.

    Args:
        cfg: hyper-parameters.
        log_every: print the loss every this many steps (0: silent).

    Returns:
        The trained open_clip model (fp32, CPU, eval mode) and the (R,) ids of the token-embedding rows that
        occur in the pretraining sentences and captions (all other rows equal
        ``init_token_embedding(seed=cfg.token_seed)``).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    model = open_clip.create_model(EMBEDDED_MODEL)
    tower = text_tower(model)
    vocab, width = tower.token_embedding.weight.shape
    with torch.no_grad():
        tower.token_embedding.weight.copy_(init_token_embedding(vocab, width, seed=cfg.token_seed, std=cfg.token_std))
    tokenizer = open_clip.get_tokenizer(EMBEDDED_MODEL)
    sot, eot_id = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)

    cap_tokens = torch.stack([tokenizer([t.format(c) for c in TEXT_CLASSNAMES]) for t in PRETRAIN_TEMPLATES])  # T,C,L
    cap_eot = cap_tokens.argmax(-1)
    cap_tokens = cap_tokens[..., : int(cap_eot.max()) + 1]

    data = make_text_dataset("train", n=PRETRAIN_SIZE, seed=PRETRAIN_SEED)
    sentences = [torch.tensor(tokenizer.encode(t), dtype=torch.long) for t in data.texts]
    labels = torch.as_tensor(data.labels)
    trained_rows = torch.unique(torch.cat([cap_tokens.flatten(), *sentences, torch.tensor([sot, eot_id, 0])]))
    row_mask = torch.zeros(vocab, 1)
    row_mask[trained_rows] = 1.0
    tower.token_embedding.weight.register_hook(lambda g: g * row_mask.to(g))  # untrained rows keep their init
    prefix_vocab = _prefix_vocab(tokenizer)
    replace_vocab = torch.tensor([i for i in range(vocab) if i not in (sot, eot_id)], dtype=torch.long)

    params = [p for n, p in model.named_parameters() if not n.startswith("visual.") and p.requires_grad]
    for n, p in model.named_parameters():
        if n.startswith("visual."):
            p.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n]
    ids_decay = {id(p) for p in decay}
    no_decay = [p for p in params if id(p) not in ids_decay]
    opt, lr_at = adamw_warmup_cosine(
        decay, no_decay, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, steps=cfg.steps
    )

    def batch(idx: Tensor) -> tuple[Tensor, Tensor]:
        bodies = []
        for i in idx.tolist():
            x = sentences[i].clone()
            swap = torch.rand(x.numel(), generator=gen) < cfg.replace_p
            x[swap] = replace_vocab[torch.randint(0, replace_vocab.numel(), (int(swap.sum()),), generator=gen)]
            if cfg.n_plain and float(torch.rand((), generator=gen)) < PREFIX_P:
                m = int(torch.randint(1, cfg.n_plain + 1, (), generator=gen))
                x = torch.cat([prefix_vocab[torch.randint(0, prefix_vocab.numel(), (m,), generator=gen)], x])
            bodies.append(x)
        length = 2 + max(b.numel() for b in bodies)
        tokens = torch.zeros(len(bodies), length, dtype=torch.long)
        eot = torch.tensor([1 + b.numel() for b in bodies])
        for j, b in enumerate(bodies):
            tokens[j, 0] = sot
            tokens[j, 1 : 1 + b.numel()] = b
            tokens[j, eot[j]] = eot_id
        return tokens, eot

    n_cls, n_tpl = len(TEXT_CLASSNAMES), len(PRETRAIN_TEMPLATES)
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=gen)
        tokens, eot = batch(idx)
        tpl = torch.randint(0, n_tpl, (n_cls,), generator=gen)
        cls = torch.arange(n_cls)
        cap = text_encoder_forward(tower, tower.token_embedding(cap_tokens[tpl, cls]), cap_eot[tpl, cls])  # (C, D)
        sent = text_encoder_forward(tower, tower.token_embedding(tokens), eot)  # (B, D)
        scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * F.normalize(sent, dim=-1) @ F.normalize(cap, dim=-1).T
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            acc = float(logits.argmax(-1).eq(labels[idx]).float().mean())
            print(f"step {step:4d}  loss {loss.item():.3f}  acc {acc:.2f}  logit_scale {scale.item():.1f}", flush=True)
    with torch.no_grad():
        model.logit_scale.clamp_(max=math.log(100.0))
    model.eval()
    return model, trained_rows


@torch.no_grad()
def _eot_features(backbone: Backbone, texts: list[str]) -> Tensor:
    return F.normalize(backbone.encode_text(texts).float(), dim=-1)


def linear_probe_accuracy(backbone: Backbone, *, n_train: int = 800, n_test: int = 400, steps: int = 300) -> float:
    """Test accuracy of a linear probe (full-batch Adam, seeded) on EOT features of CLEAN federated topic text."""
    train, test = make_text_dataset("train", n=n_train), make_text_dataset("test", n=n_test)
    xtr, xte = _eot_features(backbone, train.texts), _eot_features(backbone, test.texts)
    ytr, yte = torch.as_tensor(train.labels), torch.as_tensor(test.labels)
    torch.manual_seed(0)
    head = nn.Linear(xtr.shape[1], len(TEXT_CLASSNAMES))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(head(xtr * 10.0), ytr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(head(xte * 10.0).argmax(-1).eq(yte).float().mean())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: pretrain, save the compact weights, report the linear-probe accuracy."""
    return recipe_main(
        argv,
        recipe="fpl_fast.data.pretrain_text_tower",
        description=__doc__.split("\n")[0],
        default_out=TEXT_TOWER_WEIGHTS,
        config_cls=PretrainConfig,
        pretrain=pretrain,
        token_seed=lambda cfg: cfg.token_seed,
        evaluate=lambda backbone: {"linear_probe_test_accuracy": linear_probe_accuracy(backbone)},
        eval_help="linear-probe measurement",
        extra_meta={
            "templates": list(PRETRAIN_TEMPLATES),
            "pretrain_seed": PRETRAIN_SEED,
            "pretrain_size": PRETRAIN_SIZE,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
