"""The embedded text-to-speech generator: eSpeak NG with a table of voices, kind ``espeak``.

A generator "directory" of this kind holds one small JSON file, ``espeak_generator.json``
(gptfl_hpc/assets/espeak-generator/ is the one configs/speech.yaml uses)::

    {"format": "gptfl-hpc espeak-ng generator", "format_version": 1,
     "espeak_ng": "1.52",                         # the library version it was made for
     "voices": [{"language": "en-us", "variant": "m1"}, ...],   # the speaker table
     "rate": [140, 200], "pitch": [30, 70], "pitch_range": [40, 70],   # per-sample draws
     "place": "center"}                            # where the word sits in the clip

so ``gen.generator`` points at it like at any generator directory, and its fingerprint (the
content digest of the directory) identifies it. The speaker table is ``voices``: with
``gen.prompt_mode=multi_speaker`` every sample draws a row (gen/prompts.py), with
``class_prompt`` every sample uses ``gen.speaker``. Each sample's speaking rate, pitch and pitch
range are drawn uniformly in the ranges from the sample's seed; the prompt text is spoken
(``gen.templates: ["{label}"]``: the word), resampled to the task's rate, placed in the middle
of the clip (or at a random offset from the seed with ``"place": "random"``) and stored as
int16. No guidance, steps or scheduler: ``gen.guidance`` must be [1, 1]. The library is
gptfl_hpc/data/espeak.py (every utterance a function of text, voice and seed only), so the set
is byte-identical for any batch size and process count. It runs on the CPU (~5-10 ms per word).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from gptfl_hpc.errors import ConfigError, ModelError
from gptfl_hpc.gen.base import GeneratorKind, Task, batch_arrays, require_audio
from gptfl_hpc.gen.spec import GeneratorSpec

log = logging.getLogger(__name__)

FILE = "espeak_generator.json"
FORMAT = "gptfl-hpc espeak-ng generator"
CALL_ROWS = 64


def _config(spec: GeneratorSpec) -> dict:
    cfg = spec.component_config(".", FILE)
    if cfg is None:
        raise ModelError(f"generator directory {spec.path}: no {FILE}; an eSpeak NG generator "
                         "directory holds that file (see gptfl_hpc/assets/espeak-generator)")
    return cfg


def detect(spec: GeneratorSpec) -> bool:
    return (spec.path / FILE).is_file()


def _range(cfg: dict, key: str, lo: int, hi: int, where: Any) -> tuple[int, int]:
    v = cfg.get(key)
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)
            and lo <= v[0] <= v[1] <= hi):
        raise ModelError(f"{where}: {key} {v!r}; valid: [low, high] integers in {lo}..{hi}")
    return int(v[0]), int(v[1])


def voices(spec: GeneratorSpec) -> list[dict]:
    cfg = _config(spec)
    where = spec.path / FILE
    if cfg.get("format") != FORMAT or cfg.get("format_version") != 1:
        raise ModelError(f"{where}: format {cfg.get('format')!r} version "
                         f"{cfg.get('format_version')!r}; valid: {FORMAT!r} version 1")
    vs = cfg.get("voices")
    if not (isinstance(vs, list) and vs and all(
            isinstance(v, dict) and isinstance(v.get("language"), str) and v["language"]
            and isinstance(v.get("variant", ""), str) for v in vs)):
        raise ModelError(f"{where}: voices must be a non-empty list of {{\"language\": "
                         "\"en-us\", \"variant\": \"m3\"}} entries")
    for key, lo, hi in (("rate", 80, 450), ("pitch", 0, 99), ("pitch_range", 0, 99)):
        _range(cfg, key, lo, hi, where)
    if cfg.get("place", "center") not in ("center", "random"):
        raise ModelError(f"{where}: place {cfg.get('place')!r}; valid: center, random")
    return vs


def check(spec: GeneratorSpec, task: Task, gen_cfg: Any) -> None:
    """The JSON, the task, the config, and the installed eSpeak NG version (no synthesis)."""
    require_audio(task, KIND.name)
    voices(spec)
    check_tts_config(gen_cfg, KIND.name)
    from gptfl_hpc.data import espeak

    espeak.library()
    want = str(_config(spec).get("espeak_ng", ""))
    have = espeak.version()
    if want and not (have == want or have.startswith(want + ".")):
        raise ModelError(f"{spec.path / FILE}: made for eSpeak NG {want}, this machine has "
                         f"{have} (its voices sound different, so the synthetic set would not "
                         f"be the one this generator describes); valid: {espeak.INSTALL_HINT} "
                         f"at version {want}, or set espeak_ng in the file")


def check_tts_config(gen_cfg: Any, kind: str) -> None:
    """What text-to-speech kinds cannot do: guidance and recording-place domains."""
    lo, hi = (float(g) for g in gen_cfg.guidance)
    if hi > 1.0:
        raise ConfigError(f"config key gen.guidance: {list(gen_cfg.guidance)}; the {kind} "
                          "text-to-speech generator has no classifier-free guidance; valid: "
                          "[1.0, 1.0]")
    if gen_cfg.prompt_mode == "multi_domain":
        raise ConfigError(f"config key gen.prompt_mode: multi_domain is for text-to-image/audio "
                          f"prompts; the {kind} generator speaks the text; valid: class_prompt, "
                          "multi_speaker")


class EspeakSampler:
    """``(labels, prompts, guidance, seeds, speakers) -> int16 (B, L)``: eSpeak NG says each
    prompt with row ``speakers[i]`` of the voice table (module docstring)."""

    kind = "espeak"

    def __init__(self, spec: GeneratorSpec, task: Task) -> None:
        from gptfl_hpc.data.espeak import Voice

        cfg = _config(spec)
        self.length, self.rate = require_audio(task, KIND.name)
        self.voices = [Voice(v["language"], v.get("variant", "")) for v in voices(spec)]
        self.ranges = {k: _range(cfg, k, 0, 450, spec.path)
                       for k in ("rate", "pitch", "pitch_range")}
        self.place = cfg.get("place", "center")

    def voice(self, speaker: int, seed: int) -> Any:
        """The table's voice `speaker` with this sample's prosody (drawn from its seed)."""
        import dataclasses

        r = np.random.default_rng([int(seed), 0x65737064])  # 'espd'
        draw = {k: int(r.integers(lo, hi + 1)) for k, (lo, hi) in self.ranges.items()}
        return dataclasses.replace(self.voices[int(speaker)], **draw)

    def __call__(self, labels: np.ndarray, prompts: list[str], guidance: np.ndarray,
                 seeds: np.ndarray, speakers: np.ndarray | None = None) -> np.ndarray:
        from gptfl_hpc.data.audio import render_utterance, to_pcm16

        prompts = list(prompts)
        labels, guidance, seeds = batch_arrays("espeak", labels, guidance, seeds,
                                               rows=len(prompts))
        spk = np.zeros(len(prompts), np.int64) if speakers is None else \
            np.asarray(speakers, np.int64).reshape(-1)
        if len(spk) != len(prompts) or spk.min(initial=0) < 0 or \
                spk.max(initial=0) >= len(self.voices):
            raise ModelError(f"espeak batch: speakers {spk.tolist()[:8]}; valid: {len(prompts)} "
                             f"rows of 0..{len(self.voices) - 1}")
        out = np.empty((len(prompts), self.length), np.int16)
        for i, (text, seed, s) in enumerate(zip(prompts, seeds, spk)):
            x = render_utterance(text, self.voice(int(s), int(seed)), int(seed), self.length,
                                 self.rate, place=self.place)
            out[i] = to_pcm16(x)
        return out


def load(spec: GeneratorSpec, gen_cfg: Any, task: Task, device: Any, dtype: str
         ) -> EspeakSampler:
    """The sampler (the voices run on the CPU whatever `device` and `dtype` say)."""
    check(spec, task, gen_cfg)
    sampler = EspeakSampler(spec, task)
    log.info("espeak: %d voices from %s, %d-sample clips at %d Hz", len(sampler.voices),
             spec.path, sampler.length, sampler.rate)
    return sampler


def speaker_rows(spec: GeneratorSpec, gen_cfg: Any) -> int:
    return len(voices(spec))


KIND = GeneratorKind(
    name="espeak", family="text2speech",
    describe=f"an eSpeak NG voice table ({FILE})",
    detect=detect, check=check, load=load, call_rows=lambda spec: CALL_ROWS, priority=7,
    speakers=speaker_rows)

__all__ = ["KIND", "EspeakSampler", "check_tts_config"]
