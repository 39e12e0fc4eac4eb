"""Bad inputs and faults, by class: every one is a one-line error naming the key or file (and the
valid choices), a non-zero exit, before any expensive work, and no earlier output is lost.

Classes: the file system (an --out that is a file, a read-only --out, a full disk while writing
data, checkpoints or final weights, a config path that is a directory); the config file (not
UTF-8, nested too deep, duplicate keys or sections, a negative seed, non-finite numbers, counts
too large to allocate); prepared data (manifest paths that leave the data directory, symbolic
links to another client's shard, HDF5 datasets with external storage, float samples where the
kind needs uint8); and a stop request during `prepare`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import PY, REPO, env, run_cli

TINY = "configs/tiny.yaml"


def one_error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode not in (0, None), p.stderr[-2000:]
    errs = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert errs, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in errs[0], (n, errs[0])
    return errs[0]


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mount (root only; the CI machine runs as root)."""
    mounts = []

    def make(size: str, ro: bool = False) -> Path:
        d = tmp_path / f"fs{len(mounts)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "data"
    run_cli(["prepare", TINY, "--out", d], timeout=120)
    return d


# ---------------------------------------------------------------------------- the file system


@pytest.mark.parametrize("command", ["prepare", "federate", "run", "synthesize"])
def test_out_is_an_existing_file(tmp_path, command):
    f = tmp_path / "afile"
    f.write_text("x")
    p = run_cli([command, TINY, "--out", f], check=False, timeout=60)
    one_error_line(p, str(f), "exists and is not a directory")
    assert f.read_text() == "x"


def test_out_on_a_read_only_file_system(tmpfs):
    ro = tmpfs("1m", ro=True)
    for out in (ro, ro / "sub"):
        p = run_cli(["federate", TINY, "--out", out], check=False, timeout=60)
        one_error_line(p, str(ro), "Read-only file system")


def test_full_disk_while_preparing_and_while_checkpointing(tmpfs, data_dir, tmp_path):
    small = tmpfs("40k")
    p = run_cli(["prepare", TINY, "--out", small / "d"], check=False, timeout=120)
    one_error_line(p, str(small / "d"), "No space left on device")
    # FL: the data elsewhere, the run directory on a disk that fills at the first checkpoint
    # (the model is ~600 kB); the error names the file, the earlier outputs stay readable
    disk = tmpfs("700k")
    p = run_cli(["federate", TINY, "--out", disk / "fl", f"data.dir={data_dir}"], check=False,
                timeout=120)
    one_error_line(p, "No space left on device", str(disk / "fl"))
    rows = [json.loads(x) for x in (disk / "fl" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[0]["round"] == 1
    assert not (disk / "fl" / "federate.done.json").exists()


def test_config_path_is_a_directory(tmp_path):
    p = run_cli(["check-config", tmp_path], check=False, timeout=60)
    one_error_line(p, str(tmp_path), "is a directory")


# ---------------------------------------------------------------------------- the config file


@pytest.mark.parametrize("text,needle", [
    (b"fl:\n  rounds: 3\n  name: \xff\xfe\n", "not UTF-8 text"),
    (("x: " + "[" * 200 + "]" * 200 + "\n").encode(), "nested"),
    (b"fl:\n  rounds: 3\n  rounds: 4\n", "rounds: defined twice (lines 2 and 3)"),
    (b"fl:\n  rounds: 3\nrun:\n  seed: 1\nfl:\n  rounds: 5\n", "fl: defined twice"),
    (b"run:\n  seed: -1\n", "run.seed"),
    (b"fl:\n  client_lr: .inf\n", "fl.client_lr: invalid value inf; valid: a finite number"),
    (b"fl:\n  server_lr: .nan\n", "fl.server_lr: invalid value nan; valid: a finite number"),
    (b"gen:\n  guidance: [1, .inf]\n", "gen.guidance[1]: invalid value inf"),
    (b"gen:\n  count: 1000000000000000\n", "gen.count: invalid value 1000000000000000"),
    (b"gen:\n  micro_batch: 100000000\n", "gen.micro_batch"),
    (b"gen:\n  train:\n    batch_size: 1000000000\n", "gen.train.batch_size"),
    (b"fl:\n  batch_size: 1000000000\n", "fl.batch_size"),
])
def test_bad_config_files(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text)
    t = time.time()
    p = run_cli(["check-config", cfg], check=False, timeout=60)
    line = one_error_line(p, needle)
    assert str(cfg) in line or "config key" in line
    assert time.time() - t < 30


def test_bad_overrides():
    for over, needle in (("fl.rounds=1", "given twice"), ("fl..rounds=3", "dotted key"),
                         ("fl.client_lr=.nan", "finite")):
        p = run_cli(["check-config", TINY, "fl.rounds=2", over], check=False, timeout=60)
        one_error_line(p, needle)


# ---------------------------------------------------------------------------- prepared data


def _copy(data_dir: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "data"
    shutil.copytree(data_dir, d, symlinks=True)
    return d


def _edit_manifest(d: Path, fn) -> None:
    from gptfl_hpc import provenance

    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))
    # re-commit, as an attacker who can write the directory would: the content check must
    # stop it, not the record
    rec = json.loads((d / "prepare.done.json").read_text())
    rec["outputs"]["manifest"]["digest"] = provenance.digest(d / "manifest.json")
    (d / "prepare.done.json").write_text(json.dumps(rec))


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.h5", "clients/../../x.h5"])
def test_manifest_paths_must_stay_in_the_data_dir(data_dir, tmp_path, bad):
    d = _copy(data_dir, tmp_path)
    _edit_manifest(d, lambda m: m["clients"][1].update(file=bad))
    p = run_cli(["federate", TINY, "--out", tmp_path / "o", f"data.dir={d}"], check=False,
                timeout=120)
    one_error_line(p, "manifest.json", repr(bad))


def test_symlink_to_another_clients_shard(data_dir, tmp_path):
    d = _copy(data_dir, tmp_path)
    victim = d / "clients" / "client_00001.h5"
    victim.unlink()
    victim.symlink_to(d / "clients" / "client_00002.h5")
    p = run_cli(["federate", TINY, "--out", tmp_path / "o", f"data.dir={d}"], n=3, check=False,
                timeout=120)
    one_error_line(p, str(victim), "symbolic link")


def test_hdf5_external_storage_is_refused(data_dir, tmp_path):
    from gptfl_hpc.data.shards import read_shard

    d = _copy(data_dir, tmp_path)
    victim = d / "clients" / "client_00000.h5"
    x, y, attrs = read_shard(victim)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(x.tobytes())  # a file the shard pulls in by reference
    victim.unlink()
    with h5py.File(victim, "w") as f:
        f.create_dataset("images", shape=x.shape, dtype=x.dtype,
                         external=[(str(secret), 0, x.nbytes)])
        f["labels"] = y
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, list) else v
    p = run_cli(["federate", TINY, "--out", tmp_path / "o", f"data.dir={d}",
                 "fl.placement=static"], n=3, check=False, timeout=120)
    one_error_line(p, str(victim), "external or virtual storage")


def test_float_samples_in_an_image_dataset(data_dir, tmp_path):
    from gptfl_hpc.data.shards import read_shard, write_shard

    d = _copy(data_dir, tmp_path)
    victim = d / "clients" / "client_00003.h5"
    x, y, _ = read_shard(victim)
    sha = write_shard(victim, x.reshape(len(x), -1).astype(np.float32), y,
                      {"dataset": "digits", "client_id": 3})
    _edit_manifest(d, lambda m: m["clients"][3].update(sha256=sha))
    p = run_cli(["federate", TINY, "--out", tmp_path / "o", f"data.dir={d}",
                 "fl.placement=static"], n=3, check=False, timeout=120)
    one_error_line(p, str(victim), "float32", "uint8")


# ---------------------------------------------------------------------------- signals


def test_sigterm_during_prepare_is_honoured(tmp_path):
    """`prepare` used to swallow SIGTERM/SIGUSR1 and exit 0 after finishing."""
    out = tmp_path / "d"
    cmd = [PY, "-m", "gptfl_hpc", "prepare", TINY, "--out", str(out), "data.num_clients=150",
           "data.partition=iid"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), text=True, stderr=subprocess.PIPE)
    try:
        for line in proc.stderr:  # the source is loaded; shards are being written
            if "loaded digits" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert rc == 124, rest[-2000:]
    assert "prepare stopped by SIGTERM" in rest
    assert not (out / "manifest.json").exists()
    # the rerun prepares it and exits 0
    run_cli(["prepare", TINY, "--out", out, "data.num_clients=150", "data.partition=iid"],
            timeout=120)
    assert (out / "prepare.done.json").exists()
