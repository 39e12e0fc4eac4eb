"""manifest.json: the description of a prepared data directory, written last by ``prepare``.

Its presence marks a complete dataset. It lists every shard with its sample count and checksum,
plus what a model needs (input shape, classes, normalisation). It never holds per-client label
counts: the server may learn how many samples a client has, not which labels.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc.errors import DataError
from gptfl_hpc.fsio import write_json

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
TEST_FILE = "test.h5"
PUBLIC_FILE = "public.h5"
KIND_DTYPES = {"image": "uint8", "features": "float32", "audio": "int16"}
"""Sample dtype of each dataset kind (what a shard's /images must hold)."""


def client_file(cid: int) -> str:
    """Relative path of a client's shard inside the data directory."""
    return f"clients/client_{cid:05d}.h5"


def safe_path(data_dir: str | Path, rel: str) -> Path:
    """`data_dir/rel`, refusing anything that leaves the directory: absolute paths, '..', and
    symbolic links (a link could make one client's entry read another client's shard, or any
    file on the machine)."""
    import os

    base = Path(data_dir)
    p = base / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise DataError(f"{base / MANIFEST_NAME}: path {rel!r} leaves the data directory")
    cur = base
    for part in Path(rel).parts:
        cur = cur / part
        if cur.is_symlink():
            raise DataError(f"{cur}: is a symbolic link; valid: the regular files `gptfl-hpc "
                            "prepare` wrote (re-run it into a new directory)")
    real_base = os.path.realpath(base)
    if os.path.commonpath([real_base, os.path.realpath(p)]) != real_base:
        raise DataError(f"{p}: resolves outside {base}")
    return p


def resolve_data_dir(data_dir: str | None, out: str | Path) -> Path:
    """Where prepared shards live: ``data.dir`` when set, else ``<out>/data``."""
    return Path(data_dir) if data_dir else Path(out) / "data"


@dataclass
class ClientEntry:
    id: int
    file: str
    """Path relative to the data directory (clients/client_00000.h5)."""
    num_samples: int
    sha256: str


@dataclass
class SplitEntry:
    file: str
    num_samples: int
    sha256: str


@dataclass
class Manifest:
    format_version: int
    dataset: str
    kind: str
    """Either "image" (uint8 N,H,W,C) or "features" (float32 N,D)."""
    input_shape: list[int]
    """Per-sample shape: [H, W, C] or [D]."""
    num_classes: int
    label_names: list[str]
    norm_mean: list[float]
    """Images: per channel, pixel values scaled to [0, 1]. Features: per feature, raw units."""
    norm_std: list[float]
    partition: str
    alpha: float | None
    """Dirichlet concentration; None for iid/natural."""
    seed: int
    num_clients: int
    clients: list[ClientEntry]
    test: SplitEntry
    public: SplitEntry | None
    config_hash: str
    num_train: int
    """Size of the private pool (sum of the client sizes)."""
    min_client_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (source file, split sizes)."""

    # ---------------------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, data_dir: str | Path) -> Path:
        """Write DIR/manifest.json atomically."""
        path = Path(data_dir) / MANIFEST_NAME
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, data_dir: str | Path) -> Manifest:
        path = Path(data_dir) / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"no {MANIFEST_NAME} in {data_dir}: run `gptfl-hpc prepare CONFIG "
                            f"--out {data_dir}` first")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({' '.join(str(e).split())}); delete "
                            f"{data_dir} and run `gptfl-hpc prepare` again") from None
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object")
        version = raw.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise DataError(f"{where}: format_version {version!r} is not supported (this "
                            f"gptfl-hpc reads <= {FORMAT_VERSION}); re-run `gptfl-hpc prepare`")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - raw.keys())
        if missing:
            raise DataError(f"{where}: missing field(s) {', '.join(missing)}; re-run "
                            "`gptfl-hpc prepare`")
        kw = {k: v for k, v in raw.items() if k in names}
        try:
            kw["clients"] = [ClientEntry(**c) for c in raw["clients"]]
            kw["test"] = SplitEntry(**raw["test"])
            kw["public"] = SplitEntry(**raw["public"]) if raw.get("public") else None
        except (TypeError, AttributeError) as e:
            raise DataError(f"{where}: malformed clients/test/public entry ({e})") from None
        m = cls(**kw)
        if [c.id for c in m.clients] != list(range(m.num_clients)):
            raise DataError(f"{where}: clients must be listed with ids 0..{m.num_clients - 1}")
        expected = {f"client {c.id}": (c.file, client_file(c.id)) for c in m.clients}
        expected["test"] = (m.test.file, TEST_FILE)
        if m.public is not None:
            expected["public"] = (m.public.file, PUBLIC_FILE)
        for what, (got, want) in expected.items():
            if got != want:
                raise DataError(f"{where}: {what} file {got!r}; valid: {want!r} (a prepared "
                                "directory only refers to its own files)")
        if m.kind not in KIND_DTYPES:
            raise DataError(f"{where}: kind {m.kind!r}; valid: {', '.join(KIND_DTYPES)}")
        return m

    # ---------------------------------------------------------------------------- paths

    def client_path(self, data_dir: str | Path, cid: int) -> Path:
        return safe_path(data_dir, self._client(cid).file)

    def test_path(self, data_dir: str | Path) -> Path:
        return safe_path(data_dir, self.test.file)

    def public_path(self, data_dir: str | Path) -> Path:
        if self.public is None:
            raise DataError(f"dataset {self.dataset} in {data_dir} has no public split "
                            "(only data.source=digits reserves one)")
        return safe_path(data_dir, self.public.file)

    def _client(self, cid: int) -> ClientEntry:
        if not 0 <= int(cid) < len(self.clients):
            raise DataError(f"client id {cid} not in the manifest "
                            f"(valid: 0..{len(self.clients) - 1})")
        return self.clients[int(cid)]

    # ---------------------------------------------------------------------------- reading

    def _read(self, path: Path, sha256: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
        from gptfl_hpc.data.shards import read_shard

        x, y, attrs = read_shard(path, num_classes=self.num_classes,
                                 input_shape=tuple(self.input_shape), verify=verify,
                                 dtype=KIND_DTYPES[self.kind])
        if attrs.get("sha256") != sha256:
            raise DataError(f"shard {path}: checksum {str(attrs.get('sha256'))[:12]}... differs "
                            f"from the manifest's {sha256[:12]}...: the file belongs to another "
                            "prepare run; re-run `gptfl-hpc prepare` into a new directory")
        return x, y

    def read_client(self, data_dir: str | Path, cid: int,
                    verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of client ``cid``, checked against this manifest."""
        return self._read(self.client_path(data_dir, cid), self._client(cid).sha256, verify)

    def read_test(self, data_dir: str | Path, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        return self._read(self.test_path(data_dir), self.test.sha256, verify)

    def read_public(self, data_dir: str | Path,
                    verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        path = self.public_path(data_dir)
        assert self.public is not None
        return self._read(path, self.public.sha256, verify)

    def check_client(self, data_dir: str | Path, cid: int) -> None:
        """Cheap start-up check of a client's shard (no sample read): it exists inside the data
        directory, is a readable HDF5 file, and its attributes match this manifest."""
        from gptfl_hpc.data.shards import read_attrs

        entry = self._client(cid)
        path = self.client_path(data_dir, cid)
        attrs = read_attrs(path)
        if attrs.get("sha256") != entry.sha256 or attrs.get("num_samples") != entry.num_samples:
            raise DataError(f"shard {path}: its checksum/size attributes differ from the "
                            "manifest's: the file belongs to another prepare run; re-run "
                            "`gptfl-hpc prepare` into a new directory")

    def client_sizes(self) -> list[int]:
        return [c.num_samples for c in self.clients]
