"""Per-party Philox noise streams: non-overlapping (seed, offset) slices for the noise ops, checkpointable."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fpl_fast import ops
from fpl_fast.validation import check

__all__ = ["NoiseStream", "take_each"]

_SEED_BOUND = 2**63 - 1  # the ops take int64 seeds and offsets


class NoiseStream:
    """Hands out non-overlapping (seed, offset) slices of one Philox4x32-10 stream.

    Each Philox counter yields 4 normals, so a draw of ``numel`` normals at (seed, offset) uses
    counters offset .. offset + ceil(numel / 4) - 1; :meth:`take` returns the current offset and
    advances it past them, so successive calls never reuse noise, and a run is reproducible from one
    seed. The state is just (seed, offset), for checkpoints.

    Args:
        generator: an int seed in [0, 2^63), or a ``torch.Generator`` from which the seed is drawn.
        offset: the first free counter (0 for a fresh stream).
    """

    def __init__(self, generator: torch.Generator | int, offset: int = 0) -> None:
        if isinstance(generator, torch.Generator):
            seed = int(torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=generator.device).item())
        elif isinstance(generator, int) and not isinstance(generator, bool):
            seed = generator
        else:
            raise ValueError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
        check(0 <= seed < _SEED_BOUND, f"seed must be in [0, 2^63), got {seed}")
        check(isinstance(offset, int) and 0 <= offset < _SEED_BOUND, f"offset must be in [0, 2^63), got {offset}")
        self._seed = seed
        self._offset = offset

    @property
    def seed(self) -> int:
        """The Philox key."""
        return self._seed

    @property
    def offset(self) -> int:
        """The next free counter."""
        return self._offset

    @staticmethod
    def counters(numel: int) -> int:
        """Philox counters a draw of ``numel`` normals consumes: ceil(numel / 4)."""
        return (numel + 3) // 4

    def take(self, numel: int) -> tuple[int, int]:
        """Reserve ``numel`` normals; returns the (seed, offset) to pass to the op.

        Args:
            numel: normals the next op call draws (``reference.dp_noise_numel`` /
                ``reference.factorize_noise_numel``; 0 when it draws none).
        """
        check(isinstance(numel, int) and numel >= 0, f"numel must be an integer >= 0, got {numel!r}")
        out = (self._seed, self._offset)
        self._offset += self.counters(numel)
        check(self._offset < _SEED_BOUND, f"noise stream exhausted at offset {self._offset}")
        return out

    def normal(self, numel: int, device: torch.device | str = "cpu") -> Tensor:
        """``numel`` fresh N(0, 1) float32 normals from the stream (``reference.philox_normal``)."""
        seed, offset = self.take(numel)
        return ops.philox_normal(seed, offset, numel, device)

    def state(self) -> tuple[int, int]:
        """(seed, offset): everything needed to resume."""
        return self._seed, self._offset

    @classmethod
    def from_state(cls, state: tuple[int, int]) -> NoiseStream:
        """The stream saved by :meth:`state`."""
        seed, offset = state
        return cls(int(seed), offset=int(offset))

    def state_dict(self) -> dict[str, int]:
        """Checkpointable form of :meth:`state`."""
        return {"seed": self._seed, "offset": self._offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from :meth:`state_dict`."""
        restored = NoiseStream(int(state["seed"]), offset=int(state["offset"]))
        self._seed, self._offset = restored.state()

    def __repr__(self) -> str:
        return f"NoiseStream(offset={self._offset})"  # never the key: reprs end up in logs


def take_each(streams: Sequence[NoiseStream], numel: int) -> tuple[list[int], list[int]]:
    """Reserve ``numel`` normals from each client's stream: the (seed, offset) lists the noise ops take."""
    taken = [s.take(numel) for s in streams]
    return [t[0] for t in taken], [t[1] for t in taken]
