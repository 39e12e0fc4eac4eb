"""Audio generators: the AudioLDM, AudioLDM 2 and SpeechT5 kinds on tiny random components built
offline (tests/tiny_audio.py) and saved / reloaded through the real ``from_pretrained`` path,
the embedded eSpeak NG generator, the audio prompt modes and speaker plans, float -> int16
conversion, and the synthesis engine on audio: ``gptfl-hpc synthesize``, byte-identical sets
for any batch size and process count, preemption resume, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
from helpers import run_cli, run_py
from tiny_audio import build_tiny_audioldm, build_tiny_audioldm2, build_tiny_speecht5

from gptfl_hpc import signals
from gptfl_hpc.config import GenConfig
from gptfl_hpc.errors import ConfigError, DataError, ModelError, Preempted
from gptfl_hpc.gen import registry
from gptfl_hpc.gen.base import NonFiniteOutput, Task, fit_length, task_for, to_int16
from gptfl_hpc.gen.prompts import AUDIO_DOMAIN_TEMPLATE, AUDIO_DOMAINS, build_plan
from gptfl_hpc.gen.synthesize import parts_dir, synthesize
from gptfl_hpc.parallel.comm import LocalComm
from gptfl_hpc.pipeline import ASSETS

pytestmark = pytest.mark.usefixtures("one_thread")

ESPEAK_GEN = ASSETS / "espeak-generator"
SOUNDS = ["dog bark", "siren", "rain"]
WORDS = ["yes", "no", "up"]
ARRAYS = ("audio", "labels", "prompt_index", "guidance", "seed")


@pytest.fixture(scope="module")
def audioldm(tmp_path_factory) -> Path:
    return Path(build_tiny_audioldm(tmp_path_factory.mktemp("aldm") / "audioldm"))


@pytest.fixture(scope="module")
def audioldm2(tmp_path_factory) -> Path:
    return Path(build_tiny_audioldm2(tmp_path_factory.mktemp("aldm2") / "audioldm2"))


@pytest.fixture(scope="module")
def speecht5(tmp_path_factory) -> Path:
    return Path(build_tiny_speecht5(tmp_path_factory.mktemp("st5") / "speecht5"))


def sound_cfg(**kw) -> GenConfig:
    base = {"templates": [AUDIO_DOMAIN_TEMPLATE], "prompt_mode": "multi_domain",
            "domains": list(AUDIO_DOMAINS), "guidance": [1.0, 3.0], "steps": 2,
            "micro_batch": 4, "batch_size": 8, "scheduler": "ddim", "channels_last": False}
    return GenConfig(**{**base, **kw})


def speech_cfg(**kw) -> GenConfig:
    base = {"templates": ["{label}"], "prompt_mode": "multi_speaker", "micro_batch": 4,
            "batch_size": 8}
    return GenConfig(**{**base, **kw})


def run_synth(gen: Path, out: Path, cfg: GenConfig, labels: list[str], length: int, n: int,
              **kw) -> Path:
    return synthesize(cfg, generator_dir=gen, label_names=labels, task=Task.audio(labels, length),
                      n_total=n, out_path=out, seed=kw.pop("seed", 0), comm=LocalComm(),
                      device="cpu", **kw)


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        d = {k: f[k][()] for k in ARRAYS}
        d["speaker"] = f["speaker"][()] if "speaker" in f else None
        d["prompts"] = [p.decode() for p in f["prompts"][()]]
        d["attrs"] = dict(f.attrs)
    return d


def same(a: dict, b: dict) -> None:
    for k in ARRAYS:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert (a["speaker"] is None) == (b["speaker"] is None)
    if a["speaker"] is not None:
        assert a["speaker"].tobytes() == b["speaker"].tobytes()
    assert a["prompts"] == b["prompts"]


# --------------------------------------------------------------------------------------------
# conversion, tasks and prompts


def test_to_int16_fit_length_and_tasks():
    import torch

    w = torch.tensor([[0.0, 0.5, -1.5, 1.0], [0.25, 0.25, 0.25, 0.25]])
    assert to_int16(w, 6).tolist() == [[0, 16384, -32767, 32767, 0, 0], [8192] * 4 + [0, 0]]
    assert to_int16(w, 2).tolist() == [[0, 16384], [8192, 8192]]
    ragged = to_int16([np.ones(2) * 0.5, np.ones(6) * -0.5], 4, align="center")
    assert ragged.tolist() == [[0, 16384, 16384, 0], [-16384] * 4]
    assert fit_length(np.arange(7), 3, "center").tolist() == [2, 3, 4]
    with pytest.raises(NonFiniteOutput, match="1 of 2 samples are not finite"):
        to_int16([np.array([0.1, np.nan]), np.zeros(3)], 4)
    t = Task.for_shape(SOUNDS, (16000,))
    assert (t.dataset, t.dtype, t.sample_shape, t.is_audio) == ("audio", "int16", (16000,), True)
    assert Task.for_shape(SOUNDS, (8, 8, 1)).is_image
    m = type("M", (), {"kind": "audio", "label_names": SOUNDS, "input_shape": [80000],
                       "extra": {"sample_rate": 16000}})()
    assert task_for(m) == Task.audio(SOUNDS, 80000, 16000)
    with pytest.raises(DataError, match="audio sample shape"):
        Task(("a",), (4, 4), "int16", "audio").check()


def test_audio_prompt_modes_cover_every_class_domain_and_speaker():
    """No off-by-one: every class gets n // K or one more, every domain and speaker is drawn,
    and everything about sample (c, i) is fixed by (seed, c, i) (a plan is a prefix of a
    longer one)."""
    cfg = sound_cfg()
    plan = build_plan(cfg, SOUNDS, 600, seed=3)
    assert np.bincount(plan.labels).tolist() == [200, 200, 200]
    texts = set(plan.prompt_texts())
    assert texts == {f"a sound of {s} {d}" for s in SOUNDS for d in AUDIO_DOMAINS}
    assert plan.speakers is None
    assert plan.guidance.min() >= 1.0 and plan.guidance.max() <= 3.0
    assert len(np.unique(plan.guidance)) > 500  # random guidance per sample
    speech = build_plan(speech_cfg(), WORDS, 300, seed=3, speakers=13)
    assert speech.prompts == WORDS and np.bincount(speech.speakers, minlength=13).min() > 5
    short = build_plan(speech_cfg(), WORDS, 50, seed=3, speakers=13)
    assert np.array_equal(short.speakers, speech.speakers[:50])
    assert np.array_equal(short.seeds, speech.seeds[:50])
    one = build_plan(speech_cfg(prompt_mode="class_prompt", speaker=7), WORDS, 30, 3, speakers=13)
    assert set(one.speakers.tolist()) == {7}
    with pytest.raises(ConfigError, match="multi_speaker needs a generator with a speaker table"):
        build_plan(speech_cfg(), WORDS, 10, 0, speakers=0)
    with pytest.raises(ConfigError, match=r"gen.speaker: invalid value 13.*valid: 0..12"):
        build_plan(speech_cfg(prompt_mode="class_prompt", speaker=13), WORDS, 10, 0, speakers=13)


def test_registry_detects_the_audio_kinds(audioldm, audioldm2, speecht5):
    assert {"text2audio", "text2speech"} <= set(registry.families())
    for d, kind, family in ((audioldm, "audioldm", "text2audio"),
                            (audioldm2, "audioldm2", "text2audio"),
                            (speecht5, "speecht5", "text2speech"),
                            (ESPEAK_GEN, "espeak", "text2speech")):
        spec = registry.open_generator(d)
        assert (spec.kind, spec.family) == (kind, family), d
    # an AudioLDM directory has a text encoder but is never taken for text-to-image
    with pytest.raises(ModelError, match="makes images, the task asks for audio"):
        registry.GENERATORS["text2image"].check(registry.open_generator(audioldm),
                                                Task.audio(SOUNDS, 4000), sound_cfg())
    with pytest.raises(ModelError, match="makes audio, the task asks for images"):
        registry.GENERATORS["audioldm"].check(registry.open_generator(audioldm),
                                              Task.image(SOUNDS, (8, 8, 1)), sound_cfg())


# --------------------------------------------------------------------------------------------
# AudioLDM and AudioLDM 2


def test_audioldm_through_the_cli(audioldm, tmp_path):
    """`gptfl-hpc synthesize` on an audio dataset: the tiny AudioLDM loads through
    from_pretrained, the task comes from the manifest (int16 clips of the data's length)."""
    root = tmp_path / "sounds"
    for c, name in enumerate(SOUNDS):
        (root / name).mkdir(parents=True)
        for k in range(4):
            t = np.arange(4000) / 16000
            sf.write(root / name / f"{k}.wav", 0.3 * np.sin(2 * np.pi * (300 + 90 * c) * t),
                     16000)
    cfg = tmp_path / "sound.yaml"
    cfg.write_text(json.dumps({
        "data": {"source": "audio_folder", "root": str(root), "test_size": 3,
                 "num_clients": 2, "partition": "iid", "clip_seconds": 0.25},
        "model": {"name": "audio_crnn"},
        "fl": {"clients_per_round": 2},
        "gen": {"generator": str(audioldm), "prompt_mode": "multi_domain",
                "templates": [AUDIO_DOMAIN_TEMPLATE], "domains": list(AUDIO_DOMAINS),
                "guidance": [1.0, 3.0], "steps": 2, "count": 9, "micro_batch": 4}}))
    out = tmp_path / "out"
    run_cli(["synthesize", cfg, "--out", out], timeout=300)
    d = read(out / "synthetic.h5")
    assert d["audio"].dtype == np.int16 and d["audio"].shape == (9, 4000)
    assert d["attrs"]["kind"] == "text2audio" and d["attrs"]["generator_kind"] == "audioldm"
    assert d["attrs"]["sample_rate"] == 16000 and d["speaker"] is None
    assert np.array_equal(d["labels"], np.arange(9) % 3)
    assert (np.abs(d["audio"]).max(axis=1) > 100).all()  # not silence
    assert "a sound of siren in the field" in d["prompts"]


def test_audioldm_batch_invariance_row_guidance_and_resume(audioldm, tmp_path, monkeypatch):
    cfg = sound_cfg()
    ref = read(run_synth(audioldm, tmp_path / "ref.h5", cfg, SOUNDS, 4000, 10))
    other = read(run_synth(audioldm, tmp_path / "b.h5", dataclasses.replace(cfg, batch_size=4),
                           SOUNDS, 4000, 10))
    same(ref, other)  # byte-identical for any batch size (fixed 4-row calls)
    # per-row guidance: one pipeline call per block for the guided rows (+ one for g <= 1)
    from gptfl_hpc.gen.kinds import audioldm as kind_mod

    sampler = registry.load_sampler(audioldm, gen_cfg=cfg, task=Task.audio(SOUNDS, 4000))
    g = np.array([1.0, 1.5, 2.0, 2.7], np.float32)
    row = sampler(np.arange(4) % 3, ["a sound of rain"] * 4, g, np.arange(4))
    assert sampler.calls == 2 and sampler.row_guidance
    grouped = kind_mod.AudioLDMSampler(sampler.pipe, task=Task.audio(SOUNDS, 4000), steps=2,
                                       max_batch=4, device="cpu", kind="audioldm")
    grouped.row_guidance = False
    by_value = grouped(np.arange(4) % 3, ["a sound of rain"] * 4, g, np.arange(4))
    assert grouped.calls == 4
    assert np.abs(row.astype(int) - by_value).max() <= 1  # the same samples, batched
    # preempted after one block, resumed: the same set
    monkeypatch.setenv("GPTFL_STOP_AFTER", "1")
    signals.reset()
    out = tmp_path / "pre.h5"
    with pytest.raises(Preempted):
        run_synth(audioldm, out, cfg, SOUNDS, 4000, 10)
    assert not out.exists() and list(parts_dir(out).glob("blocks-*.h5"))
    monkeypatch.delenv("GPTFL_STOP_AFTER")
    signals.reset()
    same(read(run_synth(audioldm, out, cfg, SOUNDS, 4000, 10)), ref)


def test_audioldm2_is_batched_and_never_reranks(audioldm2, tmp_path, monkeypatch):
    cfg = sound_cfg(prompt_mode="class_prompt", templates=["a sound of {label}"])
    sampler = registry.load_sampler(audioldm2, gen_cfg=cfg, task=Task.audio(SOUNDS, 4000))
    calls = []
    real = type(sampler.pipe).__call__

    def spy(self, *a, **kw):
        calls.append(kw)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(sampler.pipe), "__call__", spy)
    out = sampler(np.arange(4) % 3, [f"a sound of {s}" for s in (SOUNDS + SOUNDS)[:4]],
                  np.array([2.0, 2.0, 3.0, 1.0], np.float32), np.arange(4))
    assert out.shape == (4, 4000) and out.dtype == np.int16
    assert all(kw["num_waveforms_per_prompt"] == 1 for kw in calls)
    assert all(len(kw["generator"]) == len(kw["prompt"]) for kw in calls)
    monkeypatch.undo()
    a = read(run_synth(audioldm2, tmp_path / "a.h5", cfg, SOUNDS, 4000, 8))
    b = read(run_synth(audioldm2, tmp_path / "b.h5", dataclasses.replace(cfg, batch_size=4),
                       SOUNDS, 4000, 8))
    same(a, b)
    assert a["attrs"]["generator_kind"] == "audioldm2"


# --------------------------------------------------------------------------------------------
# SpeechT5


def test_speecht5_decoding_matches_transformers_and_is_per_sample(speecht5):
    import torch
    from transformers import SpeechT5ForTextToSpeech, SpeechT5Tokenizer

    from gptfl_hpc.gen.kinds import speecht5 as kind_mod

    tok = SpeechT5Tokenizer.from_pretrained(str(speecht5), local_files_only=True)
    model = SpeechT5ForTextToSpeech.from_pretrained(str(speecht5), local_files_only=True).eval()
    table = torch.as_tensor(kind_mod.read_speakers(speecht5 / "speakers.safetensors"))
    one = tok(["left"], return_tensors="pt")
    with torch.inference_mode():
        torch.manual_seed(5)
        ref = model.generate_speech(one["input_ids"], table[:1],
                                    attention_mask=one["attention_mask"])
        mine = kind_mod.generate(model, one["input_ids"], one["attention_mask"], table[:1],
                                 [torch.Generator().manual_seed(5)])[0]
        assert torch.equal(ref, mine)  # one sample: transformers' loop, bit for bit
        batch = tok(["up", "left", "no"], return_tensors="pt", padding=True)
        gens = [torch.Generator().manual_seed(s) for s in (9, 5, 7)]
        many = kind_mod.generate(model, batch["input_ids"], batch["attention_mask"],
                                 table[[2, 0, 1]], gens)
    # a sample in a batch (padded text, other rows' masks) is the sample alone
    assert many[1].shape == mine.shape and torch.allclose(many[1], mine, atol=1e-5)


def test_speecht5_synthesis_speakers_and_invariance(speecht5, tmp_path):
    cfg = speech_cfg()
    a = read(run_synth(speecht5, tmp_path / "a.h5", cfg, WORDS, 4000, 10))
    assert a["audio"].shape == (10, 4000) and a["speaker"].dtype == np.int32
    assert set(a["speaker"].tolist()) <= set(range(5)) and len(set(a["speaker"].tolist())) > 1
    assert a["attrs"]["num_speakers"] == 5 and a["attrs"]["kind"] == "text2speech"
    assert (np.abs(a["audio"]).max(axis=1) > 0).all()
    b = read(run_synth(speecht5, tmp_path / "b.h5", dataclasses.replace(cfg, batch_size=4),
                       WORDS, 4000, 10))
    same(a, b)
    # the plan's speaker column is what was spoken: one fixed speaker gives other audio
    c = read(run_synth(speecht5, tmp_path / "c.h5",
                       speech_cfg(prompt_mode="class_prompt", speaker=4), WORDS, 4000, 10))
    assert set(c["speaker"].tolist()) == {4}
    assert np.array_equal(c["seed"], a["seed"])
    rows = a["speaker"] != 4
    assert (a["audio"][rows] != c["audio"][rows]).any(axis=1).all()


def test_speecht5_speaker_tables_and_bad_inputs(speecht5, tmp_path):
    import shutil

    task = Task.audio(WORDS, 4000)
    kind = registry.GENERATORS["speecht5"]
    spec = registry.open_generator(speecht5)
    # an external .npy table (gen.speakers), read without pickle
    table = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    np.save(tmp_path / "x.npy", table)
    cfg = speech_cfg(speakers=str(tmp_path / "x.npy"))
    kind.check(spec, task, cfg)
    assert kind.speakers(spec, cfg) == 3
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "narrow.npy", table[:, :100])
    cases = [
        (speech_cfg(speakers=str(tmp_path / "obj.npy")), ModelError, "not readable without "
         "pickle"),
        (speech_cfg(speakers=str(tmp_path / "narrow.npy")), ModelError, "100-d rows; the model "
         "takes 512-d"),
        (speech_cfg(speakers=str(tmp_path / "x.pkl")), ConfigError, "gen.speakers"),
        (speech_cfg(speakers=str(tmp_path / "none.npy")), ConfigError, "not found"),
        (speech_cfg(guidance=[1.0, 3.0]), ConfigError, "no classifier-free guidance"),
        (speech_cfg(prompt_mode="multi_domain", templates=["{label} {domain}"]), ConfigError,
         "multi_domain"),
    ]
    for bad, err, text in cases:
        with pytest.raises(err, match=text) as e:
            kind.check(spec, task, bad)
        assert "\n" not in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(speecht5, broken)
    shutil.rmtree(broken / "hifigan")
    with pytest.raises(ModelError, match="hifigan/config.json") as e:
        kind.check(registry.open_generator(broken), task, speech_cfg())
    assert "speecht5_hifigan" in str(e.value)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    shutil.copytree(speecht5 / "hifigan", broken / "hifigan")
    with pytest.raises(ModelError, match="a pickled pytorch_model.bin is not loaded"):
        kind.check(registry.open_generator(broken), task, speech_cfg())


# --------------------------------------------------------------------------------------------
# the embedded eSpeak NG generator


def test_espeak_generator_sets_are_identical_for_batch_sizes_and_processes(tmp_path):
    cfg = speech_cfg(micro_batch=4)
    a = read(run_synth(ESPEAK_GEN, tmp_path / "a.h5", cfg, WORDS, 16000, 10))
    assert a["audio"].shape == (10, 16000) and a["attrs"]["num_speakers"] == 13
    assert a["attrs"]["generator_kind"] == "espeak"
    peak = np.abs(a["audio"]).max(axis=1)
    assert (peak > 3000).all()
    # the word sits in the middle of the clip: silent edges
    assert (np.abs(a["audio"][:, :1000]).max(axis=1) == 0).all()
    b = read(run_synth(ESPEAK_GEN, tmp_path / "b.h5", dataclasses.replace(cfg, batch_size=12),
                       WORDS, 16000, 10))
    same(a, b)
    code = ("import sys; sys.path.insert(0, 'tests');"
            "from gptfl_hpc.config import GenConfig; from gptfl_hpc.gen.base import Task;"
            "from gptfl_hpc.gen.synthesize import synthesize;"
            "from gptfl_hpc.parallel.comm import get_comm;"
            f"w={WORDS!r}; synthesize(GenConfig(templates=['{{label}}'], "
            "prompt_mode='multi_speaker', micro_batch=4, batch_size=4), "
            f"generator_dir={str(ESPEAK_GEN)!r}, label_names=w, task=Task.audio(w, 16000), "
            f"n_total=10, out_path={str(tmp_path / 'mpi.h5')!r}, seed=0, comm=get_comm(), "
            "device='cpu')")
    p = run_py(["-c", code], n=2, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    c = read(tmp_path / "mpi.h5")
    same(a, c)
    assert c["attrs"]["num_processes"] == 2


def test_espeak_generator_checks(tmp_path):
    import shutil

    kind = registry.GENERATORS["espeak"]
    spec = registry.open_generator(ESPEAK_GEN)
    task = Task.audio(WORDS, 16000)
    kind.check(spec, task, speech_cfg())
    with pytest.raises(ConfigError, match="no classifier-free guidance"):
        kind.check(spec, task, speech_cfg(guidance=[1.0, 2.0]))
    with pytest.raises(ModelError, match="makes audio"):
        kind.check(spec, Task.image(WORDS, (8, 8, 1)), speech_cfg())
    other = tmp_path / "gen"
    shutil.copytree(ESPEAK_GEN, other)
    f = other / "espeak_generator.json"
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps({**cfg, "espeak_ng": "0.99"}))
    with pytest.raises(ModelError, match=r"made for eSpeak NG 0.99, this machine has 1\.") as e:
        kind.check(registry.open_generator(other), task, speech_cfg())
    assert "\n" not in str(e.value)
    f.write_text(json.dumps({**cfg, "voices": []}))
    with pytest.raises(ModelError, match="voices must be a non-empty list"):
        kind.check(registry.open_generator(other), task, speech_cfg())
    with pytest.raises(ConfigError, match=r"gen.speaker: invalid value 20.*valid: 0..12"):
        run_synth(ESPEAK_GEN, tmp_path / "x.h5", speech_cfg(prompt_mode="class_prompt",
                                                            speaker=20), WORDS, 16000, 4)
