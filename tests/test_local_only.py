"""The local-fine-tuning-only control (fl/local.py, the `local_only` stage): each client fine-tunes
the init on its own data for fl.rounds x fl.local_epochs epochs on the rank that owns it; the
server broadcasts its test split once and only per-client test metrics come back. Checked: the
same per-client numbers on 1 and 3 ranks, a client's result against an in-process reference,
mean/std/min/max, the provenance record (reused on a second call), and the access audit (the
server never opens a client shard, a client rank only its own and never the test split)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, run_py

from gptfl_hpc.data.manifest import Manifest
from gptfl_hpc.fl.schedule import place_clients

TINY = "configs/tiny.yaml"
DRIVER = """
import sys
from pathlib import Path
from gptfl_hpc.numerics import set_process_env
set_process_env()
from gptfl_hpc.log import init_logging
from gptfl_hpc.config import load_config
from gptfl_hpc import pipeline as pl
from gptfl_hpc.parallel.comm import get_comm
comm = get_comm()
init_logging(comm.rank)
data_dir, out, init = sys.argv[1:4]
cfg = load_config('configs/tiny.yaml', ['data.dir=' + data_dir, *sys.argv[4:]])
data = pl.stage_prepare(cfg, Path(out), comm)
pl.stage_local_only(cfg, Path(out), comm, data, init)
"""
OVER = ["fl.rounds=2", "fl.local_epochs=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    d = root / "data"
    run_cli(["prepare", TINY, "--out", d], timeout=120)
    run_cli(["federate", TINY, "--out", root / "init", f"data.dir={d}", "fl.rounds=1"],
            timeout=240)
    return d, root / "init" / "final.safetensors"


@pytest.fixture(scope="module")
def one(setup, tmp_path_factory):
    data_dir, init = setup
    return local(tmp_path_factory.mktemp("one") / "o", data_dir, init, None)[1]


def local(out, data_dir, init, n, env=None):
    p = run_py(["-c", DRIVER, str(data_dir), str(out), str(init), *OVER], n=n, timeout=300,
               extra_env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    return p, json.loads((Path(out) / "summary.json").read_text())


def test_local_only_one_vs_three_ranks_and_audit(setup, one, tmp_path):
    data_dir, init = setup
    audit = tmp_path / "audit"
    audit.mkdir()
    p, three = local(tmp_path / "three", data_dir, init, 3, env={"GPTFL_ACCESS_LOG": str(audit)})
    assert three["clients"] == one["clients"]  # every number, bit for bit
    assert three["world_size"] == 3 and three["epochs_per_client"] == 4
    acc = np.array([c["test_accuracy"] for c in three["clients"]])
    assert len(acc) == 6 and three["test_accuracy"] == {
        "mean": acc.mean(), "std": acc.std(), "min": acc.min(), "max": acc.max()}
    assert three["final_accuracy"] == acc.mean()
    assert (tmp_path / "three" / "local_only.done.json").is_file()
    # the access audit: rank 0 reads only the test split; each client rank its own shards
    m = Manifest.load(data_dir)
    owner = place_clients([c.num_samples for c in m.clients], [1, 2])
    opened: dict[int, set] = {}
    for f in audit.glob("access-*.log"):
        for line in f.read_text().splitlines():
            rank, mode, path = line.split("\t")
            assert mode == "r"
            opened.setdefault(int(rank), set()).add(Path(path).resolve())
    assert opened[0] == {m.test_path(data_dir).resolve()}
    for r in (1, 2):
        assert opened[r] == {m.client_path(data_dir, c).resolve() for c, w in owner.items()
                             if w == r}
    # a second call is the same request: reused, not recomputed
    p = run_py(["-c", DRIVER, str(data_dir), str(tmp_path / "three"), str(init), *OVER], n=3,
               timeout=300)
    assert p.returncode == 0 and "local_only: complete for this request" in p.stderr


def test_a_client_against_an_in_process_reference(setup, one):
    """Client 2: fl.rounds rounds of the FL client procedure from the init, on its own model."""
    from gptfl_hpc.config import load_config
    from gptfl_hpc.fl.client import train_client
    from gptfl_hpc.fl.engine import load_init
    from gptfl_hpc.fl.params import FlatModel
    from gptfl_hpc.numerics import training_kernels
    from gptfl_hpc.train.evaluate import evaluate
    from gptfl_hpc.train.models import build_model
    from gptfl_hpc.train.transforms import make_transform

    data_dir, init = setup
    got = one
    cfg = load_config(TINY, OVER)
    m = Manifest.load(data_dir)
    shape = tuple(m.input_shape)
    tf = make_transform(m.kind, m.norm_mean, m.norm_std, shape, cfg.fl.augment)
    etf = make_transform(m.kind, m.norm_mean, m.norm_std, shape, False)
    torch.set_num_threads(1)
    with training_kernels("invariant", "cpu"):
        flat = FlatModel(build_model(cfg.model, tuple(tf.output_shape), m.num_classes))
        load_init(flat, str(init))
        x, y = m.read_client(data_dir, 2)
        for rnd in (1, 2):
            train_client(flat.model, flat.params, flat.flat, torch.from_numpy(x),
                         torch.from_numpy(y), tf, cfg.fl, seed=0, client_id=2, round_=rnd)
        xt, yt = m.read_test(data_dir)
        ref = evaluate(flat.model, xt, yt, etf, batch_size=cfg.fl.eval_batch_size,
                       num_classes=m.num_classes)
    assert got["clients"][2]["test_accuracy"] == ref["accuracy"]
    assert got["clients"][2]["test_loss"] == pytest.approx(ref["loss"], rel=1e-12)


def test_report_has_the_algorithm_table_and_the_local_only_section(tmp_path, capsys):
    """write_report with run.algorithms: one row per X of 'X from scratch vs X from the GPT-FL
    init' (with epsilon for DP) and the local-only mean/std/min/max."""
    from types import SimpleNamespace

    from gptfl_hpc.config import load_config
    from gptfl_hpc.report import write_report

    algos = ["fedavg", "dp_fedavg(dp.noise_multiplier=1.0)"]
    cfg = load_config(TINY, ["run.methods=[gptfl, fedavg, local_only]",
                             "run.algorithms=[fedavg, \"dp_fedavg(dp.noise_multiplier=1.0)\"]"])
    curves = {"fedavg-scratch": [0.2, 0.4, 0.5], "fedavg-gptfl": [0.6, 0.8, 0.9],
              "dp_fedavg-scratch": [0.1, 0.1, 0.2], "dp_fedavg-gptfl": [0.7, 0.7, 0.8]}
    runs = {}
    for name, accs in curves.items():
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"round": r, "test_accuracy": a}) + "\n" for r, a in enumerate(accs, 1)))
        dp = ({"epsilon": 10.96, "delta": 1e-5} if name.startswith("dp_") else None)
        (d / "summary.json").write_text(json.dumps(
            {"final_accuracy": accs[-1], "best_accuracy": max(accs), "rounds_to_target": None,
             "wall_seconds": 1.0, "dp": dp}))
        runs[name] = d
    local = {"test_accuracy": {"mean": 0.5, "std": 0.1, "min": 0.3, "max": 0.9},
             "test_macro_f1": {"mean": 0.4, "std": 0.1, "min": 0.2, "max": 0.9},
             "epochs_per_client": 3, "num_clients": 6, "wall_seconds": 2.0}
    manifest = SimpleNamespace(dataset="digits", clients=[0] * 6, label_names=list("0123456789"))
    report = write_report(cfg, tmp_path, manifest, tmp_path, runs, None, {}, None,
                          local_only=local, algorithms=algos)
    rows = {a["algorithm"]: a for a in report["algorithms"]}
    assert rows["fedavg"]["gain"] == pytest.approx(0.4) and rows["fedavg"]["epsilon"] is None
    assert rows["fedavg"]["gptfl_rounds_to_scratch_final"] == 1
    assert rows["dp_fedavg"]["epsilon"] == 10.96 and rows["dp_fedavg"]["delta"] == 1e-5
    md = (tmp_path / "report.md").read_text()
    assert "| FedAvg | 50.0% | 90.0% | +40.0 pts |" in md
    assert "| DP-FedAvg | 20.0% | 80.0% | +60.0 pts |" in md and "10.96 (1e-05) |" in md
    assert "| test accuracy | 50.0% | 10.0 | 30.0% | 90.0% |" in md
    assert [r["method"] for r in report["rows"]][-1] == "local_only"
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert "from GPT-FL init: final" in capsys.readouterr().out
