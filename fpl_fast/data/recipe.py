"""The command line shared by the recipes that pretrain the shipped tiny models.

pretrain -> save the compact weights -> (optionally) measure on the saved file -> save again with the
measurements in the file's metadata.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpl_fast.backbone.checkpoints import save_compact_checkpoint
from fpl_fast.backbone.protocol import Backbone
from fpl_fast.backbone.shipped_models import EMBEDDED_MODEL

__all__ = ["recipe_main", "adamw_warmup_cosine"]


def adamw_warmup_cosine(
    decay: list[nn.Parameter], no_decay: list[nn.Parameter], *, lr: float, weight_decay: float, warmup: int, steps: int
) -> tuple[torch.optim.AdamW, Callable[[int], float]]:
    """The recipes' optimiser (AdamW, CLIP's betas and eps; weight decay on ``decay`` only) and its learning rate
    at each step: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * lr * (1.0 + math.cos(math.pi * progress))

    return opt, lr_at


def recipe_main(
    argv: Sequence[str] | None,
    *,
    recipe: str,
    description: str,
    default_out: Path,
    config_cls: type[Any],
    pretrain: Callable[[Any], tuple[nn.Module, Any]],
    token_seed: Callable[[Any], int],
    evaluate: Callable[[Backbone], dict[str, float]],
    eval_help: str,
    extra_meta: dict[str, Any] | None = None,
) -> int:
    """Parse --out/--steps/--seed/--no-eval, pretrain, save, evaluate the saved file, save with the results.

    Args:
        recipe: the module name recorded in the file's metadata (``fpl_fast.data.<recipe module>``).
        config_cls: the recipe's frozen config dataclass (fields ``steps``, ``seed``, ``token_std``).
        pretrain: config -> (model, trained token rows).
        token_seed: config -> the seed of the untrained token rows (regenerated when loading).
        evaluate: loaded backbone -> {metric name: value}, printed and stored in the metadata.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {recipe}", description=description)
    parser.add_argument("--out", default=str(default_out), help="output weights file (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=config_cls.steps)
    parser.add_argument("--seed", type=int, default=config_cls.seed)
    parser.add_argument("--no-eval", action="store_true", help=f"skip the {eval_help}")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    cfg = config_cls(steps=args.steps, seed=args.seed)
    start = time.perf_counter()
    model, rows = pretrain(cfg)
    seconds = time.perf_counter() - start
    print(f"pretraining: {cfg.steps} steps in {seconds:.1f} s ({torch.get_num_threads()} threads)")
    meta: dict[str, Any] = {
        "recipe": recipe,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        **(extra_meta or {}),
        "pretrain_seconds": round(seconds, 1),
    }

    def save() -> None:
        save_compact_checkpoint(
            model,
            args.out,
            model_name=EMBEDDED_MODEL,
            token_seed=token_seed(cfg),
            token_std=cfg.token_std,
            trained_rows=rows,
            meta=meta,
        )

    save()
    if not args.no_eval:
        from fpl_fast.backbone.loading import load_backbone

        results = evaluate(load_backbone(EMBEDDED_MODEL, args.out))
        for name, value in results.items():
            print(f"{name.replace('_', ' ')}: {value:.3f}")
        meta.update({k: round(v, 4) for k, v in results.items()})
        save()
    print(f"wrote {args.out}")
    return 0
