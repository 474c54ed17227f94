"""Test sets with class names of their own, beyond the clients' splits: what the evaluation protocols other than
``personal`` score the trained prompts on (base2novel's novel classes, xdataset's and xdomain's target datasets;
:mod:`fpl_fast.methods.protocols`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EvalSet", "set_accuracies"]

# Test images scored per matmul: bounds the (images, classes) logits of a large set (ImageNet-Sketch: 50,889 images
# against 1,000 class names) to a few hundred MB.
_CHUNK = 4096


@dataclass(frozen=True)
class EvalSet:
    """A labelled test set and the class names its labels index.

    Attributes:
        name: what it is (a dataset's name, or "novel").
        classnames: class names in label order.
        feats: (M, D) image features by the frozen image encoder (not normalised).
        labels: (M,) int64 labels into ``classnames``.
    """

    name: str
    classnames: list[str]
    feats: Tensor
    labels: Tensor


@torch.no_grad()
def set_accuracies(text: Tensor, feats: Tensor, labels: Tensor) -> list[float]:
    """Accuracy of each prompt on the whole set: ``text`` (P, n_cls, D) normalised text features, one row per prompt
    (the global prompt, or every client's); ``feats`` (M, D) image features, ``labels`` (M,). Returns P floats."""
    labels = labels.to(text.device)
    correct = torch.zeros(text.shape[0], dtype=torch.long, device=text.device)
    for start in range(0, len(labels), _CHUNK):
        x = F.normalize(feats[start : start + _CHUNK].to(text.device, text.dtype), dim=-1)
        pred = torch.einsum("nd,pcd->pnc", x, text).argmax(-1)
        correct += (pred == labels[start : start + _CHUNK][None]).sum(1)
    return (correct.double() / max(len(labels), 1)).tolist()
