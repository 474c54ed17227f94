"""Image features on disk, shared by runs, grid cells and the processes of a federation's node.

One file per (image-encoder weights, transform, dataset, split, number of items): the key is a SHA-256 of all
of them, so a change of any one encodes afresh instead of reusing stale features. Writes are atomic (a private
temporary file in the same folder, fsynced, then renamed over the entry), so concurrent writers of one entry
leave one complete file, never a mixture; each entry carries the SHA-256 of its features, and an entry that does
not load or does not match (a crash mid-copy, a truncated disk) is treated as missing and written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FeatureStore", "weights_fingerprint"]

FORMAT = 1


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a module's parameters and buffers (its identity as an
    encoder, whatever file or tag it was loaded from)."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest(feats: Tensor) -> str:
    return hashlib.sha256(feats.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class FeatureStore:
    """A folder of cached feature matrices.

    Args:
        root: the folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._fingerprints: dict[int, str] = {}  # id(encoder) -> weights_fingerprint, computed once per encoder

    def entry_key(self, encoder: nn.Module, **parts: Any) -> str:
        """The entry name of features of ``encoder`` (by its weights) and the identifying ``parts`` (transform,
        dataset, split, rows, ...)."""
        if id(encoder) not in self._fingerprints:
            self._fingerprints[id(encoder)] = weights_fingerprint(encoder)
        named = {"weights": self._fingerprints[id(encoder)], **parts}
        return hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str, *, rows: int) -> Tensor | None:
        """The entry's (rows, D) features, or None when it is missing, unreadable, of another shape or corrupt."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            feats = entry["feats"]
            ok = entry.get("format") == FORMAT and feats.dim() == 2 and feats.shape[0] == rows
            ok = ok and entry.get("sha256") == _digest(feats)
        except Exception as exc:  # a truncated or foreign file: encode again
            warnings.warn(
                f"feature cache entry {path} is unreadable ({type(exc).__name__}); encoding again", stacklevel=2
            )
            return None
        if not ok:
            warnings.warn(
                f"feature cache entry {path} does not match its checksum or shape; encoding again", stacklevel=2
            )
            return None
        return feats

    def save(self, key: str, feats: Tensor, meta: dict[str, Any] | None = None) -> Path:
        """Write the entry atomically (temporary file + fsync + rename); returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        feats = feats.detach().to("cpu").contiguous()
        entry = {"format": FORMAT, "feats": feats, "sha256": _digest(feats), "meta": dict(meta or {})}
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(entry, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path(key)
