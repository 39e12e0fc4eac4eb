"""The centralised upper bound: the downstream model trained on the POOLED private data.

This is a reference, not an FL method, and not something a federation could ever run: it
answers "how good could this model get if one party held every client's data?", so that the
report can show how much of that gap GPT-FL, FedAvg and synthetic-only training close.

It is the ONE place in the package where one process reads every client's shard: rank 0 reads
them all through the manifest (``Manifest.read_client``, checksums verified), concatenates them
in client order, writes the pool as an HDF5 in the synthetic-set layout (``/images`` uint8, or
``/audio`` int16, and ``/labels``) next to its outputs, and trains ``cfg.model`` from random init
on it with the server-pretraining code (gptfl_hpc/train/pretrain.py: the same loop, augmentation
and ``pretrain.*`` hyperparameters; ``pretrain.init`` is ignored), evaluating on the test split
after every epoch. Nothing goes over MPI: the other ranks wait. The pool file is deleted when
training ends; the model's test-set leakage check is off because the pool is the real private
data (duplicates of test images there belong to the source, and the FL clients hold them too).

Outputs in ``<out>/centralised/``: ``centralised.safetensors``, ``centralised.json`` (the
pretraining record, with the per-epoch history) and ``summary.json`` (final and best test
accuracy and the per-epoch curve), written through the ``centralised`` stage of
gptfl_hpc/pipeline.py with its provenance record.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc.errors import DataError

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
WEIGHTS_NAME = "centralised.safetensors"
INFO_NAME = "centralised.json"
POOL_NAME = ".pooled.h5"
"""The pooled private set while training (hidden: never part of a digest; removed after)."""


def pool_clients(manifest: Any, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Every client's (samples, labels), concatenated in client-id order (rank 0 only)."""
    xs, ys = [], []
    for cid in range(len(manifest.clients)):
        x, y = manifest.read_client(data_dir, cid)
        xs.append(x)
        ys.append(np.asarray(y, dtype=np.int64))
    if not xs:
        raise DataError(f"dataset in {data_dir}: no client shards to pool")
    return np.concatenate(xs), np.concatenate(ys)


def write_pool(path: Path, samples: np.ndarray, labels: np.ndarray, kind: str) -> None:
    """The pool in the layout pretrain reads (its SAMPLE_DATASETS), written atomically."""
    import h5py

    from gptfl_hpc.data.shards import audit_access
    from gptfl_hpc.fsio import atomic_path
    from gptfl_hpc.train.pretrain import SAMPLE_DATASETS

    if kind not in SAMPLE_DATASETS:
        raise DataError(f"centralised: needs an image or audio dataset (as pretraining does); "
                        f"the manifest says kind={kind}")
    name, dtype = SAMPLE_DATASETS[kind]
    audit_access("w", path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(name, data=np.ascontiguousarray(samples, dtype=dtype))
            f.create_dataset("labels", data=labels.astype(np.int64, copy=False))
            f.attrs["split"] = "pooled"


def summarise(info: dict, *, num_clients: int, fingerprint: str) -> dict:
    """summary.json from the pretraining record: final and best test accuracy, the curve."""
    history = info["history"]
    best = max(history, key=lambda h: h["test_accuracy"])
    return {
        "method": "centralised", "fingerprint": fingerprint,
        "final_accuracy": history[-1]["test_accuracy"],
        "final_macro_f1": history[-1]["test_macro_f1"],
        "best_accuracy": best["test_accuracy"], "best_epoch": best["epoch"],
        "curve": [{"epoch": h["epoch"], "test_accuracy": h["test_accuracy"],
                   "test_macro_f1": h["test_macro_f1"], "loss": h["loss"]} for h in history],
        "num_samples": info["synthetic"]["num_samples"], "num_clients": num_clients,
        "epochs": info["epochs"], "model": info["model"], "init": "random",
        "wall_seconds": info["wall_seconds"],
        "note": "reference upper bound (pooled private data, one process); not an FL method"}


def centralised(pre_cfg: Any, *, model_cfg: Any, run_cfg: Any, manifest: Any,
                data_dir: str | Path, out_dir: str | Path, augment: bool, fingerprint: str = "",
                resume: bool = False, comm: Any = None) -> dict | None:
    """Train the centralised reference (collective over `comm`; only rank 0 works). Returns
    summary.json's dict on rank 0, None elsewhere."""
    from gptfl_hpc.data.shards import set_access_rank
    from gptfl_hpc.fsio import write_json
    from gptfl_hpc.parallel.comm import get_comm
    from gptfl_hpc.train.pretrain import pretrain

    comm = comm if comm is not None else get_comm()
    set_access_rank(comm.rank)  # the shard access log (tests prove who read what)
    out = Path(out_dir)
    sub = comm.split(0 if comm.rank == 0 else -1, comm.rank)  # rank 0 alone
    summary = None
    if sub is not None:
        t0 = time.perf_counter()
        pool = out / POOL_NAME
        try:
            out.mkdir(parents=True, exist_ok=True)
            x, y = pool_clients(manifest, data_dir)
            write_pool(pool, x, y, manifest.kind)
            log.info("centralised: pooled %d samples of %d clients (rank 0 alone reads every "
                     "shard; a reference, not an FL method) in %.1fs", len(y),
                     len(manifest.clients), time.perf_counter() - t0)
            del x, y
            info = pretrain(dataclasses.replace(pre_cfg, init=None, val_fraction=0.0),
                            model_cfg=model_cfg,
                            run_cfg=run_cfg, synthetic_path=pool, data_dir=data_dir,
                            out_dir=out, augment=augment, manifest=manifest,
                            fingerprint=fingerprint, resume=resume, comm=sub, leak_check=False,
                            names=(WEIGHTS_NAME, INFO_NAME))
        finally:
            sub.free()
            pool.unlink(missing_ok=True)
        summary = summarise(info, num_clients=len(manifest.clients), fingerprint=fingerprint)
        write_json(out / SUMMARY_NAME, summary)
        log.info("centralised: final test accuracy %.4f (best %.4f at epoch %d) -> %s",
                 summary["final_accuracy"], summary["best_accuracy"], summary["best_epoch"],
                 out / SUMMARY_NAME)
    comm.barrier()
    return summary
