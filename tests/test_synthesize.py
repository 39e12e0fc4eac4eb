"""Synthesis engine: byte-identical sets for any batch size / process count, kill and preemption
resume, skip / refuse existing sets, input checks, the generator registry and spec, and the GPU
failure paths (out-of-memory, non-finite outputs) driven on CPU by fake generators. Tiny random
class-conditional UNet on CPU."""

from __future__ import annotations

import dataclasses
import json
import logging
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
from gptfl_hpc.errors import ConfigError, DataError, ModelError, Preempted, StaleOutputError
from gptfl_hpc.gen import registry
from gptfl_hpc.gen import synthesize as engine
from gptfl_hpc.gen.base import CallShape, GeneratorKind, NonFiniteOutput, Task, to_uint8
from gptfl_hpc.gen.synthesize import list_parts, parts_dir, synthesize
from gptfl_hpc.parallel.comm import LocalComm

ARRAYS = ("images", "labels", "prompt_index", "guidance", "seed")
SHAPE = (8, 8, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    return make_tiny_generator(tmp_path_factory.mktemp("gen") / "tiny")


def _run(gen: Path, out: Path, *, n: int = 50, batch: int = 8, micro: int | None = 4,
         steps: int = 4, seed: int = 0, labels=LABELS, dtype: str = "auto", **kw) -> Path:
    cfg = dataclasses.replace(gen_config(batch, micro, steps), dtype=dtype)
    return synthesize(cfg, generator_dir=gen, label_names=labels,
                      out_shape=kw.pop("out_shape", SHAPE), n_total=n, out_path=out, seed=seed,
                      comm=LocalComm(), device="cpu", **kw)


def _blocks(out: Path) -> list[tuple[int, int]]:
    """(first, end) block ranges of the part files of an unfinished set."""
    return [(a, b) for a, b, _ in list_parts(parts_dir(out))]


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
    assert not out.exists() and _blocks(out) == [(0, 2)]  # batch 8 = 2 blocks of 4 per part
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
    with pytest.raises(StaleOutputError, match=r"s.h5 exists but was made for another request"):
        _run(generator, out, n=12, seed=1)
    # parts of a different request are refused too, naming what differs
    out2 = tmp_path / "p.h5"
    with pytest.raises(Preempted):
        os.environ["GPTFL_STOP_AFTER"] = "1"
        signals.reset()
        try:
            _run(generator, out2, n=12)
        finally:
            del os.environ["GPTFL_STOP_AFTER"]
            signals.reset()
    with pytest.raises(StaleOutputError, match=r"partial synthesis of another request \(differs "
                                               r"in run.seed\)"):
        _run(generator, out2, n=12, seed=3)
    # ... and the same request's parts are continued only with resume
    with pytest.raises(StaleOutputError, match="rerun with --resume"):
        _run(generator, out2, n=12, resume=False)
    _run(generator, out2, n=12, resume=True)


def test_missing_generator_dir(tmp_path):
    missing = tmp_path / "no-such-generator"
    with pytest.raises(ModelError) as e:
        _run(missing, tmp_path / "x.h5")
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg
    assert "save_pretrained" in msg and "--local-dir" in msg and "gen.generator=embedded" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="not a generator of any registered kind") as e:
        _run(empty, tmp_path / "x.h5")
    msg = str(e.value)  # lists every registered kind with what its directory holds
    assert "\n" not in msg and all(f"{k} (" in msg for k in registry.GENERATORS)
    assert "text2image (" in msg and "dit (" in msg and "class_conditional (" in msg


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
    """auto kind: a model_index.json naming a text encoder goes to the text2image kind (its
    check and load are faked here; the real ones are tested in test_text2image.py)."""
    gen = tmp_path / "sd"
    gen.mkdir()
    (gen / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers",
                                                                    "CLIPTextModel"]}))
    seen = []

    def sampler(labels, prompts, guidance, seeds):
        seen.extend(zip(labels.tolist(), prompts))
        v = (np.asarray(seeds) % 251).astype(np.uint8)
        return np.broadcast_to(v[:, None, None, None], (len(seeds), 4, 4, 3)).copy()

    real = registry.GENERATORS["text2image"]
    monkeypatch.setitem(registry.GENERATORS, "text2image", dataclasses.replace(
        real, check=lambda spec, task, cfg: None, load=lambda *a: sampler))
    d = _read(_run(gen, tmp_path / "t.h5", n=10, out_shape=(4, 4, 3), labels=["cat", "dog"]))
    assert d["attrs"]["kind"] == "text2image" and d["attrs"]["generator_kind"] == "text2image"
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


# ------------------------------------------------------------------------ unit of work

def test_preemption_unit_is_one_block(generator, reference, tmp_path, monkeypatch):
    """A stop request is honoured after the block in flight, not after a whole batch: with
    gen.batch_size 32 (8 blocks per part) a stop after the first block saves that block."""
    out = tmp_path / "one.h5"
    monkeypatch.setenv("GPTFL_STOP_AFTER", "1")
    signals.reset()
    with pytest.raises(Preempted, match=r"after a block \(4/50 samples saved"):
        _run(generator, out, batch=32)
    assert _blocks(out) == [(0, 1)]
    monkeypatch.delenv("GPTFL_STOP_AFTER")
    signals.reset()
    _same(_read(_run(generator, out, batch=32)), reference)


def test_parts_are_sized_by_measured_time(generator, reference, tmp_path, monkeypatch):
    """Parts close before ~PART_SECONDS of generation, measured per block: a slow first block
    (compiling) makes a part of its own, then the size adapts (fake clock: 25 s, then 5 s)."""
    durations = iter([25.0] + [5.0] * 100)
    clock = {"t": 0.0, "started": False}

    def fake_clock() -> float:  # called before and after every block
        if clock["started"]:
            clock["t"] += next(durations)
        clock["started"] = not clock["started"]
        return clock["t"]

    seen = {}
    real_merge = engine._merge

    def merge(out_path, *a, **kw):
        seen["parts"] = _blocks(out_path)
        return real_merge(out_path, *a, **kw)

    monkeypatch.setattr(engine, "_clock", fake_clock)
    monkeypatch.setattr(engine, "_merge", merge)
    monkeypatch.setattr(engine, "PART_SECONDS", 30.0)
    out = _run(generator, tmp_path / "timed.h5", batch=256)  # the size cap (64 blocks) is not hit
    # 13 blocks: [25 s] | 6 x 5 s = 30 s | 6 x 5 s
    assert seen["parts"] == [(0, 1), (1, 7), (7, 13)]
    _same(_read(out), reference)


# ------------------------------------------------------------------------ GPU failure paths

def test_to_uint8_refuses_non_finite_values():
    """NaN/Inf used to be stored as black pixels (nan_to_num); now they are reported."""
    import torch

    x = torch.rand(4, 3, 4, 4)
    assert to_uint8(x, (4, 4, 3)).dtype == np.uint8
    x[1, 0, 0, 0] = float("nan")
    x[3, 2, 1, 1] = float("inf")
    with pytest.raises(NonFiniteOutput) as e:
        to_uint8(x, (2, 2, 1))
    assert (e.value.rows, e.value.total) == (2, 4) and "\n" not in str(e.value)


FAKE_SHAPE = (4, 4, 3)


def _fake_generator(tmp_path: Path, name: str = "fake") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "FAKE").write_text("a test generator")
    return d


def _fake_kind(load, name: str = "fake", family: str = "class_conditional") -> GeneratorKind:
    return GeneratorKind(name=name, family=family, describe="a FAKE marker file",
                         detect=lambda spec: (spec.path / "FAKE").is_file(),
                         check=lambda spec, task, cfg: None, load=load,
                         call_rows=lambda spec: 8)


class SeedImages:
    """Images that are a function of the seed; NaN for `bad` seeds unless loaded in fp32
    (what fp16 overflow looks like), or always NaN with always_bad."""

    kind = "fake"

    def __init__(self, dtype: str, bad: set[int], always_bad: bool = False) -> None:
        self.dtype, self.bad, self.always_bad = dtype, bad, always_bad

    def __call__(self, labels, prompts, guidance, seeds):
        import torch

        x = torch.stack([torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds])
        for i, s in enumerate(seeds):
            if int(s) in self.bad and (self.dtype != "fp32" or self.always_bad):
                x[i, 0, 0, 0] = float("nan")
        return to_uint8(x, FAKE_SHAPE)


def test_nonfinite_block_is_regenerated_in_fp32(tmp_path, monkeypatch, caplog):
    """gen.dtype=fp16: the blocks whose output holds NaN are regenerated with the generator
    loaded in fp32 (once), the set equals an fp32 run, and the count is logged and stored --
    also across a preemption."""
    from gptfl_hpc.gen.prompts import build_plan

    n = 20
    seeds = build_plan(gen_config(), ["a", "b"], n, 0).seeds
    bad = {int(seeds[9]), int(seeds[17])}  # blocks 2 and 4 of 4 samples
    loads = []

    def load(spec, cfg, task, device, dtype):
        loads.append(dtype)
        return SeedImages(dtype, bad)

    monkeypatch.setitem(registry.GENERATORS, "fake", _fake_kind(load))
    gen = _fake_generator(tmp_path)
    kw = dict(n=n, labels=["a", "b"], out_shape=FAKE_SHAPE, batch=4)
    ref = _read(_run(gen, tmp_path / "fp32.h5", dtype="fp32", **kw))
    assert ref["attrs"]["nonfinite_blocks_regenerated"] == 0 and loads == ["fp32"]

    out = tmp_path / "fp16.h5"
    loads.clear()
    monkeypatch.setenv("GPTFL_STOP_AFTER", "4")
    signals.reset()
    with caplog.at_level(logging.WARNING), pytest.raises(Preempted):
        _run(gen, out, dtype="fp16", **kw)  # blocks 0..3 done, block 2 regenerated
    assert loads == ["fp16", "fp32"]
    assert "block 2 (samples 8..11): 1 of 4 samples are not finite in fp16" in caplog.text
    monkeypatch.delenv("GPTFL_STOP_AFTER")
    signals.reset()
    loads.clear()
    with caplog.at_level(logging.INFO):
        got = _read(_run(gen, out, dtype="fp16", **kw))
    assert loads == ["fp16", "fp32"]  # block 4 needed the fp32 generator again after resume
    assert got["attrs"]["nonfinite_blocks_regenerated"] == 2  # one before, one after resuming
    assert "2 block(s) regenerated in fp32 for non-finite outputs" in caplog.text
    for k in ARRAYS:
        assert got[k].tobytes() == ref[k].tobytes(), k
    assert got["attrs"]["dtype"] == "fp16"


class _AllSeeds(set):
    def __contains__(self, item) -> bool:
        return True


def test_nonfinite_also_in_fp32_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.GENERATORS, "fake", _fake_kind(
        lambda spec, cfg, task, device, dtype: SeedImages(dtype, _AllSeeds(), always_bad=True)))
    gen = _fake_generator(tmp_path)
    kw = dict(n=8, labels=["a", "b"], out_shape=FAKE_SHAPE, batch=4)
    for dtype, where in (("fp16", "in fp16 and in fp32 too"), ("fp32", "in fp32;")):
        with pytest.raises(ModelError) as e:
            _run(gen, tmp_path / f"{dtype}.h5", dtype=dtype, **kw)
        msg = str(e.value)
        assert "\n" not in msg and "block 0 (samples 0..3): 4 of 4 samples" in msg, msg
        assert where in msg and str(gen) in msg, msg


def test_out_of_memory_halves_the_call_shape_once(generator, tmp_path, monkeypatch, caplog):
    """A generator that runs out of GPU memory above 2 rows per call: the engine halves the call
    shape once, keeps it for every later call (one shape: a compiled model recompiles once), and
    the set is byte-identical to a run with micro_batch 2 (same call shape)."""
    import torch

    real = registry.GENERATORS["class_conditional"]
    sizes = []

    def load(spec, cfg, task, device, dtype):
        sampler = real.load(spec, cfg, task, device, dtype)

        def call(labels, prompts, guidance, seeds):
            sizes.append(len(seeds))
            if len(seeds) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
            return sampler(labels, prompts, guidance, seeds)
        return call

    monkeypatch.setitem(registry.GENERATORS, "class_conditional",
                        dataclasses.replace(real, load=load))
    with caplog.at_level(logging.WARNING):
        got = _read(_run(generator, tmp_path / "oom.h5", micro=4))
    assert "out of GPU memory at 4 rows per call; using 2 from now on" in caplog.text
    assert sizes == [4] + [2] * 25  # 50 samples in calls of 2, the shape never grows back
    assert got["attrs"]["micro_batch"] == 4 and got["attrs"]["call_rows"] == 2
    monkeypatch.setitem(registry.GENERATORS, "class_conditional", real)
    _same(got, _read(_run(generator, tmp_path / "m2.h5", micro=2)))


def test_call_shape_pads_halves_and_logs_compiles(caplog):
    import torch

    sizes = []

    def fn(idx):
        sizes.append(len(idx))
        if len(idx) > 3:
            raise torch.cuda.OutOfMemoryError("fake")
        return idx * 10

    shape = CallShape(8, what="test", pad=True, compiled=True)
    with caplog.at_level(logging.INFO):
        out = shape.run(fn, 7)
        out2 = shape.run(fn, 5)
    assert out.tolist() == [i * 10 for i in range(7)] and out2.tolist() == out.tolist()[:5]
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 2, 2]  # halved twice, then every call has 2 rows
    assert (shape.rows, shape.min_rows, shape.halvings) == (2, 2, 2)
    assert "compiles this new shape once" in caplog.text
    assert caplog.text.count("first call with 2 rows took") == 1  # compile time, once per shape

    def never_fits(idx):
        raise torch.cuda.OutOfMemoryError("fake")

    with pytest.raises(ModelError, match="one sample per call does not fit in GPU memory"):
        CallShape(4, what="test").run(never_fits, 3)


# ------------------------------------------------------------------------ registry, spec, task

def test_registry_kinds_and_default_call_shapes(generator, tmp_path):
    from gptfl_hpc.config import GenConfig
    from gptfl_hpc.gen.spec import GeneratorSpec

    assert list(registry.GENERATORS) == ["audioldm2", "audioldm", "speecht5", "espeak",
                                        "text2image", "dit", "class_conditional"]
    for k in registry.GENERATORS.values():
        assert callable(k.detect) and callable(k.check) and callable(k.load)
    assert registry.families() == ["class_conditional", "text2audio", "text2image",
                                   "text2speech"]
    spec = registry.open_generator(generator)
    assert (spec.kind, spec.family) == ("class_conditional", "class_conditional")
    # rows per call: 64 on CPU; on GPU the kind's own (not gen.batch_size=256)
    num = engine.synthesis_numerics(GenConfig(), spec, "cuda")
    assert num == {"device_type": "cuda", "dtype": "fp16", "micro_batch": 256}  # 8x8 UNet
    assert engine.synthesis_numerics(GenConfig(), spec, "cpu")["micro_batch"] == 64
    assert engine.synthesis_numerics(GenConfig(micro_batch=8), spec, "cuda")["micro_batch"] == 8
    big = dataclasses.replace(spec, unet_config={**spec.unet_config, "sample_size": 256})
    assert registry.GENERATORS["class_conditional"].call_rows(big) == 16
    t2i = GeneratorSpec(path=tmp_path, index={"text_encoder": ["x", "y"]}, unet_config=None,
                        provenance=None, kind="text2image", family="text2image")
    assert engine.synthesis_numerics(GenConfig(), t2i, "cuda")["micro_batch"] == 16
    dit = dataclasses.replace(t2i, index={"_class_name": "DiTPipeline"}, kind="dit")
    assert engine.synthesis_numerics(GenConfig(), dit, "cuda")["micro_batch"] == 32
    with pytest.raises(ConfigError, match="gen.kind: invalid value 'audio'; valid: auto, "
                       "class_conditional, text2audio, text2image, text2speech"):
        registry.open_generator(generator, "audio")


def test_generator_read_once_and_fingerprinted_completely(generator, tmp_path, monkeypatch):
    """One synthesis parses the generator's descriptor files and hashes it once; the fingerprint
    covers every byte of big files (a partial hash cannot prove identity)."""
    import shutil

    import gptfl_hpc.gen.spec as spec_mod
    import gptfl_hpc.provenance as provenance

    reads, digests = [], []
    real_read, real_digest = spec_mod.read_json, provenance.digest

    def read(path):
        reads.append(path.name)
        return real_read(path)

    def digest(path):
        if Path(path).is_dir():
            digests.append(Path(path))
        return real_digest(path)

    monkeypatch.setattr(spec_mod, "read_json", read)
    monkeypatch.setattr(provenance, "digest", digest)
    _run(generator, tmp_path / "once.h5", n=8)
    assert reads.count("config.json") == 1 and reads.count("model_index.json") == 1
    assert digests == [generator]

    gen = tmp_path / "copy"
    shutil.copytree(generator, gen)
    big = gen / "unet" / "extra.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8))
    big.write_bytes(data)
    fp = spec_mod.GeneratorSpec.read(gen).fingerprint
    data[len(data) // 2] ^= 1  # one bit in the middle of a 5 MiB file
    big.write_bytes(data)
    assert spec_mod.GeneratorSpec.read(gen).fingerprint != fp


def test_a_new_modality_is_one_kind(tmp_path, monkeypatch):
    """The engine stores whatever Task asks for: a fake text-to-audio kind (what one new module
    in gen/kinds/ would register) makes int16 waveforms (N, L) in an 'audio' dataset, byte-
    identical for any batch size; an image kind refuses an audio task with one line."""
    length = 64

    def load(spec, cfg, task, device, dtype):
        assert task.sample_shape == (length,) and task.dtype == "int16"

        def sampler(labels, prompts, guidance, seeds):
            rng = [np.random.default_rng(int(s)) for s in seeds]
            return np.stack([(r.standard_normal(length) * 3000).astype(np.int16) for r in rng])
        return sampler

    monkeypatch.setitem(registry.GENERATORS, "text2audio",
                        _fake_kind(load, "text2audio", family="text2audio"))
    gen = _fake_generator(tmp_path)
    task = Task(("dog bark", "siren"), (length,), "int16", "audio")

    def run(out, batch):
        return synthesize(gen_config(batch, 4, 2, (1.0, 1.0)), generator_dir=gen,
                          label_names=list(task.label_names), task=task, n_total=10,
                          out_path=out, seed=0, comm=LocalComm(), device="cpu")

    a, b = run(tmp_path / "a.h5", 4), run(tmp_path / "b.h5", 12)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa["audio"].dtype == np.int16 and fa["audio"].shape == (10, length)
        assert fa["audio"][()].tobytes() == fb["audio"][()].tobytes()
        assert fa.attrs["kind"] == "text2audio" and "images" not in fa
    with pytest.raises(ModelError, match="makes images, the task asks for audio"):
        registry.GENERATORS["class_conditional"].check(
            registry.open_generator(_fake_generator(tmp_path, "x")), task, gen_config())
    with pytest.raises(DataError, match="sample shape"):
        Task(("a",), (length,), "float32", "audio").check()


def test_gen_package_has_no_import_cycles():
    """Every import inside gptfl_hpc/gen (module level and inside functions) as a graph: acyclic."""
    import ast

    root = Path(engine.__file__).resolve().parents[1]  # gptfl_hpc/
    mods = {}
    for f in (root / "gen").rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[m] |= {n for n in names if n in mods and n != m}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert graph["gptfl_hpc.gen.synthesize"] >= {"gptfl_hpc.gen.registry", "gptfl_hpc.gen.base"}
    assert graph["gptfl_hpc.gen.kinds.dit"] >= {"gptfl_hpc.gen.diffusion", "gptfl_hpc.gen.spec"}
