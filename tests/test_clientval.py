"""Federated validation on the clients' held-out rows (fl.client_val_fraction, fl/clientval.py)
and model selection on it (fl.select=client_val).

In-process: the split (disjoint, seeded, one row always trains, fraction 0 = no split) and the
config checks. Under mpiexec: the reported client accuracy equals scoring the saved model on the
union of the held-out rows read straight from the shards; training weights use the training rows
only; 1 vs 3 ranks give the same bits and the same validation numbers; the clients' only new
message is one Allreduce of per-client counts (the server still opens no client shard); the
selection returns round 0's model (the init) when FL only makes it worse on the clients' rows; a
preempted run resumes to the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, run_py
from safetensors.torch import load_file
from test_federate import federate

from gptfl_hpc.config import load_config
from gptfl_hpc.data.manifest import Manifest
from gptfl_hpc.errors import ConfigError
from gptfl_hpc.fl.clientval import held_out, split_rows, train_sizes

TINY = "configs/tiny.yaml"
CV = ["fl.client_val_fraction=0.2", "fl.rounds=4"]


def test_split_is_disjoint_seeded_and_keeps_a_training_row():
    for n in (1, 2, 5, 9, 10, 37, 200):
        for f in (0.0, 0.1, 0.2, 0.5):
            tr, va = split_rows(n, f, seed=7, cid=3)
            assert len(va) == held_out(n, f) == (0 if n < 2 else min(int(np.floor(f * n)),
                                                                      n - 1))
            assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(n))
            assert len(tr) >= 1 and np.all(np.diff(tr) > 0)  # stored order
    a, b = split_rows(100, 0.2, 7, 3)[1], split_rows(100, 0.2, 7, 3)[1]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, split_rows(100, 0.2, 8, 3)[1])  # another seed
    assert not np.array_equal(a, split_rows(100, 0.2, 7, 4)[1])  # another client
    assert train_sizes([10, 1, 37], 0.2) == [8, 1, 30]
    assert train_sizes([10, 1, 37], 0.0) == [10, 1, 37]


def test_config_keys_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="fl.select.*client_val.*fl.client_val_fraction > 0"):
        load_config(TINY, ["fl.select=client_val"])
    with pytest.raises(ConfigError, match="fl.client_val_fraction.*0 \\(off\\) or 0 < x <= 0.5"):
        load_config(TINY, ["fl.client_val_fraction=0.6"])
    with pytest.raises(ConfigError, match="fl.client_val_fraction.*dp.enabled"):
        load_config(TINY, ["fl.client_val_fraction=0.1", "dp.enabled=true"])
    with pytest.raises(ConfigError, match="fl.patience.*synthetic_val or client_val"):
        load_config(TINY, ["fl.patience=2"])
    cfg = load_config(TINY, ["fl.client_val_fraction=0.1", "fl.select=client_val",
                             "fl.patience=2"])
    assert cfg.fl.select == "client_val" and cfg.fl.patience == 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "data"
    run_cli(["prepare", TINY, "--out", d], timeout=120)
    return d


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def held_out_rows(data_dir: Path, seed: int = 0, fraction: float = 0.2):
    """Every client's held-out rows, read from its shard in the test (not by the engine)."""
    m = Manifest.load(data_dir)
    xs, ys, train = [], [], []
    for c in range(len(m.clients)):
        x, y = m.read_client(data_dir, c)
        tr, va = split_rows(len(y), fraction, seed, c)
        xs.append(x[va])
        ys.append(y[va])
        train.append(len(tr))
    return m, np.concatenate(xs), np.concatenate(ys), train


@pytest.fixture(scope="module")
def three(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "three"
    federate(out, data_dir, *CV, n=3)
    return out


def test_reported_accuracy_is_the_model_scored_on_the_held_out_rows(three, data_dir):
    """The last round's client_val_accuracy is exactly the saved final model's accuracy on the
    union of every client's held-out rows; each round's sample count is the sampled clients'
    training rows (the held-out rows never train)."""
    from gptfl_hpc.train.evaluate import evaluate
    from gptfl_hpc.train.models import build_model
    from gptfl_hpc.train.transforms import make_transform

    m, x, y, train = held_out_rows(data_dir)
    rec = records(three)
    assert all(r["client_val_samples"] == len(y) for r in rec)
    assert all(r["num_samples"] == sum(train[c] for c in r["sampled_clients"]) for r in rec)
    cfg = load_config(TINY)
    tf = make_transform(m.kind, m.norm_mean, m.norm_std, tuple(m.input_shape), False)
    model = build_model(cfg.model, tuple(tf.output_shape), m.num_classes)
    model.load_state_dict(load_file(str(three / "final.safetensors")))
    got = evaluate(model, x, y, tf, num_classes=m.num_classes)
    assert rec[-1]["client_val_accuracy"] == got["accuracy"]
    assert rec[-1]["client_val_loss"] == pytest.approx(got["loss"], rel=1e-5)
    assert 0 <= rec[-1]["client_val_client_min"] <= rec[-1]["client_val_client_mean"] <= 1
    s = json.loads((three / "summary.json").read_text())
    assert s["selection"] == {"rule": "last"} and s["client_val_fraction"] == 0.2
    assert s["round0"]["client_val_samples"] == len(y)  # the init, scored before round 1


def test_one_rank_gives_the_same_bits_and_numbers(three, data_dir, tmp_path):
    federate(tmp_path / "one", data_dir, *CV, n=None, env={"OMP_NUM_THREADS": "2"})
    assert (tmp_path / "one" / "final.safetensors").read_bytes() == \
        (three / "final.safetensors").read_bytes()

    def vals(out):
        return [{k: v for k, v in r.items() if k.startswith("client_val")}
                for r in records(out)]

    assert vals(tmp_path / "one") == vals(three)
    # and the split changes training: without it the weights differ
    federate(tmp_path / "plain", data_dir, "fl.rounds=4", n=3)
    assert (tmp_path / "plain" / "final.safetensors").read_bytes() != \
        (three / "final.safetensors").read_bytes()


def test_only_counts_cross_mpi_and_the_server_opens_no_client_shard(data_dir, tmp_path):
    """Per evaluation, one extra Allreduce(SUM) of 3 float64 counts per client; rank 0 opens
    only the test split."""
    from test_federate import AUDIT_DRIVER, _opened

    audit, access = tmp_path / "audit", tmp_path / "access"
    audit.mkdir()
    access.mkdir()
    p = run_py(["-c", AUDIT_DRIVER, str(audit), "federate", TINY, "--out", str(tmp_path / "o"),
                f"data.dir={data_dir}", "fl.rounds=2", "fl.client_val_fraction=0.2"], n=3,
               timeout=240, extra_env={"GPTFL_ACCESS_LOG": str(access)})
    assert p.returncode == 0, p.stderr[-3000:]
    m = Manifest.load(data_dir)
    for r in range(3):
        calls = json.loads((audit / f"rank-{r}.json").read_text())["calls"]
        reduces = [(c["nbytes"], c["dtype"]) for c in calls if c["op"] == "allreduce_sum_"]
        counts = (8 * 3 * len(m.clients), "<f8")
        # round 0, then per round: the round buffer and the counts
        assert reduces[0] == counts and reduces[2::2] == [counts, counts], reduces
        assert all(d == "<i8" for _, d in reduces[1::2]), reduces
    opened = _opened(access)
    assert {p for _, p in opened[0]} == {m.test_path(data_dir).resolve()}


def test_selection_returns_the_init_when_fl_only_hurts(data_dir, tmp_path):
    """From a trained init, a client lr that wrecks the model: every FL round scores below the
    init on the clients' rows, so round 0 is selected and final.safetensors is the init."""
    federate(tmp_path / "init", data_dir, "fl.rounds=6", n=3)
    init = tmp_path / "init" / "final.safetensors"
    out = tmp_path / "sel"
    federate(out, data_dir, f"fl.init={init}", "fl.client_val_fraction=0.2",
             "fl.select=client_val", "fl.rounds=3", "fl.client_lr=3.0", n=3)
    s = json.loads((out / "summary.json").read_text())
    sel = s["selection"]
    hist = sel["val_by_round"]
    assert [h[0] for h in hist] == [0, 1, 2, 3]
    best = max(h[1] for h in hist)
    first = next(h for h in hist if h[1] == best)  # ties go to the earlier round
    assert (sel["round"], sel["val_accuracy"], sel["test_accuracy"]) == tuple(first)
    assert sel["round"] == 0, hist  # the wrecked rounds lose to the init
    a, b = load_file(str(out / "final.safetensors")), load_file(str(init))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert s["selected_accuracy"] == s["round0"]["test_accuracy"]


def test_patience_and_preemption_resume_bitwise(data_dir, tmp_path):
    over = ["fl.client_val_fraction=0.2", "fl.select=client_val", "fl.patience=2",
            "fl.rounds=5", "fl.checkpoint_every=1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    federate(ref, data_dir, *over)
    p = federate(cut, data_dir, *over, check=False, env={"GPTFL_STOP_AFTER": "2"})
    assert p.returncode == 124, p.stderr[-3000:]
    federate(cut, data_dir, *over, "--resume")
    assert (ref / "final.safetensors").read_bytes() == (cut / "final.safetensors").read_bytes()

    def lines(d):
        return [{k: v for k, v in r.items() if not k.startswith(("t_", "wall"))}
                for r in records(d)]

    assert lines(ref) == lines(cut)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, cut))
    assert a["selection"] == b["selection"] and a["round0"] == b["round0"]
    # the rule: stop after 2 evaluations in a row without a better client accuracy
    best, since, stop = -1.0, 0, 5
    for r, v, _ in a["selection"]["val_by_round"][1:]:
        best, since = (v, 0) if v > best else (best, since + 1)
        if r > 0 and since >= 2:
            stop = r
            break
    assert a["rounds_run"] == stop


# ---- gptfl-hpc choose: the regime with the best client-val accuracy, never the test set -------


def fake_grid(root: Path, overrides: list[str], cells: dict[tuple, tuple[float, float]],
              fraction: float = 0.1, rule: str = "last", status_ok: bool = True) -> Path:
    """A finished grid of gptfl cells: (seed, alpha) -> (last client-val acc, test acc)."""
    grid = {"format": 1, "config": "configs/mnist.yaml",
            "overrides": [f"fl.client_val_fraction={fraction}", *overrides],
            "target_accuracy": 0.9, "cells": []}
    for (seed, alpha), (val, test) in cells.items():
        name = f"gptfl-seed{seed}-alpha{alpha}"
        grid["cells"].append({"name": name, "method": "gptfl", "seed": seed, "alpha": alpha,
                              "volume": 1.0, "clients_per_round": 5})
        d = root / "cells" / name
        (d / "gptfl").mkdir(parents=True)
        if status_ok:
            (d / "report.json").write_text(json.dumps({"rows": [
                {"method": "gptfl", "final_accuracy": test, "best_accuracy": test}]}))
        recs = [{"round": 1, "test_accuracy": 0.5, "client_val_accuracy": 0.99},
                {"round": 2, "test_accuracy": test, "client_val_accuracy": val}]
        (d / "gptfl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "gptfl" / "summary.json").write_text(json.dumps({
            "final_accuracy": test, "client_val_fraction": fraction,
            "selection": {"rule": rule}}))
    (root / "grid.json").write_text(json.dumps(grid))
    return root


def test_choose_takes_the_best_client_val_mean_and_ignores_test(tmp_path):
    """A candidate replaces the default (the first grid) only when it is significantly better on
    the clients' rows (paired over the cells, Bonferroni over the candidates); among those the
    best mean wins; the test accuracy never matters."""
    from gptfl_hpc.choose import choose, markdown

    keys = [(s, a) for s in (0, 1, 2) for a in (0.1, 0.5)]
    base = [0.90, 0.85, 0.91, 0.88, 0.93, 0.86]

    def grid(name, overrides, deltas, test):
        return fake_grid(tmp_path / name, overrides,
                         {k: (v + d, t) for k, v, d, t in zip(keys, base, deltas, test)})

    a = grid("a", [], [0] * 6, [0.95] * 6)
    # b: consistently better on the clients' rows, worse on the test set
    b = grid("b", ["fl.client_lr=0.0003"], [0.02, 0.03, 0.02, 0.025, 0.03, 0.02], [0.80] * 6)
    # c: a higher mean than b, but from one lucky cell: not significant, not chosen
    c = grid("c", ["fl.algorithm=fedprox"], [0.2, -0.01, -0.01, 0.0, -0.01, 0.0], [0.99] * 6)
    r = choose([a, b, c])
    assert r["rows"][2]["val_mean"] > r["rows"][1]["val_mean"]
    assert [x.get("significant") for x in r["rows"]] == [None, True, False]
    assert r["chosen"] == 1 and r["chosen_regime"] == "fl.client_lr=0.0003"
    assert r["rows"][1]["val_diff"] == pytest.approx(0.0242, abs=1e-4)
    assert r["rows"][1]["test_diff"] == pytest.approx(-0.15)
    assert r["corrected_level"] == pytest.approx(0.025)
    table = markdown(r).splitlines()[4:]  # after the rule, a blank line and the header
    assert ["**(chosen)**" in line for line in table] == [False, True, False]
    # nothing significantly better: the default stays, whatever the means or the test say
    assert choose([a, c])["chosen"] == 0
    assert choose([a, a])["chosen"] == 0
    # overrides that cannot change a result (run.threads) are neither a regime nor a difference
    d = grid("d", ["run.threads=1", "fl.client_lr=0.0003"], [0.02, 0.03, 0.02, 0.025, 0.03, 0.02],
             [0.80] * 6)
    assert choose([a, d])["chosen_regime"] == "fl.client_lr=0.0003"
    with pytest.raises(ConfigError, match="--level"):
        choose([a, b], level=1.5)


def test_choose_refuses_what_it_cannot_compare(tmp_path):
    from gptfl_hpc.choose import choose
    from gptfl_hpc.errors import DataError

    keys = [(0, 0.1), (1, 0.1)]
    a = fake_grid(tmp_path / "a", [], dict(zip(keys, [(0.9, 0.9)] * 2)))
    cases = {
        "other cells": (fake_grid(tmp_path / "b", ["fl.client_lr=0.1"],
                                  {(0, 0.1): (0.9, 0.9)}), DataError, "differ from"),
        "other fraction": (fake_grid(tmp_path / "c", ["fl.client_lr=0.1"],
                                     dict(zip(keys, [(0.9, 0.9)] * 2)), fraction=0.2),
                           ConfigError, "fl.client_val_fraction differs"),
        "selected": (fake_grid(tmp_path / "d", ["fl.client_lr=0.1"],
                               dict(zip(keys, [(0.9, 0.9)] * 2)), rule="client_val"),
                     ConfigError, "fl.select"),
        "not fl": (fake_grid(tmp_path / "e", ["data.alpha=0.5"],
                             dict(zip(keys, [(0.9, 0.9)] * 2))), ConfigError,
                   "differ in fl.\\* only"),
        "unfinished": (fake_grid(tmp_path / "f", ["fl.client_lr=0.1"],
                                 dict(zip(keys, [(0.9, 0.9)] * 2)), status_ok=False),
                       DataError, "cell gptfl-seed0-alpha0.1 is missing"),
    }
    for name, (other, err, msg) in cases.items():
        with pytest.raises(err, match=msg):
            choose([a, other])
            pytest.fail(f"{name}: accepted")
    p = run_cli(["choose", str(a)], check=False)
    assert p.returncode != 0 and "at least two grid directories" in p.stderr
