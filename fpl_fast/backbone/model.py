"""The frozen CLIP: an open_clip model with a prompt-injected text encoder and an image-feature cache.

The text encoder is exposed as a function of *token embeddings* rather than token ids, so that learned context
vectors can be spliced in (CoOp): for class k the input is ``[SOT] ctx_1..ctx_n [classname_k .] [EOT] [pad..]``.
Everything here is frozen: parameters never require gradients and gradients only flow into the prompts passed to
:meth:`FrozenCLIP.encode_prompts`.

The text tower itself runs in :mod:`fpl_fast.backbone.text_tower` (plain tensor ops that ``torch.func`` batches fully):
:meth:`FrozenCLIP.encode_prompts` takes whole sequences (the full path), :meth:`FrozenCLIP.encode_shared` takes
sequences that share their first rows, as the class prompts of one client do (the shared-prefix path). Build one with
:func:`fpl_fast.backbone.loading.load_backbone`; image features are cached by
:class:`fpl_fast.backbone.feature_cache.FeatureCache`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

import fpl_fast.backbone.shipped_models  # noqa: F401 - registers the shipped configs, which the tokenizer lookup needs
from fpl_fast.backbone.feature_cache import FeatureCache
from fpl_fast.backbone.protocol import TEXT_PATHS, Backbone, FeatureIndices, PromptParts
from fpl_fast.backbone.text_tower import SuffixPack, shared_prefix_forward, text_encoder_forward, text_tower

__all__ = ["FrozenCLIP"]

_CTX_PLACEHOLDER = "X"


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


if TYPE_CHECKING:

    def _frozen_clip_is_a_backbone(backbone: FrozenCLIP) -> Backbone:
        return backbone  # mypy checks here that FrozenCLIP satisfies the Backbone protocol
