"""run.concurrent_clients (gptfl_hpc/fl/concurrent.py): a rank with T > 1 threads trains T
clients at a time on one-thread workers. The promise is bitwise: the same final weights, the same
metrics (every number but the timings) as one client after another, and the same as three ranks
at one thread each; dropout masks drawn from a per-thread generator equal the global ones."""

import json
from pathlib import Path

import pytest
import torch
from test_federate import _sha, federate
from torch import nn

from gptfl_hpc.fl.concurrent import StreamDropout, adopt, dropout_stream, why_not


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from helpers import run_cli

    d = tmp_path_factory.mktemp("data") / "data"
    run_cli(["prepare", "configs/tiny.yaml", "--out", d], timeout=120)
    return d


@pytest.mark.parametrize("shape,p", [((6, 8, 5, 5), 0.25), ((7, 33), 0.5), ((4, 3), 1.0),
                                     ((4, 3), 0.0)])
def test_stream_dropout_draws_the_global_generators_masks(shape, p):
    """StreamDropout under dropout_stream(g) gives nn.Dropout's output and input gradient when
    g and torch's global generator are seeded alike (a channels-last input as the transforms
    make it); outside a stream it is nn.Dropout itself."""
    x0 = torch.randn(*shape)
    if len(shape) == 4:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    ref, ours = nn.Dropout(p), nn.Dropout(p)
    assert adopt(ours) == 1 and type(ours) is StreamDropout
    outs = []
    for layer, stream in ((ref, False), (ours, True), (ours, False)):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(11)
        if stream:
            torch.manual_seed(99)  # the global generator elsewhere: must not matter
            with dropout_stream(torch.Generator().manual_seed(11)):
                y = layer(x)
        else:
            y = layer(x)
        y.backward(torch.arange(y.numel(), dtype=y.dtype).view_as(y))
        outs.append((y.detach(), x.grad))
    for y, g in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(g, outs[0][1])
    if 0 < p < 1:
        assert 0 < int((outs[0][0] == 0).sum()) < x0.numel()  # a real mask was drawn


def test_models_that_cannot_train_concurrently_say_why():
    from gptfl_hpc.train.invconv import adopt as adopt_convs

    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Dropout(0.1))
    assert "not an invariant convolution" in why_not(plain)
    adopt_convs(plain)
    assert why_not(plain) is None
    assert "Dropout2d" in why_not(nn.Sequential(nn.Dropout2d(0.1)))
    assert "RReLU" in why_not(nn.Sequential(nn.RReLU()))


def _metrics(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("t_", "wall"))} for r in rows]


@pytest.mark.parametrize("over", [["model.name=simple_cnn"],
                                  ["fl.aggregation=float32", "fl.algorithm=fedprox",
                                   "fl.prox_mu=0.01"]])
def test_concurrent_clients_give_the_sequential_bits(data_dir, tmp_path, over):
    """One process with 2 threads: two clients at a time (simple_cnn: dropout; float32
    aggregation: the order of the additions matters, so it must be kept) against
    run.concurrent_clients=false and against three ranks at one thread each."""
    two = {"OMP_NUM_THREADS": "2"}
    federate(tmp_path / "conc", data_dir, *over, "run.threads=2", n=None, env=two)
    federate(tmp_path / "seq", data_dir, *over, "run.threads=2", "run.concurrent_clients=false",
             n=None, env=two)
    federate(tmp_path / "three", data_dir, *over, n=3)
    summary = json.loads((tmp_path / "conc" / "summary.json").read_text())
    assert [p["concurrent_clients"] for p in summary["placement"]] == [2]
    seq = json.loads((tmp_path / "seq" / "summary.json").read_text())
    assert [p["concurrent_clients"] for p in seq["placement"]] == [1]
    assert _sha(tmp_path / "conc") == _sha(tmp_path / "seq")
    assert _metrics(tmp_path / "conc") == _metrics(tmp_path / "seq")
    if "fl.aggregation=float32" not in over:  # float32 sums depend on the rank count
        assert _sha(tmp_path / "conc") == _sha(tmp_path / "three")


def test_slots_are_capped_by_memory():
    import os

    from gptfl_hpc.fl.concurrent import SLOT_BYTES_PER_PARAM, memory_cap

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_cap(1000) > 64
    per = total // (4 * SLOT_BYTES_PER_PARAM)  # a model that fills a quarter of the memory
    assert memory_cap(per) == 1 and memory_cap(per // 3) == 3
