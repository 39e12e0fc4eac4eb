"""Server pretraining (train/pretrain.py) and the shared test metrics (train/evaluate.py).

Data: `prepare` on scikit-learn's digits (8x8x1, 360 test images) gives a real data directory;
its public split (539 real digits) stands in for the synthetic set, written in the synthetic
HDF5 layout. Multi-process runs go through tests/pretrain_driver.py under `mpiexec -n 2`.

GPU paths are tested on CPU: the streaming data path runs its prefetch thread on CPU (bitwise
the same weights as the resident path), the step loop runs on torch's ``meta`` device under a
dispatch mode that flags every host<->device copy and device read, and torch.cuda's memory
functions are mocked for the memory plan, the OOM message and the release of GPU memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fake_accelerator, run_py, write_synthetic

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

GiB = 1 << 30

CFG = PretrainConfig(epochs=2, batch_size=32, lr=2e-3)
MODEL = ModelConfig(name="digits_cnn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data_dir = root / "data"
    prepare_data(DataConfig(num_clients=2), seed=0, out_dir=data_dir)
    x, y, _ = read_shard(data_dir / "public.h5")
    syn = write_synthetic(root / "synthetic.h5", x, y)
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
    syn = write_synthetic(tmp_path / "syn.h5", x, y)

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
    copy = write_synthetic(tmp_path / "copy.h5", np.concatenate([x, tx[:3]]),
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
    two processes, on the STREAMING data path (prefetch threads reading the node's shared host
    copy): the same final weights as the uninterrupted two-process run on the resident path."""
    out = digits["root"] / "two_resumed"
    p = _driver(digits, out, *SGD_ARGS, "--data-path", "stream", "--resume-after-preempt",
                stop_after=1)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "stopped after epoch 1/2" in p.stderr and "resuming after epoch 1/2" in p.stderr
    assert "r0 stream, r1 stream" in p.stderr
    ref, got = _weights(two_procs[0]), _weights(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_two_processes_share_one_host_copy(two_procs):
    """Both processes of one node read the same host copy (an MPI shared-memory window)."""
    _, info, p = two_procs
    data = info["data_path"]
    assert data["host_copies"] == 1 and data["rank0_shared_window"] is True
    assert [n["ranks"] for n in data["nodes"]] == [2]
    assert [d["path"] for d in data["per_process"]] == ["device", "device"]
    assert "one host copy per node" in p.stderr and "r0 device, r1 device" in p.stderr


def test_host_array_is_one_shared_copy_per_host():
    """Comm.host_array under mpiexec -n 3 on one host: one window; rank 0's writes are seen by
    the others without another message once the copy is shared (the same memory)."""
    code = """
import numpy as np
from gptfl_hpc.parallel.comm import get_comm
c = get_comm()
h = c.host_array((5, 3), np.int16)
if c.rank == 0:
    h.array[:] = np.arange(15).reshape(5, 3)
h.bcast_from_root()
ok = h.array.sum() == 105 and h.shared and h.hosts == 1 and h.host_size == 3
c.barrier()
if c.rank == 0:
    h.array[4, 2] = -1000
c.barrier()
seen = int(h.array[4, 2])
h.free()
print(f"rank {c.rank} ok {bool(ok)} seen {seen}", flush=True)
"""
    p = run_py(["-c", code], n=3, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in range(3):
        assert f"rank {r} ok True seen -1000" in p.stdout, p.stdout
    h = LocalComm().host_array((2, 2), np.uint8)
    assert h.array.shape == (2, 2) and not h.shared and h.hosts == 1
    h.bcast_from_root()
    h.free()


# --------------------------------------------------------- data path, step, GPU memory (CPU)


def test_streaming_path_gives_bitwise_the_same_weights(digits, baseline):
    """pretrain.data_path=stream (the prefetch thread gathering rows from the host copy) trains
    bitwise the same weights as the resident path: same batches, permutation, augmentation."""
    out = digits["root"] / "stream"
    signals.reset()
    info = _run(digits, out, cfg=PretrainConfig(epochs=2, batch_size=32, lr=2e-3,
                                                data_path="stream"))
    assert [d["path"] for d in info["data_path"]["per_process"]] == ["stream"]
    assert [d["path"] for d in baseline[1]["data_path"]["per_process"]] == ["device"]
    ref, got = _weights(baseline[0]), _weights(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert info["test"] == baseline[1]["test"]


@pytest.mark.parametrize("hw, c, augment", [(8, 1, True), (32, 3, True), (32, 3, False)])
def test_device_batches_equal_the_image_transform(hw, c, augment):
    """The trainer's batch (rows gathered, shifted and flipped as bytes, then normalised, with
    the epoch's draws made up front) is bitwise the shared ImageTransform applied to the global
    batch with the generator of (seed, epoch, step) and sliced for each of 2 processes."""
    from gptfl_hpc.seeding import derive
    from gptfl_hpc.train.pretrain import ResidentRows, Trainer

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, hw, hw, c), dtype=np.uint8)
    y = np.arange(40) % 10
    mean, std = [0.3, 0.4, 0.5][:c], [0.2, 0.25, 0.3][:c]
    tf = ImageTransform(mean, std, (hw, hw, c), augment)
    cfg = PretrainConfig(epochs=1, batch_size=13)
    for rank, (r0, r1) in enumerate([(0, 6), (6, 13)]):
        model = build_model(ModelConfig(name="digits_cnn" if hw == 8 else "resnet20"),
                            (hw, hw, c), 10)
        tr = Trainer(cfg, fake_accelerator(torch.device("cpu"), rank), model,
                     ResidentRows(x, torch.device("cpu")), y, tf, seed=7, num_processes=2)
        plan = tr.plan_epoch(3)
        for step in range(tr.steps_per_epoch):
            idx = plan.perm[step * 13:(step + 1) * 13]
            g = torch.Generator().manual_seed(derive(7, "pretrain.augment", 3, step))
            want = tf(torch.from_numpy(x)[idx], g)[r0:r1] if augment else \
                tf(torch.from_numpy(x)[idx[r0:r1]], None)
            got, labels = tr.batch(plan, step)
            assert torch.equal(got, want) and got.is_contiguous()
            assert torch.equal(labels, torch.from_numpy(y)[idx[r0:r1]])


def test_training_steps_make_no_host_device_copy():
    """A training step neither copies between host and device nor reads a device value: run on
    torch's meta device under a dispatch mode that records every op mixing devices and every
    scalar read of a device tensor (the old per-step ImageTransform made 5 such copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gptfl_hpc.train.pretrain import ResidentRows, Trainer

    class Watch(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bad: list[str] = []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            devices = {t.device.type for t in torch.utils._pytree.tree_leaves(
                (args, kwargs, out)) if isinstance(t, torch.Tensor)}
            if len(devices) > 1 or (func is torch.ops.aten._local_scalar_dense.default
                                    and "meta" in devices):
                self.bad.append(str(func))
            return out

    meta = torch.device("meta")
    x = np.zeros((96, 32, 32, 3), np.uint8)
    tf = ImageTransform([0.5] * 3, [0.25] * 3, (32, 32, 3), True)
    for optimizer in ("adamw", "sgd"):
        tr = Trainer(PretrainConfig(epochs=1, batch_size=16, optimizer=optimizer),
                     fake_accelerator(meta),
                     build_model(ModelConfig(name="resnet20"), (32, 32, 3), 10),
                     ResidentRows(x, meta), np.arange(96) % 10, tf, seed=0, num_processes=1)
        plan = tr.plan_epoch(0)
        assert plan.draws is not None and plan.draws.device == meta  # copied once per epoch
        watch = Watch()
        with watch:
            for step in range(tr.steps_per_epoch):
                tr.step(plan, step)
        assert watch.bad == [], (optimizer, watch.bad)
        with watch:  # the check itself works: the shared transform copies per call
            tf(tr.source.x[:4], torch.Generator().manual_seed(0))
        assert watch.bad.count("aten._to_copy.default") == 5, watch.bad


def test_data_path_choice_and_its_errors():
    from gptfl_hpc.train.pretrain import choose_path

    kw = {"set_bytes": 20 * GiB, "besides": 6 * GiB, "margin": 4 * GiB}
    assert choose_path("auto", free=30 * GiB, **kw) == ("device", None)
    assert choose_path("auto", free=29 * GiB, **kw) == ("stream", None)
    assert choose_path("stream", free=300 * GiB, **kw) == ("stream", None)
    path, err = choose_path("device", free=29 * GiB, **kw)
    assert path == "device" and "\n" not in err
    assert err.startswith("config key pretrain.data_path: 'device', but the synthetic set "
                          "(20.00 GiB) does not fit on the GPU: 29.00 GiB free, 30.00 GiB needed")
    assert err.endswith("valid: auto, stream")


def test_gpu_plan_uses_free_device_memory(monkeypatch):
    """plan_device on a (mocked) GPU: the free memory decides; an impossible 'device' is one
    ConfigError on every rank."""
    from gptfl_hpc.train.pretrain import SetInfo, plan_device

    info = SetInfo("s.h5", "images", "uint8", 150_000, (224, 224, 3))  # 21 GiB
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 * GiB)
    for free, want in ((78 * GiB, "device"), (22 * GiB, "stream")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d, f=free: (f, 80 * GiB))
        (plan,) = plan_device(PretrainConfig(), LocalComm(), gpu, info, besides=GiB)
        # the allocator's cached, unused 2 GiB count as free
        assert plan["path"] == want and plan["free"] == free + 2 * GiB and plan["step"] == GiB
        assert plan["margin"] == 4 * GiB  # 5 % of the GPU
    with pytest.raises(ConfigError, match=r"'device', but the synthetic set \(21.03 GiB\)"):
        plan_device(PretrainConfig(data_path="device"), LocalComm(), gpu, info, besides=GiB)
    (plan,) = plan_device(PretrainConfig(), LocalComm(), torch.device("cpu"), info, besides=0)
    assert plan["path"] == "device"  # CPU: the host copy is the device copy


def test_set_too_big_for_host_memory_is_one_line_error_before_training(digits, tmp_path,
                                                                        monkeypatch):
    """On CPU the host copy is the device copy: a node that cannot hold it stops the stage."""
    monkeypatch.setenv("GPTFL_HOST_MEMORY_GIB", "0.5")
    with pytest.raises(DataError) as e:
        _run(digits, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "539 x (8,8,1) uint8 = 0.00 GiB fits neither in host memory" in msg
    assert "offers 0.50 GiB (GPTFL_HOST_MEMORY_GIB), 1.00 GiB are needed with a margin" in msg
    assert "pretrain.batch_size does not change this" in msg and "gen.count or gen.volume" in msg
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("GPTFL_HOST_MEMORY_GIB", "lots")
    with pytest.raises(ConfigError, match="GPTFL_HOST_MEMORY_GIB='lots': not a number"):
        _run(digits, tmp_path / "out")


def _inputs(digits):
    from gptfl_hpc.train.pretrain import read_inputs

    return read_inputs(PretrainConfig(batch_size=32), LocalComm(), None, digits["data"],
                       digits["syn"])


def test_without_host_room_the_set_goes_to_the_gpus_or_stops(digits, monkeypatch):
    """No node can hold a host copy: when every GPU can hold the set, it is read slab by slab
    straight onto the devices (checked for leakage on the way); when a GPU cannot either, one
    line names both sizes."""
    import gptfl_hpc.train.pretrain as pt

    inputs = _inputs(digits)
    nodes = [{"host": "n1", "first_rank": 0, "ranks": 1, "available": 1000, "source": "test",
              "need": GiB, "fits": False}]
    monkeypatch.setattr(pt, "SLAB_BYTES", 64 * 100)  # 100 rows a slab: 6 slabs
    plans, source = pt.place_data(PretrainConfig(), LocalComm(), torch.device("cpu"), inputs,
                                  None, nodes, 0, 32)
    assert plans[0]["path"] == "device"
    assert torch.equal(source.x, torch.from_numpy(read_shard(digits["data"] / "public.h5")[0]))
    # a leaked test image is found in whichever slab it is
    tx = inputs.test[0].copy()
    tx[5] = source.x[450].numpy()
    with pytest.raises(DataError, match="1 sample.s. are identical to images of the test"):
        pt.load_to_devices(LocalComm(), dataclasses.replace(inputs, test=(tx, inputs.test[1])),
                           torch.device("cpu"))
    # a (mocked) GPU too small as well
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (2 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 0)
    with pytest.raises(DataError) as e:
        pt.place_data(PretrainConfig(), LocalComm(), torch.device("cuda", 0), inputs, None,
                      nodes, GiB, 32)
    msg = str(e.value)
    assert "fits neither in host memory (node n1 offers 0.00 GiB (test)" in msg
    assert "nor on every GPU (cuda:0 of rank 0: 2.00 GiB free, 5.00 GiB needed" in msg
    assert "\n" not in msg


def test_slabs_reach_every_process(digits):
    """load_to_devices under mpiexec -n 2: rank 0 reads the slabs, both processes end up with
    the whole set."""
    code = f"""
from pathlib import Path
import numpy as np, torch
import gptfl_hpc.train.pretrain as pt
from gptfl_hpc.config import PretrainConfig
from gptfl_hpc.data.shards import read_shard
from gptfl_hpc.parallel.comm import get_comm
c = get_comm()
pt.SLAB_BYTES = 64 * 100
inputs = pt.read_inputs(PretrainConfig(batch_size=32), c, None, {str(digits["data"])!r},
                        Path({str(digits["syn"])!r}))
x = pt.load_to_devices(c, inputs, torch.device("cpu"))
want = read_shard({str(digits["data"] / "public.h5")!r})[0]
print(f"rank {{c.rank}} equal {{bool(np.array_equal(x.numpy(), want))}}", flush=True)
"""
    p = run_py(["-c", code], n=2, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0 equal True" in p.stdout and "rank 1 equal True" in p.stdout, p.stdout


def test_out_of_memory_is_one_line_error_with_the_sizes(digits, tmp_path, monkeypatch):
    import gptfl_hpc.train.pretrain as pt

    def oom(self, plan, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pt.Trainer, "step", oom)
    signals.reset()
    with pytest.raises(ConfigError) as e:
        _run(digits, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("pretraining ran out of GPU memory on cpu")
    assert "synthetic set 539 x (8,8,1) uint8 = 0.00 GiB on the device" in msg
    assert "at 32 samples per process; lower pretrain.batch_size" in msg
    assert "pretrain.data_path=stream" in msg


def test_stage_frees_its_models_then_returns_gpu_memory(digits, tmp_path, monkeypatch, caplog):
    """When pretrain() hands the GPU back (torch.cuda mocked as initialised), its models and
    optimizers are already gone, then the cache is emptied once and the memory logged."""
    import gptfl_hpc.train.models as models
    import gptfl_hpc.train.pretrain as pt

    alive: list[weakref.ref] = []
    build, make_opt = models.build_model, pt._optimizer
    monkeypatch.setattr(models, "build_model",
                        lambda *a: alive.append(weakref.ref(m := build(*a))) or m)
    monkeypatch.setattr(pt, "_optimizer",
                        lambda *a: alive.append(weakref.ref(o := make_opt(*a))) or o)
    calls: list[list[bool]] = []
    release = pt.release_device_memory

    def mocked_release(stage: str):
        with monkeypatch.context() as mp:
            mp.setattr(torch.cuda, "is_initialized", lambda: True)
            mp.setattr(torch.cuda, "current_device", lambda: 0)
            mp.setattr(torch.cuda, "memory_reserved", lambda d: 3 * GiB - 2 * GiB * len(calls))
            mp.setattr(torch.cuda, "memory_allocated", lambda d: 0)
            mp.setattr(torch.cuda, "mem_get_info", lambda d: (79 * GiB, 80 * GiB))
            mp.setattr(torch.cuda, "empty_cache",
                       lambda: calls.append([r() is not None for r in alive]))
            return release(stage)

    monkeypatch.setattr(pt, "release_device_memory", mocked_release)
    signals.reset()
    with caplog.at_level("INFO", logger="gptfl_hpc.parallel.accel"):
        _run(digits, tmp_path / "out", cfg=PretrainConfig(epochs=1, batch_size=32))
    assert len(alive) == 3  # the model, rank 0's evaluation copy, the optimizer
    assert calls == [[False, False, False]]
    assert ("pretraining: GPU memory released on cuda:0: 0.00 GiB still allocated, reserved "
            "3.00 -> 1.00 GiB, 79.00 of 80.00 GiB free") in caplog.text


def test_package_catches_oom_as_torch_cuda_out_of_memory_error():
    """torch.OutOfMemoryError needs torch >= 2.5 while setup.py allows 2.4: the package uses
    torch.cuda.OutOfMemoryError (the same class on every torch >= 2.4)."""
    pkg = Path(__file__).resolve().parents[1] / "gptfl_hpc"
    bad = [str(f) for f in pkg.rglob("*.py") if "torch.OutOfMemoryError" in f.read_text()]
    assert bad == []
    assert "torch.cuda.OutOfMemoryError" in (pkg / "train" / "pretrain.py").read_text()


# ------------------------------------------------------------------------- (d) input errors


def test_missing_synthetic_file(digits, tmp_path):
    with pytest.raises(DataError, match=r"synthetic set .*nope\.h5: not found"):
        _run(digits, tmp_path / "out", syn=tmp_path / "nope.h5")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_file_and_both_shapes(digits, tmp_path):
    syn = write_synthetic(tmp_path / "big.h5", np.zeros((64, 16, 16, 1), np.uint8),
                           np.zeros(64, np.int64))
    with pytest.raises(DataError) as e:
        _run(digits, tmp_path / "out", syn=syn)
    msg = str(e.value)
    assert "big.h5" in msg and "(16,16,1)" in msg and "(8,8,1)" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_labels_out_of_range_and_too_few_samples(digits, tmp_path):
    syn = write_synthetic(tmp_path / "lab.h5", np.zeros((64, 8, 8, 1), np.uint8),
                           np.full(64, 10, np.int64))
    with pytest.raises(DataError, match=r"labels out of range \[0, 10\)"):
        _run(digits, tmp_path / "out", syn=syn)
    syn = write_synthetic(tmp_path / "few.h5", np.zeros((8, 8, 8, 1), np.uint8),
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
