"""Embedded generator: trains on the digits public split, saves a loadable diffusers directory,
is deterministic, resumes bit-identically after preemption, and samples through load_sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptfl_hpc import signals
from gptfl_hpc.config import GenConfig, GenTrainConfig
from gptfl_hpc.errors import ConfigError, DataError, ModelError, Preempted, StaleOutputError
from gptfl_hpc.gen.embedded import PROVENANCE, checkpoint_path, train_generator

TINY = GenTrainConfig(steps=20, batch_size=32, block_out_channels=[8, 16], checkpoint_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def public() -> tuple[np.ndarray, np.ndarray]:
    """The digits public split (30 %, stratified), as the data layer stores it: uint8 NHWC."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    _, x, _, y = train_test_split(images, labels, test_size=0.3, stratify=labels, random_state=0)
    return x, y


def _weights(d: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].tobytes() == wb[k].tobytes(), k


@pytest.fixture(scope="module")
def trained(public, tmp_path_factory) -> Path:
    x, y = public
    return train_generator(TINY, x, y, 10, tmp_path_factory.mktemp("g") / "gen", seed=0,
                           label_names=[str(i) for i in range(10)])


def test_trains_and_loads_with_diffusers(trained, public):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(str(trained), subfolder="unet", local_files_only=True)
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 8
    assert tuple(unet.config.block_out_channels) == (8, 16)
    sched = DDPMScheduler.from_pretrained(str(trained), subfolder="scheduler")
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    prov = json.loads((trained / PROVENANCE).read_text())
    assert prov["trained_on"] == "public split" and prov["steps"] == 20 and prov["seed"] == 0
    assert prov["params"] == sum(p.numel() for p in unet.parameters())
    assert prov["num_train_images"] == len(public[0]) and prov["wall_s"] > 0
    assert prov["label_names"] == [str(i) for i in range(10)]
    assert not checkpoint_path(trained).exists()
    assert sorted(p.name for p in trained.parent.iterdir()) == ["gen"]  # no temp dirs left


def test_same_seed_same_weights_and_reuse(trained, public, tmp_path):
    x, y = public
    again = train_generator(TINY, x, y, 10, tmp_path / "again", seed=0,
                            label_names=[str(i) for i in range(10)])
    _same_weights(trained, again)
    other = train_generator(TINY, x, y, 10, tmp_path / "other", seed=1)
    assert _weights(other)["conv_in.weight"].tobytes() != _weights(trained)["conv_in.weight"]\
        .tobytes()
    mtime = (again / PROVENANCE).stat().st_mtime_ns
    train_generator(TINY, x, y, 10, again, seed=0, label_names=[str(i) for i in range(10)])
    assert (again / PROVENANCE).stat().st_mtime_ns == mtime  # same request: reused
    with pytest.raises(StaleOutputError, match="holds another request"):
        train_generator(TINY, x, y, 10, again, seed=1)  # never silently replaced
    assert json.loads((again / PROVENANCE).read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]
    (tmp_path / "foreign").mkdir()
    with pytest.raises(StaleOutputError, match="no gptfl_generator.json"):
        train_generator(TINY, x, y, 10, tmp_path / "foreign", seed=0)


def test_gen_train_seed_overrides_run_seed(trained, public, tmp_path):
    """gen.train.seed takes run.seed's place: the request names the resolved seed (null with
    run.seed=N is the same request as N), and the weights follow it, not run.seed."""
    import dataclasses

    from gptfl_hpc.gen.embedded import generator_request

    x, y = public
    def fp(train, seed):
        return generator_request(train, public_sha256="p", seed=seed, label_names=None,
                                 image_shape=[8, 8, 1]).fingerprint

    pinned = dataclasses.replace(TINY, seed=0)
    assert fp(TINY, 0) == fp(pinned, 0) == fp(pinned, 7)
    assert fp(TINY, 7) != fp(pinned, 7) and fp(dataclasses.replace(TINY, seed=7), 0) == fp(TINY, 7)
    again = train_generator(pinned, x, y, 10, tmp_path / "pinned", seed=5,
                            label_names=[str(i) for i in range(10)])
    _same_weights(trained, again)  # trained with run.seed 0 and no gen.train.seed
    assert json.loads((again / PROVENANCE).read_text())["seed"] == 0
    with pytest.raises(ConfigError, match=r"gen.train.seed.*valid: null \(run.seed\)"):
        GenTrainConfig(seed=-3)


def test_preempted_training_resumes_bit_identically(trained, public, tmp_path, monkeypatch):
    x, y = public
    out = tmp_path / "resumed"
    monkeypatch.setenv("GPTFL_STOP_AFTER", "7")
    signals.reset()
    with pytest.raises(Preempted, match="at step 7/20"):
        train_generator(TINY, x, y, 10, out, seed=0, label_names=[str(i) for i in range(10)])
    assert checkpoint_path(out).is_file() and not out.exists()
    monkeypatch.delenv("GPTFL_STOP_AFTER")
    signals.reset()
    with pytest.raises(StaleOutputError, match="rerun with --resume"):
        train_generator(TINY, x, y, 10, out, seed=0, label_names=[str(i) for i in range(10)],
                        resume=False)
    with pytest.raises(StaleOutputError, match="checkpoint of another request"):
        train_generator(TINY, x, y, 10, out, seed=5, label_names=[str(i) for i in range(10)])
    train_generator(TINY, x, y, 10, out, seed=0, label_names=[str(i) for i in range(10)])
    _same_weights(trained, out)
    assert not checkpoint_path(out).exists()
    assert json.loads((out / PROVENANCE).read_text())["resumed_from_step"] == 7


def test_periodic_checkpoint_and_resume(trained, public, tmp_path, monkeypatch):
    """A kill after a periodic checkpoint (simulated: stop at 13, keep only the step-10 file)."""
    import shutil

    x, y = public
    cfg = GenTrainConfig(steps=20, batch_size=32, block_out_channels=[8, 16],
                         checkpoint_every=10)
    out = tmp_path / "periodic"
    ck = checkpoint_path(out)
    monkeypatch.setenv("GPTFL_STOP_AFTER", "10")
    signals.reset()
    with pytest.raises(Preempted):
        train_generator(cfg, x, y, 10, out, seed=0, label_names=[str(i) for i in range(10)])
    shutil.copy(ck, tmp_path / "step10")
    monkeypatch.setenv("GPTFL_STOP_AFTER", "3")  # counts boundaries of this run: 10 + 3
    signals.reset()
    with pytest.raises(Preempted, match="at step 13/20"):
        train_generator(cfg, x, y, 10, out, seed=0, label_names=[str(i) for i in range(10)])
    shutil.copy(tmp_path / "step10", ck)  # as if SIGKILLed at step 13: last durable state is 10
    monkeypatch.delenv("GPTFL_STOP_AFTER")
    signals.reset()
    train_generator(cfg, x, y, 10, out, seed=0, label_names=[str(i) for i in range(10)])
    _same_weights(trained, out)  # checkpoint_every is not part of the request


def test_bad_data(public, tmp_path):
    x, y = public
    with pytest.raises(DataError, match="uint8"):
        train_generator(TINY, x.astype(np.float32), y, 10, tmp_path / "g", seed=0)
    with pytest.raises(DataError, match="labels span"):
        train_generator(TINY, x, y + 1, 10, tmp_path / "g", seed=0)
    with pytest.raises(ModelError, match="not divisible"):
        train_generator(GenTrainConfig(block_out_channels=[8] * 5), x, y, 10,
                        tmp_path / "g", seed=0)


def test_sampler_from_trained_directory(trained):
    from gptfl_hpc.gen.base import Task
    from gptfl_hpc.gen.registry import load_sampler, open_generator

    cfg = GenConfig(steps=3, guidance=[1.0, 2.0], channels_last=False)
    names = [str(i) for i in range(10)]
    s = load_sampler(trained, gen_cfg=cfg, task=Task.image(names, (8, 8, 1)), device="cpu",
                     dtype="fp32")
    assert s.kind == "class_conditional"
    spec = open_generator(trained)
    assert spec.kind == "class_conditional" and spec.provenance["label_names"] == names
    labels, seeds = np.arange(6) % 10, np.arange(6) + 100
    g = np.array([1.0, 2.0, 1.0, 1.5, 1.0, 2.0], dtype=np.float32)
    a = s(labels, [""] * 6, g, seeds)
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    b = s(labels[:3], [""] * 3, g[:3], seeds[:3])
    assert b.shape == (3, 8, 8, 1)
    c = s(labels, [""] * 6, g, seeds)
    assert np.array_equal(a, c)  # deterministic per seed
    twelve = [str(i) for i in range(12)]
    with pytest.raises(ModelError, match="11 class embeddings but the task has 12"):
        load_sampler(trained, gen_cfg=cfg, task=Task.image(twelve, (8, 8, 1)), device="cpu")
    other = [f"digit {i}" for i in range(10)]  # the generator records its classes
    with pytest.raises(ModelError, match="was trained on classes"):
        load_sampler(trained, gen_cfg=cfg, task=Task.image(other, (8, 8, 1)), device="cpu")
