"""The one seed-derivation scheme: every random stream comes from (base seed, purpose, ids...).

A purpose is a string (hashed with CRC-32) or a fixed integer tag; ids are non-negative integers
(client, round, class, sample index, epoch, step...). The tuple becomes a
``numpy.random.SeedSequence``, from which come numpy generators (:func:`rng`), 63-bit torch seeds
(:func:`derive`) and raw 64-bit words (:func:`state_words`). Nothing derives from a rank, a
batch size or the order of calls, so results do not depend on them.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np


def _entropy(parts: tuple[int | str, ...]) -> list[int]:
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(zlib.crc32(p.encode()))
        else:
            v = int(p)
            if v < 0:
                raise ValueError(f"seed parts must be >= 0, got {v}")
            out.append(v)
    return out


def sequence(*parts: int | str) -> np.random.SeedSequence:
    return np.random.SeedSequence(_entropy(parts))


def derive(*parts: int | str) -> int:
    """A 63-bit seed (for torch.manual_seed / torch.Generator) from (seed, purpose, ids...)."""
    return int(sequence(*parts).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def rng(*parts: int | str) -> np.random.Generator:
    """A numpy generator for (seed, purpose, ids...)."""
    return np.random.default_rng(sequence(*parts))


def state_words(*parts: int | str, n: int = 4) -> np.ndarray:
    """`n` uint64 words for (seed, purpose, ids...) (the synthesis plan draws from these)."""
    return sequence(*parts).generate_state(n, np.uint64)


def torch_generator(*parts: int | str, device: str = "cpu") -> Any:
    import torch

    return torch.Generator(device=device).manual_seed(derive(*parts))
