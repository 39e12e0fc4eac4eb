"""Synthesis engine: byte-identical sets for any batch size / process count, kill and preemption
resume, skip / refuse existing sets, input checks. Tiny random class-conditional UNet on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import PY, REPO, env, run_py
from synth_driver import LABELS, gen_config, make_tiny_generator

from gptfl_hpc import signals
from gptfl_hpc.parallel.comm import LocalComm
from gptfl_hpc.errors import ConfigError, DataError, ModelError, Preempted
from gptfl_hpc.gen.synthesize import parts_dir, synthesize

ARRAYS = ("images", "labels", "prompt_index", "guidance", "seed")
SHAPE = (8, 8, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    return make_tiny_generator(tmp_path_factory.mktemp("gen") / "tiny")


def _run(gen: Path, out: Path, *, n: int = 50, batch: int = 8, micro: int | None = 4,
         steps: int = 4, seed: int = 0, labels=LABELS, **kw) -> Path:
    return synthesize(gen_config(batch, micro, steps), generator_dir=gen, label_names=labels,
                      out_shape=kw.pop("out_shape", SHAPE), n_total=n, out_path=out, seed=seed,
                      comm=LocalComm(), device="cpu", **kw)


def _read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        d = {k: f[k][()] for k in ARRAYS}
        d["prompts"] = [p.decode() for p in f["prompts"][()]]
        d["attrs"] = dict(f.attrs)
    return d


def _same(a: dict, b: dict) -> None:
    for k in ARRAYS:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"
    assert a["prompts"] == b["prompts"]


@pytest.fixture(scope="module")
def reference(generator, tmp_path_factory) -> dict:
    """n=50, batch 32 (8 blocks of 4 per batch), one process with the default thread count."""
    return _read(_run(generator, tmp_path_factory.mktemp("ref") / "ref.h5", batch=32))


def test_format_and_batch_size_invariance(generator, reference, tmp_path):
    out = _run(generator, tmp_path / "b7.h5", batch=7)  # rounded up to 8 = 2 blocks per batch
    got = _read(out)
    _same(got, reference)
    assert got["images"].shape == (50, 8, 8, 1) and got["images"].dtype == np.uint8
    assert got["images"].std() > 5  # not a constant image
    assert np.array_equal(got["labels"], np.arange(50) % 10)
    assert got["prompts"][3] == "a photo of a digit 3"
    assert ((got["guidance"] >= 1) & (got["guidance"] <= 3)).all()
    a = got["attrs"]
    assert a["format_version"] == 1 and a["kind"] == "class_conditional"
    assert a["n_total"] == 50 and a["steps"] == 4 and a["scheduler"] == "ddim"
    assert json.loads(a["label_names"]) == LABELS and a["micro_batch"] == 4
    assert json.loads(a["config"])["batch_size"] == 7
    assert not parts_dir(out).exists()
    # without guidance the same seeds give other images, but still deterministic
    with h5py.File(out) as f:
        assert f["images"].chunks[1:] == (8, 8, 1)


def test_one_vs_two_processes_and_resume_with_other_count(generator, reference, tmp_path):
    drv = ["tests/synth_driver.py", "--generator", str(generator), "--n", "50"]
    out2 = tmp_path / "mpi2.h5"
    p = run_py([*drv, "--out", str(out2), "--batch", "8"], n=2, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    _same(_read(out2), reference)
    assert _read(out2)["attrs"]["num_processes"] == 2

    # preempted under 2 processes (both stop at the same batch), resumed by 1 with another batch
    out3 = tmp_path / "mixed.h5"
    p = run_py([*drv, "--out", str(out3), "--batch", "8"], n=2, timeout=180,
               extra_env={"GPTFL_STOP_AFTER": "1"})
    assert p.returncode == 124, p.stderr[-3000:]
    assert "stopped by GPTFL_STOP_AFTER" in p.stderr and not out3.exists()
    assert len(list(parts_dir(out3).glob("blocks-*.h5"))) == 2
    _same(_read(_run(generator, out3, batch=12)), reference)


def test_preemption_resumes_identically(generator, reference, tmp_path, monkeypatch):
    out = tmp_path / "pre.h5"
    monkeypatch.setenv("GPTFL_STOP_AFTER", "2")
    signals.reset()
    with pytest.raises(Preempted, match="rerun the same command"):
        _run(generator, out)
    assert Preempted.exit_code == 124
    assert not out.exists() and len(list(parts_dir(out).glob("blocks-*.h5"))) == 2
    monkeypatch.delenv("GPTFL_STOP_AFTER")
    signals.reset()
    _same(_read(_run(generator, out)), reference)


def test_kill_midway_resumes_identically(generator, tmp_path):
    """SIGKILL a running synthesis after its first part file; the rerun finishes the rest."""
    args = ["--generator", str(generator), "--n", "40", "--steps", "40", "--batch", "4"]
    ref = tmp_path / "ref.h5"
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([PY, "tests/synth_driver.py", *args, "--out", str(out)], cwd=REPO,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(parts_dir(out).glob("blocks-*.h5")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no part file after 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "finished before the kill; make the run slower"
    n_parts = len(list(parts_dir(out).glob("blocks-*.h5")))
    assert 1 <= n_parts < 10
    p = subprocess.run([PY, "tests/synth_driver.py", *args, "--out", str(out)], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{n_parts * 4} done" in p.stderr  # finished blocks were not redone
    _same(_read(out), _read(_run(generator, ref, n=40, steps=40, batch=4)))


def test_skip_when_complete_and_refuse_other_request(generator, tmp_path):
    out = _run(generator, tmp_path / "s.h5", n=12)
    mtime = out.stat().st_mtime_ns
    _run(generator, out, n=12, batch=16)  # batch size is not part of the request: skipped
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match=r"different request \(differs in seed\)"):
        _run(generator, out, n=12, seed=1)
    # parts of a different request are refused too
    out2 = tmp_path / "p.h5"
    parts_dir(out2).mkdir()
    (parts_dir(out2) / "state.json").write_text(json.dumps({"request": {"seed": 5},
                                                            "numerics": {}, "prompts": []}))
    with pytest.raises(DataError, match="delete .*p.h5.parts to start over"):
        _run(generator, out2, n=12)


def test_missing_generator_dir(tmp_path):
    missing = tmp_path / "no-such-generator"
    with pytest.raises(ModelError) as e:
        _run(missing, tmp_path / "x.h5")
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg
    assert "save_pretrained" in msg and "--local-dir" in msg and "gen.generator=embedded" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="neither a text-to-image pipeline"):
        _run(empty, tmp_path / "x.h5")


def test_bad_inputs_fail_before_any_work(generator, tmp_path):
    out = tmp_path / "bad.h5"
    with pytest.raises(ConfigError, match="n_total=0"):
        _run(generator, out, n=0)
    with pytest.raises(ModelError, match="11 class embeddings but the task has 9 classes"):
        _run(generator, out, labels=LABELS[:9])
    with pytest.raises(ConfigError, match="distinct non-empty strings"):
        _run(generator, out, labels=LABELS[:9] + ["digit_0"])
    with pytest.raises(DataError, match="out_shape"):
        _run(generator, out, out_shape=(8, 8, 2))
    assert not out.exists() and not parts_dir(out).exists()


def test_resize_and_channels(generator, tmp_path):
    d = _read(_run(generator, tmp_path / "rgb.h5", n=12, out_shape=(16, 12, 3)))
    assert d["images"].shape == (12, 16, 12, 3)
    assert np.array_equal(d["images"][..., 0], d["images"][..., 2])  # gray model -> 3 channels


def test_text2image_kind_is_routed_to_text2image(tmp_path, monkeypatch):
    """auto kind: a model_index.json naming a text encoder goes to gen.text2image (faked here)."""
    import gptfl_hpc.gen.text2image as t2i

    gen = tmp_path / "sd"
    gen.mkdir()
    (gen / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers",
                                                                    "CLIPTextModel"]}))
    seen = []

    class Fake:
        kind = "text2image"

        def __call__(self, labels, prompts, guidance, seeds):
            seen.extend(zip(labels.tolist(), prompts))
            v = (np.asarray(seeds) % 251).astype(np.uint8)
            return np.broadcast_to(v[:, None, None, None], (len(seeds), 4, 4, 3)).copy()

    monkeypatch.setattr(t2i, "check_generator_dir", lambda d: {})
    monkeypatch.setattr(t2i, "load_text2image", lambda d, **kw: Fake())
    d = _read(_run(gen, tmp_path / "t.h5", n=10, out_shape=(4, 4, 3), labels=["cat", "dog"]))
    assert d["attrs"]["kind"] == "text2image"
    assert all(p == f"a photo of a {['cat', 'dog'][lab]}" for lab, p in seen)
    assert np.array_equal(d["images"][:, 0, 0, 0], (d["seed"] % 251).astype(np.uint8))


@pytest.mark.parametrize("scheduler", ["dpm", "default"])
def test_other_schedulers_run(generator, tmp_path, scheduler):
    cfg = gen_config(8, 4, 3, (1.0, 1.0), scheduler)
    out = synthesize(cfg, generator_dir=generator, label_names=LABELS, out_shape=SHAPE,
                     n_total=8, out_path=tmp_path / "s.h5", seed=0, comm=LocalComm(),
                     device="cpu")
    assert _read(out)["images"].shape == (8, 8, 8, 1)


def test_no_leftovers(generator, tmp_path):
    _run(generator, tmp_path / "c.h5", n=8)
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]
