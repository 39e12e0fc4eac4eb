"""Data preparation and shard access: sources, partitions, HDF5 shards, manifest. No torch.

Names are re-exported lazily, so ``import gptfl_hpc.data.partition`` does not pull in h5py or
scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Source": "sources", "load_source": "sources", "SOURCES": "sources",
    "partition": "partition", "stratified_split": "partition",
    "write_shard": "shards", "read_shard": "shards", "read_arrays": "shards",
    "read_attrs": "shards", "open_h5": "shards", "set_access_rank": "shards",
    "audit_access": "shards", "content_sha256": "shards",
    "Manifest": "manifest", "ClientEntry": "manifest", "SplitEntry": "manifest",
    "resolve_data_dir": "manifest",
    "prepare_data": "prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'gptfl_hpc.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gptfl_hpc.data.{mod}"), name)
