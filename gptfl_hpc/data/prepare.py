"""``gptfl-hpc prepare``: source -> partition -> per-client HDF5 shards + test/public + manifest.

Layout of the data directory::

    DIR/clients/client_00000.h5 ...   one shard per client (only that client's rank opens it)
    DIR/test.h5                       the test split (client_id -1)
    DIR/public.h5                     the generator's public split (digits only)
    DIR/manifest.json                 written last: its presence marks a complete dataset

Whether a directory already holds the requested data (reuse) or another request's (refuse) is
decided by the prepare stage (gptfl_hpc/pipeline.py with gptfl_hpc/provenance.py); this module
only writes. Every file is written atomically and the manifest last; the stage's completion
record comes after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc import signals
from gptfl_hpc.config import DataConfig
from gptfl_hpc.data.manifest import (
    FORMAT_VERSION,
    ClientEntry,
    Manifest,
    SplitEntry,
    client_file,
)
from gptfl_hpc.data.partition import partition
from gptfl_hpc.data.shards import write_shard
from gptfl_hpc.data.sources import Source, load_source
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
    if cfg.train_fraction != 1.0:  # absent at 1.0: older data dirs keep their hash
        d["train_fraction"] = cfg.train_fraction
    return d


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
        mean = np.zeros(x.shape[-1])
        sq = np.zeros(x.shape[-1])
        step = max(1, (1 << 24) // max(1, x[:1].nbytes))  # bounded float64 temporaries
        for i in range(0, len(x), step):
            b = x[i:i + step].astype(np.float64) / 255.0
            mean += b.sum(axis=(0, 1, 2))
            sq += (b * b).sum(axis=(0, 1, 2))
        count = len(x) * x.shape[1] * x.shape[2]
        m = mean / count
        s = np.sqrt(np.maximum(sq / count - m * m, 0.0))
    else:
        m = x.astype(np.float64).mean(axis=0)
        s = x.astype(np.float64).std(axis=0)
    s = np.where(s > 1e-8, s, 1.0)
    return [round(float(v), 6) for v in m], [round(float(v), 6) for v in s]


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
    src = load_source(cfg, seed)
    mean, std = norm_stats(src)
    if cfg.train_fraction < 1.0:
        keep = train_subset(src.train_labels, cfg.train_fraction, seed)
        log.info("data.train_fraction=%g: %d of %d private samples", cfg.train_fraction,
                 len(keep), len(src.train_labels))
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
    clients = []
    for cid, idx in enumerate(parts):
        if signals.boundary():  # every shard is written atomically: a safe place to stop
            raise Preempted(f"prepare stopped by {signals.reason()} after {cid} of "
                            f"{cfg.num_clients} client shards; rerun the same command to "
                            "prepare again")
        rel = client_file(cid)
        sha = write_shard(out / rel, src.train_images[idx], src.train_labels[idx],
                          {**base, "client_id": cid, "split": "client"})
        clients.append(ClientEntry(id=cid, file=rel, num_samples=len(idx), sha256=sha))
    sha = write_shard(out / "test.h5", src.test_images, src.test_labels,
                      {**base, "client_id": -1, "split": "test"})
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
        extra={"source_root": content_config(cfg, seed).get("root")},
    )
    manifest.save(out)
    log.info("prepared %s in %s: %d clients (%s%s), client sizes min/median/max %d/%d/%d; "
             "train %d, test %d, public %s", src.name, out, cfg.num_clients, cfg.partition,
             f" alpha={cfg.alpha}" if cfg.partition == "dirichlet" else "", sizes.min(),
             int(np.median(sizes)), sizes.max(), sizes.sum(), test.num_samples,
             public.num_samples if public else "none")
    return manifest

