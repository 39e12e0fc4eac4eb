"""Synthetic-data quality helpers: class counts, sample grid, nearest neighbours, memorisation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gptfl_hpc.errors import DataError
from gptfl_hpc.gen.quality import (
    class_counts,
    memorisation_report,
    nearest_neighbour_distances,
    sample_grid,
)


def test_class_counts():
    assert class_counts(np.array([0, 2, 2, 4]), 5) == [1, 0, 2, 0, 1]
    assert class_counts(np.array([], dtype=np.int64), 3) == [0, 0, 0]
    with pytest.raises(DataError, match=r"outside \[0, 3\)"):
        class_counts(np.array([0, 3]), 3)
    with pytest.raises(DataError):
        class_counts(np.array([-1, 0]), 3)


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_sample_grid_writes_png(tmp_path, shape):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    n_cls = 10
    labels = np.repeat(np.arange(n_cls), 12)
    labels[labels == 9] = 8  # class 9 has no samples: its row stays grey
    images = rng.integers(0, 256, size=(len(labels), *shape), dtype=np.uint8)
    out = sample_grid(images, labels, [f"class {k}" for k in range(n_cls)],
                      tmp_path / "sub" / "grid.png", per_class=10)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 100
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left behind


def test_nn_distances_match_brute_force():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, size=(37, 6, 5, 3), dtype=np.uint8)
    r = rng.integers(0, 256, size=(23, 6, 5, 3), dtype=np.uint8)
    r[5] = q[3]  # an exact copy
    d, idx = nearest_neighbour_distances(q, r, batch=7, return_index=True)  # several chunks
    qf = q.reshape(len(q), -1).astype(np.float64) / 255
    rf = r.reshape(len(r), -1).astype(np.float64) / 255
    full = np.sqrt(((qf[:, None, :] - rf[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(d, full.min(1), rtol=1e-9, atol=1e-9)
    assert np.array_equal(idx, full.argmin(1))
    assert d[3] == 0.0 and idx[3] == 5
    with pytest.raises(DataError, match="differ in shape"):
        nearest_neighbour_distances(q, r[:, :5])


def test_nn_distances_fast_at_cifar_scale():
    rng = np.random.default_rng(2)
    q = rng.integers(0, 256, size=(3000, 32, 32, 3), dtype=np.uint8)
    r = rng.integers(0, 256, size=(539, 32, 32, 3), dtype=np.uint8)
    t = time.perf_counter()
    d = nearest_neighbour_distances(q, r)
    dt = time.perf_counter() - t
    assert d.shape == (3000,) and np.all(d > 0)
    assert dt < 10.0, f"3000 x 539 nearest neighbours took {dt:.1f} s"


def _digits_uint8():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    imgs = np.clip(x.reshape(-1, 8, 8, 1) * (255 / 16), 0, 255).round().astype(np.uint8)
    return imgs, y


def test_memorisation_report_flags_a_copying_generator():
    imgs, _ = _digits_uint8()
    perm = np.random.default_rng(0).permutation(len(imgs))
    public, heldout, fresh = imgs[perm[:539]], imgs[perm[539:900]], imgs[perm[900:1700]]

    rng = np.random.default_rng(3)
    # copier: public images with pixel noise (+-12 grey levels) and a one-pixel shift for some
    copies = public[rng.integers(0, len(public), size=800)].astype(np.int16)
    copies += rng.integers(-12, 13, size=copies.shape, dtype=np.int16)
    copies = np.clip(copies, 0, 255).astype(np.uint8)

    rep_copy = memorisation_report(copies, public, heldout)
    rep_fresh = memorisation_report(fresh, public, heldout)

    assert rep_copy["share_below_threshold"] > 0.9, rep_copy
    assert rep_copy["median_ratio"] < 0.5, rep_copy
    # a generator of new images from the same distribution looks like held-out real data
    assert rep_fresh["share_below_threshold"] < 0.15, rep_fresh
    assert 0.8 < rep_fresh["median_ratio"] < 1.25, rep_fresh
    assert rep_fresh["exact_copies"] == 0
    assert rep_copy["n_synthetic"] == 800 and rep_copy["n_public"] == 539
    assert rep_copy["heldout_to_public_median"] == rep_fresh["heldout_to_public_median"]
