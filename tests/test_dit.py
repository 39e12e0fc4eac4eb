"""Class-conditional DiT generators (DiTPipeline): kind detection, sampler contract, class-id
mapping by label name, agreement with DiTPipeline.__call__, and synthesis end to end. Tiny random
pipelines built offline and loaded through DiTPipeline.from_pretrained(local_files_only=True)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from synth_driver import gen_config

from gptfl_hpc.errors import ModelError
from gptfl_hpc.gen.base import Task
from gptfl_hpc.gen.kinds.dit import DiTSampler, check_dit
from gptfl_hpc.gen.registry import load_sampler, open_generator
from gptfl_hpc.gen.synthesize import synthesize
from gptfl_hpc.parallel.comm import LocalComm

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def build_tiny_dit(path: Path, *, num_classes: int = 10, id2label: dict | None = None,
                   seed: int = 0) -> Path:
    """Random DiT (latent 4x4x4, patch 2, 1 layer) + VAE (16 px <-> 4x4) + DDIM, saved offline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            sample_size=4, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
            num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=num_classes,
            norm_type="ada_norm_zero", norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32, 32), in_channels=3, out_channels=3,
                            down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4,
                            norm_num_groups=8, sample_size=16)
        with torch.no_grad():  # make the prediction depend clearly on class and input
            for p in transformer.parameters():
                p.add_(0.05 * torch.randn_like(p))
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(),
                       id2label=id2label)
    if id2label is not None:  # save_pretrained keeps only registered config (as on the Hub)
        pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})
    pipe.save_pretrained(str(path))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


def _task(num_classes: int, shape=(8, 8, 1), label_names=None) -> Task:
    return Task.image(label_names or [f"class_{i}" for i in range(num_classes)], shape)


def load_dit(d, *, gen_cfg, out_shape, num_classes, label_names=None) -> DiTSampler:
    return load_sampler(d, gen_cfg=gen_cfg, task=_task(num_classes, out_shape, label_names),
                        device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    return build_tiny_dit(tmp_path_factory.mktemp("dit") / "tiny",
                          id2label=dict(enumerate(NAMES)))


@pytest.fixture(scope="module")
def sampler(dit_dir) -> DiTSampler:
    return load_dit(dit_dir, gen_cfg=gen_config(steps=3), out_shape=(8, 8, 1), num_classes=10)


def test_kind_detection(dit_dir, tmp_path):
    spec = open_generator(dit_dir)
    assert (spec.kind, spec.family) == ("dit", "class_conditional")
    assert open_generator(dit_dir, "class_conditional").kind == "dit"
    idx = json.loads((dit_dir / "model_index.json").read_text())
    assert idx["_class_name"] == "DiTPipeline"
    other = tmp_path / "other"  # a transformer and no text encoder also counts as a DiT
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "X",
                                                        "transformer": ["diffusers", "Y"]}))
    assert open_generator(other).kind == "dit"
    with pytest.raises(ModelError, match="component folder"):
        check_dit(open_generator(other), _task(2))


def test_sampler_contract(dit_dir, sampler):
    assert isinstance(sampler, DiTSampler) and sampler.kind == "class_conditional"
    labels = np.array([0, 1, 2, 3], dtype=np.int64)
    guidance = np.array([1.0, 3.0, 1.0, 2.5], dtype=np.float32)
    seeds = np.array([10, 11, 12, 13], dtype=np.int64)
    a = sampler(labels, [""] * 4, guidance, seeds)
    assert a.shape == (4, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, sampler(labels, [""] * 4, guidance, seeds))  # deterministic
    b = sampler(labels, [""] * 4, guidance, seeds + 100)
    assert all(not np.array_equal(a[i], b[i]) for i in range(4))  # other seeds, other images
    # a row depends on its own label/guidance/seed only, not on its neighbours' guidance
    c = sampler(labels, [""] * 4, np.array([1.0, 3.0, 4.0, 1.0], np.float32), seeds)
    assert np.array_equal(a[:2], c[:2]) and not np.array_equal(a[2:], c[2:])
    assert sampler(labels[:0], [], guidance[:0], seeds[:0]).shape == (0, 8, 8, 1)
    rgb = load_dit(dit_dir, gen_cfg=gen_config(steps=3), out_shape=(32, 32, 3), num_classes=10)
    d = rgb(labels, [""] * 4, guidance, seeds)
    assert d.shape == (4, 32, 32, 3) and d.dtype == np.uint8 and d.std() > 1
    assert np.array_equal(d, rgb(labels, [""] * 4, guidance, seeds))


def test_label_name_mapping(dit_dir, tmp_path):
    cfg = gen_config(steps=2)
    s = load_dit(dit_dir, gen_cfg=cfg, out_shape=(8, 8, 1), num_classes=2,
                 label_names=["one", "three"])
    assert s.class_ids.tolist() == [1, 3]
    assert check_dit(open_generator(dit_dir), _task(2, label_names=["one", "three"])
                     ).tolist() == [1, 3]
    s = load_dit(dit_dir, gen_cfg=cfg, out_shape=(8, 8, 1), num_classes=3,
                 label_names=["cat", "dog", "one"])  # not all found -> identity
    assert s.class_ids.tolist() == [0, 1, 2]
    assert load_dit(dit_dir, gen_cfg=cfg, out_shape=(8, 8, 1), num_classes=3
                    ).class_ids.tolist() == [0, 1, 2]
    many = [f"c{i}" for i in range(11)]
    with pytest.raises(ModelError, match=r"DiT has 10 classes.*task has 11.*valid: <= 10") as e:
        load_dit(dit_dir, gen_cfg=cfg, out_shape=(8, 8, 1), num_classes=11, label_names=many)
    assert str(dit_dir) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match="DiT has 10 classes"):
        check_dit(open_generator(dit_dir), _task(11, label_names=many))
    with pytest.raises(ModelError, match="not found"):
        load_dit(tmp_path / "nope", gen_cfg=cfg, out_shape=(8, 8, 1), num_classes=2)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_matches_dit_pipeline(tmp_path, guidance):
    """The sampler's loop reproduces DiTPipeline.__call__ (1000 classes: its null class)."""
    import torch
    from diffusers import DiTPipeline

    d = build_tiny_dit(tmp_path / "imagenet_like", num_classes=1000, seed=1)
    s = load_dit(d, gen_cfg=gen_config(steps=3), out_shape=(16, 16, 3), num_classes=1000)
    labels = np.array([5, 999, 7], dtype=np.int64)
    seeds = np.array([1, 2, 3], dtype=np.int64)
    ours = s(labels, [""] * 3, np.full(3, guidance, np.float32), seeds)
    pipe = DiTPipeline.from_pretrained(str(d), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(int(v)) for v in seeds]
    ref = pipe(class_labels=labels.tolist(), guidance_scale=guidance, generator=gens,
               num_inference_steps=3, output_type="np").images
    ref = np.round(np.clip(ref, 0, 1) * 255).astype(np.int16)
    assert ours.shape == ref.shape
    assert np.abs(ours.astype(np.int16) - ref).max() <= 1


def test_synthesize_end_to_end(dit_dir, tmp_path):
    out = synthesize(gen_config(batch=8, micro=4, steps=2), generator_dir=dit_dir,
                     label_names=["digit_a", "digit_b", "digit_c"], out_shape=(8, 8, 1),
                     n_total=12, out_path=tmp_path / "dit.h5", seed=0, comm=LocalComm(),
                     device="cpu")
    with h5py.File(out, "r") as f:
        images, labels = f["images"][()], f["labels"][()]
        assert f.attrs["kind"] == "class_conditional"
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 1
    assert np.bincount(labels, minlength=3).tolist() == [4, 4, 4]


def test_stochastic_scheduler_uses_sample_generators(tmp_path):
    """A saved DDPM scheduler (gen.scheduler=default) draws its step noise from the per-sample
    generators, not the global RNG, so the output is reproducible."""
    import torch

    d = build_tiny_dit(tmp_path / "ddpm")
    from diffusers import DDPMScheduler

    DDPMScheduler().save_pretrained(str(d / "scheduler"))
    idx = json.loads((d / "model_index.json").read_text())
    idx["scheduler"] = ["diffusers", "DDPMScheduler"]
    (d / "model_index.json").write_text(json.dumps(idx))
    s = load_dit(d, gen_cfg=gen_config(steps=3, scheduler="default"), out_shape=(8, 8, 1),
                 num_classes=10)
    assert type(s.pipe.scheduler).__name__ == "DDPMScheduler"
    args = (np.arange(3), [""] * 3, np.full(3, 2.0, np.float32), np.arange(3))
    torch.manual_seed(1)
    a = s(*args)
    torch.manual_seed(2)
    assert np.array_equal(a, s(*args))


def test_vae_out_of_memory_halves_the_call(dit_dir, tmp_path, monkeypatch, caplog):
    """The DiT decodes a whole call in one VAE call; when that runs out of GPU memory (faked
    above 2 rows) the engine halves the call shape for the rest of the run, and the set equals a
    run at that call shape."""
    import dataclasses
    import logging

    import torch

    from gptfl_hpc.gen import registry

    real = registry.GENERATORS["dit"]
    decoded = []

    def load(spec, cfg, task, device, dtype):
        sampler = real.load(spec, cfg, task, device, dtype)
        decode = sampler.pipe.vae.decode

        def limited(z, *a, **kw):
            decoded.append(len(z))
            if len(z) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
            return decode(z, *a, **kw)

        sampler.pipe.vae.decode = limited
        return sampler

    def run(out, micro):
        synthesize(gen_config(batch=8, micro=micro, steps=2), generator_dir=dit_dir,
                   label_names=["digit_a", "digit_b", "digit_c"], out_shape=(8, 8, 1),
                   n_total=12, out_path=out, seed=0, comm=LocalComm(), device="cpu")
        with h5py.File(out, "r") as f:
            return f["images"][()], f.attrs["call_rows"]

    monkeypatch.setitem(registry.GENERATORS, "dit", dataclasses.replace(real, load=load))
    with caplog.at_level(logging.WARNING):
        images, call_rows = run(tmp_path / "oom.h5", 4)
    assert decoded == [4, 2, 2, 2, 2, 2, 2] and call_rows == 2
    assert "dit generator: out of GPU memory at 4 rows per call; using 2" in caplog.text
    monkeypatch.setitem(registry.GENERATORS, "dit", real)
    ref, _ = run(tmp_path / "m2.h5", 2)
    assert images.tobytes() == ref.tobytes()
