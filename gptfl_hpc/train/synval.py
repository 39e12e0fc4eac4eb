"""The server's validation split of the synthetic set (``pretrain.val_fraction``).

GPT-FL's server may look at its synthetic data but never at private data, so the only
validation set it can choose a model on is a held-out part of what it synthesised. This module
draws that split (stratified per class, from ``run.seed``), and reads its rows back for the FL
server (``fl.select=synthetic_val``, ``fl.patience``).

- :func:`split_rows`: (train rows, validation rows) of a label vector; deterministic in
  (labels, fraction, seed), independent of the process count; every class keeps at least one
  training row and, when it has two or more, gives at least one to validation.
- :func:`read_rows`: the validation rows' samples and labels from the synthetic HDF5.
- :func:`rows_digest`: what the FL request records about the split (its rows and the set).

The split only ever removes rows from pretraining; with fraction 0 pretraining sees exactly the
rows, permutations and augmentation draws it saw before this existed (tests/test_synval.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc.errors import DataError
from gptfl_hpc.seeding import derive

PURPOSE = "synthetic.val"


def split_rows(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows), both sorted int64: ``round(fraction * n_c)`` rows of each
    class c with n_c >= 2 rows (at least 1, at most n_c - 1) go to validation."""
    labels = np.asarray(labels)
    n = len(labels)
    if fraction <= 0:
        return np.arange(n, dtype=np.int64), np.empty(0, np.int64)
    val = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        k = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        rng = np.random.default_rng(derive(seed, PURPOSE, int(c)))
        val.append(rng.permutation(rows)[:k])
    v = np.sort(np.concatenate(val)).astype(np.int64) if val else np.empty(0, np.int64)
    keep = np.ones(n, bool)
    keep[v] = False
    return np.flatnonzero(keep).astype(np.int64), v


def rows_digest(rows: Any, synthetic_digest: str) -> str:
    """Identity of a validation split: its rows and the content digest of the set."""
    h = hashlib.sha256(synthetic_digest.encode())
    h.update(np.ascontiguousarray(np.asarray(rows, dtype=np.int64)).tobytes())
    return h.hexdigest()[:32]


def read_rows(path: str | Path, rows: Any, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The samples and labels of `rows` (sorted, unique) of the synthetic set at `path`."""
    from gptfl_hpc.data.shards import open_h5

    idx = np.asarray(rows, dtype=np.int64)
    if len(idx) == 0 or np.any(np.diff(idx) <= 0) or idx[0] < 0:
        raise DataError(f"synthetic validation split of {path}: rows must be sorted, unique and "
                        f"non-negative, and at least one; got {len(idx)} row(s)")
    with open_h5(path, "r", what="synthetic set") as f:
        if dataset not in f or "labels" not in f:
            raise DataError(f"synthetic set {path}: no '{dataset}' and 'labels' datasets for its "
                            "validation split")
        n = f["labels"].shape[0]
        if idx[-1] >= n:
            raise DataError(f"synthetic set {path}: validation row {int(idx[-1])} is past its "
                            f"{n} samples; the set changed after pretraining, rerun it")
        try:
            return np.asarray(f[dataset][idx]), np.asarray(f["labels"][idx], dtype=np.int64)
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"synthetic set {path}: unreadable validation rows "
                            f"({' '.join(str(e).split())})") from None
