"""Scoring a global prompt through the oracle: accuracies on the test part (per client: local and neighbour)
and the transfer of the final prompt to a second model (F8)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fpl_fast.federated.metrics import local_neighbor
from fpl_fast.methods.feddtpt.config import Config
from fpl_fast.methods.feddtpt.oracle import Oracle

__all__ = ["evaluate", "transfer_accuracy"]


def evaluate(oracle: Oracle, prompt: Sequence[int], test_labels: np.ndarray, test_idx: list[np.ndarray]) -> dict:
    """Global-prompt accuracy: on the whole test part, per client on its own split (local) and on the others'."""
    pred = oracle.predict(prompt, "test", np.arange(len(test_labels))).numpy()
    correct = pred == test_labels
    local, neighbor = local_neighbor(correct, test_idx)
    return {"test_acc": float(correct.mean()), "local_acc": local, "neighbor_acc": neighbor}


def _same_tokenizer(a: Any, b: Any) -> bool:
    enc_a, enc_b = getattr(a, "encoder", None), getattr(b, "encoder", None)
    return isinstance(enc_a, dict) and enc_a == enc_b


def transfer_accuracy(
    cfg: Config, data: Any, test_labels: np.ndarray, backbone: Any, prompt: list[int], seed_ids: list[int]
) -> dict[str, Any]:
    """F8: score the final prompt ids (and the seed prompt) on a second open_clip model sharing the tokenizer."""
    from fpl_fast.backbone.loading import load_backbone

    if cfg.transfer_model is None:
        raise ValueError("transfer_accuracy needs cfg.transfer_model (None skips the transfer evaluation)")
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
