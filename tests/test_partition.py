"""Properties of the client partitions and the stratified split (pure numpy, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from gptfl_hpc.data.partition import label_entropy, partition, purpose_tag, stratified_split
from gptfl_hpc.errors import ConfigError, DataError


def _labels(n: int = 1000, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "indices lost or duplicated"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part is sorted and has no duplicate"


@pytest.mark.parametrize("method", ["iid", "dirichlet", "natural"])
def test_disjoint_cover_deterministic(method: str) -> None:
    y = _labels()
    keys = np.random.default_rng(1).integers(0, 7, len(y)) * 3 if method == "natural" else None
    k = 7 if method == "natural" else 10
    a = partition(y, k, method, seed=5, alpha=0.5, min_size=5, keys=keys)
    b = partition(y, k, method, seed=5, alpha=0.5, min_size=5, keys=keys)
    assert len(a) == k
    _check_cover(a, len(y))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    if method != "natural":
        c = partition(y, k, method, seed=6, alpha=0.5, min_size=5, keys=keys)
        assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_iid_sizes_balanced() -> None:
    parts = partition(_labels(1003), 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("min_size", [1, 20, 40])
def test_dirichlet_min_size_honoured(min_size: int) -> None:
    y = _labels(2000)
    parts = partition(y, 20, "dirichlet", seed=3, alpha=0.3, min_size=min_size)
    _check_cover(parts, len(y))
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = _labels(5000)
    skewed = partition(y, 20, "dirichlet", seed=0, alpha=0.1, min_size=1)
    flat = partition(y, 20, "dirichlet", seed=0, alpha=100.0, min_size=1)
    h_skewed, h_flat = label_entropy(y, skewed, 10), label_entropy(y, flat, 10)
    assert h_flat > 2.2  # close to log(10) = 2.30
    assert h_skewed < 1.2
    assert h_flat - h_skewed > 1.0


def test_natural_one_client_per_sorted_key() -> None:
    y = _labels(300)
    keys = np.array([f"w{i % 12:02d}" for i in range(300)])
    parts = partition(y, 12, "natural", seed=0, keys=keys)
    _check_cover(parts, 300)
    for j, p in enumerate(parts):
        assert set(keys[p]) == {f"w{j:02d}"}


def test_errors_name_the_key() -> None:
    y = _labels(50)
    with pytest.raises(ConfigError, match="data.num_clients"):
        partition(y, 51, "iid", seed=0)
    with pytest.raises(ConfigError, match="data.num_clients"):
        partition(y, 51, "dirichlet", seed=0)
    with pytest.raises(DataError, match="data.min_client_size"):
        partition(y, 10, "dirichlet", seed=0, alpha=0.5, min_size=6)  # 60 > 50: impossible
    # possible in principle, but Dirichlet(0.01) never gives all 10 clients >= 4 of 50 samples
    with pytest.raises(DataError, match=r"data.min_client_size=4 .*data.alpha=0.01"):
        partition(y, 10, "dirichlet", seed=0, alpha=0.01, min_size=4)
    with pytest.raises(ConfigError, match=r"data.num_clients.*3 distinct"):
        partition(y, 4, "natural", seed=0, keys=np.arange(50) % 3)
    with pytest.raises(ConfigError, match="data.natural_key"):
        partition(y, 4, "natural", seed=0, keys=None)
    with pytest.raises(ConfigError, match="data.partition.*iid, dirichlet, natural"):
        partition(y, 4, "shards", seed=0)
    with pytest.raises(ConfigError, match="run.seed"):
        partition(y, 4, "iid", seed=-1)


def test_stratified_split_keeps_class_proportions() -> None:
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    take, rest = stratified_split(y, 60, seed=0, tag=purpose_tag("t"))
    assert len(take) == 60 and len(rest) == 140
    assert np.array_equal(np.sort(np.concatenate([take, rest])), np.arange(200))
    assert np.bincount(y[take]).tolist() == [30, 15, 9, 6]
    again, _ = stratified_split(y, 60, seed=0, tag=purpose_tag("t"))
    other, _ = stratified_split(y, 60, seed=0, tag=purpose_tag("u"))
    assert np.array_equal(take, again) and not np.array_equal(take, other)
