"""The interface of a frozen backbone, as a typing protocol (no open_clip import: cheap to import for annotations).

:class:`Backbone` lists the members that the federated simulation, the methods (FedDTPT, RAPT), the attacks and the
pretraining recipes use from :class:`fpl_fast.backbone.model.FrozenCLIP`, which satisfies it structurally. Annotate a
``backbone`` parameter with it instead of the concrete class::

    from fpl_fast.backbone.protocol import Backbone

    def zero_shot(backbone: Backbone, classnames: list[str]) -> Tensor: ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

__all__ = ["TEXT_PATHS", "Backbone", "FeatureDisk", "FeatureIndices", "ImageFeatureCache", "PromptParts"]

# How class prompts go through the tower: the prompt prefix once per client ("shared") or each prompt whole.
TEXT_PATHS = ("shared", "full")

FeatureIndices: TypeAlias = Sequence[int] | Tensor | npt.NDArray[np.integer[Any]]
"""Dataset indices accepted by :meth:`Backbone.image_features`: a sequence of ints, a tensor or an integer array."""


@dataclass(frozen=True)
class PromptParts:
    """Frozen pieces of the CoOp prompts of a list of classes.

    The full prompt of class k is ``cat([prefix[k], ctx, suffix[k]])`` of length ``1 + n_ctx + S``.

    Attributes:
        prefix: (n_cls, 1, d) SOT embedding.
        suffix: (n_cls, S, d) embeddings of ``"classname ."``, EOT and padding; S = context_length - 1 - n_ctx.
        eot_index: (n_cls,) long, position of EOT in the full sequence.
        n_ctx: number of context vectors.
        tokens: (n_cls, context_length) the token ids of ``"X X ... X classname."``.
        seq_len: max(eot_index) + 1, the exact truncation length for causal towers.
    """

    prefix: Tensor
    suffix: Tensor
    eot_index: Tensor
    n_ctx: int
    tokens: Tensor
    seq_len: int

    def assemble(self, ctx: Tensor) -> Tensor:
        """Build ``[prefix | ctx | suffix]``.

        Args:
            ctx: (n_ctx, d) shared or (n_cls, n_ctx, d) per-class context.

        Returns:
            (n_cls, 1 + n_ctx + S, d) prompts.
        """
        n_cls = self.prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
        return torch.cat([self.prefix.to(ctx.dtype), ctx, self.suffix.to(ctx.dtype)], dim=1)


class FeatureDisk(Protocol):
    """An on-disk feature store as the image-feature cache sees it (``fpl_fast.data.feature_store.FeatureStore``)."""

    def entry_key(self, encoder: nn.Module, **parts: Any) -> str: ...

    def load(self, key: str, *, rows: int) -> Tensor | None: ...

    def save(self, key: str, feats: Tensor, meta: dict[str, Any] | None = None) -> Any: ...


class ImageFeatureCache(Protocol):
    """What the application layer sets on a backbone's feature cache: its disk store; and what it counts."""

    disk: FeatureDisk | None
    encoded_images: int


class Backbone(Protocol):
    """A frozen CLIP-like model with a prompt-injected text encoder and cached image features.

    Gradients flow only into the prompts passed to :meth:`encode_prompts`; the model's own weights are frozen.
    See :class:`fpl_fast.backbone.model.FrozenCLIP` for the semantics of each member.
    """

    @property
    def model(self) -> nn.Module:
        """The wrapped open_clip model (its text tower is read with :func:`fpl_fast.backbone.text_tower`)."""
        ...

    @property
    def feature_cache(self) -> ImageFeatureCache:
        """The image-feature cache behind :meth:`image_features` (its ``disk`` store may be set)."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The open_clip tokenizer: ``tokenizer(texts) -> (N, context_length)`` token ids."""
        ...

    @property
    def ctx_dim(self) -> int:
        """Token-embedding width d."""
        ...

    @property
    def embed_dim(self) -> int:
        """Joint image-text feature dimension."""
        ...

    @property
    def logit_scale(self) -> float:
        """exp(learned logit scale)."""
        ...

    @property
    def context_length(self) -> int:
        """Text context length."""
        ...

    @property
    def is_causal(self) -> bool:
        """True if the text transformer is causal and pools at EOT (prompt truncation is exact)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        ...

    @property
    def image_size(self) -> tuple[int, int]:
        """Input image size (H, W)."""
        ...

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """Frozen token embeddings of token ids, (..., d)."""
        ...

    def prompt_parts(self, classnames: list[str], n_ctx: int) -> PromptParts:
        """The frozen prefix/suffix embeddings of the CoOp prompts ``"X .. X classname."``."""
        ...

    def encode_prompts(self, prompts: Tensor, eot_index: Tensor, *, seq_len: int | None = None) -> Tensor:
        """Unnormalised text features of (N, L, d) prompt embeddings, (N, embed_dim); differentiable in prompts."""
        ...

    def suffix_pack(self, parts: PromptParts) -> Any:
        """The class suffixes of ``parts`` packed for :meth:`encode_shared` (a ``text_tower.SuffixPack``)."""
        ...

    def encode_shared(self, prefix: Tensor, pack: Any, *, states: bool = False) -> Any:
        """Features (N, n_seq, embed_dim) of sequences sharing the (N, P, d) prefix rows; causal towers only."""
        ...

    def encode_text(self, texts: list[str], *, text_path: str = ...) -> Tensor:
        """Unnormalised text features of plain texts, (N, embed_dim), no gradient."""
        ...

    def zero_shot_weights(
        self, classnames: list[str], template: str | Sequence[str] = ..., *, text_path: str = ...
    ) -> Tensor:
        """Unit-norm text features of hand-written prompts, (n_cls, embed_dim)."""
        ...

    def image_features(
        self,
        dataset_key: str,
        split: str,
        dataset: torch.utils.data.Dataset,
        indices: FeatureIndices | None = None,
        *,
        augment: bool = False,
    ) -> Tensor:
        """Unnormalised float32 image features of ``dataset[i]`` for i in ``indices`` (all if None)."""
        ...
