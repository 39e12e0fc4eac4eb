"""HDF5 shard round trip, corruption detection and the access audit log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from gptfl_hpc.data import shards
from gptfl_hpc.data.shards import (
    content_sha256,
    read_arrays,
    read_attrs,
    read_shard,
    set_access_rank,
    write_shard,
)
from gptfl_hpc.errors import DataError

ATTRS = {"dataset": "toy", "client_id": 3, "partition": "dirichlet", "seed": 7,
         "label_names": ["a", "b", "c"]}


@pytest.fixture(autouse=True)
def _reset_rank():
    yield
    set_access_rank(-1)


def _images(n: int = 50, shape: tuple = (8, 8, 1)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 3, n)


def test_roundtrip_uint8_images(tmp_path: Path) -> None:
    x, y = _images()
    path = tmp_path / "clients" / "client_00003.h5"
    sha = write_shard(path, x, y, ATTRS)
    assert sha == content_sha256(x, y)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    x2, y2, attrs = read_shard(path, num_classes=3, input_shape=(8, 8, 1))
    assert x2.dtype == np.uint8 and np.array_equal(x2, x)
    assert y2.dtype == np.int64 and np.array_equal(y2, y)
    for key in ("dataset", "client_id", "num_samples", "label_names", "partition", "seed",
                "format_version", "sha256", "kind"):
        assert key in attrs, key
    assert attrs["client_id"] == 3 and attrs["num_samples"] == 50 and attrs["seed"] == 7
    assert attrs["label_names"] == ["a", "b", "c"] and attrs["kind"] == "image"
    assert attrs["sha256"] == sha and attrs["format_version"] == shards.FORMAT_VERSION
    with h5py.File(path, "r") as f:  # stored types and layout, as documented
        assert f["images"].dtype == np.uint8 and f["images"].chunks is not None
        assert f["labels"].dtype == np.int64
        assert json.loads(f.attrs["label_names"]) == ["a", "b", "c"]
    assert read_attrs(path)["sha256"] == sha


def test_roundtrip_float_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    write_shard(tmp_path / "f.h5", x, y, {"dataset": "feat", "label_names": ["a", "b", "c"]})
    x2, y2, attrs = read_shard(tmp_path / "f.h5", num_classes=3, input_shape=(16,))
    assert x2.dtype == np.float32 and np.array_equal(x2, x) and np.array_equal(y2, y)
    assert attrs["kind"] == "features" and attrs["client_id"] == -1


def test_write_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uint8"):
        write_shard(tmp_path / "a.h5", np.zeros((3, 4), np.float64), np.zeros(3, int), ATTRS)
    with pytest.raises(DataError, match="3 images but 2 labels"):
        write_shard(tmp_path / "a.h5", np.zeros((3, 2, 2, 1), np.uint8), np.zeros(2, int), ATTRS)
    assert not (tmp_path / "a.h5").exists()


def test_checksum_mismatch_detected(tmp_path: Path) -> None:
    x, y = _images()
    path = tmp_path / "s.h5"
    write_shard(path, x, y, ATTRS)
    with h5py.File(path, "r+") as f:
        f["images"][0, 0, 0, 0] = (int(f["images"][0, 0, 0, 0]) + 1) % 256
    with pytest.raises(DataError, match=r"s\.h5: checksum mismatch"):
        read_shard(path)
    read_shard(path, verify=False)  # explicitly unverified reads still work


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    x, y = _images(2000)
    path = tmp_path / "t.h5"
    write_shard(path, x, y, ATTRS)
    data = path.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc\.h5") as e:
        read_shard(tmp_path / "trunc.h5")
    assert "\n" not in str(e.value)
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DataError, match=r"junk\.h5: not a readable HDF5 file"):
        read_shard(tmp_path / "junk.h5")
    with pytest.raises(DataError, match=r"missing\.h5: not found"):
        read_shard(tmp_path / "missing.h5")


def test_missing_dataset(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["images"] = np.zeros((2, 2, 2, 1), np.uint8)
    with pytest.raises(DataError, match="no dataset 'labels'"):
        read_shard(tmp_path / "m.h5")


def test_labels_out_of_range(tmp_path: Path) -> None:
    x, _ = _images(10)
    write_shard(tmp_path / "l.h5", x, np.arange(10), ATTRS)
    read_shard(tmp_path / "l.h5", num_classes=10)
    with pytest.raises(DataError, match=r"labels out of range \[0, 5\): found min 0, max 9"):
        read_shard(tmp_path / "l.h5", num_classes=5)


def test_shape_mismatch(tmp_path: Path) -> None:
    x, y = _images(10)
    write_shard(tmp_path / "x.h5", x, y, ATTRS)
    with pytest.raises(DataError, match=r"images have shape \(8,8,1\) per sample, "
                                        r"model/manifest expects \(32,32,3\)"):
        read_shard(tmp_path / "x.h5", input_shape=(32, 32, 3))


def test_length_mismatch(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "n.h5", "w") as f:
        f["images"] = np.zeros((5, 2, 2, 1), np.uint8)
        f["labels"] = np.zeros(4, np.int64)
    with pytest.raises(DataError, match="5 images but 4 labels"):
        read_shard(tmp_path / "n.h5", verify=False)


def test_read_arrays(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "syn.h5", "w") as f:
        f["images"] = np.ones((4, 2, 2, 3), np.uint8)
        f["labels"] = np.arange(4)
    out = read_arrays(tmp_path / "syn.h5", ["labels"], optional=["images", "absent"])
    assert sorted(out) == ["images", "labels"] and out["labels"].tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match=r"no dataset 'weights' \(has: images, labels\)"):
        read_arrays(tmp_path / "syn.h5", ["weights"])
    with pytest.raises(DataError, match="not found"):
        read_arrays(tmp_path / "nope.h5", ["labels"])


def test_access_log_records_rank_mode_path(tmp_path: Path, monkeypatch) -> None:
    logdir = tmp_path / "access"
    monkeypatch.setenv("GPTFL_ACCESS_LOG", str(logdir))
    x, y = _images(5)
    path = tmp_path / "a.h5"
    write_shard(path, x, y, ATTRS)  # rank -1 until set
    set_access_rank(2)
    read_shard(path)
    read_arrays(path, ["labels"])
    with pytest.raises(DataError):
        read_shard(tmp_path / "other.h5")  # failed attempts are recorded too
    lines = (logdir / f"access-{os.getpid()}.log").read_text().splitlines()
    a, other = os.path.abspath(path), os.path.abspath(tmp_path / "other.h5")
    assert lines == [f"-1\tw\t{a}", f"2\tr\t{a}", f"2\tr\t{a}", f"2\tr\t{other}"]
    monkeypatch.delenv("GPTFL_ACCESS_LOG")
    read_shard(path)  # no log configured: nothing appended
    assert len((logdir / f"access-{os.getpid()}.log").read_text().splitlines()) == 4
