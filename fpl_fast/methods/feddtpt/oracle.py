"""The label-only black-box oracle (F1) and the vocabulary its prompts are drawn from (F2)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PAD_ID", "Oracle", "allowed_vocabulary", "token_table"]

PAD_ID = 0  # open_clip pads token sequences with id 0


def token_table(backbone: Any) -> Tensor:
    """The static token-embedding table z of a FrozenCLIP's text tower, (V, d) float32 on the CPU."""
    from fpl_fast.backbone.text_tower import text_tower

    return text_tower(backbone.model).token_embedding.weight.detach().float().cpu()


def allowed_vocabulary(tokenizer: Any, *, words_only: bool = False) -> Tensor:
    """The allowed vocabulary V_a: every BPE id except SOT, EOT and the pad id 0.

    Args:
        tokenizer: an open_clip ``SimpleTokenizer`` (it has ``encoder``, ``sot_token_id``, ``eot_token_id``).
        words_only: keep only alphabetic ASCII tokens that end a word (``</w>``).

    Returns:
        (A,) sorted long ids.
    """
    encoder = getattr(tokenizer, "encoder", None)
    if not isinstance(encoder, dict):
        raise ValueError(f"FedDTPT needs a CLIP BPE tokenizer with an 'encoder' table, got {type(tokenizer).__name__}")
    special = {int(tokenizer.sot_token_id), int(tokenizer.eot_token_id), PAD_ID}
    ids = []
    for token, i in encoder.items():
        if i in special:
            continue
        if words_only:
            word = token[:-4] if token.endswith("</w>") else ""
            if not (word.isascii() and word.isalpha()):
                continue
        ids.append(int(i))
    return torch.as_tensor(sorted(ids), dtype=torch.long)


class Oracle:
    """Label-only black-box classifier around a frozen CLIP (F1).

    Images are registered once per split (the simulation caches their features: the "API" sees the images, the
    caller only names them by index). :meth:`predict` and :meth:`predict_many` return predicted class indices
    (``torch.long``) and nothing else: no scores, features or logits are reachable through the public interface.

    Query accounting: ``queries`` grows by 1 per (prompt, image) evaluation; ``text_encodings`` by C (the number of
    classes) per prompt whose class texts were not encoded before (text features are cached per prompt), whichever
    text path computes them.

    The class texts of one prompt are ``[SOT, prompt, classname, '.', EOT]``: on a causal tower pooling at EOT the
    shared-prefix path (``text_path="shared"``) encodes [SOT, prompt] once per prompt and each class only on its own
    name tokens (:meth:`FrozenCLIP.encode_shared`); other towers, or ``text_path="full"``, encode
    each class text whole.

    Args:
        backbone: a :class:`fpl_fast.backbone.model.FrozenCLIP`.
        classnames: class names in label order (underscores become spaces).
        cache_size: prompts whose text features are kept (least recently used dropped first).
        chunk: text sequences (prompt x class pairs) per encoder call.
        text_path: ``"shared"`` (where the tower allows it) or ``"full"``.
    """

    def __init__(
        self,
        backbone: Any,
        classnames: Sequence[str],
        *,
        cache_size: int = 4096,
        chunk: int = 1024,
        text_path: str = "shared",
    ) -> None:
        if not classnames:
            raise ValueError("classnames must be a non-empty list of class names")
        self._backbone = backbone
        tok = backbone.tokenizer
        self._sot = int(tok.sot_token_id)
        self._eot = int(tok.eot_token_id)
        self._context = int(backbone.context_length)
        self._vocab = int(token_table(backbone).shape[0])
        self._class_ids = [list(tok.encode(f"{c.replace('_', ' ')}.")) for c in classnames]
        self.num_classes = len(self._class_ids)
        self._images: dict[str, Tensor] = {}
        self._text: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._chunk = chunk
        self._shared = text_path == "shared" and bool(backbone.is_causal)
        self._packs: dict[int, Any] = {}  # shared path: the class suffixes packed behind prefixes of each length
        self.queries = 0
        self.text_encodings = 0

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt that fits the context with every class name."""
        return self._context - 2 - max(len(c) for c in self._class_ids)

    def register(self, split: str, dataset: torch.utils.data.Dataset, *, dataset_key: str = "data") -> None:
        """Make the images of ``dataset`` (items ``(image, label)``) available as ``split``; labels are ignored."""
        feats = self._backbone.image_features(dataset_key, split, dataset)
        self._images[split] = F.normalize(feats.float(), dim=-1)

    def num_images(self, split: str) -> int:
        """Number of registered images of ``split``."""
        return int(self._split(split).shape[0])

    def _split(self, split: str) -> Tensor:
        if split not in self._images:
            raise ValueError(f"split must be one of the registered splits {sorted(self._images)}, got {split!r}")
        return self._images[split]

    def _check_prompt(self, ids: Sequence[int]) -> tuple[int, ...]:
        key = tuple(int(i) for i in ids)
        if not key:
            raise ValueError("a prompt must hold at least one token id")
        if len(key) > self.max_prompt_len:
            raise ValueError(f"prompt length must be <= {self.max_prompt_len} for these class names, got {len(key)}")
        if min(key) < 0 or max(key) >= self._vocab or self._sot in key or self._eot in key:
            raise ValueError(f"prompt ids must lie in [0, {self._vocab}) without SOT/EOT, got {list(key)}")
        return key

    def _encode_full(self, prompts: list[tuple[int, ...]]) -> Tensor:
        """(U, C, D) features of every class text of each prompt, each text whole."""
        rows, eots = [], []
        for p in prompts:
            for cls in self._class_ids:
                seq = [self._sot, *p, *cls, self._eot]
                eots.append(len(seq) - 1)
                rows.append(seq + [PAD_ID] * (self._context - len(seq)))
        tokens = torch.as_tensor(rows, dtype=torch.long)  # (U * C, context_length)
        eot = torch.as_tensor(eots, dtype=torch.long)
        feats = []
        for s in range(0, len(rows), self._chunk):
            emb = self._backbone.token_embeddings(tokens[s : s + self._chunk])
            feats.append(self._backbone.encode_prompts(emb, eot[s : s + self._chunk].to(emb.device)).float())
        return torch.cat(feats).reshape(len(prompts), self.num_classes, -1)

    def _encode_shared(self, prompts: list[tuple[int, ...]]) -> Tensor:
        """(U, C, D) features of every class text of each prompt: [SOT, prompt] once per prompt (prompts of one
        length in one call per chunk), the class suffixes [classname, '.', EOT] packed behind it."""
        from fpl_fast.backbone.text_tower import SuffixPack

        by_len: dict[int, list[int]] = {}
        for j, p in enumerate(prompts):
            by_len.setdefault(1 + len(p), []).append(j)
        out = torch.empty(len(prompts), self.num_classes, self._backbone.embed_dim, device=self._backbone.device)
        step = max(1, self._chunk // self.num_classes)
        for P, members in by_len.items():
            if P not in self._packs:
                suffixes = [self._backbone.token_embeddings(torch.as_tensor([*c, self._eot])) for c in self._class_ids]
                self._packs[P] = SuffixPack.build(suffixes, P)
            for s in range(0, len(members), step):
                part = members[s : s + step]
                prefix = self._backbone.token_embeddings(torch.as_tensor([[self._sot, *prompts[j]] for j in part]))
                out[part] = self._backbone.encode_shared(prefix, self._packs[P]).float()
        return out

    @torch.no_grad()
    def _encode(self, prompts: list[tuple[int, ...]]) -> None:
        """Encode the class texts of prompts that are not cached, all in as few encoder calls as possible."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            feats = self._encode_shared(new) if self._shared else self._encode_full(new)
            text = F.normalize(feats, dim=-1)  # (U, C, D)
            for p, t in zip(new, text, strict=True):
                self._text[p] = t
            self.text_encodings += len(new) * self.num_classes
        for p in prompts:
            self._text.move_to_end(p)
        while len(self._text) > max(self._cache_size, len(set(prompts))):
            self._text.popitem(last=False)

    @torch.no_grad()
    def predict_many(
        self, prompts: Sequence[Sequence[int]], split: str, indices: Sequence[int] | np.ndarray | Tensor
    ) -> Tensor:
        """Predicted labels of images ``indices`` of ``split`` under each prompt.

        Args:
            prompts: P prompts (token-id lists).
            split: a registered split.
            indices: B image indices.

        Returns:
            (P, B) ``torch.long`` predicted class indices.
        """
        keys = [self._check_prompt(p) for p in prompts]
        images = self._split(split)
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= images.shape[0]):
            raise ValueError(f"indices must lie in [0, {images.shape[0]}) for split {split!r}")
        if not keys:
            return torch.zeros(0, idx.numel(), dtype=torch.long)
        self._encode(keys)
        text = torch.stack([self._text[k] for k in keys])  # (P, C, D)
        x = images[idx.to(images.device)]  # (B, D)
        pred = torch.einsum("bd,pcd->pbc", x, text.to(x.device)).argmax(-1)  # (P, B)
        self.queries += len(keys) * idx.numel()
        return pred.to(device="cpu", dtype=torch.long)

    def predict(
        self, prompt_ids: Sequence[int] | Tensor, split: str, indices: Sequence[int] | np.ndarray | Tensor
    ) -> Tensor:
        """Predicted labels (B,) ``torch.long`` of images ``indices`` of ``split`` under one prompt."""
        ids = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else prompt_ids
        return self.predict_many([ids], split, indices)[0]
