"""Seeds derived from (base seed, purpose, ids...): never from rank, batch size or call order."""

from __future__ import annotations

import zlib

import numpy as np


def derive(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints and strings (strings hashed with crc32)."""
    words = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def rng(*parts: int | str) -> np.random.Generator:
    return np.random.default_rng(derive(*parts))


def torch_generator(*parts: int | str, device: str = "cpu"):
    import torch

    return torch.Generator(device=device).manual_seed(derive(*parts))
