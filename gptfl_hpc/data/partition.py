"""Client partitions and stratified splits: pure numpy, seeded, no I/O, no torch.

Every random draw comes from ``gptfl_hpc.seeding.rng(seed, purpose, ...)`` (the project's one
seed-derivation scheme) with a fixed per-purpose tag, so the same (seed, inputs) always give the
same split and no two purposes share a random stream.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from gptfl_hpc import seeding
from gptfl_hpc.errors import ConfigError, DataError

METHODS = ("iid", "dirichlet", "natural")
MAX_DIRICHLET_ATTEMPTS = 1000
"""Dirichlet draws tried (each with its own derived seed) before giving up on min_size."""


def purpose_tag(name: str) -> int:
    """Stable 32-bit tag of a purpose string (what gptfl_hpc.seeding does with a string)."""
    return zlib.crc32(name.encode("utf-8"))


TAG_IID = purpose_tag("partition.iid")
TAG_DIRICHLET = purpose_tag("partition.dirichlet")


def derived_rng(seed: int, tag: int, *more: int) -> np.random.Generator:
    """A generator for (seed, purpose tag, extra ints); seed must be >= 0."""
    if int(seed) < 0:
        raise ConfigError(f"config key run.seed: invalid value {seed!r}; valid: >= 0")
    return seeding.rng(int(seed), int(tag), *map(int, more))


def partition(labels: np.ndarray, num_clients: int, method: str, seed: int, alpha: float = 0.5,
              min_size: int = 1, keys: np.ndarray | None = None) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` over clients.

    Returns ``num_clients`` sorted int64 index arrays that are disjoint and cover every index once.

    - ``iid``: a seeded permutation cut into near-equal parts.
    - ``dirichlet``: per class, Dirichlet(alpha * 1_K) proportions over the K clients; the class's
      (shuffled) indices are cut at the cumulative proportions. Redrawn with seeds
      (seed, tag, attempt) until every client holds >= ``min_size`` samples.
    - ``natural``: one client per distinct value of ``keys`` (in sorted order of the values).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"partition: labels must be 1-d, got shape {labels.shape}")
    n = len(labels)
    if method not in METHODS:
        raise ConfigError(f"config key data.partition: invalid value {method!r}; valid: "
                          + ", ".join(METHODS))
    if num_clients < 1:
        raise ConfigError(f"config key data.num_clients: invalid value {num_clients!r}; "
                          "valid: >= 1")
    if method == "natural":
        return _natural(n, num_clients, keys)
    if num_clients > n:
        raise ConfigError(f"config key data.num_clients: {num_clients} clients but only {n} "
                          f"training samples; valid: 1..{n}")
    if method == "iid":
        rng = derived_rng(seed, TAG_IID)
        pieces = np.array_split(rng.permutation(n), num_clients)
        return [np.sort(p).astype(np.int64) for p in pieces]
    return _dirichlet(labels, num_clients, seed, alpha, min_size)


def _dirichlet(labels: np.ndarray, k: int, seed: int, alpha: float,
               min_size: int) -> list[np.ndarray]:
    n = len(labels)
    if not alpha > 0:
        raise ConfigError(f"config key data.alpha: invalid value {alpha!r}; valid: > 0")
    if min_size * k > n:
        raise DataError(f"dirichlet partition impossible: data.min_client_size={min_size} x "
                        f"data.num_clients={k} exceeds the {n} training samples; lower "
                        "data.min_client_size or data.num_clients")
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    best = -1
    for attempt in range(MAX_DIRICHLET_ATTEMPTS):
        rng = derived_rng(seed, TAG_DIRICHLET, attempt)
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, float(alpha)))
            if not np.all(np.isfinite(p)):
                break
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for j, piece in enumerate(np.split(idx, cuts)):
                parts[j].append(piece)
        else:
            sizes = [sum(len(x) for x in pj) for pj in parts]
            smallest = min(sizes)
            if smallest >= min_size:
                return [np.sort(np.concatenate(pj)).astype(np.int64) for pj in parts]
            best = max(best, smallest)
    raise DataError(f"dirichlet partition: no draw gave every client >= data.min_client_size="
                    f"{min_size} samples in {MAX_DIRICHLET_ATTEMPTS} attempts at "
                    f"data.alpha={alpha} with {k} clients (best smallest client: {best}); lower "
                    "data.min_client_size, raise data.alpha or use fewer clients")


def _natural(n: int, k: int, keys: np.ndarray | None) -> list[np.ndarray]:
    if keys is None:
        raise ConfigError("config key data.natural_key: natural partition needs a key array; "
                          "valid: the name of a key array in an 'arrays' source")
    keys = np.asarray(keys)
    if keys.shape != (n,):
        raise DataError(f"natural partition: key array has shape {keys.shape}, expected ({n},) "
                        "(one key per training sample)")
    values, inverse = np.unique(keys, return_inverse=True)
    if len(values) != k:
        raise ConfigError(f"config key data.num_clients: invalid value {k}; the natural key has "
                          f"{len(values)} distinct values, so valid: {len(values)}")
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse.ravel(), minlength=k))[:-1]
    return [np.sort(p).astype(np.int64) for p in np.split(order, bounds)]


def stratified_split(labels: np.ndarray, n_take: int, seed: int,
                     tag: int) -> tuple[np.ndarray, np.ndarray]:
    """Take ``n_take`` indices with class proportions kept; return (taken, rest), both sorted.

    Per-class quotas are ``n_take * count_c / n`` rounded by largest remainder (ties broken by
    class order), so the quotas sum to exactly ``n_take``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 <= n_take <= n:
        raise DataError(f"stratified split: cannot take {n_take} of {n} samples")
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_take * counts / max(n, 1)
    quota = np.floor(exact).astype(np.int64)
    short = n_take - int(quota.sum())
    if short:
        order = np.lexsort((np.arange(len(classes)), -(exact - quota)))
        quota[order[:short]] += 1
    rng = derived_rng(seed, tag)
    taken = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    take = np.sort(np.concatenate(taken)) if taken else np.zeros(0, np.int64)
    mask = np.ones(n, bool)
    mask[take] = False
    return take.astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def label_entropy(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean per-client label entropy in nats (lower = more skewed); a partition diagnostic."""
    labels = np.asarray(labels)
    ent = []
    for p in parts:
        c = np.bincount(labels[p], minlength=num_classes).astype(float)
        if c.sum() == 0:
            continue
        q = c[c > 0] / c.sum()
        ent.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ent)) if ent else 0.0
