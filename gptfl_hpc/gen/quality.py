"""Quality checks for a synthetic set: class balance, a sample grid, and a memorisation test.

numpy + matplotlib (Agg, no pyplot state) only, so it runs on any login node.

Memorisation: a generator that copies its training (public) images produces synthetic samples
that lie much closer to some public image than genuinely new real images do. We measure L2
nearest-neighbour distances (pixels scaled to [0, 1]) from synthetic samples to the public set and
from held-out real images to the public set; the share of synthetic samples closer to a public
image than the 5th percentile of the held-out distances is ~5% for a generator that makes new
images from the data distribution, and near 100% for one that copies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptfl_hpc.errors import DataError
from gptfl_hpc.fsio import atomic_path


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class, length `num_classes` (labels must lie in [0, num_classes))."""
    labels = np.asarray(labels).reshape(-1)
    if num_classes < 1:
        raise DataError(f"class_counts: num_classes {num_classes}: expected >= 1")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"class_counts: labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"class_counts: labels span [{labels.min()}, {labels.max()}], outside "
                        f"[0, {num_classes})")
    return np.bincount(labels.astype(np.int64), minlength=num_classes).tolist()


def _as_nhwc(images: np.ndarray, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{name}: expected uint8 images (N, H, W, C) with C in (1, 3), got shape "
                        f"{images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{name}: expected dtype uint8, got {images.dtype}")
    return images


def sample_grid(images: np.ndarray, labels: np.ndarray, label_names: list[str], path: str | Path,
                per_class: int = 10, max_classes: int = 100) -> Path:
    """Write a PNG with one row per class (its first `per_class` samples), atomically.

    Rows of classes with fewer samples are left grey; at most `max_classes` rows are drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = _as_nhwc(images, "sample_grid images")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise DataError(f"sample_grid: {len(images)} images but {len(labels)} labels")
    n_cls = min(len(label_names), max_classes)
    if n_cls < 1 or per_class < 1:
        raise DataError("sample_grid: need at least one label name and per_class >= 1")
    h, w, c = images.shape[1:]
    pad = max(1, h // 16)
    cell_h, cell_w = h + pad, w + pad
    mosaic = np.full((n_cls * cell_h + pad, per_class * cell_w + pad, 3), 128, dtype=np.uint8)
    for k in range(n_cls):
        idx = np.flatnonzero(labels == k)[:per_class]
        for j, i in enumerate(idx):
            img = images[i] if c == 3 else np.repeat(images[i], 3, axis=-1)
            y, x = pad + k * cell_h, pad + j * cell_w
            mosaic[y:y + h, x:x + w] = img
    scale = max(1.0, 48.0 / h)  # small images: draw each pixel as a few screen pixels
    fig_w = max(4.0, mosaic.shape[1] * scale / 100 + 1.5)
    fig_h = max(2.0, mosaic.shape[0] * scale / 100 + 0.3)
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((1.4 / fig_w, 0.15 / fig_h, 1 - 1.5 / fig_w, 1 - 0.3 / fig_h))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_anchor("W")
    ax.set_xticks([])
    ax.set_yticks([pad + k * cell_h + h / 2 for k in range(n_cls)])
    ax.set_yticklabels([str(s) for s in label_names[:n_cls]],
                       fontsize=max(4, min(9, int(9 * 10 / max(n_cls, 10)) + 3)))
    ax.tick_params(length=0)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _flat01(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)


def nearest_neighbour_distances(queries: np.ndarray, reference: np.ndarray, batch: int = 2048,
                                return_index: bool = False):
    """L2 distance (pixels in [0, 1]) from each query image to its nearest reference image.

    Chunked over queries and reference (memory O(batch^2)); the search uses float32 matrix
    products (|q|^2 + |r|^2 - 2 q.r) and the winning pair's distance is then recomputed exactly in
    float64, so near-copies get accurate (near-zero) distances. 3000 x 539 CIFAR-sized images take
    well under a second. Returns float64 (N,) distances, and (N,) int64 indices if `return_index`.
    """
    q = _as_nhwc(queries, "nearest_neighbour_distances queries")
    r = _as_nhwc(reference, "nearest_neighbour_distances reference")
    if q.shape[1:] != r.shape[1:]:
        raise DataError(f"nearest_neighbour_distances: queries {q.shape[1:]} and reference "
                        f"{r.shape[1:]} differ in shape")
    if len(r) == 0:
        raise DataError("nearest_neighbour_distances: empty reference set")
    batch = max(1, int(batch))
    best_d2 = np.full(len(q), np.inf, dtype=np.float32)
    best_i = np.zeros(len(q), dtype=np.int64)
    for rs in range(0, len(r), batch):
        rb = _flat01(r[rs:rs + batch])
        rn = np.einsum("ij,ij->i", rb, rb)
        for qs in range(0, len(q), batch):
            qb = _flat01(q[qs:qs + batch])
            qn = np.einsum("ij,ij->i", qb, qb)
            d2 = qn[:, None] + rn[None, :] - 2.0 * (qb @ rb.T)
            j = np.argmin(d2, axis=1)
            m = d2[np.arange(len(qb)), j]
            better = m < best_d2[qs:qs + batch]
            best_d2[qs:qs + batch][better] = m[better]
            best_i[qs:qs + batch][better] = rs + j[better]
    dist = np.empty(len(q), dtype=np.float64)
    for qs in range(0, len(q), batch):  # exact distance of the chosen pairs
        diff = (q[qs:qs + batch].reshape(min(batch, len(q) - qs), -1).astype(np.float64)
                - r[best_i[qs:qs + batch]].reshape(min(batch, len(q) - qs), -1)) / 255.0
        dist[qs:qs + batch] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return (dist, best_i) if return_index else dist


def memorisation_report(synthetic: np.ndarray, public: np.ndarray, heldout_real: np.ndarray,
                        percentile: float = 5.0) -> dict:
    """Compare synthetic->public NN distances with held-out-real->public NN distances.

    Keys: synthetic_to_public_median, heldout_to_public_median, median_ratio (synthetic/heldout;
    << 1 suggests copying), threshold (the held-out distances' `percentile`), share_below_threshold
    (share of synthetic samples closer than that: ~percentile/100 for a generator that makes new
    images, ~1 for a copying one), exact_copies (synthetic samples at distance 0), and the counts.
    """
    syn = _as_nhwc(synthetic, "memorisation_report synthetic")
    pub = _as_nhwc(public, "memorisation_report public")
    real = _as_nhwc(heldout_real, "memorisation_report heldout_real")
    if len(syn) == 0 or len(real) == 0:
        raise DataError("memorisation_report: synthetic and heldout_real must be non-empty")
    d_syn = nearest_neighbour_distances(syn, pub)
    d_real = nearest_neighbour_distances(real, pub)
    thr = float(np.percentile(d_real, percentile))
    med_syn, med_real = float(np.median(d_syn)), float(np.median(d_real))
    return {
        "synthetic_to_public_median": med_syn,
        "heldout_to_public_median": med_real,
        "median_ratio": med_syn / med_real if med_real > 0 else float("inf"),
        "percentile": float(percentile),
        "threshold": thr,
        "share_below_threshold": float(np.mean(d_syn < thr)),
        "exact_copies": int(np.sum(d_syn == 0)),
        "n_synthetic": int(len(syn)),
        "n_public": int(len(pub)),
        "n_heldout": int(len(real)),
    }
