"""Recipe of the embedded tiny CLIP: pretrain ``tiny-digits-clip`` on the PRETRAINING part of digits.

A randomly initialised CLIP cannot learn prompts (CoOp stays at chance on top of it), so fpl_fast ships a tiny
CLIP that has learned image-text alignment on digits. Recipe (deterministic: seeded, CPU, single-threaded math):

* model: ``fpl_fast/configs/tiny-digits-clip.json`` (ViT 2 layers, width 64, 32x32 input, patch 4; causal text
  transformer, 2 layers, width 64, pooling at EOT), random init from ``--seed``;
* data: the 797 ``pretrain`` images of :mod:`fpl_fast.data.digits` (never the federated train/test parts), with
  random shifts of up to 2 pixels;
* captions: each class name in the templates :data:`PRETRAIN_TEMPLATES` (one random template per class and step);
* loss: cross-entropy of each image against the caption features of all 10 classes (logit scale learned);
* AdamW, cosine schedule; the token embedding gets no weight decay, so the rows of tokens that never occur in a
  caption keep their seeded initialisation and the shipped file stores only the trained rows (fp16).

The hand-written zero-shot prompt :data:`ZERO_SHOT_TEMPLATE` uses words that never occur in the pretraining
captions, so it sits well below what learned context reaches: prompt learning has real headroom.

Run ``python -m fpl_fast.data.pretrain_tiny_clip --out fpl_fast/configs/tiny-digits-clip.pt``; it prints the
zero-shot accuracy and the accuracy of a small CoOp run (16 learned context vectors) on the federated test part.
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
from fpl_fast.backbone.shipped_models import EMBEDDED_MODEL, EMBEDDED_WEIGHTS
from fpl_fast.backbone.text_tower import text_encoder_forward, text_tower
from fpl_fast.data.digits import DIGIT_CLASSNAMES, DigitsDataset
from fpl_fast.data.recipe import adamw_warmup_cosine, recipe_main

__all__ = [
    "PRETRAIN_TEMPLATES",
    "ZERO_SHOT_TEMPLATE",
    "PretrainConfig",
    "coop_accuracy",
    "main",
    "pretrain",
    "zero_shot_accuracy",
]

PRETRAIN_TEMPLATES = ("{}", "number {}", "{} written by hand", "handwritten {}")
"""Caption templates of the pretraining (deliberately different from :data:`ZERO_SHOT_TEMPLATE`)."""

ZERO_SHOT_TEMPLATE = "a photo of the digit {}."
"""The hand-written prompt of the zero-shot baseline."""


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of the tiny-CLIP pretraining.

    Attributes:
        steps: optimiser steps.
        batch_size: images per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only; never the token embedding).
        warmup: linear warm-up steps before the cosine decay.
        max_shift: random image translation in pixels (augmentation).
        seed: seed of the model initialisation and of the data order.
        token_std: standard deviation of the seeded token-embedding initialisation (larger than CLIP's 0.02 so
            the class tokens start distinguishable and training leaves its initial plateau sooner).
    """

    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 40
    max_shift: int = 2
    seed: int = 0
    token_std: float = 0.2


def _normalise(backbone_or_cfg: dict, images: Tensor) -> Tensor:
    mean = torch.tensor(backbone_or_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(backbone_or_cfg["std"]).view(1, 3, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std


def _shift(images: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, 1, h, w)
    return out.gather(3, cols)


def pretrain(cfg: PretrainConfig, *, log_every: int = 100) -> tuple[nn.Module, Tensor]:
    """Pretrain the tiny CLIP.

    Args:
        cfg: hyper-parameters.
        log_every: print the loss every this many steps (0: silent).

    Returns:
        The trained open_clip model (fp32, CPU, eval mode) and the (R,) ids of the token-embedding rows that
        occur in the captions (all other rows equal ``init_token_embedding(seed=cfg.seed + 1)``).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    model = open_clip.create_model(EMBEDDED_MODEL)
    tower = text_tower(model)
    vocab, width = tower.token_embedding.weight.shape
    with torch.no_grad():
        tower.token_embedding.weight.copy_(init_token_embedding(vocab, width, seed=cfg.seed + 1, std=cfg.token_std))
    tokenizer = open_clip.get_tokenizer(EMBEDDED_MODEL)
    tokens = torch.stack([tokenizer([t.format(c) for c in DIGIT_CLASSNAMES]) for t in PRETRAIN_TEMPLATES])  # (T,C,L)
    eot = tokens.argmax(-1)  # (T, C)
    seq_len = int(eot.max()) + 1
    tokens = tokens[..., :seq_len]
    trained_rows = torch.unique(tokens)

    data = DigitsDataset("pretrain", image_size=model.visual.image_size[0])
    images = data.images
    labels = torch.from_numpy(data.labels)
    pp_cfg = model.visual.preprocess_cfg

    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and "token_embedding" not in name and "positional_embedding" not in name
        (decay if is_matrix else no_decay).append(p)
    opt, lr_at = adamw_warmup_cosine(
        decay, no_decay, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, steps=cfg.steps
    )

    n_cls, n_tpl = len(DIGIT_CLASSNAMES), len(PRETRAIN_TEMPLATES)
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=gen)
        x = _normalise(pp_cfg, _shift(images[idx], cfg.max_shift, gen))
        tpl = torch.randint(0, n_tpl, (n_cls,), generator=gen)
        cls = torch.arange(n_cls)
        txt = text_encoder_forward(tower, tower.token_embedding(tokens[tpl, cls]), eot[tpl, cls])  # (C, D)
        img = model.encode_image(x)  # (B, D)
        scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  logit_scale {scale.item():.1f}", flush=True)
    with torch.no_grad():
        model.logit_scale.clamp_(max=math.log(100.0))
    model.eval()
    return model, trained_rows


def _features(backbone: Backbone, part: str) -> tuple[Tensor, Tensor]:
    data = DigitsDataset(part, image_size=backbone.image_size[0])
    feats = backbone.image_features("digits", part, data)
    return F.normalize(feats, dim=-1), torch.from_numpy(data.labels).to(feats.device)


def zero_shot_accuracy(backbone: Backbone, template: str = ZERO_SHOT_TEMPLATE, part: str = "test") -> float:
    """Accuracy of the hand-written prompt ``template`` on a digits part."""
    feats, labels = _features(backbone, part)
    weights = backbone.zero_shot_weights(DIGIT_CLASSNAMES, template).float()
    return float((feats @ weights.T).argmax(-1).eq(labels).float().mean())


def coop_accuracy(
    backbone: Backbone,
    *,
    n_ctx: int = 16,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> float:
    """Train CoOp context on the federated ``train`` part (centrally) and return its ``test`` accuracy.

    The context vectors (n_ctx, d), initialised N(0, 0.02^2), are the only trainable parameters; prompts are
    ``[prefix | ctx | suffix]`` and logits ``logit_scale * cos(image_feat, text_feat)``; Adam.
    """
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = _features(backbone, "train")
    test_x, test_y = _features(backbone, "test")
    parts = backbone.prompt_parts(DIGIT_CLASSNAMES, n_ctx)
    ctx = (torch.randn(n_ctx, backbone.ctx_dim, generator=gen) * 0.02).to(backbone.device).requires_grad_(True)
    opt = torch.optim.Adam([ctx], lr=lr)
    scale = backbone.logit_scale

    def text_features() -> Tensor:
        return F.normalize(backbone.encode_prompts(parts.assemble(ctx), parts.eot_index, seq_len=parts.seq_len), dim=-1)

    for _ in range(steps):
        idx = torch.randint(0, len(train_y), (batch_size,), generator=gen)
        loss = F.cross_entropy(scale * train_x[idx] @ text_features().T, train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((test_x @ text_features().T).argmax(-1).eq(test_y).float().mean())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: pretrain, save the compact weights, report zero-shot and CoOp accuracy."""

    def evaluate(backbone: Backbone) -> dict[str, float]:
        return {
            "zero_shot_test_accuracy": zero_shot_accuracy(backbone),
            "coop_test_accuracy": coop_accuracy(backbone),  # 16 ctx, 300 Adam steps, central
        }

    return recipe_main(
        argv,
        recipe="fpl_fast.data.pretrain_tiny_clip",
        description=__doc__.split("\n")[0],
        default_out=EMBEDDED_WEIGHTS,
        config_cls=PretrainConfig,
        pretrain=pretrain,
        token_seed=lambda cfg: cfg.seed + 1,
        evaluate=evaluate,
        eval_help="zero-shot / CoOp measurement",
        extra_meta={"templates": list(PRETRAIN_TEMPLATES)},
    )


if __name__ == "__main__":
    sys.exit(main())
