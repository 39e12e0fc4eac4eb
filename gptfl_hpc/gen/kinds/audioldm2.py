"""AudioLDM 2 text-to-audio (``cvssp/audioldm2``, ``cvssp/audioldm2-large``): kind ``audioldm2``.

diffusers' maintained ``AudioLDM2Pipeline``: CLAP and T5 (or VITS) text encoders, a projection
and a GPT-2 language model that generates ``max_new_tokens`` (the model's own setting) of
conditioning, a UNet with two cross-attention streams, VAE and HiFi-GAN. Everything else is the
AudioLDM kind's (gen/kinds/audioldm.py): local safetensors loading, batched prompts with one
``torch.Generator`` per sample, per-row guidance, int16 clips of the task length.

**CLAP re-ranking is never used.** With ``num_waveforms_per_prompt > 1`` the pipeline generates
several waveforms per prompt and keeps the best by CLAP text-audio similarity (and only when
librosa is installed, otherwise silently in generation order): a sample would then depend on
which other candidates were drawn, and its ``seed`` column would not reproduce it. The sampler
always passes ``num_waveforms_per_prompt=1``; more candidates per class are simply more samples
(gen.volume / gen.count), each with its own seed.
"""

from __future__ import annotations

from typing import Any

from gptfl_hpc.gen.base import GeneratorKind, Task
from gptfl_hpc.gen.kinds.audioldm import (
    GPU_CALL_ROWS,
    AudioLDMSampler,
    check_pipeline,
    detect_pipeline,
    load_pipeline,
)
from gptfl_hpc.gen.spec import GeneratorSpec

PIPELINE = "AudioLDM2Pipeline"


def check(spec: GeneratorSpec, task: Task, gen_cfg: Any) -> None:
    check_pipeline(spec, task, KIND.name, PIPELINE)


def load(spec: GeneratorSpec, gen_cfg: Any, task: Task, device: Any, dtype: str, *,
         max_batch: int | None = None) -> AudioLDMSampler:
    check(spec, task, gen_cfg)
    return load_pipeline(spec, gen_cfg, task, device, dtype, PIPELINE, KIND.name, max_batch)


KIND = GeneratorKind(
    name="audioldm2", family="text2audio",
    describe="a diffusers AudioLDM2Pipeline (model_index.json _class_name AudioLDM2Pipeline)",
    detect=lambda spec: detect_pipeline(spec, PIPELINE), check=check, load=load,
    call_rows=lambda spec: GPU_CALL_ROWS, priority=4)
