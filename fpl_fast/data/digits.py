"""The embedded default data: scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes).

A fixed, seeded, class-stratified split keeps the data used to pretrain the embedded tiny CLIP apart from the
data of the federated runs:

=============  ======  =====================================================================
part           images  use
=============  ======  =====================================================================
``pretrain``     797   only to pretrain the tiny CLIP (``fpl_fast.data.pretrain_tiny_clip``)
``train``        600   federated training data (partitioned over clients)
``test``         400   federated test data
=============  ======  =====================================================================

The ``pretrain`` part is public (no client's data): ``tune_train`` (400) and ``tune_test`` (397) split it again, for
hyper-parameter tuning without spending any client's privacy (the dataset ``digits-tune``).

Images are scaled to [0, 1], upsampled (bilinear) to ``image_size`` and repeated to 3 channels; they are returned
as float (3, H, W) tensors, not yet normalised (the backbone's transforms normalise them).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DIGIT_CLASSNAMES", "DigitsDataset", "PART_SIZES", "SPLIT_SEED", "TUNE_SIZES", "digits_indices"]

DIGIT_CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT_SEED = 2501
PART_SIZES = {"pretrain": 797, "train": 600, "test": 400}
TUNE_SIZES = {"tune_train": 400, "tune_test": 397}  # a split of the public pretrain part
_PARTS = (*PART_SIZES, *TUNE_SIZES)


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


@lru_cache(maxsize=1)
def _split() -> dict[str, np.ndarray]:
    _, labels = _raw()
    all_idx = np.arange(len(labels))
    fed_size = PART_SIZES["train"] + PART_SIZES["test"]
    pre, fed = train_test_split(all_idx, test_size=fed_size, stratify=labels, random_state=SPLIT_SEED)
    train, test = train_test_split(fed, test_size=PART_SIZES["test"], stratify=labels[fed], random_state=SPLIT_SEED + 1)
    tune_train, tune_test = train_test_split(
        pre, test_size=TUNE_SIZES["tune_test"], stratify=labels[pre], random_state=SPLIT_SEED + 2
    )
    return {
        "pretrain": np.sort(pre),
        "train": np.sort(train),
        "test": np.sort(test),
        "tune_train": np.sort(tune_train),
        "tune_test": np.sort(tune_test),
    }


def digits_indices(part: str) -> np.ndarray:
    """Indices into ``sklearn.datasets.load_digits()`` of one part (``"pretrain"``, ``"train"``, ``"test"``,
    ``"tune_train"``, ``"tune_test"``)."""
    if part not in _PARTS:
        raise ValueError(f"digits part must be one of {_PARTS}, got {part!r}")
    return _split()[part].copy()


class DigitsDataset(Dataset):
    """One part of the digits split.

    Args:
        part: ``"pretrain"``, ``"train"`` or ``"test"``.
        image_size: output side length in pixels (the model input size; 32 for the tiny CLIP).

    Attributes:
        images: (N, 1, image_size, image_size) float32 in [0, 1].
        labels: (N,) int64 numpy array.
        indices: (N,) indices into ``load_digits()``.
        classnames: ``"zero"`` .. ``"nine"``.
    """

    def __init__(self, part: str = "train", *, image_size: int = 32) -> None:
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        images, labels = _raw()
        self.part = part
        self.indices = digits_indices(part)
        small = torch.from_numpy(images[self.indices]).unsqueeze(1)  # (N, 1, 8, 8)
        self.images: Tensor = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = self.images.clamp_(0.0, 1.0)
        self.labels: np.ndarray = labels[self.indices]
        self.classnames = list(DIGIT_CLASSNAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].expand(3, -1, -1), int(self.labels[i])
