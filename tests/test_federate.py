"""End-to-end federate runs under mpiexec (-n 1 / -n 3) with hard timeouts.

Tolerance of the 1-vs-3-rank comparison: atol 1e-5 on every weight. The per-client updates are
bit-identical (each client's training depends only on (seed, client, round) and the global
weights); only the order of the float32 sum of the client updates differs (rank-local sums,
then MPI's reduction order). Each round adds a few ulps (~1e-7 relative) of difference that
subsequent SGD steps can amplify mildly; over the 3 rounds used here the observed max
difference is ~3e-8, so 1e-5 leaves margin while still catching any real algorithmic difference
(a mis-weighted or missing client update moves weights by 1e-3 or more).
"""

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from gptfl_hpc.data.manifest import Manifest
from gptfl_hpc.data.shards import read_shard, write_shard
from gptfl_hpc.fl.schedule import place_clients, sample_clients

TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "data"
    run_cli(["prepare", TINY, "--out", d], timeout=120)
    return d


def federate(out, data_dir, *over, n=3, check=True, env=None, timeout=180):
    return run_cli(["federate", TINY, "--out", out, f"data.dir={data_dir}", *over], n=n,
                   check=check, extra_env=env, timeout=timeout)


def weights(out):
    return load_file(str(Path(out) / "final.safetensors"))


def test_one_vs_three_ranks_same_weights_and_outputs(data_dir, tmp_path):
    federate(tmp_path / "one", data_dir, n=None)
    federate(tmp_path / "three", data_dir, n=3)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "three")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    # the replicated server step (default) and the rank-0 step + Bcast agree bit for bit
    federate(tmp_path / "bcast", data_dir, "fl.sync=bcast", n=3)
    c = weights(tmp_path / "bcast")
    assert all(torch.equal(b[k], c[k]) for k in b)
    # outputs and their fields
    out = tmp_path / "three"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    for r in lines:
        for key in ("test_accuracy", "test_macro_f1", "test_loss", "train_loss",
                    "sampled_clients", "t_client", "t_comm", "t_server", "bytes_reduced",
                    "grad_diversity"):
            assert r[key] is not None, key
        assert r["sampled_clients"] == sample_clients(0, r["round"], 6, 4)
        assert r["bytes_reduced"] > 4 * 151306
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampled_clients"] for r in one] == [r["sampled_clients"] for r in lines]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["rounds"] == 3
    assert summary["final_accuracy"] == lines[-1]["test_accuracy"]
    assert summary["best_accuracy"] == max(r["test_accuracy"] for r in lines)
    ckpts = sorted(p.name for p in (out / "ckpt").iterdir())
    assert ckpts == ["round-00002", "round-00003"]  # keep_checkpoints=2


def test_resume_is_bitwise_identical(data_dir, tmp_path):
    over = ["fl.rounds=4", "fl.checkpoint_every=2"]
    federate(tmp_path / "full", data_dir, *over)
    # preempted after round 3 (GPTFL_STOP_AFTER counts the server's round boundaries)
    p = federate(tmp_path / "cut", data_dir, *over, check=False, env={"GPTFL_STOP_AFTER": "3"})
    assert p.returncode != 0, p.stderr
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    assert (tmp_path / "cut" / "ckpt" / "round-00003" / "state.json").exists()
    federate(tmp_path / "cut", data_dir, *over, "--resume")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rounds = [json.loads(x)["round"] for x in
              (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_fedprox_and_fedadam_run_and_differ(data_dir, tmp_path):
    federate(tmp_path / "prox", data_dir, "fl.algorithm=fedprox", "fl.prox_mu=0.1",
             "fl.rounds=2", n=None)
    federate(tmp_path / "adam", data_dir, "fl.algorithm=fedadam", "fl.server_lr=0.01",
             "fl.rounds=2", n=None)
    federate(tmp_path / "avg", data_dir, "fl.rounds=2", n=None)
    a, p, d = weights(tmp_path / "avg"), weights(tmp_path / "prox"), weights(tmp_path / "adam")
    assert not torch.equal(a["fc2.weight"], p["fc2.weight"])
    assert not torch.equal(a["fc2.weight"], d["fc2.weight"])


def test_nan_update_is_dropped_and_round_continues(data_dir, tmp_path):
    victim = sample_clients(0, 1, 6, 4)[0]
    p = federate(tmp_path / "nan", data_dir, "fl.rounds=2",
                 env={"GPTFL_FAULT_NAN_CLIENT": str(victim)})
    assert "non-finite update; dropped" in p.stderr
    rec = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert rec[0]["clients_dropped"] == 1 and rec[0]["clients_ok"] == 3
    assert all(torch.isfinite(t.float()).all() for t in weights(tmp_path / "nan").values())


def test_client_ranks_open_only_their_own_shards(data_dir, tmp_path):
    audit = tmp_path / "audit"
    audit.mkdir()
    federate(tmp_path / "a", data_dir, "fl.rounds=1", env={"GPTFL_ACCESS_LOG": str(audit)})
    m = Manifest.load(data_dir)
    owner = place_clients([c.num_samples for c in m.clients], [1, 2])
    opened = {}
    for f in audit.glob("access-*.log"):
        for line in f.read_text().splitlines():
            rank, mode, path = line.split("\t")
            opened.setdefault(int(rank), []).append((mode, Path(path)))
    assert set(opened) == {0, 1, 2}
    for rank, items in opened.items():
        assert all(mode == "r" for mode, _ in items), items
        files = {p.resolve() for _, p in items}
        if rank == 0:
            assert files == {m.test_path(data_dir).resolve()}  # never a client shard
        else:
            want = {m.client_path(data_dir, c).resolve() for c, w in owner.items() if w == rank}
            assert files == want


# ---- failures: every rank exits non-zero within seconds, with a one-line error -------------

def _copy(data_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    return d


def assert_fails_fast(proc, started, needle):
    assert proc.returncode != 0
    assert time.time() - started < 60, "took too long: hang?"
    errs = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert any(needle in ln for ln in errs), proc.stderr[-3000:]


@pytest.mark.parametrize("damage", ["missing", "truncated", "labels", "shape"])
def test_bad_shard_ends_every_rank(data_dir, tmp_path, damage):
    d = _copy(data_dir, tmp_path)
    m = Manifest.load(d)
    victim = m.client_path(d, 1)
    images, labels, attrs = read_shard(victim)
    if damage == "missing":
        victim.unlink()
        needle = "not found"
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:2000])
        needle = str(victim.name)
    elif damage == "labels":
        labels = labels.copy()
        labels[0] = 42
        write_shard(victim, images, labels, {"dataset": "digits", "client_id": 1})
        needle = "out of range"
    else:
        write_shard(victim, np.zeros((len(labels), 16, 16, 1), np.uint8), labels,
                    {"dataset": "digits", "client_id": 1})
        needle = "shape"
    t = time.time()
    p = federate(tmp_path / "o", d, check=False, timeout=120)
    assert_fails_fast(p, t, needle)
    assert not (tmp_path / "o" / "final.safetensors").exists()


def test_exception_on_one_rank_aborts_the_job(data_dir, tmp_path):
    t = time.time()
    p = federate(tmp_path / "o", data_dir, check=False, env={"GPTFL_FAULT_RAISE_RANK": "2"},
                 timeout=120)
    assert p.returncode != 0 and time.time() - t < 60
    assert "injected fault on rank 2" in p.stderr


def test_world_size_must_match_slurm_ntasks(data_dir, tmp_path):
    t = time.time()
    p = federate(tmp_path / "o", data_dir, check=False, env={"SLURM_NTASKS": "5"}, timeout=120)
    assert_fails_fast(p, t, "SLURM_NTASKS")


def test_more_client_ranks_than_clients(tmp_path):
    d = tmp_path / "d2"
    run_cli(["prepare", TINY, "--out", d, "data.num_clients=2", "data.min_client_size=1",
             "fl.clients_per_round=2"])
    t = time.time()
    p = run_cli(["federate", TINY, "--out", tmp_path / "o", f"data.dir={d}",
                 "data.num_clients=2", "data.min_client_size=1", "fl.clients_per_round=2"],
                n=4, check=False, timeout=120)
    assert_fails_fast(p, t, "3 client ranks but only 2 clients")


def test_clients_per_round_larger_than_clients(data_dir, tmp_path):
    t = time.time()
    p = federate(tmp_path / "o", data_dir, "fl.clients_per_round=7", check=False)
    assert_fails_fast(p, t, "fl.clients_per_round")
    # a prepared dir with fewer clients than the config claims is caught too
    p = federate(tmp_path / "o", data_dir, "data.num_clients=10", "fl.clients_per_round=8",
                 check=False)
    assert_fails_fast(p, t, "fl.clients_per_round")


def test_model_that_does_not_fit_the_input(data_dir, tmp_path):
    t = time.time()
    p = federate(tmp_path / "o", data_dir, "model.name=convnet", "model.depth=4", check=False)
    assert_fails_fast(p, t, "model.depth")


def test_init_checkpoint_must_fit(data_dir, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"fc2.weight": torch.zeros(3, 3)}, str(bad))
    t = time.time()
    p = federate(tmp_path / "o", data_dir, f"fl.init={bad}", check=False, n=None)
    assert_fails_fast(p, t, "does not fit the model")
