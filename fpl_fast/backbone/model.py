"""Frozen CLIP backbone: open_clip model loading, prompt-injected text encoder, image-feature cache.

The text encoder is exposed as a function of *token embeddings* rather than token ids, so that learned context
vectors can be spliced in (CoOp): for class k the input is ``[SOT] ctx_1..ctx_n [classname_k .] [EOT] [pad..]``.
Everything here is frozen: parameters never require gradients and gradients only flow into the prompts passed to
:meth:`FrozenCLIP.encode_prompts`.

The text tower itself runs in :mod:`fpl_fast.backbone.text_tower` (plain tensor ops that ``torch.func`` batches fully):
:meth:`FrozenCLIP.encode_prompts` takes whole sequences (the full path), :meth:`FrozenCLIP.encode_shared` takes
sequences that share their first rows, as the class prompts of one client do (the shared-prefix path).
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from fpl_fast.backbone.protocol import Backbone, FeatureDisk, FeatureIndices, PromptParts
from fpl_fast.backbone.text_tower import TEXT_PATHS, SuffixPack, shared_prefix_forward, text_encoder_forward, text_tower

__all__ = [
    "Backbone",
    "CONFIG_DIR",
    "EMBEDDED_MODEL",
    "EMBEDDED_WEIGHTS",
    "FeatureCache",
    "FrozenCLIP",
    "PromptParts",
    "init_token_embedding",
    "load_backbone",
    "load_compact_checkpoint",
    "save_compact_checkpoint",
    "SuffixPack",
    "text_encoder_forward",
    "text_tower",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""Directory of the JSON model configs shipped with fpl_fast (registered with open_clip on import)."""

EMBEDDED_MODEL = "tiny-digits-clip"
"""Name of the embedded tiny CLIP config (``fpl_fast/configs/tiny-digits-clip.json``)."""

EMBEDDED_WEIGHTS = CONFIG_DIR / "tiny-digits-clip.pt"
"""Weights of the embedded tiny CLIP, written by ``python -m fpl_fast.data.pretrain_tiny_clip``."""

COMPACT_FORMAT = "fpl_fast.compact_clip.v1"
_PRECISIONS = ("fp32", "bf16")
_CTX_PLACEHOLDER = "X"

open_clip.add_model_config(CONFIG_DIR)


def _shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# --------------------------------------------------------------------------------------------------------------
# Compact checkpoints (the embedded tiny CLIP)
# --------------------------------------------------------------------------------------------------------------


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


def _checkpoint_kind(path: str | os.PathLike[str]) -> str:
    """Classify a local checkpoint file (see :func:`load_backbone` for the rule).

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


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


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
            f"({', '.join(_shipped_configs())})"
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
        kind = _checkpoint_kind(pretrained)
        if kind == "compact":
            compact_path, pretrained = pretrained, None
        elif kind == "openai" and not has_schema:
            openai_path, pretrained = pretrained, None
        elif kind == "clip-layout" and not has_schema:
            _warn_if_openai_architecture(model, pretrained)
    elif pretrained is not None and not has_schema and not os.path.isfile(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise ValueError(
                f"pretrained {pretrained!r} for model {model!r} is neither an open_clip tag nor an existing file; "
                f"allowed: None (random init), a checkpoint file path, 'embedded' (only {EMBEDDED_MODEL!r}), "
                f"or one of the tags {tags}"
            )
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


# --------------------------------------------------------------------------------------------------------------
# The frozen model
# --------------------------------------------------------------------------------------------------------------


class FrozenCLIP(nn.Module):
    """A frozen open_clip model with a prompt-injected text encoder and an image-feature cache.

    Every parameter has ``requires_grad=False`` and the module stays in eval mode (``train()`` is a no-op).

    Attributes:
        model: the wrapped open_clip model.
        model_name: its config name.
        meta: metadata of the loaded compact checkpoint (empty otherwise).
        attention: ``"math"`` (default; plain matmul attention, fully batched by ``torch.func.vmap``) is the only
            implementation of the standard text block here; custom open_clip blocks use their own attention.
        feature_cache: the default :class:`FeatureCache` used by :meth:`image_features`.
    """

    def __init__(self, model: nn.Module, *, model_name: str = "", meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model: open_clip.CLIP | open_clip.CustomTextCLIP = model  # what text_tower accepts
        self.model_name = model_name
        self.meta = dict(meta or {})
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)
        self._tower = text_tower(model)
        self.tokenizer = open_clip.get_tokenizer(model_name) if model_name else open_clip.SimpleTokenizer()
        self.feature_cache = FeatureCache(self)

    # ---- properties ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenCLIP:
        """No-op: the backbone always stays in eval mode."""
        return self

    @property
    def ctx_dim(self) -> int:
        """Token-embedding width d."""
        return int(self._tower.token_embedding.weight.shape[1])

    @property
    def embed_dim(self) -> int:
        """Joint image-text feature dimension."""
        proj = self._tower.text_projection
        if proj is None:
            return self.ctx_dim
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def logit_scale(self) -> float:
        """exp(learned logit scale), as a Python float."""
        return float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])

    @property
    def context_length(self) -> int:
        """Text context length (positions of the positional embedding)."""
        return int(self._tower.positional_embedding.shape[0])

    @property
    def is_causal(self) -> bool:
        """True if the text transformer uses a causal mask and pools at EOT (then truncation after EOT and the
        shared-prefix path are exact)."""
        return self._tower.is_causal

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return self._tower.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the text transformer (fp32, bf16, or float64 after ``.double()``)."""
        return self._tower.transformer.get_cast_dtype()

    @property
    def image_size(self) -> tuple[int, int]:
        """Input image size (H, W)."""
        size = self.model.visual.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FrozenCLIP:
        super()._apply(fn, recurse)
        self._tower = text_tower(self.model)  # the causal-mask buffer is replaced on .to()
        return self

    # ---- text ------------------------------------------------------------------------------------------------
    def _eot_index(self, tokens: Tensor) -> Tensor:
        eot_id = getattr(self.tokenizer, "eot_token_id", None)
        if self._tower.pool_type == "argmax" or eot_id is None:
            return tokens.argmax(dim=-1)
        return (tokens == eot_id).int().argmax(dim=-1)

    def _tokenize(self, texts: list[str]) -> Tensor:
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            for text in texts:
                n = len(encode(text)) + 2
                if n > self.context_length:
                    raise ValueError(
                        f"prompt {text!r} needs {n} tokens, more than the context length {self.context_length}; "
                        "use fewer context tokens or a shorter class name"
                    )
        return self.tokenizer(texts).to(self.device)

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """Frozen token embeddings of token ids, (..., d)."""
        with torch.no_grad():
            return self._tower.token_embedding(tokens.to(self.device))

    def prompt_parts(self, classnames: list[str], n_ctx: int) -> PromptParts:
        """Tokenize ``"X X ... X classname."`` (n_ctx placeholders, as CoOp) and split its embeddings.

        Underscores in class names become spaces (as CoOp).

        Args:
            classnames: class names, n_cls of them.
            n_ctx: number of context vectors, 0 <= n_ctx <= context_length - 3.

        Returns:
            The prompt parts.

        Raises:
            ValueError: bad n_ctx, empty class list, or a prompt that does not fit the context length.
        """
        if not classnames:
            raise ValueError("classnames must be a non-empty list of class names")
        if not isinstance(n_ctx, int) or not 0 <= n_ctx <= self.context_length - 3:
            raise ValueError(f"n_ctx must be an int in [0, {self.context_length - 3}], got {n_ctx!r}")
        names = [name.replace("_", " ") for name in classnames]
        prefix_text = " ".join([_CTX_PLACEHOLDER] * n_ctx)
        texts = [f"{prefix_text} {name}." if n_ctx else f"{name}." for name in names]
        tokens = self._tokenize(texts)  # (n_cls, context_length)
        if n_ctx:
            placeholder = self._tokenize([_CTX_PLACEHOLDER])[0, 1]
            if not bool((tokens[:, 1 : 1 + n_ctx] == placeholder).all()):
                raise ValueError("the context placeholder did not tokenize to one token per context vector")
        emb = self.token_embeddings(tokens)  # (n_cls, context_length, d)
        eot_index = self._eot_index(tokens)
        return PromptParts(
            prefix=emb[:, :1].clone(),
            suffix=emb[:, 1 + n_ctx :].clone(),
            eot_index=eot_index,
            n_ctx=n_ctx,
            tokens=tokens,
            seq_len=int(eot_index.max()) + 1,
        )

    def encode_prompts(self, prompts: Tensor, eot_index: Tensor, *, seq_len: int | None = None) -> Tensor:
        """Text features of prompt embeddings (unnormalised).

        Adds positional embeddings, runs the text transformer with its attention mask, ``ln_final``, takes the
        EOT position (or the tower's pooling position) and applies ``text_projection``. Differentiable w.r.t.
        ``prompts``; the encoder's own weights never get gradients.

        Truncation: for a causal tower that pools at EOT the sequence is cut to ``max(eot_index) + 1`` positions
        before the transformer. This is exact: with causal attention, positions <= EOT never attend to later ones.
        Towers without a causal mask keep the full length (every position attends to every other one).

        Args:
            prompts: (N, L, d) token embeddings, L <= context_length (usually the full context length).
            eot_index: (N,) long, EOT position per sequence.
            seq_len: truncation length if already known (``PromptParts.seq_len``): saves a device sync and allows
                a ``vmap`` over ``eot_index``. Ignored for non-causal towers.

        Returns:
            (N, embed_dim) text features in the model dtype.
        """
        if prompts.dim() != 3 or prompts.shape[-1] != self.ctx_dim:
            raise ValueError(f"prompts must be (N, L, {self.ctx_dim}), got {tuple(prompts.shape)}")
        if prompts.shape[-2] > self.context_length:
            raise ValueError(f"prompts have length {prompts.shape[-2]} > context length {self.context_length}")
        pool = self._tower.pool_type
        if self.is_causal:
            cut = seq_len if seq_len is not None else int(eot_index.max()) + 1
            prompts = prompts[:, : min(cut, prompts.shape[-2])]
            index = eot_index
        elif pool == "first":
            index = torch.zeros_like(eot_index)
        elif pool == "last":
            index = torch.full_like(eot_index, prompts.shape[-2] - 1)
        else:
            index = eot_index
        return text_encoder_forward(self._tower, prompts, index)

    def suffix_pack(self, parts: PromptParts) -> SuffixPack:
        """The class suffixes of ``parts`` (name tokens, '.', EOT: no padding), packed for :meth:`encode_shared`
        behind the shared rows [SOS, ctx_1..ctx_n]."""
        lengths = (parts.eot_index - parts.n_ctx).tolist()  # EOT sits at 1 + n_ctx + (S_c - 1)
        return SuffixPack.build([parts.suffix[c, :S] for c, S in enumerate(lengths)], 1 + parts.n_ctx)

    def encode_shared(self, prefix: Tensor, pack: SuffixPack, *, states: bool = False) -> Any:
        """Text features of the sequences ``[prefix[j]; suffix_c]`` by the shared-prefix path (causal towers only).

        The P prefix rows are computed once per prefix and each suffix only on its own rows
        (:func:`fpl_fast.backbone.text_tower.shared_prefix_forward`); equal to :meth:`encode_prompts` on the assembled
        sequences up to floating-point summation order.

        Args:
            prefix: (N, P, d) shared rows, one set per prefix (e.g. SOS and one client's context).
            pack: the suffixes, :meth:`suffix_pack` or :meth:`SuffixPack.build`.
            states: also return the (N, P + T, width) states after ``ln_final`` of every row.

        Returns:
            (N, n_seq, embed_dim) unnormalised features in the model dtype (and the states with ``states``).

        Raises:
            ValueError: a tower that is not causal or does not pool at EOT; a prefix of the wrong length.
        """
        if prefix.dim() != 3 or prefix.shape[-1] != self.ctx_dim:
            raise ValueError(f"prefix must be (N, P, {self.ctx_dim}), got {tuple(prefix.shape)}")
        return shared_prefix_forward(self._tower, prefix, pack, states=states)

    def encode_text(self, texts: list[str], *, text_path: str = "shared") -> Tensor:
        """Unnormalised features of plain texts, (N, embed_dim), no gradient.

        ``text_path="shared"`` on a causal tower pooling at EOT: the texts' longest common run of leading tokens
        (SOT at least; e.g. SOT and "a photo of a" of a zero-shot template) is encoded once and each text only on its
        remaining tokens (:meth:`encode_shared`); otherwise (``"full"``, or another tower) each text whole through
        :meth:`encode_prompts`. Both give the same features up to floating-point summation order.
        """
        if text_path not in TEXT_PATHS:
            raise ValueError(f"text_path must be one of {', '.join(TEXT_PATHS)}, got {text_path!r}")
        tokens = self._tokenize(texts)
        eot = self._eot_index(tokens)
        with torch.no_grad():
            emb = self.token_embeddings(tokens)
            if text_path == "full" or not self.is_causal:
                return self.encode_prompts(emb, eot)
            # Shared leading positions, short of every text's EOT (each keeps its pooled row).
            same = (tokens == tokens[:1]).all(dim=0).int().cumprod(dim=0)
            shared = min(int(same.sum()), int(eot.min()))
            pack = SuffixPack.build([emb[i, shared : int(e) + 1] for i, e in enumerate(eot.tolist())], shared)
            return self.encode_shared(emb[:1, :shared], pack)[0]

    def zero_shot_weights(
        self,
        classnames: list[str],
        template: str | Sequence[str] = "a photo of a {}.",
        *,
        text_path: str = "shared",
    ) -> Tensor:
        """Normalised text features of hand-written prompts (the zero-shot baseline).

        Args:
            classnames: class names (underscores become spaces).
            template: a format string with one ``{}`` or a list of them (features averaged over templates, then
                renormalised, as CLIP's prompt ensembling).
            text_path: as :meth:`encode_text` (the template's words before ``{}`` are encoded once).

        Returns:
            (n_cls, embed_dim) unit-norm class weights.
        """
        templates = [template] if isinstance(template, str) else list(template)
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"template must be a format string with '{{}}' or a list of them, got {template!r}")
        names = [c.replace("_", " ") for c in classnames]
        per_template = [self.encode_text([t.format(c) for c in names], text_path=text_path) for t in templates]
        return F.normalize(torch.stack([F.normalize(f, dim=-1) for f in per_template]).mean(0), dim=-1)

    # ---- images ----------------------------------------------------------------------------------------------
    def encode_images(self, images: Tensor) -> Tensor:
        """Unnormalised image features of preprocessed images (N, 3, H, W), no gradient, (N, embed_dim)."""
        with torch.no_grad():
            dtype = self.model.visual.conv1.weight.dtype if hasattr(self.model.visual, "conv1") else self.dtype
            return self.model.encode_image(images.to(device=self.device, dtype=dtype))

    def eval_transform(self) -> v2.Compose:
        """Resize (shorter side, bicubic) + center crop to the model size, CLIP mean/std normalisation.

        Accepts PIL images and (C, H, W) tensors (uint8, or float in [0, 1]).
        """
        return self.train_transform(augment=False)

    def train_transform(self, augment: bool) -> v2.Compose:
        """Training transform: with ``augment``, random resized crop (scale 0.08-1, as CoOp/Dassl) and horizontal
        flip, then normalisation; without, the same as :meth:`eval_transform`."""
        cfg = self.model.visual.preprocess_cfg
        size = self.image_size
        interp = v2.InterpolationMode.BICUBIC if cfg.get("interpolation", "bicubic") == "bicubic" else None
        interp = interp or v2.InterpolationMode.BILINEAR
        if augment:
            geometric = [
                v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        else:
            geometric = [v2.Resize(min(size), interpolation=interp, antialias=True), v2.CenterCrop(size)]
        return v2.Compose(
            [
                v2.ToImage(),
                *geometric,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
            ]
        )

    def image_features(
        self,
        dataset_key: str,
        split: str,
        dataset: torch.utils.data.Dataset,
        indices: FeatureIndices | None = None,
        *,
        augment: bool = False,
    ) -> Tensor:
        """Image features through :attr:`feature_cache` (see :meth:`FeatureCache.features`)."""
        return self.feature_cache.features(dataset_key, split, dataset, indices, augment=augment)


class FeatureCache:
    """Image features keyed by (dataset, split, index).

    Without augmentation each image is encoded once (with :meth:`FrozenCLIP.eval_transform`) and its feature is
    reused. With ``augment=True`` features are recomputed at every call with
    :meth:`FrozenCLIP.train_transform` ``(augment=True)`` (fresh random crops/flips from the global torch RNG) and
    nothing is cached.

    With a :class:`~fpl_fast.data.feature_store.FeatureStore` as ``disk``, a split's features are also read from and
    written to disk, keyed by the image encoder's weights, the eval transform, the dataset key, the split and its
    size: a split is then encoded whole, once across processes and runs.

    Args:
        backbone: the frozen model.
        batch_size: images encoded per forward pass.
        disk: an on-disk store shared across processes (None: memory only).
    """

    def __init__(self, backbone: FrozenCLIP, *, batch_size: int = 256, disk: FeatureDisk | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.batch_size = batch_size
        self.disk = disk
        self.encoded_images = 0  # images run through the encoder by this cache (0 when everything came from disk)
        self._store: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    def _disk_key(self, dataset_key: str, split: str, n: int) -> str:
        assert self.disk is not None
        # The visual tower and the eval transform alone decide the image features.
        return self.disk.entry_key(
            self.backbone.model.visual,
            transform=repr(self.backbone.eval_transform()),
            dataset=dataset_key,
            split=split,
            rows=n,
        )

    def clear(self) -> None:
        """Drop every cached feature."""
        self._store.clear()

    def __len__(self) -> int:
        return sum(int(done.sum()) for _, done in self._store.values())

    def _encode(self, dataset: torch.utils.data.Dataset, idx: list[int], transform: Callable[[Any], Tensor]) -> Tensor:
        out = []
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start : start + self.batch_size]
            images = torch.stack([transform(dataset[i][0]) for i in chunk])
            out.append(self.backbone.encode_images(images).float())
            self.encoded_images += len(chunk)
        if not out:
            return torch.empty(0, self.backbone.embed_dim, device=self.backbone.device)
        return torch.cat(out)

    def features(
        self,
        dataset_key: str,
        split: str,
        dataset: torch.utils.data.Dataset,
        indices: FeatureIndices | None = None,
        *,
        augment: bool = False,
    ) -> Tensor:
        """Unnormalised float32 features of ``dataset[i]`` for i in ``indices`` (all if None), (len, embed_dim).

        Args:
            dataset_key: name of the dataset (cache key).
            split: split name (cache key).
            dataset: items are ``(image, label)``; images are PIL or (C, H, W) tensors, not yet normalised.
            indices: which items.
            augment: recompute with random augmentation instead of using the cache.
        """
        n = len(dataset)  # type: ignore[arg-type]
        idx = list(range(n)) if indices is None else [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if any(not 0 <= i < n for i in idx):
            raise ValueError(f"indices must lie in [0, {n}) for dataset {dataset_key!r} split {split!r}")
        if augment:
            return self._encode(dataset, idx, self.backbone.train_transform(augment=True))
        key = (dataset_key, split)
        if key not in self._store:
            feats = torch.zeros(n, self.backbone.embed_dim, device=self.backbone.device)
            done = torch.zeros(n, dtype=torch.bool)
            saved = self.disk.load(self._disk_key(dataset_key, split, n), rows=n) if self.disk is not None else None
            if saved is not None and saved.shape[1] == feats.shape[1]:
                feats, done = saved.to(feats.device), torch.ones(n, dtype=torch.bool)
            self._store[key] = (feats, done)
        feats, done = self._store[key]
        wanted = range(n) if self.disk is not None else idx  # with a disk store: the whole split, to save it
        missing = [] if bool(done.all()) else sorted({i for i in wanted if not done[i]})
        if missing:
            feats[missing] = self._encode(dataset, missing, self.backbone.eval_transform())
            done[missing] = True
            if self.disk is not None:
                meta = {"dataset": dataset_key, "split": split, "model": self.backbone.model_name}
                self.disk.save(self._disk_key(dataset_key, split, n), feats, meta)
        return feats[idx]


if TYPE_CHECKING:

    def _frozen_clip_is_a_backbone(backbone: FrozenCLIP) -> Backbone:
        return backbone  # mypy checks here that FrozenCLIP satisfies the Backbone protocol
