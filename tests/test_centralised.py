"""The centralised reference (gptfl_hpc/train/centralised.py): rank 0 alone pools every client's
shard and trains the model on it with the pretraining loop; summary.json, a provenance record,
reuse, and a report row; `run` with only this method runs no generator or synthesis."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import run_cli

from gptfl_hpc import provenance as pv
from gptfl_hpc.config import load_config
from gptfl_hpc.data.manifest import Manifest
from gptfl_hpc.errors import ConfigError, DataError
from gptfl_hpc.train import centralised as C

TINY = "configs/tiny.yaml"


def test_centralised_is_an_opt_in_method() -> None:
    assert "centralised" not in load_config(TINY).run.methods
    assert load_config(TINY, ["run.methods=[centralised]"]).run.methods == ["centralised"]
    with pytest.raises(ConfigError, match=r"run.methods.*valid: .*centralised"):
        load_config(TINY, ["run.methods=[central]"])


def test_its_request_reads_the_pretrain_and_model_settings_only() -> None:
    base = load_config(TINY)
    fp = pv.request("centralised", base).fingerprint
    for o in ("pretrain.epochs=3", "model.name=convnet", "run.seed=1", "fl.augment=false"):
        assert pv.request("centralised", load_config(TINY, [o])).fingerprint != fp, o
    for o in ("fl.client_lr=0.1", "gen.volume=1.0", "fl.rounds=9",
              "pretrain.init=/tmp/b.safetensors"):
        assert pv.request("centralised", load_config(TINY, [o])).fingerprint == fp, o


def test_write_pool_refuses_a_non_image_non_audio_kind(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"centralised: needs an image or audio dataset"):
        C.write_pool(tmp_path / "p.h5", np.zeros((2, 3), np.float32), np.zeros(2), "features")


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("central") / "run"
    log = out.parent / "access"
    p = run_cli(["run", TINY, "run.methods=[centralised]", "pretrain.epochs=3", "--out", out],
                n=3, timeout=600, extra_env={"GPTFL_ACCESS_LOG": str(log)})
    return out, p, log


def test_rank0_alone_pools_every_client_and_trains(central_run) -> None:
    out, p, log = central_run
    m = Manifest.load(out / "data")
    s = json.loads((out / "centralised" / "summary.json").read_text())
    curve = [h["test_accuracy"] for h in s["curve"]]
    assert [h["epoch"] for h in s["curve"]] == [1, 2, 3]
    assert s["final_accuracy"] == curve[-1] and s["best_accuracy"] == max(curve)
    assert s["best_epoch"] == 1 + curve.index(max(curve))
    assert s["num_samples"] == m.num_train == sum(m.client_sizes())
    assert s["num_clients"] == len(m.clients) and s["init"] == "random"
    assert 1.0 / m.num_classes < s["final_accuracy"] <= 1.0
    info = json.loads((out / "centralised" / "centralised.json").read_text())
    assert info["history"][-1]["test_accuracy"] == s["final_accuracy"]
    assert info["pretrain"]["epochs"] == 3 and info["init"] == "random"
    assert not (out / "centralised" / C.POOL_NAME).exists(), "the pool is removed"
    # the record: the centralised stage's request, every output digested
    rec = pv.read_record(out / "centralised", "centralised")
    assert rec["fingerprint"] == s["fingerprint"]
    assert set(rec["outputs"]) == {"summary", "weights", "info"}
    assert rec["request"]["config"]["pretrain.epochs"] == 3
    # who read the client shards: rank 0, every one of them, and no other rank
    reads = [ln.split("\t") for f in log.glob("access-*.log")
             for ln in f.read_text().splitlines()]
    shard_reads = {(r, Path(path).name) for r, mode, path in reads
                   if mode == "r" and "/clients/" in path}
    assert {r for r, _ in shard_reads} == {"0"}
    assert {n for _, n in shard_reads} == {Path(c.file).name for c in m.clients}
    # no server stage but prepare ran; the report has the row
    assert "== stage generator" not in p.stderr and "== stage synthesize" not in p.stderr
    report = json.loads((out / "report.json").read_text())
    (row,) = report["rows"]
    assert row["method"] == "centralised" and row["final_accuracy"] == s["final_accuracy"]
    assert row["best_accuracy"] == s["best_accuracy"]
    md = (out / "report.md").read_text()
    assert f"| centralised | {100 * s['final_accuracy']:.1f}% |" in md
    assert "reference upper bound, not an FL method" in md


def test_the_pool_is_the_clients_shards_concatenated(central_run) -> None:
    out, _, _ = central_run
    m = Manifest.load(out / "data")
    x, y = C.pool_clients(m, out / "data")
    parts = [m.read_client(out / "data", c) for c in range(len(m.clients))]
    assert np.array_equal(x, np.concatenate([a for a, _ in parts]))
    assert np.array_equal(y, np.concatenate([b for _, b in parts]))
    path = out.parent / "pool.h5"
    C.write_pool(path, x, y, m.kind)
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["images"][()], x) and np.array_equal(f["labels"][()], y)
        assert f.attrs["split"] == "pooled"


def test_a_second_run_reuses_it_and_another_request_is_refused(central_run) -> None:
    out, _, _ = central_run
    again = run_cli(["run", TINY, "run.methods=[centralised]", "pretrain.epochs=3", "--out",
                     out], n=1, timeout=300)
    assert "== stage centralised: complete for this request" in again.stderr
    other = run_cli(["run", TINY, "run.methods=[centralised]", "pretrain.epochs=2", "--out",
                     out], n=1, timeout=300, check=False)
    assert other.returncode != 0
    assert "differs in pretrain.epochs" in other.stderr
