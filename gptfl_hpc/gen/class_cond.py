"""Class-conditional diffusion sampling with a diffusers ``UNet2DModel`` (e.g. the embedded one).

diffusers has no pipeline that passes ``class_labels`` to a ``UNet2DModel`` (DDPMPipeline and
DDIMPipeline take none), so this module holds the short sampling loop:

* the model comes from ``generator_dir/unet`` and the noise schedule from
  ``generator_dir/scheduler`` (both ``save_pretrained`` output), loaded offline with the dtype set
  at load time;
* ``gen.scheduler``: ``ddim`` (eta 0) or ``dpm`` (DPM-Solver++ multistep) built from the saved
  training schedule, or ``default`` (the saved class itself, e.g. DDPM);
* one CPU ``torch.Generator`` per sample, seeded from its plan seed, draws its initial noise (and
  any per-step noise), so a sample's noise never depends on its neighbours or the device;
* classifier-free guidance per sample: rows with guidance > 1 get
  ``e_u + g (e_c - e_u)`` where ``e_u`` uses the null class (index ``num_classes``, dropped in
  during training); the conditional and unconditional passes are separate calls of the same
  shape, so a row's conditional prediction does not depend on whether its neighbours use CFG;
* the latent trajectory is kept in float32 (the model may run in fp16/bf16 on GPU), clamped to
  [-1, 1], resized to the task's (H, W) with antialiasing, adapted to its channel count and
  quantised to uint8 (``round((x + 1) * 127.5)``).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc.errors import ModelError
from gptfl_hpc.gen.base import batch_arrays

log = logging.getLogger(__name__)

SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}


def read_unet_config(generator_dir: str | Path) -> dict:
    """The generator's unet/config.json (no model load). One-line ModelError if unusable."""
    path = Path(generator_dir) / "unet" / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"generator directory {generator_dir}: no unet/config.json; a "
                         "class-conditional generator needs unet/ and scheduler/ subfolders "
                         "written by save_pretrained (gptfl-hpc train-generator writes them)"
                         ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    if not (Path(generator_dir) / "scheduler" / "scheduler_config.json").is_file():
        raise ModelError(f"generator directory {generator_dir}: no scheduler/scheduler_config.json"
                         "; save the training noise scheduler there with save_pretrained")
    return cfg


def check_classes(unet_cfg: dict, num_classes: int, generator_dir: str | Path,
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


def make_scheduler(generator_dir: str | Path, name: str) -> Any:
    import diffusers

    path = Path(generator_dir) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    if name == "default":
        cls_name = config.get("_class_name", "DDPMScheduler")
    elif name in SCHEDULERS:
        cls_name = SCHEDULERS[name]
    else:
        raise ModelError(f"config key gen.scheduler: invalid value {name!r}; valid: default, "
                         + ", ".join(SCHEDULERS))
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ModelError(f"{generator_dir}/scheduler: unknown scheduler class {cls_name!r} in "
                         "this diffusers version")
    return cls.from_config(config)


class ClassConditionalSampler:
    """``sampler(labels, prompts, guidance, seeds) -> uint8 (B, H, W, C)``; prompts are ignored."""

    kind = "class_conditional"

    def __init__(self, unet: Any, scheduler: Any, *, out_shape: tuple[int, int, int], steps: int,
                 null_class: int | None, device: Any, dtype: Any) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.out_shape = tuple(int(v) for v in out_shape)
        self.steps = int(steps)
        self.null_class = null_class
        self.device = device
        self.dtype = dtype
        cfg = getattr(unet, "_orig_mod", unet).config  # torch.compile wraps the module
        size = cfg.sample_size
        self.model_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.model_c = int(cfg.in_channels)
        c = self.out_shape[2]
        if not (self.model_c == c or self.model_c == 1 or c == 1):
            raise ModelError(f"generator makes {self.model_c}-channel images, the task needs {c} "
                             "channels; valid: equal counts, or 1 on either side")
        self._step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters

    def __repr__(self) -> str:
        return (f"ClassConditionalSampler({self.model_hw[0]}x{self.model_hw[1]}x{self.model_c} -> "
                f"{'x'.join(map(str, self.out_shape))}, {type(self.scheduler).__name__} "
                f"{self.steps} steps, null class {self.null_class})")

    def _eps(self, x: Any, t: Any, labels: Any) -> Any:
        return self.unet(x.to(self.dtype), t, class_labels=labels).sample.float()

    def __call__(self, labels: np.ndarray, prompts: list[str] | None, guidance: np.ndarray,
                 seeds: np.ndarray) -> np.ndarray:
        import torch

        labels, guidance, seeds = batch_arrays("class-conditional", labels, guidance, seeds)
        b = len(labels)
        if b == 0:
            return np.zeros((0, *self.out_shape), dtype=np.uint8)
        cfg_rows = guidance > 1.0
        if cfg_rows.any() and self.null_class is None:
            raise ModelError("guidance > 1 requested but the generator has no null class")
        dev = self.device
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (self.model_c, *self.model_hw)
        x = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        sched = self.scheduler
        sched.set_timesteps(self.steps, device=dev)
        x = x.to(dev) * sched.init_noise_sigma
        y = torch.as_tensor(labels, device=dev)
        y_null = torch.full_like(y, self.null_class if self.null_class is not None else 0)
        g = torch.as_tensor(guidance, device=dev).view(-1, 1, 1, 1)
        mask = torch.as_tensor(cfg_rows, device=dev).view(-1, 1, 1, 1)
        step_kw = {"generator": gens} if self._step_takes_generator else {}
        with torch.inference_mode():
            for t in sched.timesteps:
                xin = sched.scale_model_input(x, t)
                eps = self._eps(xin, t, y)
                if cfg_rows.any():
                    eps_u = self._eps(xin, t, y_null)
                    eps = torch.where(mask, eps_u + g * (eps - eps_u), eps)
                x = sched.step(eps, t, x, **step_kw).prev_sample
            return self._to_uint8(x)

    def _to_uint8(self, x: Any) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        h, w, c = self.out_shape
        x = x.float().clamp(-1.0, 1.0)
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=True).clamp(-1.0, 1.0)
        if x.shape[1] != c:
            if c == 1:  # ITU-R 601 luma, as PIL's "L"
                wts = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * wts).sum(1, keepdim=True) if x.shape[1] == 3 else x.mean(1, keepdim=True)
            else:
                x = x.expand(-1, c, -1, -1)
        q = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return q.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def load_class_conditional(generator_dir: str | Path, *, gen_cfg: Any,
                           out_shape: tuple[int, int, int], num_classes: int, device: Any,
                           dtype: Any) -> ClassConditionalSampler:
    """Load unet/ + scheduler/ from `generator_dir` (offline) and return the sampler."""
    import torch
    from diffusers import UNet2DModel

    unet_cfg = read_unet_config(generator_dir)
    null = check_classes(unet_cfg, num_classes, generator_dir, float(max(gen_cfg.guidance)))
    try:
        unet = UNet2DModel.from_pretrained(str(generator_dir), subfolder="unet", dtype=dtype,
                                           local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelError(f"generator {generator_dir}/unet: cannot load "
                         f"({' '.join(str(e).split())[:300]})") from None
    unet = unet.to(device).eval().requires_grad_(False)
    if gen_cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if gen_cfg.compile:
        unet = torch.compile(unet)
    sched = make_scheduler(generator_dir, gen_cfg.scheduler)
    sampler = ClassConditionalSampler(unet, sched, out_shape=out_shape, steps=gen_cfg.steps,
                                      null_class=null, device=device, dtype=dtype)
    log.info("class-conditional generator %s: %s on %s (%s)", generator_dir, sampler, device,
             str(dtype).replace("torch.", ""))
    return sampler
