"""The image-feature cache of a frozen CLIP: each image encoded once, optionally once across processes (on disk)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fpl_fast.backbone.protocol import FeatureDisk, FeatureIndices

if TYPE_CHECKING:
    from fpl_fast.backbone.model import FrozenCLIP

__all__ = ["FeatureCache"]


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
