"""End-to-end federate runs under mpiexec (-n 1 / -n 3) with hard timeouts.

1 vs 3 ranks, balanced vs static placement: bit-identical weights (``torch.equal`` and the same
file bytes). Each client's update is a pure function of (seed, client, round, global weights),
computed with CPU kernels whose results do not depend on the thread count (run.cpu_kernels=
invariant: one process gets 2 threads here, each of the 3 ranks 1), and the round's sum is exact
fixed-point arithmetic (fl.aggregation=exact), so the order of the additions cannot matter.
With fl.aggregation=float32 the same runs agree to ~1e-7 (the float32 summation order).
"""

import json
import re
import shutil
import time
from pathlib import Path

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


def _sha(out):
    import hashlib

    return hashlib.sha256((Path(out) / "final.safetensors").read_bytes()).hexdigest()


def test_one_vs_three_ranks_same_weights_and_outputs(data_dir, tmp_path):
    # one process with 2 torch threads vs three ranks with 1 thread each
    federate(tmp_path / "one", data_dir, n=None, env={"OMP_NUM_THREADS": "2"})
    federate(tmp_path / "three", data_dir, n=3)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "three")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _sha(tmp_path / "one") == _sha(tmp_path / "three")  # sha256sum compares runs
    # the replicated server step (default) and the rank-0 step + Bcast agree bit for bit, and
    # so do clients pinned to ranks (static) and clients spread per round (balanced)
    federate(tmp_path / "bcast", data_dir, "fl.sync=bcast", n=3)
    federate(tmp_path / "static", data_dir, "fl.placement=static", n=3)
    for other in ("bcast", "static"):
        assert _sha(tmp_path / other) == _sha(tmp_path / "three"), other
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
    over = ["fl.rounds=4", "fl.checkpoint_every=1", "fl.keep_checkpoints=3"]
    federate(tmp_path / "full", data_dir, *over)
    # preempted after round 3 (GPTFL_STOP_AFTER counts the server's round boundaries)
    p = federate(tmp_path / "cut", data_dir, *over, check=False, env={"GPTFL_STOP_AFTER": "3"})
    assert p.returncode == 124, p.stderr[-3000:]
    cut = tmp_path / "cut"
    assert not (cut / "final.safetensors").exists()
    assert (cut / "ckpt" / "round-00003" / "state.json").exists()
    # without --resume the partial run is refused, not restarted over it
    p = federate(cut, data_dir, *over, check=False)
    assert_fails_fast(p, time.time(), "rerun with --resume")
    # a torn newest checkpoint (killed while the file system lost it) and a torn metrics line:
    # resume from the newest complete checkpoint, drop the torn tail
    (cut / "ckpt" / "round-00003" / "state.json").write_text('{"round": 3, "fing')
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "test_acc')
    federate(cut, data_dir, *over, "--resume")
    a, b = weights(tmp_path / "full"), weights(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rounds = [json.loads(x)["round"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_fresh_run_refuses_another_runs_checkpoints(data_dir, tmp_path):
    out = tmp_path / "o"
    p = federate(out, data_dir, "fl.rounds=3", check=False, env={"GPTFL_STOP_AFTER": "2"})
    assert p.returncode == 124
    before = sorted(x.name for x in (out / "ckpt").iterdir())
    t = time.time()
    p = federate(out, data_dir, "fl.rounds=3", "fl.client_lr=0.01", "--resume", check=False)
    assert_fails_fast(p, t, "checkpoints of another request")
    assert sorted(x.name for x in (out / "ckpt").iterdir()) == before  # nothing deleted


def test_finished_run_with_other_settings_is_refused_not_reported(data_dir, tmp_path):
    out = tmp_path / "o"
    federate(out, data_dir, "fl.rounds=2", n=None)
    again = federate(out, data_dir, "fl.rounds=2", n=None)  # same request: reused
    assert "complete for this request" in again.stderr
    t = time.time()
    p = federate(out, data_dir, "fl.rounds=2", "fl.local_epochs=2", n=None, check=False)
    assert_fails_fast(p, t, "differs in fl.local_epochs")


def test_constant_schedule_run_can_be_extended(data_dir, tmp_path):
    over = ["fl.client_lr_schedule=constant", "fl.checkpoint_every=5"]
    federate(tmp_path / "three", data_dir, *over, "fl.rounds=3", n=None)
    federate(tmp_path / "ext", data_dir, *over, "fl.rounds=2", n=None)
    federate(tmp_path / "ext", data_dir, *over, "fl.rounds=3", "--resume", n=None)
    assert _sha(tmp_path / "ext") == _sha(tmp_path / "three")
    # the cosine schedule depends on fl.rounds: the same extension is refused
    cos = "fl.client_lr_schedule=cosine"
    federate(tmp_path / "cos", data_dir, cos, "fl.rounds=2", n=None)
    p = federate(tmp_path / "cos", data_dir, cos, "fl.rounds=3", "--resume", n=None, check=False)
    assert_fails_fast(p, time.time(), "differs in fl.rounds")


def test_second_command_on_the_same_out_is_refused(data_dir, tmp_path):
    from gptfl_hpc.fsio import DirLock

    out = tmp_path / "busy"
    with DirLock(out):  # this test process plays the other gptfl-hpc command
        t = time.time()
        p = federate(out, data_dir, n=None, check=False)
    assert_fails_fast(p, t, "is in use by another gptfl-hpc process")
    import os

    assert f"pid {os.getpid()}" in p.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


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


def _opened(audit: Path) -> dict[int, list[tuple[str, Path]]]:
    opened: dict[int, list[tuple[str, Path]]] = {}
    for f in audit.glob("access-*.log"):
        for line in f.read_text().splitlines():
            rank, mode, path = line.split("\t")
            opened.setdefault(int(rank), []).append((mode, Path(path).resolve()))
    return opened


@pytest.mark.parametrize("placement", ["static", "balanced"])
def test_access_audit_server_never_opens_client_data(data_dir, tmp_path, placement):
    """Static: each client rank opens only its own clients' shards. Balanced: a client rank
    may open any client's shard (it trains different clients each round), but the server
    (rank 0) only ever opens the test split, everything read-only, and only model-sized
    buffers cross MPI."""
    audit = tmp_path / "audit"
    audit.mkdir()
    federate(tmp_path / "a", data_dir, "fl.rounds=2", f"fl.placement={placement}",
             env={"GPTFL_ACCESS_LOG": str(audit)})
    m = Manifest.load(data_dir)
    opened = _opened(audit)
    clients = {m.client_path(data_dir, c).resolve() for c in range(len(m.clients))}
    assert set(opened) == {0, 1, 2}
    for rank, items in opened.items():
        assert all(mode == "r" for mode, _ in items), items
        files = {p for _, p in items}
        if rank == 0:
            assert files == {m.test_path(data_dir).resolve()}  # never a client shard
        elif placement == "static":
            owner = place_clients([c.num_samples for c in m.clients], [1, 2])
            assert files == {m.client_path(data_dir, c).resolve() for c, w in owner.items()
                             if w == rank}
        else:
            assert files <= clients and files
    rec = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    numel = sum(t.numel() for t in weights(tmp_path / "a").values())
    # the only per-round traffic: one buffer of the model's size plus a few statistics
    assert all(r["bytes_reduced"] <= 8 * (numel + 16) for r in rec)


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


@pytest.mark.parametrize("damage,placement", [
    ("missing", "balanced"), ("truncated", "balanced"), ("labels", "static"), ("shape", "static"),
    ("labels", "balanced")])
def test_bad_shard_ends_every_rank(data_dir, tmp_path, damage, placement):
    """Caught before the first round: static placement reads (and verifies) each rank's shards
    up front; balanced placement checks every shard's attributes against the manifest."""
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
        needle = "out of range" if placement == "static" else "differ from the manifest's"
    else:
        write_shard(victim, np.zeros((len(labels), 16, 16, 1), np.uint8), labels,
                    {"dataset": "digits", "client_id": 1})
        needle = "shape"
    t = time.time()
    p = federate(tmp_path / "o", d, f"fl.placement={placement}", check=False, timeout=120)
    assert_fails_fast(p, t, needle)
    assert victim.name in [ln for ln in p.stderr.splitlines() if "error:" in ln][0]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # before any round


def test_exception_on_one_rank_aborts_the_job(data_dir, tmp_path):
    t = time.time()
    p = federate(tmp_path / "o", data_dir, check=False, timeout=120,
                 env={"GPTFL_FAULT_RAISE_RANK": "2", "GPTFL_FAULT_PHASE": "client"})
    assert p.returncode != 0 and time.time() - t < 60
    assert "injected fault on rank 2 in phase client" in p.stderr
    # the server failing in its own code (the server step) ends every rank too
    t = time.time()
    p = federate(tmp_path / "o2", data_dir, check=False, timeout=120,
                 env={"GPTFL_FAULT_RAISE_RANK": "0", "GPTFL_FAULT_PHASE": "server"})
    assert p.returncode != 0 and time.time() - t < 60
    assert "injected fault on rank 0 in phase server" in p.stderr


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
    assert_fails_fast(p, t, "holds prepared data for another request (differs in "
                            "data.num_clients)")


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
    # the right shapes but NaN values: refused (it used to end with an all-NaN final model)
    federate(tmp_path / "ok", data_dir, "fl.rounds=1", n=None)
    state = weights(tmp_path / "ok")
    state["fc1.bias"][3] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    p = federate(tmp_path / "o2", data_dir, f"fl.init={tmp_path / 'nan.safetensors'}",
                 check=False, n=3)
    assert_fails_fast(p, t, "tensor fc1.bias has NaN/Inf values")
    assert not (tmp_path / "o2" / "final.safetensors").exists()


# ---- secure-aggregation compatibility: which buffers cross MPI --------------------------------

AUDIT_DRIVER = r"""
import json, os, sys
import numpy as np
from gptfl_hpc.parallel import comm as C
calls = []
PUBLIC = sorted(n for n, v in vars(C.MPIComm).items() if not n.startswith("_") and callable(v))

def wrap(name):
    orig = getattr(C.MPIComm, name)
    def f(self, *a, **k):
        e = {"op": name}
        if a and isinstance(a[0], np.ndarray):
            e["nbytes"], e["dtype"] = int(a[0].nbytes), a[0].dtype.str
        if name in ("bcast_", "bcast_json"):
            e["root"] = int(k.get("root", a[1] if len(a) > 1 else 0))
        calls.append(e)
        return orig(self, *a, **k)
    setattr(C.MPIComm, name, f)

for n in PUBLIC:
    if n not in ("abort", "free", "barrier", "wait_for_peers"):
        wrap(n)
from gptfl_hpc.cli import main
rc = main(sys.argv[2:])
rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
with open(os.path.join(sys.argv[1], f"rank-{rank}.json"), "w") as f:
    json.dump({"calls": calls, "public": PUBLIC}, f)
sys.exit(rc)
"""


@pytest.mark.parametrize("algorithm", ["scaffold", "dp_fedavg"])
def test_only_sums_cross_mpi_from_client_ranks(data_dir, tmp_path, algorithm):
    """What the server can see of the clients, audited on every rank of a 3-rank run: the
    communication layer has no point-to-point or gather of buffers at all; every broadcast comes
    from rank 0 (server -> clients); the clients' only contribution per round is ONE in-place
    Allreduce(SUM) of the round buffer (SCAFFOLD: model + control-variate parts, twice the
    model; DP: the clipped updates), i.e. a sum that secure aggregation could compute; the only
    other client-to-all message is the start-up placement metadata (allgather of node, device,
    thread count: no client data)."""
    from helpers import run_py

    from gptfl_hpc.fl.aggregate import N_STATS

    over = (["fl.algorithm=scaffold", "fl.client_optimizer=sgd"] if algorithm == "scaffold"
            else ["dp.enabled=true", "dp.noise_multiplier=0.1"])
    audit = tmp_path / "audit"
    audit.mkdir()
    out = tmp_path / "o"
    p = run_py(["-c", AUDIT_DRIVER, str(audit), "federate", TINY, "--out", str(out),
                f"data.dir={data_dir}", "fl.rounds=2", *over], n=3, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    numel = sum(t.numel() for t in weights(out).values())  # digits_cnn: all parameters
    vec = 2 * numel if algorithm == "scaffold" else numel
    logs = {r: json.loads((audit / f"rank-{r}.json").read_text()) for r in range(3)}
    assert set(logs[0]["public"]) <= {"allgather_json", "allreduce_max_", "allreduce_sum_",
                                      "barrier", "bcast_", "bcast_json", "split",
                                      "wait_for_peers", "abort", "free", "host_array"}
    for r, log in logs.items():
        ops = [c["op"] for c in log["calls"]]
        assert set(ops) <= {"allgather_json", "allreduce_sum_", "bcast_", "bcast_json"}, ops
        assert all(c["root"] == 0 for c in log["calls"] if c["op"].startswith("bcast")), r
        reduces = [c for c in log["calls"] if c["op"] == "allreduce_sum_"]
        assert [(c["nbytes"], c["dtype"]) for c in reduces] == \
            [(8 * (vec + N_STATS + 3), "<i8")] * 2, (r, reduces)
        assert ops.count("allgather_json") == 2, (r, ops)  # MPI start-up + placement


def test_run_algorithm_entries_are_validated_up_front():
    """run.algorithms: the name sets fl.algorithm / dp.enabled, the entry's own overrides apply
    to that algorithm only, and a bad entry is a one-line error naming it before any stage."""
    from gptfl_hpc.config import load_config
    from gptfl_hpc.errors import ConfigError
    from gptfl_hpc.pipeline import algorithm_configs

    cfg = load_config(TINY, ["dp.enabled=true", "run.algorithms=[fedavg, "
                             "\"fedadam(fl.server_lr=0.001 fl.server_beta1=0.8)\", scaffold, "
                             "\"dp_fedavg(dp.clip_norm=0.05)\"]"])
    got = {name: sub for name, sub in algorithm_configs(cfg)}
    assert list(got) == ["fedavg", "fedadam", "scaffold", "dp_fedavg"]
    assert (got["fedavg"].fl.algorithm, got["fedavg"].dp.enabled) == ("fedavg", False)
    assert got["fedadam"].fl.server_lr == 0.001 and got["fedadam"].fl.server_beta1 == 0.8
    assert got["scaffold"].fl.server_lr == cfg.fl.server_lr  # overrides stay in their entry
    assert got["dp_fedavg"].dp.enabled and got["dp_fedavg"].dp.clip_norm == 0.05
    assert all(not sub.run.algorithms for sub in got.values())
    for entry, needle in (("fedadam(fl.server_lr=-1)", "fl.server_lr"),
                          ("dp_fedavg(dp.clip_norm=0)", "dp.clip_norm"),
                          ("fedavg(fl.clients_per_round=99)", "fl.clients_per_round")):
        bad = load_config(TINY, [f"run.algorithms=[\"{entry}\"]"])
        with pytest.raises(ConfigError, match=rf"run.algorithms entry '{re.escape(entry)}'.*"
                                              f"{re.escape(needle)}"):
            algorithm_configs(bad)
    for entry in ("fedx", "fedadam(data.alpha=1)", "dp_fedavg(dp.enabled=false)"):
        with pytest.raises(ConfigError, match="config key run.algorithms"):
            load_config(TINY, [f"run.algorithms=[\"{entry}\"]"])
