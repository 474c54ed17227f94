"""Checkpoint files: the compact format of the embedded tiny CLIP, and telling OpenAI's CLIP files from others.

A compact checkpoint (:func:`save_compact_checkpoint`) stores the weights in fp16 and, of the token embedding, only
the rows that training changed: the others are regenerated from the seed of :func:`init_token_embedding`.
:func:`checkpoint_kind` classifies a local file for :func:`fpl_fast.backbone.loading.load_backbone`.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import torch
from torch import Tensor, nn

from fpl_fast.backbone.text_tower import text_tower

__all__ = [
    "COMPACT_FORMAT",
    "checkpoint_kind",
    "init_token_embedding",
    "load_compact_checkpoint",
    "save_compact_checkpoint",
]

COMPACT_FORMAT = "fpl_fast.compact_clip.v1"


def init_token_embedding(vocab_size: int, width: int, *, seed: int, std: float = 0.02) -> Tensor:
    """The seeded N(0, std^2) token-embedding initialisation used by the embedded tiny CLIP.

    Rows of tokens that never occur in the pretraining captions keep exactly this value (they receive no gradient),
    so a compact checkpoint stores only the trained rows and regenerates the others from ``seed``.

    Args:
        vocab_size: number of rows.
        width: embedding width d.
        seed: seed of a dedicated CPU ``torch.Generator``.
        std: standard deviation.

    Returns:
        (vocab_size, width) float32 tensor.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(vocab_size, width, generator=gen) * std


def save_compact_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str,
    token_seed: int,
    token_std: float,
    trained_rows: Tensor,
    meta: dict[str, Any] | None = None,
) -> None:
    """Save an open_clip model in fp16, storing only the trained rows of the token embedding.

    Args:
        model: the trained model.
        path: output file.
        model_name: open_clip config name of ``model``.
        token_seed: seed of :func:`init_token_embedding` used to initialise the token embedding.
        token_std: its standard deviation.
        trained_rows: (R,) long ids of the rows that may differ from the initialisation.
        meta: JSON-like metadata stored alongside (training recipe, measured accuracies).

    Raises:
        ValueError: if a row outside ``trained_rows`` differs from its initialisation (it would be lost).
    """
    tower = text_tower(model)
    emb = tower.token_embedding.weight.detach().float().cpu()
    init = init_token_embedding(emb.shape[0], emb.shape[1], seed=token_seed, std=token_std)
    untouched = torch.ones(emb.shape[0], dtype=torch.bool)
    untouched[trained_rows] = False
    if not torch.equal(emb[untouched], init[untouched]):
        raise ValueError("token-embedding rows outside trained_rows changed during training; cannot store compactly")
    emb_key = next(k for k, p in model.named_parameters() if p is tower.token_embedding.weight)
    state = {k: v.detach().cpu().half() for k, v in model.state_dict().items() if k != emb_key}
    torch.save(
        {
            "format": COMPACT_FORMAT,
            "model": model_name,
            "state_dict": state,
            "token_embedding_key": emb_key,
            "token_rows": trained_rows.cpu().long(),
            "token_values": emb[trained_rows].half(),
            "token_shape": list(emb.shape),
            "token_seed": token_seed,
            "token_std": token_std,
            "meta": meta or {},
        },
        path,
    )


def load_compact_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_compact_checkpoint` into ``model`` (strict).

    Args:
        model: an open_clip model built from the same config.
        path: the checkpoint file.

    Returns:
        The checkpoint's metadata dict.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != COMPACT_FORMAT:
        raise ValueError(f"{path} is not a {COMPACT_FORMAT} checkpoint")
    vocab, width = ckpt["token_shape"]
    emb = init_token_embedding(vocab, width, seed=ckpt["token_seed"], std=ckpt["token_std"])
    emb[ckpt["token_rows"]] = ckpt["token_values"].float()
    state = dict(ckpt["state_dict"])
    state[ckpt["token_embedding_key"]] = emb
    target = model.state_dict()
    state = {k: v.to(dtype=target[k].dtype) if k in target else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return dict(ckpt.get("meta", {}))


_OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")
"""Entries of OpenAI's CLIP archives that no open_clip model has (OpenAI's and open_clip's loaders drop them)."""

_OPENAI_LAYOUT = (
    "visual.conv1.weight",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
)
"""Keys that ``open_clip.build_model_from_openai_state_dict`` reads to infer the architecture."""


def _is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """True for a TorchScript (``torch.jit.save``) archive: a zip with ``constants.pkl`` (as ``torch.load`` tests)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoint_kind(path: str | os.PathLike[str]) -> str:
    """Classify a local checkpoint file (see :func:`fpl_fast.backbone.loading.load_backbone` for the rule).

    Returns:
        ``"compact"`` (:func:`save_compact_checkpoint`), ``"openai"`` (a TorchScript archive, or a bare state dict
        in OpenAI's CLIP key layout carrying OpenAI's ``input_resolution``/``context_length``/``vocab_size``
        entries), ``"clip-layout"`` (a bare state dict in that key layout without them: open_clip writes the same
        keys for its own ``CLIP`` models, so the weights' activation cannot be told) or ``"other"`` (anything
        else, left to open_clip's loader).
    """
    if _is_torchscript_archive(path):
        return "openai"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable here (safetensors, numpy, ...): handled by open_clip's loader
        return "other"
    if not isinstance(ckpt, dict):
        return "other"
    if ckpt.get("format") == COMPACT_FORMAT:
        return "compact"
    if all(k in ckpt for k in _OPENAI_LAYOUT):
        return "openai" if all(k in ckpt for k in _OPENAI_MARKERS) else "clip-layout"
    return "other"
