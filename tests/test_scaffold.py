"""SCAFFOLD: the client correction and control variates against a numpy reference of the paper's
option II, the server update through the round buffer, and end-to-end runs: the same bits on 1
and 3 ranks, per-rank control-variate files in the checkpoint, and bitwise resume after a
preemption (also on another rank count, since the c_k are keyed by client)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from gptfl_hpc.config import FLConfig
from gptfl_hpc.fl.aggregate import RoundBuffer
from gptfl_hpc.fl.client import train_client
from gptfl_hpc.fl.params import FlatModel
from gptfl_hpc.fl.scaffold import Scaffold
from gptfl_hpc.seeding import torch_generator

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "configs/tiny.yaml"
SGD = ["fl.algorithm=scaffold", "fl.client_optimizer=sgd", "fl.client_lr=0.05"]


def _softmax_grad(w, b, x, y):
    """Gradient of the mean cross-entropy of a linear classifier (float64 numpy)."""
    z = x @ w.T + b
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return p.T @ x, p.sum(axis=0)


def test_client_control_variate_is_option_ii_for_plain_sgd():
    """Local steps y <- y - lr (g - c_k + c); c_k+ = c_k - c + (x - y) / (K lr) (Karimireddy et
    al. 2020, Alg. 1 option II), in float64 numpy, against train_client with ControlVariates."""
    rng = np.random.default_rng(0)
    n, d, k = 24, 5, 3
    x_np = rng.normal(size=(n, d))
    y_np = rng.integers(0, k, size=n)
    model = torch.nn.Linear(d, k)
    flat = FlatModel(model)
    x0 = flat.flat.clone()
    sc = Scaffold(flat.num_params, num_clients=10, owned={4})
    sc.c.copy_(torch.tensor(rng.normal(scale=0.3, size=flat.num_params)))
    sc.clients[4] = torch.tensor(rng.normal(scale=0.3, size=flat.num_params), dtype=torch.float32)
    fl = FLConfig(algorithm="scaffold", client_optimizer="sgd", client_lr=0.1, local_epochs=2,
                  batch_size=6, augment=False, client_lr_schedule="constant")
    cv = sc.begin(4, torch.device("cpu"))
    train_client(model, flat.params, flat.flat, torch.tensor(x_np, dtype=torch.float32),
                 torch.tensor(y_np), lambda xb, g: xb, fl, seed=3, client_id=4, round_=2,
                 control=cv)
    # reference: the same minibatch order (torch's permutation), numpy float64 maths
    g = torch_generator(3, "client-train", 4, 2)
    w = x0[:k * d].double().numpy().reshape(k, d).copy()
    b = x0[k * d:].double().numpy().copy()
    c = sc.c.double().numpy()
    ck = sc.clients[4].double().numpy()
    steps = 0
    for _ in range(fl.local_epochs):
        perm = torch.randperm(n, generator=g).numpy()
        for s in range(0, n, fl.batch_size):
            idx = perm[s:s + fl.batch_size]
            gw, gb = _softmax_grad(w, b, x_np[idx], y_np[idx])
            grad = np.concatenate([gw.ravel(), gb]) - ck + c
            w -= fl.client_lr * grad[:k * d].reshape(k, d)
            b -= fl.client_lr * grad[k * d:]
            steps += 1
    y_ref = np.concatenate([w.ravel(), b])
    ck_new_ref = ck - c + (x0.double().numpy() - y_ref) / (steps * fl.client_lr)
    assert cv.steps == steps == 8
    np.testing.assert_allclose(flat.flat.double().numpy(), y_ref, rtol=0, atol=2e-6)
    new, dc = sc.change(4, cv)
    np.testing.assert_allclose(new.double().numpy(), ck_new_ref, rtol=0, atol=5e-5)
    np.testing.assert_allclose(dc.double().numpy(), ck_new_ref - ck, rtol=0, atol=5e-5)
    # the correction really entered the steps: without it the weights differ
    assert np.abs(ck - c).max() > 0.1


def test_round_buffer_carries_model_and_control_parts_and_server_update():
    """[ sum_k (n_k/N) dy_k | sum_k dc_k / M | stats ] through the exact encoding; x and c
    updated as the numpy reference: x += lr sum_k (n_k/N) dy_k, c += (1/M) sum_k dc_k."""
    rng = np.random.default_rng(1)
    numel, n_params, m = 40, 30, 7
    n = [12, 30, 5]
    dy = [rng.normal(scale=0.1, size=numel) for _ in n]
    dc = [rng.normal(scale=0.5, size=n_params) for _ in n]
    # two ranks' buffers (clients 0,1 on one, 2 on the other), summed like the Allreduce
    bufs = [RoundBuffer(numel, 3, "exact", extra=n_params) for _ in range(2)]
    for r, ks in ((0, [0, 1]), (1, [2])):
        for k in ks:
            bufs[r].add_vector(bufs[r].encode(torch.tensor(dy[k]), n[k] / sum(n)))
            bufs[r].add_vector(bufs[r].encode(torch.tensor(dc[k]), 1.0 / m), start=numel)
    total = bufs[0].pack(1, 0.0) + bufs[1].pack(2, 0.0)
    bufs[0].host[:] = total
    vec, _ = bufs[0].unpack()
    assert vec.numel() == numel + n_params
    x = rng.normal(size=numel)
    ref_x = x + 0.5 * sum(nk / sum(n) * d for nk, d in zip(n, dy))
    np.testing.assert_allclose(x + 0.5 * vec[:numel].numpy(), ref_x, rtol=0, atol=1e-11)
    sc = Scaffold(n_params, m, set())
    c0 = rng.normal(size=n_params).astype(np.float32)
    sc.c.copy_(torch.tensor(c0))
    sc.server_update(vec[numel:])
    ref_c = c0.astype(np.float64) + sum(dc) / m
    np.testing.assert_allclose(sc.c.numpy(), ref_c, rtol=1e-6, atol=1e-6)


def test_rank_state_round_trip_by_client_id():
    a = Scaffold(4, 5, {0, 3})
    a.commit(3, torch.arange(4.0))
    b = Scaffold(4, 5, {3, 4})  # another rank count: client 3 now lives elsewhere
    assert b.load_rank_states([a.rank_state(), {"_": torch.zeros(1)}]) == 1
    assert torch.equal(b.control(3), torch.arange(4.0))
    assert torch.equal(b.control(4), torch.zeros(4))
    with pytest.raises(RuntimeError, match="not owned"):
        b.control(0)


# ---- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "data"
    run_cli(["prepare", TINY, "--out", d], timeout=120)
    return d


def federate(out, data_dir, *over, n=3, check=True, env=None):
    return run_cli(["federate", TINY, "--out", out, f"data.dir={data_dir}", *SGD, *over], n=n,
                   check=check, extra_env=env, timeout=240)


def _sha(out):
    return hashlib.sha256((Path(out) / "final.safetensors").read_bytes()).hexdigest()


def test_scaffold_round_one_equals_fedavg(data_dir, tmp_path):
    """All control variates start at zero, so round 1 is FedAvg's round 1, bit for bit."""
    federate(tmp_path / "s", data_dir, "fl.rounds=1", n=None)
    run_cli(["federate", TINY, "--out", tmp_path / "f", f"data.dir={data_dir}", "fl.rounds=1",
             "fl.client_optimizer=sgd", "fl.client_lr=0.05"], timeout=240)
    a, b = (load_file(str(tmp_path / d / "final.safetensors")) for d in ("s", "f"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_vs_three_ranks_and_bitwise_resume(data_dir, tmp_path):
    over = ["fl.rounds=3", "fl.checkpoint_every=1", "fl.keep_checkpoints=3"]
    p = federate(tmp_path / "three", data_dir, *over)  # balanced by default: switched to static
    assert "clients are pinned to ranks (fl.placement static instead of balanced)" in p.stderr
    federate(tmp_path / "one", data_dir, *over, n=None)
    assert _sha(tmp_path / "one") == _sha(tmp_path / "three")
    # rank 0 steps and broadcasts (fl.sync=bcast): every rank still updates c alike
    federate(tmp_path / "bcast", data_dir, *over, "fl.sync=bcast")
    assert _sha(tmp_path / "bcast") == _sha(tmp_path / "three")
    ck = tmp_path / "three" / "ckpt" / "round-00002"
    state = json.loads((ck / "state.json").read_text())
    assert {"rank-00001.safetensors", "rank-00002.safetensors",
            "server_state.safetensors"} <= set(state["files"])
    owned = [set(load_file(str(ck / f"rank-0000{r}.safetensors"))) for r in (1, 2)]
    assert not owned[0] & owned[1] and all(k.startswith("client_") for k in owned[0] | owned[1])
    summary = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert summary["client_placement"] == "static" and summary["algorithm"] == "scaffold"
    rec = [json.loads(x) for x in (tmp_path / "three" / "metrics.jsonl").read_text().split("\n")
           if x]
    numel = sum(t.numel() for t in load_file(str(tmp_path / "three" / "final.safetensors"))
                .values())
    # one Allreduce of [model | control variates (the parameters) | statistics], int64
    assert all(8 * 2 * numel < r["bytes_reduced"] <= 8 * (2 * numel + 16) for r in rec)
    # preempted after round 2 on 3 ranks; resumed on 3 ranks, and on one process
    p = federate(tmp_path / "cut", data_dir, *over, check=False, env={"GPTFL_STOP_AFTER": "2"})
    assert p.returncode == 124, p.stderr[-3000:]
    import shutil

    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    federate(tmp_path / "cut", data_dir, *over, "--resume")
    assert _sha(tmp_path / "cut") == _sha(tmp_path / "three")
    federate(tmp_path / "cut1", data_dir, *over, "--resume", n=None)
    assert _sha(tmp_path / "cut1") == _sha(tmp_path / "three")


def test_scaffold_with_dp_is_refused(data_dir, tmp_path):
    p = federate(tmp_path / "o", data_dir, "dp.enabled=true", n=None, check=False)
    assert p.returncode != 0
    assert "error: config key dp.enabled: SCAFFOLD's control-variate changes" in p.stderr
