"""AudioLDM text-to-audio (the paper's ESC-50 generator, ``cvssp/audioldm``): kind ``audioldm``.

diffusers' ``AudioLDMPipeline`` (deprecated in diffusers, still exported; ``AudioLDM2Pipeline``
is the maintained one, gen/kinds/audioldm2.py), loaded from a local directory with
``local_files_only`` and safetensors only, the dtype set at load time. Detected from
``model_index.json`` (``_class_name`` AudioLDMPipeline), before the text-to-image kind (whose
"has a text encoder" test it would also pass).

* **Prompts**: ``gen.prompt_mode`` class_prompt (``gen.templates``, the paper's
  ``"a sound of {label}"``) or multi_domain (``"a sound of {label} {domain}"`` with the recording
  places of gen/prompts.py ``AUDIO_DOMAINS``), random guidance per sample in ``gen.guidance``.
* **Batched**, at most ``gen.micro_batch`` prompts per pipeline call (default on GPU:
  ``GPU_CALL_ROWS``), ``num_waveforms_per_prompt=1``, one ``torch.Generator`` per sample (a
  list), so a sample's initial latents depend on its seed only and the set is byte-identical for
  any batch size and process count (CPU; the engine's fixed call shape).
* **Per-sample guidance in one call**: AudioLDM's guidance step is
  ``uncond + guidance_scale * (text - uncond)``, so the per-row scale object of the text-to-image
  kind (``RowGuidance``) applies (rows with scale <= 1 run without CFG, as one group); if the
  pipeline does not apply it, samples are grouped by guidance value.
* **Length**: ``audio_length_in_s`` = the task's clip length at the vocoder's rate (16 kHz for
  the released models; the pipeline rounds the spectrogram up to the VAE's multiple and cuts
  back); a vocoder rate other than the task's is resampled. The paper: 5.0 s, 100 steps.
  Waveforms -> int16 with ``base.to_int16`` (NaN/Inf -> regenerated in fp32 by the engine).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from gptfl_hpc.errors import ModelError
from gptfl_hpc.gen.base import (
    CallShape,
    GeneratorKind,
    Task,
    check_steps,
    require_audio,
    to_int16,
    torch_dtype,
)
from gptfl_hpc.gen.diffusion import prepare_pipeline, quiet_loading
from gptfl_hpc.gen.kinds.text2image import PromptSampler
from gptfl_hpc.gen.spec import GeneratorSpec

log = logging.getLogger(__name__)

PIPELINE = "AudioLDMPipeline"
GPU_CALL_ROWS = 16
HINT = ("download it on a machine with network (`hf download cvssp/audioldm --local-dir DIR`, "
        "or cvssp/audioldm2 for AudioLDM 2) and set gen.generator to DIR")


def detect_pipeline(spec: GeneratorSpec, name: str) -> bool:
    return (spec.index or {}).get("_class_name") == name


def check_pipeline(spec: GeneratorSpec, task: Task, kind: str, name: str) -> None:
    """A local diffusers pipeline of class `name` for an audio task (descriptor files only)."""
    require_audio(task, kind)
    d, index = spec.path, spec.index
    if index is None or index.get("_class_name") != name:
        got = None if index is None else index.get("_class_name")
        raise ModelError(f"generator directory {d}: model_index.json names {got!r}, not a "
                         f"{name}; {HINT}")
    missing = [c for c, entry in index.items()
               if not c.startswith("_") and isinstance(entry, list) and len(entry) == 2
               and entry[0] is not None and entry[1] is not None and not (d / c).is_dir()]
    if missing:
        raise ModelError(f"generator directory {d}: component folder(s) {', '.join(missing)} "
                         f"missing (incomplete download?); {HINT}")


def check(spec: GeneratorSpec, task: Task, gen_cfg: Any) -> None:
    check_pipeline(spec, task, KIND.name, PIPELINE)


class AudioLDMSampler(PromptSampler):
    """``(labels, prompts, guidance, seeds) -> int16 (B, L)`` around an AudioLDM(2) pipeline."""

    def __init__(self, pipe: Any, *, task: Task, steps: int, max_batch: int, device: str,
                 kind: str, compiled: bool = False) -> None:
        self.pipe, self.kind = pipe, kind
        self.length, self.rate = require_audio(task, kind)
        self.steps = check_steps(steps)
        self.device = device
        self.vocoder_rate = int(pipe.vocoder.config.sampling_rate)
        self.seconds = self.length / self.rate
        self.shape = CallShape(int(max_batch), what=kind, pad=compiled, compiled=compiled)
        self.row_guidance = True
        self.calls = 0
        self._warned_groups = False

    def _out(self, rows: int) -> np.ndarray:
        return np.empty((rows, self.length), np.int16)

    def _call(self, prompts: list[str], guidance: Any, seeds: np.ndarray) -> np.ndarray:
        import torch

        from gptfl_hpc.data.audio import resample

        gen_device = "cpu" if self.device.startswith("mps") else self.device
        generators = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            audio = self.pipe(prompt=prompts, audio_length_in_s=self.seconds,
                              num_inference_steps=self.steps,
                              guidance_scale=guidance, num_waveforms_per_prompt=1,
                              generator=generators, output_type="pt").audios
        self.calls += 1
        waves = audio.float().cpu().numpy()
        if self.vocoder_rate != self.rate:
            waves = resample(waves, self.vocoder_rate, self.rate)
        return to_int16(waves, self.length)


def load_pipeline(spec: GeneratorSpec, gen_cfg: Any, task: Task, device: Any, dtype: str,
                  cls_name: str, kind: str, max_batch: int | None = None) -> AudioLDMSampler:
    import diffusers

    d = str(spec.path)
    try:
        with quiet_loading():
            pipe = getattr(diffusers, cls_name).from_pretrained(
                d, dtype=torch_dtype(dtype), local_files_only=True, use_safetensors=True)
    except Exception as e:  # noqa: BLE001  (diffusers/transformers raise many types)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"generator directory {d}: cannot be loaded as a diffusers {cls_name} "
                         f"({type(e).__name__}: {first[:200]}); {HINT}") from e
    prepare_pipeline(pipe, device=str(device), scheduler=gen_cfg.scheduler,
                     channels_last=gen_cfg.channels_last, compile=gen_cfg.compile)
    sampler = AudioLDMSampler(pipe, task=task, steps=gen_cfg.steps,
                              max_batch=max_batch or gen_cfg.micro_batch or GPU_CALL_ROWS,
                              device=str(device), kind=kind, compiled=gen_cfg.compile)
    log.info("%s: %s from %s, %.2f s clips at %d Hz (vocoder %d Hz), %d steps, %s", kind,
             cls_name, d, sampler.seconds, sampler.rate, sampler.vocoder_rate, sampler.steps,
             dtype)
    return sampler


def load(spec: GeneratorSpec, gen_cfg: Any, task: Task, device: Any, dtype: str, *,
         max_batch: int | None = None) -> AudioLDMSampler:
    check(spec, task, gen_cfg)
    return load_pipeline(spec, gen_cfg, task, device, dtype, PIPELINE, KIND.name, max_batch)


KIND = GeneratorKind(
    name="audioldm", family="text2audio",
    describe="a diffusers AudioLDMPipeline (model_index.json _class_name AudioLDMPipeline)",
    detect=lambda spec: detect_pipeline(spec, PIPELINE), check=check, load=load,
    call_rows=lambda spec: GPU_CALL_ROWS, priority=5)
