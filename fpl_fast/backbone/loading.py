"""Loading a frozen CLIP through open_clip: model names, pretrained tags, local checkpoint files (open_clip's,
OpenAI's, compact ones) and the embedded weights; open_clip's misleading log lines are dropped on the way."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import open_clip
import torch
from torch import nn

from fpl_fast.backbone.checkpoints import checkpoint_kind, load_compact_checkpoint
from fpl_fast.backbone.model import FrozenCLIP
from fpl_fast.backbone.shipped_models import CONFIG_DIR, EMBEDDED_MODEL, EMBEDDED_WEIGHTS, shipped_configs
from fpl_fast.validation import ConfigError

__all__ = ["load_backbone"]

_PRECISIONS = ("fp32", "bf16")


class _DropMessages(logging.Filter):
    def __init__(self, fragments: Sequence[str]) -> None:
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


@contextmanager
def _quiet_open_clip(*fragments: str) -> Iterator[None]:
    """Drop open_clip's root-logger messages that would be misleading for how we load weights."""
    filt = _DropMessages(fragments)
    root = logging.getLogger()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _warn_if_openai_architecture(model: str, path: str) -> None:
    """Warn when a bare state dict in OpenAI's key layout is loaded into a GELU config of an OpenAI architecture."""
    tag_cfg = open_clip.get_pretrained_cfg(model, "openai")
    model_cfg = open_clip.get_model_config(model) or {}
    if tag_cfg and tag_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
        quick = f"{model}-quickgelu"
        instead = f"model {quick!r}" if quick in open_clip.list_models() else "a QuickGELU model config"
        warnings.warn(
            f"{path} is a state dict in the key layout shared by OpenAI's and open_clip's CLIP, without OpenAI's "
            f"archive entries: loading it with the GELU of {model!r}'s config. If these are OpenAI's weights "
            f"(trained with QuickGELU), load them with {instead} or from OpenAI's .pt archive",
            UserWarning,
            stacklevel=3,
        )


def _load_openai_file(
    model: str, path: str | os.PathLike[str], *, precision: str, device: str | torch.device
) -> nn.Module:
    """Build ``model`` with QuickGELU and load OpenAI-format weights into it with open_clip's OpenAI loader.

    ``open_clip.load_openai_model`` reads the file (TorchScript archive or state dict) and builds an OpenAI CLIP
    from it (``build_model_from_openai_state_dict``, QuickGELU); its weights are loaded strictly into the named
    config built by ``open_clip.create_model(..., force_quick_gelu=True)``, so the preprocessing config, the
    precision handling and the architecture check are those of open_clip's ``openai`` tag path.
    """
    with _quiet_open_clip("initialized randomly"):
        clip = open_clip.create_model(model, None, force_quick_gelu=True, precision=precision, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load. is deprecated", category=FutureWarning)
        weights = open_clip.load_openai_model(os.fspath(path), precision="fp32", device="cpu")
    clip.load_state_dict(weights.state_dict(), strict=True)
    return clip


def _unknown_pretrained(model: str, pretrained: str) -> ConfigError:
    """Neither a file nor a tag: a path-like value is a missing file; the model's tags are listed where it has some."""
    tags = open_clip.list_pretrained_tags_by_model(model)
    looks_like_file = os.sep in pretrained or os.path.splitext(pretrained)[1] != ""
    what = "no such file" if looks_like_file else f"neither a file nor an open_clip tag of model {model!r}"
    allowed = f"a checkpoint file, 'embedded' (model {EMBEDDED_MODEL!r} only), none (random init)"
    allowed += f", or a tag of model {model!r}: {', '.join(tags)}" if tags else ""
    return ConfigError(
        "pretrained",
        f"pretrained={pretrained!r}: {what}; allowed: {allowed}",
        cli=f"--pretrained {pretrained}: {what}; allowed: {allowed}",
    )


def load_backbone(
    model: str,
    pretrained: str | None = None,
    *,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
) -> FrozenCLIP:
    """Load a frozen open_clip model.

    Args:
        model: an open_clip model name (``open_clip.list_models()``, e.g. ``"ViT-B-16"``), the name of a JSON config
            shipped in ``fpl_fast/configs`` (e.g. ``"tiny-digits-clip"``), or an ``hf-hub:``/``local-dir:`` name.
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``; downloaded by open_clip, needs a network), a
            local checkpoint file (open_clip format, OpenAI format, or a compact file written by
            ``fpl_fast.data.pretrain_tiny_clip``), ``None`` for random initialisation, or ``"embedded"`` for the
            shipped tiny digits CLIP weights (only with ``model="tiny-digits-clip"``). For tags trained with
            QuickGELU (the OpenAI weights) QuickGELU is switched on automatically, as open_clip requires.

            OpenAI-format files also get QuickGELU. A file counts as OpenAI's when it is a TorchScript archive (how
            OpenAI distributes CLIP, e.g. ``ViT-B-16.pt``; open_clip publishes none), or a bare state dict in
            OpenAI's CLIP key layout that also carries OpenAI's ``input_resolution``, ``context_length`` and
            ``vocab_size`` entries (e.g. the ``state_dict()`` of such an archive). It is read by open_clip's
            ``load_openai_model`` and loaded strictly into ``model`` built with QuickGELU. Any other file keeps the
            activation of ``model``'s config: a bare state dict with OpenAI's key layout but without those entries
            is exactly what open_clip saves for its own ``CLIP`` models (e.g. LAION's GELU ViT-B-16), so the key
            layout alone cannot tell OpenAI's weights; name the QuickGELU config (``"ViT-B-16-quickgelu"``) for
            OpenAI weights saved that way. A warning says so when ``model`` has an ``openai`` tag and uses GELU.
        precision: ``"fp32"`` or ``"bf16"`` (open_clip's mixed bf16: bf16 weights, fp32 layer norms).
        device: where the model lives.

    Returns:
        The frozen model.

    Raises:
        ValueError: unknown model name, unknown pretrained value, bad precision.
        RuntimeError: pretrained weights that cannot be downloaded (no network) or loaded.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    has_schema = model.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and model not in open_clip.list_models():
        raise ValueError(
            f"unknown model {model!r}: names come from open_clip.list_models() (open_clip's built-in configs, e.g. "
            f"'ViT-B-16', 'ViT-B-32', 'RN50') and from the JSON configs in {CONFIG_DIR} "
            f"({', '.join(shipped_configs())})"
        )
    kwargs: dict[str, Any] = {"precision": precision, "device": device}
    compact_path: str | os.PathLike[str] | None = None
    openai_path: str | None = None
    if pretrained == "embedded":
        if model != EMBEDDED_MODEL:
            raise ValueError(f"pretrained='embedded' is only available for model {EMBEDDED_MODEL!r}, got {model!r}")
        if not EMBEDDED_WEIGHTS.is_file():
            raise RuntimeError(
                f"embedded weights {EMBEDDED_WEIGHTS} are missing; rebuild them with "
                f"`python -m fpl_fast.data.pretrain_tiny_clip --out {EMBEDDED_WEIGHTS}`"
            )
        compact_path, pretrained = EMBEDDED_WEIGHTS, None
    elif pretrained is not None and os.path.isfile(pretrained):
        kind = checkpoint_kind(pretrained)
        if kind == "compact":
            compact_path, pretrained = pretrained, None
        elif kind == "openai" and not has_schema:
            openai_path, pretrained = pretrained, None
        elif kind == "clip-layout" and not has_schema:
            _warn_if_openai_architecture(model, pretrained)
    elif pretrained is not None and not has_schema and not os.path.isfile(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            raise _unknown_pretrained(model, pretrained)
        if tag_cfg.get("quick_gelu", False):
            kwargs["force_quick_gelu"] = True
    try:
        if openai_path is not None:
            clip = _load_openai_file(model, openai_path, precision=precision, device=device)
        else:
            with _quiet_open_clip("initialized randomly") if compact_path is not None else nullcontext():
                clip = open_clip.create_model(model, pretrained, **kwargs)
        meta = load_compact_checkpoint(clip, compact_path) if compact_path is not None else {}
    except (ValueError, TypeError):
        raise
    except Exception as err:  # noqa: BLE001 - download/IO errors from open_clip, re-raised as one clear line
        what = next((w for w in (pretrained, compact_path, openai_path) if w is not None), None)
        raise RuntimeError(
            f"could not load weights {what!r} for model {model!r}: {_first_line(err)} "
            "(downloads need a network; pass a local checkpoint file as pretrained= instead)"
        ) from None
    return FrozenCLIP(clip, model_name=model, meta=meta)
