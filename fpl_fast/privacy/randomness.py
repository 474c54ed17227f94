"""Who owns which randomness: one secret key per party (each client, the server) for its noise and its sampling.

The Gaussian noise of a DP mechanism protects only against someone who cannot regenerate it, and the
amplification by subsampling only against someone who does not know which examples a batch held. So by default
every party draws its keys from the operating system's CSPRNG (:mod:`secrets`); the keys are never written to
results or logs, only into that party's part of a checkpoint (so ``--resume`` continues exactly). With
``noise_seed`` (``--noise-seed N``) the keys are derived from N instead, for reproducible research: the guarantee
then does not hold against anyone who knows N.

Security assumption (stated in the README): 63-bit keys; noise from Philox4x32-10 (csrc/philox.h) and sampling
from NumPy's PCG64, which are fast, well-tested counter/permutation generators but not proven cryptographic ones.

Randomness that need not be secret (prompt initialisation, data splits, the evaluation's factorisation) stays on
the public ``--seed``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np

from fpl_fast.privacy.noise_stream import NoiseStream

__all__ = ["KEY_BITS", "derive_key", "party_key", "PartyRandomness", "randomness_statement"]

KEY_BITS = 63  # the ops take int64 seeds


def derive_key(*parts: object) -> int:
    """A 63-bit key from public parts (BLAKE2b of their text): distinct parts give independent-looking keys."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8, person=b"fpl_fast").digest(), "little") >> 1


def party_key(noise_seed: int | None, party: str, purpose: str) -> int:
    """The key of one party's stream: secret (OS CSPRNG) when ``noise_seed`` is None, else derived from it."""
    if noise_seed is None:
        return secrets.randbits(KEY_BITS)
    return derive_key("noise-seed", noise_seed, party, purpose)


@dataclass
class PartyRandomness:
    """One party's private randomness: a Philox noise stream and a sampling generator, from two keys.

    Attributes:
        noise: the party's Gaussian-noise stream (also its low-rank factorisation draws).
        sampling: the party's batch sampling (Poisson masks, shuffles) or, for the server, client sampling.
    """

    noise: NoiseStream
    sampling: np.random.Generator

    @classmethod
    def create(cls, party: str, noise_seed: int | None) -> PartyRandomness:
        noise = NoiseStream(party_key(noise_seed, party, "noise"))
        sampling = np.random.Generator(np.random.PCG64(party_key(noise_seed, party, "sampling")))
        return cls(noise, sampling)

    def state_dict(self) -> dict:
        """The party's part of a checkpoint (holds its keys: never put it in results or logs)."""
        return {"noise": self.noise.state_dict(), "sampling": self.sampling.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.noise.load_state_dict(state["noise"])
        self.sampling.bit_generator.state = state["sampling"]


GENERATORS = "Philox4x32-10 for noise, PCG64 for sampling, 63-bit keys (fast, not proven cryptographic)"


def randomness_statement(noise_seed: int | None, generators: str = GENERATORS) -> dict[str, str]:
    """What results.json says about the noise and sampling randomness (never the keys)."""
    if noise_seed is None:
        return {
            "noise_and_sampling": "secret",
            "keys": "drawn per party (each client, the server) from the OS CSPRNG; not recorded here",
            "generators": generators,
        }
    return {
        "noise_and_sampling": "reproducible",
        "keys": f"derived from --noise-seed {noise_seed}",
        "generators": generators,
        "warning": f"the DP guarantee does NOT hold against anyone who knows --noise-seed {noise_seed}: "
        "they can regenerate the noise and the batches",
    }
