"""Server pretraining (train/pretrain.py) and the shared test metrics (train/evaluate.py).

Data: `prepare` on scikit-learn's digits (8x8x1, 360 test images) gives a real data directory;
its public split (539 real digits) stands in for the synthetic set, written in the synthetic
HDF5 layout. Multi-process runs go through tests/pretrain_driver.py under `mpiexec -n 2`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import run_py

from gptfl_hpc import signals
from gptfl_hpc.config import DataConfig, ModelConfig, PretrainConfig, RunConfig
from gptfl_hpc.data.manifest import Manifest
from gptfl_hpc.data.prepare import prepare_data
from gptfl_hpc.data.shards import read_shard
from gptfl_hpc.errors import ConfigError, DataError, Preempted, StaleOutputError
from gptfl_hpc.fsio import load_safetensors
from gptfl_hpc.parallel.comm import LocalComm
from gptfl_hpc.train.evaluate import evaluate, macro_f1
from gptfl_hpc.train.models import build_model
from gptfl_hpc.train.pretrain import CKPT_DIR, INFO_NAME, WEIGHTS_NAME, pretrain
from gptfl_hpc.train.transforms import ImageTransform

CFG = PretrainConfig(epochs=2, batch_size=32, lr=2e-3)
MODEL = ModelConfig(name="digits_cnn")


def _write_synthetic(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The synthetic set's layout: images, labels (+ prompt_index, guidance, seed)."""
    n = len(labels)
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["labels"] = labels.astype(np.int64)
        f["prompt_index"] = np.zeros(n, np.int64)
        f["guidance"] = np.ones(n, np.float32)
        f["seed"] = np.arange(n, dtype=np.int64)
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data_dir = root / "data"
    prepare_data(DataConfig(num_clients=2), seed=0, out_dir=data_dir)
    x, y, _ = read_shard(data_dir / "public.h5")
    syn = _write_synthetic(root / "synthetic.h5", x, y)
    return {"root": root, "data": data_dir, "syn": syn}


def _run(digits, out: Path, cfg: PretrainConfig = CFG, augment: bool = True,
         resume: bool = False, **kw) -> dict:
    return pretrain(cfg, model_cfg=MODEL, run_cfg=RunConfig(seed=0),
                    synthetic_path=kw.pop("syn", digits["syn"]), data_dir=digits["data"],
                    out_dir=out, augment=augment, fingerprint=f"test-{cfg.epochs}-{augment}",
                    resume=resume, comm=LocalComm(), **kw)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(Path(out) / WEIGHTS_NAME)[0]


def _driver(digits, out: Path, *extra: str, stop_after: int | None = None):
    args = ["tests/pretrain_driver.py", "--synthetic", str(digits["syn"]), "--data-dir",
            str(digits["data"]), "--out", str(out), "--epochs", str(CFG.epochs),
            "--batch-size", str(CFG.batch_size), "--lr", str(CFG.lr), *extra]
    env = {"GPTFL_STOP_AFTER": str(stop_after)} if stop_after else {}
    return run_py(args, n=2, timeout=120, extra_env=env)


@pytest.fixture(scope="module")
def baseline(digits):
    """One uninterrupted single-process run, shared by several tests."""
    signals.reset()
    out = digits["root"] / "single"
    return out, _run(digits, out)


# ------------------------------------------------------------------------- (a) one process


def test_single_process_trains_and_writes_loadable_outputs(digits, baseline):
    out, info = baseline
    assert info["fingerprint"] == "test-2-True" and info["num_processes"] == 1
    assert info["test"]["accuracy"] > 0.3, info["history"]  # chance is 0.1
    assert len(info["history"]) == 2 and info["images_per_second"] > 0
    assert info["input_shape"] == [8, 8, 1] and info["num_classes"] == 10
    assert info["synthetic"]["num_samples"] == 539
    assert info["test_accuracy"] == info["test"]["accuracy"]  # flat copy used by report.py
    assert json.loads((out / INFO_NAME).read_text()) == info
    assert not (out / CKPT_DIR).exists()

    # the FL engine's view: build_model + strict load, same metrics as the JSON reports
    m = Manifest.load(digits["data"])
    model = build_model(MODEL, m.input_shape, m.num_classes)
    state = _weights(out)
    assert set(state) == set(model.state_dict())  # safetensors stores keys sorted
    model.load_state_dict(state, strict=True)
    tx, ty = m.read_test(digits["data"])
    metrics = evaluate(model, tx, ty, ImageTransform(m.norm_mean, m.norm_std, m.input_shape,
                                                     False), num_classes=m.num_classes)
    assert metrics["accuracy"] == info["test"]["accuracy"]
    assert metrics["loss"] == pytest.approx(info["test"]["loss"], rel=1e-6)


def test_complete_stage_is_reused_and_test_split_is_refused(tmp_path):
    """Through the CLI: the pretrain stage reuses its complete output for the same request, and
    refuses the real test split passed as the synthetic set (test leakage)."""
    from helpers import run_cli

    data = tmp_path / "data"
    run_cli(["prepare", "configs/tiny.yaml", "--out", data], timeout=120)
    x, y, _ = read_shard(data / "public.h5")
    syn = _write_synthetic(tmp_path / "syn.h5", x, y)

    def pre(out, synthetic, check=True):
        return run_cli(["pretrain", "configs/tiny.yaml", f"data.dir={data}", "--synthetic",
                        synthetic, "--out", out], timeout=300, check=check)

    pre(tmp_path / "p", syn)
    mtime = (tmp_path / "p" / WEIGHTS_NAME).stat().st_mtime_ns
    again = pre(tmp_path / "p", syn)
    assert "stage pretrain: complete for this request" in again.stderr
    assert (tmp_path / "p" / WEIGHTS_NAME).stat().st_mtime_ns == mtime
    p = pre(tmp_path / "leak", data / "test.h5", check=False)
    assert p.returncode == 2 and "prepared test shard of real data" in p.stderr, p.stderr[-2000:]
    # the same test images copied into a synthetic-set layout are found by content
    tx, ty, _ = read_shard(data / "test.h5")
    copy = _write_synthetic(tmp_path / "copy.h5", np.concatenate([x, tx[:3]]),
                            np.concatenate([y, ty[:3]]))
    p = pre(tmp_path / "leak2", copy, check=False)
    assert p.returncode == 2 and "3 sample(s) are identical to images of the test split" in \
        p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------------- (c) resume


def test_resume_after_preemption_is_bitwise_identical(digits, baseline, monkeypatch):
    out = digits["root"] / "resumed"
    signals.reset()
    monkeypatch.setenv("GPTFL_STOP_AFTER", "1")
    with pytest.raises(Preempted, match="after epoch 1/2"):
        _run(digits, out)
    state = json.loads((out / CKPT_DIR / "state.json").read_text())
    assert state["epoch"] == 1 and not (out / INFO_NAME).exists()
    assert sorted(p.name for p in (out / CKPT_DIR).iterdir()) == [
        "model-e00001.safetensors", "optim-e00001.safetensors", "state.json"]

    monkeypatch.delenv("GPTFL_STOP_AFTER")
    signals.reset()
    with pytest.raises(StaleOutputError, match="rerun with --resume"):
        _run(digits, out)
    info = _run(digits, out, resume=True)
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    ref, got = _weights(baseline[0]), _weights(out)
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert info["test"] == baseline[1]["test"]


def test_checkpoint_of_last_epoch_finishes_without_training(digits, monkeypatch, caplog):
    """Killed after the last checkpoint but before pretrained.json: the rerun only writes it."""
    import gptfl_hpc.train.pretrain as pt

    out, cfg = digits["root"] / "late", PretrainConfig(epochs=1, batch_size=32)
    signals.reset()
    monkeypatch.setattr(pt.shutil, "rmtree", lambda *a, **k: None)
    first = _run(digits, out, cfg=cfg)
    ref = _weights(out)
    (out / INFO_NAME).unlink()
    (out / WEIGHTS_NAME).unlink()
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level("INFO", logger="gptfl_hpc.train.pretrain"):
        info = _run(digits, out, cfg=cfg, resume=True)
    assert "resuming after epoch 1/1" in caplog.text and "pretrain epoch" not in caplog.text
    assert info["test"] == first["test"] and not (out / CKPT_DIR).exists()
    got = _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_checkpoint_of_another_request_is_refused(digits):
    out = digits["root"] / "stale"
    (out / CKPT_DIR).mkdir(parents=True)
    for f in ("model-e00001.safetensors", "optim-e00001.safetensors"):
        (out / CKPT_DIR / f).write_bytes(b"")
    (out / CKPT_DIR / "state.json").write_text(json.dumps(
        {"format_version": 2, "epoch": 1, "fingerprint": "another",
         "model_file": "model-e00001.safetensors", "optim_file": "optim-e00001.safetensors"}))
    signals.reset()
    for resume in (False, True):
        with pytest.raises(StaleOutputError, match="checkpoint of another request"):
            _run(digits, out, cfg=PretrainConfig(epochs=1, batch_size=32), resume=resume)
    assert (out / CKPT_DIR / "state.json").is_file()  # left as it was


# ------------------------------------------------------------------------- (b) two processes


# an odd global batch: the two processes take 16 + 17 samples of each
SGD = PretrainConfig(epochs=2, batch_size=33, lr=0.05, optimizer="sgd")
SGD_ARGS = ("--no-augment", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "33")


@pytest.fixture(scope="module")
def two_procs(digits):
    """One uninterrupted run on 2 processes (SGD, no augmentation, so that it can be compared
    with one process); shared by the tests below to keep the number of mpiexec runs at three."""
    out = digits["root"] / "two"
    p = _driver(digits, out, *SGD_ARGS)
    assert p.returncode == 0, p.stderr[-4000:]
    return out, json.loads((out / INFO_NAME).read_text()), p


def test_two_processes_ddp(digits, two_procs):
    out, info, p = two_procs
    assert info["num_processes"] == 2 and info["per_process_batch_sizes"] == [16, 17]
    assert info["global_batch_size"] == 33
    assert "2 processes" in p.stderr and "16+17 per process" in p.stderr
    assert info["test"]["accuracy"] > 0.3, info["history"]
    model = build_model(MODEL, (8, 8, 1), 10)
    model.load_state_dict(_weights(out), strict=True)


def test_two_processes_match_one(digits, two_procs):
    """Same global batches at any process count: DDP's average of the two (uneven, 16 + 17)
    slices' weighted gradients equals the one-process gradient up to float rounding."""
    one = digits["root"] / "sgd1"
    _run(digits, one, cfg=SGD, augment=False)
    a, b = _weights(one), _weights(two_procs[0])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_two_processes_resume_is_bitwise_identical(digits, two_procs):
    """Preempted after epoch 1 (GPTFL_STOP_AFTER=1), then run again by the driver in the same
    two processes: same final weights as the uninterrupted two-process run."""
    out = digits["root"] / "two_resumed"
    p = _driver(digits, out, *SGD_ARGS, "--resume-after-preempt", stop_after=1)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "stopped after epoch 1/2" in p.stderr and "resuming after epoch 1/2" in p.stderr
    ref, got = _weights(two_procs[0]), _weights(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


# ------------------------------------------------------------------------- (d) input errors


def test_missing_synthetic_file(digits, tmp_path):
    with pytest.raises(DataError, match=r"synthetic set .*nope\.h5: not found"):
        _run(digits, tmp_path / "out", syn=tmp_path / "nope.h5")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_file_and_both_shapes(digits, tmp_path):
    syn = _write_synthetic(tmp_path / "big.h5", np.zeros((64, 16, 16, 1), np.uint8),
                           np.zeros(64, np.int64))
    with pytest.raises(DataError) as e:
        _run(digits, tmp_path / "out", syn=syn)
    msg = str(e.value)
    assert "big.h5" in msg and "(16,16,1)" in msg and "(8,8,1)" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_labels_out_of_range_and_too_few_samples(digits, tmp_path):
    syn = _write_synthetic(tmp_path / "lab.h5", np.zeros((64, 8, 8, 1), np.uint8),
                           np.full(64, 10, np.int64))
    with pytest.raises(DataError, match=r"labels out of range \[0, 10\)"):
        _run(digits, tmp_path / "out", syn=syn)
    syn = _write_synthetic(tmp_path / "few.h5", np.zeros((8, 8, 8, 1), np.uint8),
                           np.zeros(8, np.int64))
    with pytest.raises(DataError, match="fewer than pretrain.batch_size=32"):
        _run(digits, tmp_path / "out", syn=syn)


def test_config_checks():
    with pytest.raises(ConfigError, match="pretrain.batch_size"):
        PretrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="pretrain.momentum"):
        PretrainConfig(momentum=1.0)


# ------------------------------------------------------------------------- (e) evaluate()


class _Lookup(torch.nn.Module):
    """Returns fixed logits per sample; the sample id is the image's single pixel value."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.reshape(len(x)).long()]


def test_evaluate_hand_computed():
    # labels [0,0,1,1,2,2], predictions [0,1,1,1,2,0]
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.8, 0.1],
                          [0.25, 0.5, 0.25], [0.1, 0.1, 0.8], [0.7, 0.1, 0.2]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1)
    model = _Lookup(probs.log()).train()

    def tf(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float()

    expected_loss = -(math.log(0.5) + math.log(0.2) + math.log(0.8) + math.log(0.5)
                      + math.log(0.8) + math.log(0.2)) / 6
    # class 0: TP1 FP1 FN1 -> 1/2; class 1: TP2 FP1 -> 4/5; class 2: TP1 FN1 -> 2/3
    expected_f1 = (0.5 + 0.8 + 2 / 3) / 3
    for bs in (1, 4, 512):  # 4: a last batch of 2 is kept, and the loss is divided once
        r = evaluate(model, images, labels, tf, batch_size=bs, num_classes=3)
        assert r["accuracy"] == pytest.approx(4 / 6)
        assert r["macro_f1"] == pytest.approx(expected_f1)
        assert r["loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert r["num_samples"] == 6
    assert model.training
    model.eval()
    evaluate(model, torch.from_numpy(images), torch.from_numpy(labels), tf, batch_size=4)
    assert not model.training


def test_macro_f1_ignores_absent_classes_and_refuses_augmentation():
    cm = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert macro_f1(cm) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="augment"):
        evaluate(torch.nn.Identity(), np.zeros((1, 8, 8, 1), np.uint8), np.zeros(1),
                 ImageTransform([0.5], [0.5], (8, 8, 1), augment=True))
