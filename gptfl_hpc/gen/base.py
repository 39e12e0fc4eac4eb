"""Argument checks shared by every sampler (class-conditional UNet, DiT, text-to-image)."""

from __future__ import annotations

import numpy as np

from gptfl_hpc.errors import ModelError


def check_sampler_args(what: str, out_shape: tuple, steps: int) -> tuple[tuple[int, ...], int]:
    """Validate a sampler's output shape (H, W, C with C in 1, 3) and step count."""
    if len(out_shape) != 3 or out_shape[2] not in (1, 3) or min(out_shape) < 1:
        raise ModelError(f"{what} out_shape {tuple(out_shape)}: expected (H, W, C) with "
                         "C in (1, 3)")
    if steps < 1:
        raise ModelError(f"config key gen.steps: invalid value {steps!r}; valid: >= 1")
    return tuple(int(v) for v in out_shape), int(steps)


def batch_arrays(what: str, labels, guidance, seeds, rows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's per-row labels (int64), guidance (float32) and seeds (int64), same length."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    guidance = np.asarray(guidance, dtype=np.float32).reshape(-1)
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
    b = len(labels) if rows is None else rows
    if not (len(labels) == len(guidance) == len(seeds) == b):
        raise ModelError(f"{what} batch: labels {len(labels)}, guidance {len(guidance)} and "
                         f"seeds {len(seeds)} must have the same length"
                         + ("" if rows is None else f" as the {rows} prompts"))
    return labels, guidance, seeds
