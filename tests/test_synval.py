"""The server's synthetic validation split (train/synval.py, pretrain.val_fraction) and model
selection / early stopping on it during FL (fl.select=synthetic_val, fl.patience).

In-process: the split's rows, pretraining without them (the permutations never touch them; with
fraction 0 the permutations are the old ones), the validation accuracy pretrained.json reports
equals evaluating the saved weights on those rows. Under mpiexec -n 3: the tiny pipeline with
selection and early stopping, and a run preempted inside FL that resumes to the same selected
model bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fake_accelerator, run_cli, write_synthetic

from gptfl_hpc.config import DataConfig, ModelConfig, PretrainConfig, RunConfig, load_config
from gptfl_hpc.data.manifest import Manifest
from gptfl_hpc.data.prepare import prepare_data
from gptfl_hpc.data.shards import read_shard
from gptfl_hpc.errors import ConfigError, DataError
from gptfl_hpc.fsio import load_safetensors
from gptfl_hpc.parallel.comm import LocalComm
from gptfl_hpc.train.evaluate import evaluate
from gptfl_hpc.train.models import build_model
from gptfl_hpc.train.synval import read_rows, split_rows
from gptfl_hpc.train.transforms import ImageTransform

TINY = "configs/tiny.yaml"
SELECT = ["pretrain.val_fraction=0.25", "fl.select=synthetic_val", "fl.rounds=6"]
PREEMPTED = 124


def test_split_is_stratified_disjoint_and_drawn_from_the_seed():
    y = np.repeat(np.arange(5), [40, 10, 3, 2, 1])
    tr, va = split_rows(y, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(y)))
    assert not set(tr) & set(va)
    # round(0.2 n) per class, >= 1 where a class has two rows, never its last training row
    assert [int(np.sum(y[va] == c)) for c in range(5)] == [8, 2, 1, 1, 0]
    assert [int(np.sum(y[tr] == c)) for c in range(5)] == [32, 8, 2, 1, 1]
    again, other = split_rows(y, 0.2, seed=3)[1], split_rows(y, 0.2, seed=4)[1]
    assert np.array_equal(va, again) and not np.array_equal(va, other)
    tr0, va0 = split_rows(y, 0.0, seed=3)
    assert np.array_equal(tr0, np.arange(len(y))) and len(va0) == 0


def test_config_keys_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="fl.select.*pretrain.val_fraction > 0"):
        load_config(TINY, ["fl.select=synthetic_val"])
    with pytest.raises(ConfigError, match="fl.patience.*0 unless fl.select is synthetic_val"):
        load_config(TINY, ["fl.patience=3"])
    with pytest.raises(ConfigError, match="pretrain.val_fraction.*0 \\(off\\) .. 0.5"):
        load_config(TINY, ["pretrain.val_fraction=0.7"])
    with pytest.raises(ConfigError, match="fl.select.*last.*synthetic_val"):
        load_config(TINY, ["fl.select=best"])
    cfg = load_config(TINY, SELECT + ["fl.patience=2"])
    assert cfg.fl.select == "synthetic_val" and cfg.pretrain.val_fraction == 0.25


def test_trainer_never_draws_a_validation_row_and_fraction_zero_is_unchanged():
    from gptfl_hpc.train.pretrain import ResidentRows, Trainer

    x = np.zeros((60, 8, 8, 1), np.uint8)
    y = np.arange(60) % 10
    tf = ImageTransform([0.5], [0.25], (8, 8, 1), True)
    cfg = PretrainConfig(epochs=1, batch_size=8)
    tr_rows, va_rows = split_rows(y, 0.3, seed=0)

    def trainer(rows):
        return Trainer(cfg, fake_accelerator(torch.device("cpu")),
                       build_model(ModelConfig(), (8, 8, 1), 10),
                       ResidentRows(x, torch.device("cpu")), y, tf, seed=0, num_processes=1,
                       rows=rows)

    held = trainer(tr_rows)
    assert held.steps_per_epoch == len(tr_rows) // 8
    for epoch in range(3):
        perm = held.plan_epoch(epoch).perm.numpy()
        assert sorted(perm) == sorted(tr_rows) and not set(perm) & set(va_rows)
        # no split: every row, and the very permutation of before the split existed
        assert torch.equal(trainer(None).plan_epoch(epoch).perm,
                           trainer(np.arange(60)).plan_epoch(epoch).perm)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("synval")
    data_dir = root / "data"
    prepare_data(DataConfig(num_clients=2), seed=0, out_dir=data_dir)
    x, y, _ = read_shard(data_dir / "public.h5")
    syn = write_synthetic(root / "synthetic.h5", x, y)
    return {"root": root, "data": data_dir, "syn": syn, "labels": y}


def test_pretraining_reports_the_split_it_left_out(digits):
    from gptfl_hpc.train.pretrain import WEIGHTS_NAME, pretrain

    out = digits["root"] / "held"
    cfg = PretrainConfig(epochs=2, batch_size=32, lr=2e-3, val_fraction=0.2)
    info = pretrain(cfg, model_cfg=ModelConfig(), run_cfg=RunConfig(seed=5),
                    synthetic_path=digits["syn"], data_dir=digits["data"], out_dir=out,
                    augment=False, fingerprint="t", comm=LocalComm())
    want = split_rows(digits["labels"], 0.2, seed=5)[1]
    split = info["synthetic_val"]
    assert split["rows"] == want.tolist() and split["num_samples"] == len(want)
    assert all("val_accuracy" in h for h in info["history"])
    # the reported accuracy is the saved weights' on exactly those rows
    m = Manifest.load(digits["data"])
    model = build_model(ModelConfig(), m.input_shape, m.num_classes)
    model.load_state_dict(load_safetensors(out / WEIGHTS_NAME)[0])
    vx, vy = read_rows(digits["syn"], want, "images")
    got = evaluate(model, vx, vy, ImageTransform(m.norm_mean, m.norm_std, m.input_shape, False),
                   num_classes=m.num_classes)
    assert got["accuracy"] == split["accuracy"] > 0.2
    # a fraction that leaves fewer rows than a batch is refused before training
    with pytest.raises(ConfigError, match="pretrain.val_fraction"):
        pretrain(PretrainConfig(epochs=1, batch_size=512, val_fraction=0.2),
                 model_cfg=ModelConfig(), run_cfg=RunConfig(), synthetic_path=digits["syn"],
                 data_dir=digits["data"], out_dir=digits["root"] / "no", augment=False,
                 comm=LocalComm())
    with pytest.raises(DataError, match="validation row .* past"):
        read_rows(digits["syn"], [len(digits["labels"])], "images")


def _summary(out: Path, row: str) -> dict:
    return json.loads((out / row / "summary.json").read_text())


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    out = tmp_path_factory.mktemp("sel") / "run"
    run_cli(["run", TINY, "--out", out, *SELECT], n=3, timeout=600)
    return out


def test_gptfl_returns_the_model_best_on_the_synthetic_split(selected):
    out = selected
    s = _summary(out, "gptfl")
    sel = s["selection"]
    hist = sel["val_by_round"]
    assert [h[0] for h in hist] == list(range(0, 7))  # round 0 (the init) and every round
    best = max(h[1] for h in hist[1:])  # round 0 is reported, not a candidate
    first = next(h for h in hist[1:] if h[1] == best)  # ties go to the earlier round
    assert (sel["round"], sel["val_accuracy"], sel["test_accuracy"]) == tuple(first)
    assert s["selected_accuracy"] == sel["test_accuracy"] and not sel["stopped_early"]
    pre = json.loads((out / "pretrained.json").read_text())
    assert hist[0][1] == pre["synthetic_val"]["accuracy"]  # round 0 is the pretrained model
    assert hist[0][2] == pre["test_accuracy"]
    by_round = dict((r, a) for r, a in s["accuracy_by_round"])
    assert all(by_round[r] == t for r, _, t in hist[1:])
    # final.safetensors holds the selected round's weights (the checkpoints keep rounds 5, 6)
    final, meta = load_safetensors(out / "gptfl" / "final.safetensors")
    assert meta["round"] == str(sel["round"])
    for r in (5, 6):
        model = load_safetensors(out / "gptfl" / "ckpt" / f"round-{r:05d}" /
                                 "model.safetensors")[0]
        same = all(torch.equal(final[k], model[k]) for k in model)
        assert same == (sel["round"] == r), (r, sel["round"])
    # FedAvg from scratch has no synthetic data: it returns its last round
    f = _summary(out, "fedavg")
    assert f["selection"] == {"rule": "last"} and f["selected_accuracy"] == f["final_accuracy"]
    rec = [json.loads(x) for x in (out / "gptfl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in rec] == [h[1] for h in hist[1:]]


def test_patience_stops_every_rank_and_a_preempted_run_resumes_bitwise(selected, tmp_path):
    """fl.patience=3 stops once three evaluations in a row bring no improvement (every rank,
    exit 0); the same run stopped by the stop counter after its second FL round (before
    patience can stop it) resumes to identical outputs and the same selection."""
    ref, out = tmp_path / "ref", tmp_path / "cut"
    init = ["fl.init=" + str(selected / "pretrained.safetensors"), *SELECT, "fl.patience=3"]
    run_cli(["federate", TINY, "--out", ref, *init], n=3, timeout=300)
    s = _summary(ref, ".")
    sel = s["selection"]
    best, since, stop = -1.0, 0, 6
    for r, v, _ in sel["val_by_round"][1:]:  # the FL rounds
        best, since = (v, 0) if v > best else (best, since + 1)
        if since >= 3:
            stop = r
            break
    assert sel["last_round"] == s["rounds_run"] == stop and sel["stopped_early"] == (stop < 6)
    # GPTFL_STOP_AFTER counts the 6 client shards `prepare` writes, then FL rounds
    p = run_cli(["federate", TINY, "--out", out, *init], n=3, timeout=300, check=False,
                extra_env={"GPTFL_STOP_AFTER": "8"})
    assert p.returncode == PREEMPTED and "stopped after round 2" in p.stderr, p.stderr[-2000:]
    run_cli(["federate", TINY, "--out", out, "--resume", *init], n=3, timeout=300)
    assert (ref / "final.safetensors").read_bytes() == (out / "final.safetensors").read_bytes()

    def lines(d):
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(("t_", "wall"))}
                for x in (d / "metrics.jsonl").read_text().splitlines()]

    assert lines(ref) == lines(out)
    assert _summary(out, ".")["selection"] == sel


def test_selection_refuses_an_init_without_a_split(selected, tmp_path):
    """An init pretrained on the whole set (or without its pretrained.json) is a one-line
    error naming fl.select, before any FL work."""
    import shutil

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(selected / "pretrained.safetensors", lone / "pretrained.safetensors")
    p = run_cli(["federate", TINY, "--out", tmp_path / "x", *SELECT,
                 "fl.init=" + str(lone / "pretrained.safetensors")], n=1, timeout=120,
                check=False)
    assert p.returncode != 0 and "config key fl.select" in p.stderr, p.stderr[-2000:]
    assert "round 1/" not in p.stderr
