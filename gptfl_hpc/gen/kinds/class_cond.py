"""Class-conditional ``UNet2DModel`` generators (e.g. the embedded one): kind ``class_conditional``.

diffusers has no pipeline that passes ``class_labels`` to a ``UNet2DModel`` (DDPMPipeline and
DDIMPipeline take none), so the sampling loop is ``diffusion.denoise``, shared with the DiT kind:

* the model comes from ``<dir>/unet`` and the noise schedule from ``<dir>/scheduler`` (both
  ``save_pretrained`` output), loaded offline with the dtype set at load time;
* ``gen.scheduler``: ``ddim`` (eta 0) or ``dpm`` (DPM-Solver++ multistep) built from the saved
  training schedule, or ``default`` (the saved class itself, e.g. DDPM);
* classifier-free guidance per sample against the null class (index ``num_classes``, dropped in
  during training), see ``diffusion.guided``;
* the result, in [-1, 1], is mapped to [0, 1] and converted by ``base.to_uint8`` (antialiased
  resize to the task's (H, W), channel adaptation, NaN/Inf detection).

Detected by ``unet/config.json`` (after text-to-image and DiT, which are more specific).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from gptfl_hpc.errors import ModelError
from gptfl_hpc.gen.base import (
    GeneratorKind,
    Task,
    batch_arrays,
    check_steps,
    require_images,
    to_uint8,
    torch_dtype,
)
from gptfl_hpc.gen.diffusion import denoise, make_scheduler, prepare_module
from gptfl_hpc.gen.spec import GeneratorSpec

log = logging.getLogger(__name__)


def _unet_config(spec: GeneratorSpec) -> dict:
    if spec.unet_config is None:
        raise ModelError(f"generator directory {spec.path}: no unet/config.json; a "
                         "class-conditional generator needs unet/ and scheduler/ subfolders "
                         "written by save_pretrained (gptfl-hpc train-generator writes them)")
    return spec.unet_config


def _scheduler_config(spec: GeneratorSpec) -> dict:
    cfg = spec.component_config("scheduler", "scheduler_config.json")
    if cfg is None:
        raise ModelError(f"generator directory {spec.path}: no scheduler/scheduler_config.json"
                         "; save the training noise scheduler there with save_pretrained")
    return cfg


def check_classes(unet_cfg: dict, num_classes: int, generator_dir: Any,
                  guidance_hi: float) -> int | None:
    """Check the class embeddings against the task; return the null class (or None)."""
    n_emb = unet_cfg.get("num_class_embeds")
    if not n_emb:
        raise ModelError(f"generator {generator_dir}: unet has no class embeddings "
                         "(num_class_embeds is null); it is not class-conditional (use a "
                         "text-to-image pipeline with gen.kind=text2image)")
    if n_emb not in (num_classes, num_classes + 1):
        raise ModelError(f"generator {generator_dir}: unet has {n_emb} class embeddings but the "
                         f"task has {num_classes} classes; valid: {num_classes} or "
                         f"{num_classes + 1} (with the null class); retrain it for this dataset")
    null = num_classes if n_emb == num_classes + 1 else None
    if guidance_hi > 1 and null is None:
        raise ModelError(f"generator {generator_dir}: gen.guidance > 1 needs a null class "
                         f"(num_class_embeds = {num_classes + 1}), the unet has {n_emb}; "
                         "set gen.guidance=[1.0, 1.0]")
    return null


def detect(spec: GeneratorSpec) -> bool:
    return spec.unet_config is not None


def check(spec: GeneratorSpec, task: Task, gen_cfg: Any) -> None:
    """Task fits the UNet: image task, class embeddings (+ null class for guidance), and the
    classes the embedded generator was trained on (gptfl_generator.json)."""
    _, _, c = require_images(task, KIND.name)
    cfg = _unet_config(spec)
    _scheduler_config(spec)
    check_classes(cfg, task.num_classes, spec.path, float(max(gen_cfg.guidance)))
    model_c = int(cfg.get("in_channels", 3))
    if not (model_c == c or model_c == 1 or c == 1):
        raise ModelError(f"generator {spec.path} makes {model_c}-channel images, the task needs "
                         f"{c} channels; valid: equal counts, or 1 on either side")
    names = (spec.provenance or {}).get("label_names")
    if names is not None and list(names) != list(task.label_names):
        raise ModelError(f"generator {spec.path} was trained on classes {names}, the task has "
                         f"{list(task.label_names)}; train a generator for this dataset")


def call_rows(spec: GeneratorSpec) -> int:
    """Rows per call on GPU: 256 up to 64x64 samples, fewer for bigger ones (activation
    memory grows with rows x pixels): a power of two in [16, 256], about 2^20 / (H x W)."""
    size = (spec.unet_config or {}).get("sample_size") or 32
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return int(min(256, max(16, 2 ** int(math.log2(max(1, (1 << 20) // (h * w)))))))


class ClassConditionalSampler:
    """``sampler(labels, prompts, guidance, seeds) -> uint8 (B, H, W, C)``; prompts are ignored."""

    kind = "class_conditional"

    def __init__(self, unet: Any, scheduler: Any, *, out_shape: tuple[int, int, int], steps: int,
                 null_class: int | None, device: Any, dtype: Any) -> None:
        self.unet = unet
        self.scheduler = scheduler
        h, w, c = (int(v) for v in out_shape)
        self.out_shape = (h, w, c)
        self.steps = check_steps(steps)
        self.null_class = null_class
        self.device = device
        self.dtype = dtype
        size = unet.config.sample_size
        self.model_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.model_c = int(unet.config.in_channels)

    def __repr__(self) -> str:
        return (f"ClassConditionalSampler({self.model_hw[0]}x{self.model_hw[1]}x{self.model_c} -> "
                f"{'x'.join(map(str, self.out_shape))}, {type(self.scheduler).__name__} "
                f"{self.steps} steps, null class {self.null_class})")

    def _predict(self, x: Any, t: Any, labels: Any) -> Any:
        return self.unet(x.to(self.dtype), t, class_labels=labels).sample.float()

    def __call__(self, labels: np.ndarray, prompts: list[str] | None, guidance: np.ndarray,
                 seeds: np.ndarray) -> np.ndarray:
        labels, guidance, seeds = batch_arrays("class-conditional", labels, guidance, seeds)
        if len(labels) == 0:
            return np.zeros((0, *self.out_shape), dtype=np.uint8)
        x = denoise(self._predict, self.scheduler, steps=self.steps,
                    latent_shape=(self.model_c, *self.model_hw), labels=labels,
                    guidance=guidance, seeds=seeds, null_label=self.null_class,
                    device=self.device)
        return to_uint8((x.float().clamp(-1.0, 1.0) + 1.0) * 0.5, self.out_shape)


def load(spec: GeneratorSpec, gen_cfg: Any, task: Task, device: Any,
         dtype: str) -> ClassConditionalSampler:
    """Load unet/ + scheduler/ (offline) and return the sampler."""
    from diffusers import UNet2DModel

    out_shape = require_images(task, KIND.name)
    null = check_classes(_unet_config(spec), task.num_classes, spec.path,
                         float(max(gen_cfg.guidance)))
    try:
        unet = UNet2DModel.from_pretrained(str(spec.path), subfolder="unet",
                                           dtype=torch_dtype(dtype), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"generator {spec.path}/unet: cannot load "
                         f"({' '.join(str(e).split())[:300]})") from None
    unet = prepare_module(unet.eval().requires_grad_(False), device=device,
                          channels_last=gen_cfg.channels_last, compile=gen_cfg.compile)
    sched = make_scheduler(gen_cfg.scheduler, _scheduler_config(spec), f"{spec.path}/scheduler")
    sampler = ClassConditionalSampler(unet, sched, out_shape=out_shape, steps=gen_cfg.steps,
                                      null_class=null, device=device, dtype=torch_dtype(dtype))
    log.info("class-conditional generator %s: %s on %s (%s)", spec.path, sampler, device, dtype)
    return sampler


KIND = GeneratorKind(
    name="class_conditional", family="class_conditional",
    describe="unet/config.json of a UNet2DModel with class embeddings, and scheduler/",
    detect=detect, check=check, load=load, call_rows=call_rows, priority=30)
