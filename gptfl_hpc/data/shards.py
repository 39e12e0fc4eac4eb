"""HDF5 shard format: one file per client (plus test/public), written once, read read-only.

Layout of a shard::

    /images   uint8 (N, H, W, C) images, or float32 (N, D) features; chunked, uncompressed
    /labels   int64 (N,)
    attrs     dataset, kind, split, client_id (-1 for test/public), num_samples,
              label_names (JSON list), partition, seed, format_version, sha256

``sha256`` is the hex SHA-256 of the images' bytes (C order, little-endian uint8/float32)
followed by the labels' bytes (C order, little-endian int64); see :func:`content_sha256`.

Access audit: when the environment variable ``GPTFL_ACCESS_LOG`` names a directory, every HDF5
open made through this module (read or write, including failed attempts) appends the line
``<rank>\\t<mode>\\t<absolute path>`` to ``$GPTFL_ACCESS_LOG/access-<pid>.log``. The rank is set
with :func:`set_access_rank` (the FL engine calls it; -1 until then). Tests use the log to prove
that each client rank opens only its own shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc.errors import DataError
from gptfl_hpc.fsio import atomic_path

FORMAT_VERSION = 1
ACCESS_LOG_ENV = "GPTFL_ACCESS_LOG"
CHUNK_BYTES = 1 << 20
"""Target chunk size of /images (about 1 MiB, whole samples per chunk)."""

_access_rank = -1


def set_access_rank(rank: int) -> None:
    """Rank written into the access log by this process from now on."""
    global _access_rank
    _access_rank = int(rank)


def get_access_rank() -> int:
    return _access_rank


def audit_access(mode: str, path: str | Path) -> None:
    """Append ``rank<TAB>mode<TAB>abspath`` to the access log, if GPTFL_ACCESS_LOG is set."""
    log_dir = os.environ.get(ACCESS_LOG_ENV)
    if not log_dir:
        return
    os.makedirs(log_dir, exist_ok=True)
    line = f"{_access_rank}\t{mode}\t{os.path.abspath(path)}\n".encode()
    fd = os.open(os.path.join(log_dir, f"access-{os.getpid()}.log"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


@contextlib.contextmanager
def open_h5(path: str | Path, mode: str = "r", *, what: str = "HDF5 file") -> Iterator[Any]:
    """Open an HDF5 file through the audit log; open failures become one-line DataErrors.

    ``mode`` is an h5py mode ("r", "r+", "a", "w", ...). Reads check that the file exists first.
    """
    import h5py

    audit_access(mode, path)
    if mode in ("r", "r+") and not Path(path).is_file():
        raise DataError(f"{what} {path}: not found")
    try:
        # Shards are written once (atomically) and then only read, so readers skip HDF5's file
        # locks, which fail on parallel file systems without flock (Lustre, NFS).
        f = h5py.File(path, mode, locking=False) if mode == "r" else h5py.File(path, mode)
    except (OSError, ValueError) as e:
        raise DataError(f"{what} {path}: not a readable HDF5 file ({_one_line(e)}); it may be "
                        "truncated or corrupt: re-create it") from None
    try:
        yield f
    finally:
        f.close()


def content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of images bytes (C order, little-endian) + labels bytes (little-endian int64)."""
    h = hashlib.sha256()
    img = np.ascontiguousarray(images)
    if img.dtype.byteorder == ">":
        img = img.astype(img.dtype.newbyteorder("<"))
    h.update(img.reshape(-1).view(np.uint8).data if img.size else b"")
    lab = np.ascontiguousarray(labels, dtype="<i8")
    h.update(lab.view(np.uint8).data if lab.size else b"")
    return h.hexdigest()


KINDS = {("uint8", 4): "image", ("float32", 2): "features", ("int16", 2): "audio"}
"""(sample dtype, array ndim) -> dataset kind: uint8 (N,H,W,C) images, float32 (N,D) features,
int16 (N,L) mono waveforms."""


def kind_of(images: np.ndarray) -> str | None:
    return KINDS.get((str(images.dtype), images.ndim))


def _check_arrays(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if kind_of(images) is None:
        raise DataError(f"{where}: samples must be uint8 (N,H,W,C) images, float32 (N,D) "
                        f"features or int16 (N,L) waveforms, got {images.dtype} with shape "
                        f"{images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-d integer array, got {labels.dtype} "
                        f"with shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")


def write_shard(path: str | Path, images: np.ndarray, labels: np.ndarray,
                attrs: dict[str, Any]) -> str:
    """Write one shard atomically; return its content sha256.

    ``attrs`` must hold ``dataset``; ``client_id`` (default -1), ``partition`` (default "none"),
    ``seed`` (default -1), ``label_names`` (list, stored as JSON) and any extra scalar attributes
    are stored as given. ``num_samples``, ``kind``, ``format_version`` and ``sha256`` are filled in.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    _check_arrays(images, labels, f"shard {path}")
    if "dataset" not in attrs:
        raise ValueError("write_shard: attrs must contain 'dataset'")
    labels = labels.astype(np.int64, copy=False)
    digest = content_sha256(images, labels)
    meta: dict[str, Any] = {"client_id": -1, "partition": "none", "seed": -1, "label_names": []}
    meta.update(attrs)
    meta["label_names"] = json.dumps(list(meta["label_names"]))
    meta.update(num_samples=len(labels), kind=kind_of(images),
                format_version=FORMAT_VERSION, sha256=digest)
    n = len(labels)
    row_bytes = max(1, images[:1].nbytes) if n else 1
    rows = int(min(n, max(1, CHUNK_BYTES // row_bytes)))
    audit_access("w", path)
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images,
                             chunks=(rows, *images.shape[1:]) if n else None)
            f.create_dataset("labels", data=labels)
            for k, v in meta.items():
                f.attrs[k] = v if v is not None else "null"
    return digest


def _fmt_shape(shape: Sequence[int]) -> str:
    shape = tuple(int(s) for s in shape)
    return "(" + ",".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _attrs_dict(attrs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    if isinstance(out.get("label_names"), str):
        try:
            out["label_names"] = json.loads(out["label_names"])
        except json.JSONDecodeError:
            pass
    return out


def _get(f: Any, name: str, path: str | Path, what: str) -> Any:
    import h5py

    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        have = ", ".join(sorted(f.keys())) or "nothing"
        raise DataError(f"{what} {path}: no dataset '{name}' (has: {have}); re-create the file")
    if obj.external or obj.is_virtual:
        # external/virtual storage makes HDF5 read other files of the machine into the array
        raise DataError(f"{what} {path}: dataset '{name}' uses external or virtual storage "
                        "(it reads other files); valid: self-contained datasets")
    return obj


def read_shard(path: str | Path, *, num_classes: int | None = None,
               input_shape: tuple | None = None, verify: bool = True,
               dtype: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a whole shard read-only and check it; return (images, labels, attrs).

    Raises a one-line DataError for a missing/corrupt file, a missing dataset, a checksum
    mismatch (when ``verify``), labels outside ``[0, num_classes)``, per-sample shape different
    from ``input_shape`` and images/labels of different lengths.
    """
    with open_h5(path, "r", what="shard") as f:
        ds_img = _get(f, "images", path, "shard")
        ds_lab = _get(f, "labels", path, "shard")
        try:
            attrs = _attrs_dict(f.attrs)
            images = ds_img[()]
            labels = ds_lab[()]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"shard {path}: unreadable data ({_one_line(e)}); the file is "
                            "truncated or corrupt: re-run `gptfl-hpc prepare`") from None
    if dtype is not None and images.dtype != np.dtype(dtype):
        raise DataError(f"shard {path}: samples are {images.dtype}, the dataset's kind needs "
                        f"{dtype}; re-run `gptfl-hpc prepare` into a new directory")
    if input_shape is not None and tuple(images.shape[1:]) != tuple(input_shape):
        raise DataError(f"shard {path}: images have shape {_fmt_shape(images.shape[1:])} per "
                        f"sample, model/manifest expects {_fmt_shape(input_shape)}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"shard {path}: labels must be 1-d integers, got {labels.dtype} "
                        f"{_fmt_shape(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(f"shard {path}: {len(images)} images but {len(labels)} labels")
    if "num_samples" in attrs and attrs["num_samples"] != len(labels):
        raise DataError(f"shard {path}: attribute num_samples={attrs['num_samples']} but the "
                        f"file holds {len(labels)} samples; re-run `gptfl-hpc prepare`")
    if verify:
        stored = attrs.get("sha256")
        if not stored:
            raise DataError(f"shard {path}: no sha256 attribute; re-run `gptfl-hpc prepare`")
        actual = content_sha256(images, labels)
        if actual != stored:
            raise DataError(f"shard {path}: checksum mismatch (stored {str(stored)[:12]}..., "
                            f"content {actual[:12]}...): the file was modified or is corrupt; "
                            "re-run `gptfl-hpc prepare` into a new directory")
    if num_classes is not None and len(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"shard {path}: labels out of range [0, {num_classes}): found "
                            f"min {lo}, max {hi}")
    return images, labels.astype(np.int64, copy=False), attrs


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The root attributes of an HDF5 file (read-only, audited), without loading datasets."""
    with open_h5(path, "r", what="shard") as f:
        try:
            return _attrs_dict(f.attrs)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"shard {path}: unreadable attributes ({_one_line(e)})") from None


def read_arrays(path: str | Path, names: list[str], *,
                optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read whole datasets ``names`` (required) and ``optional`` (when present) from any HDF5 file.

    Read-only and audited. A missing file or dataset, or a corrupt file, raises a one-line
    DataError that names the file and the datasets it holds.
    """
    out: dict[str, np.ndarray] = {}
    with open_h5(path, "r") as f:
        want = [(n, True) for n in names] + [(n, False) for n in optional if n not in names]
        for name, required in want:
            if name not in f and not required:
                continue
            ds = _get(f, name, path, "HDF5 file")
            try:
                out[name] = np.asarray(ds[()])
            except (OSError, ValueError, KeyError) as e:
                raise DataError(f"HDF5 file {path}: dataset '{name}' unreadable "
                                f"({_one_line(e)}); the file is truncated or corrupt") from None
    return out
