"""``gptfl-hpc prepare``: source -> partition -> per-client HDF5 shards + test/public + manifest.

Layout of the data directory::

    DIR/clients/client_00000.h5 ...   one shard per client (only that client's rank opens it)
    DIR/test.h5                       the test split (client_id -1)
    DIR/public.h5                     the generator's public split (digits only)
    DIR/manifest.json                 written last: its presence marks a complete dataset

Image-folder sources (gptfl_hpc/data/images.py) are never held in memory: their labels come
from the file list, so the partition is made first; then each client's files, and the test
split's, are decoded once by a pool of processes and streamed block by block into the shard
(:func:`stream_shard`, the same format and checksum as shards.write_shard), while the
normalisation statistics of the private pool accumulate on the way (:class:`PixelStats`).

Whether a directory already holds the requested data (reuse) or another request's (refuse) is
decided by the prepare stage (gptfl_hpc/pipeline.py with gptfl_hpc/provenance.py); this module
only writes. Every file is written atomically and the manifest last; the stage's completion
record comes after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc import signals
from gptfl_hpc.config import DataConfig
from gptfl_hpc.data.images import channel_counts, is_lazy
from gptfl_hpc.data.manifest import (
    FORMAT_VERSION,
    ClientEntry,
    Manifest,
    SplitEntry,
    client_file,
)
from gptfl_hpc.data.partition import partition
from gptfl_hpc.data.shards import write_shard
from gptfl_hpc.data.sources import IMAGE_FOLDER_SOURCES, Source, load_source
from gptfl_hpc.errors import ConfigError, DataError, Preempted
from gptfl_hpc.seeding import rng

log = logging.getLogger(__name__)

CLIENT_DIR = "clients"
CLIENT_PATTERN = re.compile(r"^client_\d{5,}\.h5$")


def content_config(cfg: DataConfig, seed: int) -> dict[str, Any]:
    """The DataConfig fields that change the prepared content (plus seed and format)."""
    d: dict[str, Any] = {"format_version": FORMAT_VERSION, "seed": int(seed),
                         "source": cfg.source, "num_clients": cfg.num_clients,
                         "partition": cfg.partition, "label_names": cfg.label_names}
    if cfg.source != "digits":
        d["root"] = str(Path(cfg.root or "").expanduser().resolve())
    if cfg.source == "digits":
        d["public_fraction"] = cfg.public_fraction
    if cfg.source in ("digits", "arrays"):
        d["test_size"] = cfg.test_size
    if cfg.source == "arrays":
        d["images_key"], d["labels_key"] = cfg.images_key, cfg.labels_key
    if cfg.partition == "dirichlet":
        d["alpha"], d["min_client_size"] = cfg.alpha, cfg.min_client_size
    if cfg.partition == "natural":
        d["natural_key"] = cfg.natural_key
    if cfg.source in IMAGE_FOLDER_SOURCES:
        d["image_size"], d["resize"] = cfg.image_size, cfg.resize
        if cfg.split_file:
            d["split_file"] = cfg.split_file
    if cfg.train_fraction != 1.0:  # absent at 1.0: older data dirs keep their hash
        d["train_fraction"] = cfg.train_fraction
    return d


class _ShardWriter:
    """Streams the shards of a lazy (image-folder) source: ONE decoding stream over the client
    shards in order, then the test split, then (train_fraction < 1) the pool samples outside
    the fraction, whose pixels only enter the normalisation statistics (as for in-memory
    sources, the statistics are those of the whole private pool)."""

    def __init__(self, src: Source, cfg: DataConfig, parts: list[np.ndarray],
                 left_out: Any) -> None:
        from gptfl_hpc.data.images import Decoder, workers_for

        self.src, self.left_out = src, left_out
        self.stats = PixelStats(3)
        groups = [src.train_images[idx] for idx in parts] + [src.test_images]
        if left_out is not None and len(left_out):
            groups.append(left_out)
        total = sum(len(g) for g in groups)
        self.decoder = Decoder(workers_for(cfg), total, f"{src.name} ({len(groups)} shards)")
        self.groups = groups
        self.shape = tuple(src.train_images.shape[1:])

    def __enter__(self) -> _ShardWriter:
        self.decoder.__enter__()
        self.blocks: Generator = self.decoder.stream(self.groups)
        return self

    def __exit__(self, *exc: object) -> None:
        self.blocks.close()
        self.decoder.__exit__(*exc)

    def write(self, path: Path, n: int, labels: np.ndarray, attrs: dict[str, Any],
              stats: bool = False) -> str:
        return stream_shard(path, self._images(stats), n, self.shape, labels, attrs)

    def _images(self, stats: bool) -> Iterator[np.ndarray]:
        """The next blocks' images (the shard takes exactly its count); their pixel counts
        enter the statistics when `stats` (the private pool)."""
        for images, counts in self.blocks:
            if stats:
                self.stats.add_counts(counts)
            yield images

    def finish(self) -> tuple[list[float], list[float]]:
        if self.left_out is not None and len(self.left_out):
            pos = 0
            for images, counts in self.blocks:
                self.stats.add_counts(counts)
                pos += len(images)
                if pos >= len(self.left_out):
                    break
        self.decoder.summary()  # the throughput line (files/s per worker)
        return self.stats.result()


def train_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified `fraction` of the pool (>= 1 per present class).

    Seeded from (seed, class) only, so a larger fraction's subset contains every smaller one's.
    """
    if fraction >= 1.0:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = rng(seed, "train-subset", int(c)).permutation(idx)
        keep.append(order[:max(1, int(round(fraction * len(idx))))])
    return np.sort(np.concatenate(keep))


def config_hash(cfg: DataConfig, seed: int) -> str:
    blob = json.dumps(content_config(cfg, seed), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def norm_stats(src: Source) -> tuple[list[float], list[float]]:
    """The source's fixed constants, else mean/std over the private pool.

    Images: per channel on pixel/255; features: per feature (std 0 becomes 1).
    """
    if src.norm_mean is not None and src.norm_std is not None:
        return list(src.norm_mean), list(src.norm_std)
    if src.kind == "audio":  # normalised per utterance by the audio front end (train/audio.py)
        return [0.0], [1.0]
    x = src.train_images
    if src.kind == "image":
        acc = PixelStats(x.shape[-1])
        step = max(1, (1 << 24) // max(1, x[:1].nbytes))  # bounded float64 temporaries
        for i in range(0, len(x), step):
            acc.add(x[i:i + step])
        return acc.result()
    m = x.astype(np.float64).mean(axis=0)
    s = x.astype(np.float64).std(axis=0)
    s = np.where(s > 1e-8, s, 1.0)
    return [round(float(v), 6) for v in m], [round(float(v), 6) for v in s]


class PixelStats:
    """Per-channel mean/std of pixel/255 over uint8 (N,H,W,C) images, from exact per-channel
    value histograms: the result does not depend on how the pool is cut into blocks or on the
    order they arrive in (decode workers count their own blocks: images.channel_counts)."""

    def __init__(self, channels: int) -> None:
        self.counts = np.zeros((channels, 256), np.int64)

    def add(self, block: np.ndarray) -> None:
        self.counts += channel_counts(block)

    def add_counts(self, counts: np.ndarray) -> None:
        self.counts += counts

    def result(self) -> tuple[list[float], list[float]]:
        v = np.arange(256, dtype=np.float64) / 255.0
        n = np.maximum(self.counts.sum(axis=1), 1).astype(np.float64)
        m = (self.counts * v).sum(axis=1) / n
        s = np.sqrt(np.maximum((self.counts * v * v).sum(axis=1) / n - m * m, 0.0))
        s = np.where(s > 1e-8, s, 1.0)
        return [round(float(x), 6) for x in m], [round(float(x), 6) for x in s]


def stream_shard(path: str | Path, blocks: Iterator[np.ndarray], n: int,
                 sample_shape: tuple[int, ...], labels: np.ndarray, attrs: dict[str, Any]
                 ) -> str:
    """shards.write_shard for samples that arrive in blocks (uint8 images): the same datasets,
    chunking, attributes and content sha256, without holding the shard in memory. Takes
    exactly `n` samples from `blocks`; returns the sha256."""
    from gptfl_hpc.data.shards import CHUNK_BYTES, audit_access
    from gptfl_hpc.data.shards import FORMAT_VERSION as SHARD_FORMAT
    from gptfl_hpc.fsio import atomic_path

    labels = np.asarray(labels).astype(np.int64, copy=False)
    if len(labels) != n or n < 1:
        raise DataError(f"shard {path}: {n} samples but {len(labels)} labels")
    if "dataset" not in attrs:
        raise ValueError("stream_shard: attrs must contain 'dataset'")
    meta: dict[str, Any] = {"client_id": -1, "partition": "none", "seed": -1, "label_names": []}
    meta.update(attrs)
    meta["label_names"] = json.dumps(list(meta["label_names"]))
    rows = int(min(n, max(1, CHUNK_BYTES // max(1, int(np.prod(sample_shape))))))
    h = hashlib.sha256()
    audit_access("w", path)
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("images", shape=(n, *sample_shape), dtype=np.uint8,
                                  chunks=(rows, *sample_shape))
            pos = 0
            while pos < n:
                b = np.ascontiguousarray(next(blocks), dtype=np.uint8)
                if b.shape[1:] != tuple(sample_shape) or pos + len(b) > n:
                    raise DataError(f"shard {path}: block of shape {b.shape} at sample {pos} "
                                    f"does not fit ({n}, {tuple(sample_shape)})")
                ds[pos:pos + len(b)] = b
                h.update(b.reshape(-1).data)
                pos += len(b)
            f.create_dataset("labels", data=labels)
            h.update(np.ascontiguousarray(labels, dtype="<i8").view(np.uint8).data)
            digest = h.hexdigest()
            meta.update(num_samples=n, kind="image", format_version=SHARD_FORMAT,
                        sha256=digest)
            for k, v in meta.items():
                f.attrs[k] = v if v is not None else "null"
    return digest


def prepare_data(cfg: DataConfig, seed: int, out_dir: str | Path,
                 fingerprint: str | None = None) -> Manifest:
    """Write the shards of ``cfg`` into ``out_dir`` (manifest last); return the manifest.

    `fingerprint` (the stage's request fingerprint) is stored as the manifest's config_hash;
    without one the hash of the content-relevant data config is used.
    """
    if out_dir is None:
        raise ConfigError("prepare: --out DIR is required (where the shards are written)")
    out = Path(out_dir)
    if int(seed) < 0:
        raise ConfigError(f"config key run.seed: invalid value {seed!r}; valid: >= 0")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    digest = fingerprint or config_hash(cfg, seed)

    # Step 1: load the source and partition it (everything is checked before any write)
    src = load_source(cfg, seed if cfg.split_seed is None else cfg.split_seed)
    lazy = is_lazy(src.train_images)
    mean, std = ([], []) if lazy else norm_stats(src)
    left_out = None  # lazy sources: pool samples outside train_fraction (statistics only)
    if cfg.train_fraction < 1.0:
        keep = train_subset(src.train_labels, cfg.train_fraction, seed)
        log.info("data.train_fraction=%g: %d of %d private samples", cfg.train_fraction,
                 len(keep), len(src.train_labels))
        if lazy:
            left_out = src.train_images[np.setdiff1d(np.arange(len(src.train_labels)), keep)]
        src = dataclasses.replace(src, train_images=src.train_images[keep],
                                  train_labels=src.train_labels[keep],
                                  keys=None if src.keys is None else src.keys[keep])
    parts = partition(src.train_labels, cfg.num_clients, cfg.partition, seed, alpha=cfg.alpha,
                      min_size=cfg.min_client_size, keys=src.keys)

    # Step 2: write the shards (each atomically), dropping stale client files of an old attempt
    client_dir = out / CLIENT_DIR
    wanted = {Path(client_file(i)).name for i in range(cfg.num_clients)}
    if client_dir.is_dir():
        for p in client_dir.iterdir():
            if CLIENT_PATTERN.match(p.name) and p.name not in wanted:
                p.unlink()
    base = {"dataset": src.name, "partition": cfg.partition, "seed": int(seed),
            "label_names": src.label_names}
    writer = _ShardWriter(src, cfg, parts, left_out) if lazy else None
    with writer or contextlib.nullcontext():
        clients = []
        for cid, idx in enumerate(parts):
            if signals.boundary():  # every shard is written atomically: a safe place to stop
                raise Preempted(f"prepare stopped by {signals.reason()} after {cid} of "
                                f"{cfg.num_clients} client shards; rerun the same command to "
                                "prepare again")
            rel = client_file(cid)
            attrs = {**base, "client_id": cid, "split": "client"}
            if writer is not None:
                sha = writer.write(out / rel, len(idx), src.train_labels[idx], attrs, stats=True)
            else:
                sha = write_shard(out / rel, src.train_images[idx], src.train_labels[idx], attrs)
            clients.append(ClientEntry(id=cid, file=rel, num_samples=len(idx), sha256=sha))
        attrs = {**base, "client_id": -1, "split": "test"}
        if writer is not None:
            sha = writer.write(out / "test.h5", len(src.test_labels), src.test_labels, attrs)
            mean, std = writer.finish()
        else:
            sha = write_shard(out / "test.h5", src.test_images, src.test_labels, attrs)
    test = SplitEntry(file="test.h5", num_samples=len(src.test_labels), sha256=sha)
    public = None
    if src.public_images is not None and src.public_labels is not None:
        sha = write_shard(out / "public.h5", src.public_images, src.public_labels,
                          {**base, "client_id": -1, "split": "public"})
        public = SplitEntry(file="public.h5", num_samples=len(src.public_labels), sha256=sha)
    elif (out / "public.h5").exists():
        (out / "public.h5").unlink()

    # Step 3: the manifest, last
    sizes = np.array([len(p) for p in parts])
    manifest = Manifest(
        format_version=FORMAT_VERSION, dataset=src.name, kind=src.kind,
        input_shape=list(src.input_shape), num_classes=src.num_classes,
        label_names=list(src.label_names), norm_mean=mean, norm_std=std,
        partition=cfg.partition, alpha=cfg.alpha if cfg.partition == "dirichlet" else None,
        seed=int(seed), num_clients=cfg.num_clients, clients=clients, test=test, public=public,
        config_hash=digest, num_train=int(sizes.sum()),
        min_client_size=cfg.min_client_size if cfg.partition == "dirichlet" else None,
        extra={"source_root": content_config(cfg, seed).get("root"),
               # deterministic content only: the manifest's digest identifies the data
               **({"image_size": src.input_shape[0], "resize": cfg.resize}
                  if writer is not None else {})},
    )
    manifest.save(out)
    log.info("prepared %s in %s: %d clients (%s%s), client sizes min/median/max %d/%d/%d; "
             "train %d, test %d, public %s", src.name, out, cfg.num_clients, cfg.partition,
             f" alpha={cfg.alpha}" if cfg.partition == "dirichlet" else "", sizes.min(),
             int(np.median(sizes)), sizes.max(), sizes.sum(), test.num_samples,
             public.num_samples if public else "none")
    return manifest

