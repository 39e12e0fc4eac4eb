"""Diffusion building blocks shared by the generator kinds (diffusers and torch imported lazily).

* :func:`make_scheduler` -- the one gen.scheduler factory (default / ddim / dpm) from a saved
  scheduler or its config;
* :func:`prepare_module` / :func:`prepare_pipeline` -- device, channels_last (GPU only) and
  torch.compile (static shapes), the same for every kind;
* :func:`denoise` and :func:`guided` -- the class-conditional sampling loop with per-row
  classifier-free guidance, shared by the UNet (``kinds/class_cond.py``) and DiT
  (``kinds/dit.py``) samplers;
* :func:`quiet_loading` -- no loading progress bars in batch logs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from gptfl_hpc.errors import ModelError

log = logging.getLogger(__name__)

SCHEDULERS = ("default", "ddim", "dpm")


def make_scheduler(name: str, saved: Any, where: str) -> Any:
    """gen.scheduler -> a diffusers scheduler built from the generator's own.

    `saved` is a scheduler instance (a loaded pipeline's) or its config dict
    (``scheduler/scheduler_config.json``). 'default' keeps the saved class, 'ddim' is DDIM
    (eta 0), 'dpm' DPM-Solver++ multistep; both keep the saved noise schedule.
    """
    import diffusers

    if name not in SCHEDULERS:
        raise ModelError(f"config key gen.scheduler: invalid value {name!r}; valid: "
                         + ", ".join(SCHEDULERS))
    config = saved if isinstance(saved, dict) else saved.config
    if name == "default":
        if not isinstance(saved, dict):
            return saved
        cls_name = config.get("_class_name", "DDPMScheduler")
        cls = getattr(diffusers, str(cls_name), None)
        if cls is None:
            raise ModelError(f"{where}: unknown scheduler class {cls_name!r} in this diffusers "
                             "version; valid: gen.scheduler=ddim or dpm")
        return cls.from_config(config)
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def step_takes_generator(scheduler: Any) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Disable diffusers' and transformers' loading progress bars (they flood batch logs)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def prepare_module(module: Any, *, device: Any, channels_last: bool = True,
                   compile: bool = False, compile_mode: str | None = None) -> Any:
    """Move `module` to `device`; channels_last on GPU; torch.compile in place (static shapes).

    A compiled module compiles once per input shape (tens of seconds on a GPU with
    max-autotune); the engine keeps the call shape fixed (``base.CallShape``). Default mode:
    'max-autotune-no-cudagraphs' on CUDA, 'default' elsewhere.
    """
    import torch

    on_gpu = str(device).startswith("cuda")
    module = module.to(device)
    if channels_last and on_gpu:
        module = module.to(memory_format=torch.channels_last)
    if compile:
        mode = compile_mode or ("max-autotune-no-cudagraphs" if on_gpu else "default")
        t0 = time.perf_counter()
        module.compile(mode=mode, dynamic=False)
        log.info("torch.compile(%s, mode=%s, dynamic=False) set up in %.1f s; each new call "
                 "shape compiles on its first call", type(module).__name__, mode,
                 time.perf_counter() - t0)
    return module


def prepare_pipeline(pipe: Any, *, device: str, scheduler: str = "default",
                     channels_last: bool = True, compile: bool = False,
                     compile_mode: str | None = None) -> Any:
    """A loaded diffusers pipeline: progress bars off, gen.scheduler, then prepare_module on
    its denoiser (unet or transformer) and `.to(device)` for the rest."""
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, f"{type(pipe).__name__}.scheduler")
    pipe.to(device)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is not None:
        prepare_module(denoiser, device=device, channels_last=channels_last, compile=compile,
                       compile_mode=compile_mode)
    return pipe


Predict = Callable[[Any, Any, Any], Any]
"""predict(x, t, class_labels) -> float32 model output (B, C_out, h, w)."""


def guided(predict: Predict, x: Any, t: Any, labels: Any, null_labels: Any, scale: Any,
           mask: Any, *, use_cfg: bool, channels: int | None = None) -> Any:
    """One model evaluation with classifier-free guidance on the rows in `mask`.

    Rows in `mask` get ``e_u + g (e_c - e_u)`` on the first `channels` output channels (all
    when None; the rest, e.g. a DiT's learned variance, stays conditional). The conditional and
    the unconditional pass are separate calls of the same shape, so a row's prediction does not
    depend on whether its neighbours use guidance.
    """
    import torch

    out = predict(x, t, labels)
    if not use_cfg:
        return out
    c = out.shape[1] if channels is None else channels
    eps_c = out[:, :c]
    eps_u = predict(x, t, null_labels)[:, :c]
    eps = torch.where(mask, eps_u + scale * (eps_c - eps_u), eps_c)
    return eps if c == out.shape[1] else torch.cat([eps, out[:, c:]], dim=1)


def denoise(predict: Predict, scheduler: Any, *, steps: int, latent_shape: tuple[int, ...],
            labels: np.ndarray, guidance: np.ndarray, seeds: np.ndarray, null_label: int | None,
            device: Any, channels: int | None = None, learned_sigma: bool = False) -> Any:
    """The class-conditional sampling loop; returns the final latents (float32, on `device`).

    One CPU ``torch.Generator`` per row, seeded from ``seeds[i]``, draws the row's initial noise
    (and the scheduler's per-step noise), so a row depends on its own seed only, whatever the
    device. The trajectory stays in float32 while the model may run in fp16/bf16. Rows with
    guidance > 1 use classifier-free guidance against `null_label` (see :func:`guided`).
    `learned_sigma`: the model also predicts a variance in the channels after `channels`; the
    scheduler gets the first `channels` only (DiTPipeline's convention).
    """
    import torch

    cfg_rows = guidance > 1.0
    if cfg_rows.any() and null_label is None:
        raise ModelError("guidance > 1 requested but the generator has no null class")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(latent_shape, generator=g, dtype=torch.float32) for g in gens])
    scheduler.set_timesteps(steps, device=device)
    x = x.to(device) * scheduler.init_noise_sigma
    y = torch.as_tensor(labels, device=device)
    y_null = torch.full_like(y, null_label if null_label is not None else 0)
    g = torch.as_tensor(guidance, device=device).view(-1, 1, 1, 1)
    mask = torch.as_tensor(cfg_rows, device=device).view(-1, 1, 1, 1)
    step_kw = {"generator": gens} if step_takes_generator(scheduler) else {}
    with torch.inference_mode():
        for t in scheduler.timesteps:
            xin = scheduler.scale_model_input(x, t)
            out = guided(predict, xin, t, y, y_null, g, mask, use_cfg=bool(cfg_rows.any()),
                         channels=channels)
            model_output = out[:, :channels] if learned_sigma else out
            x = scheduler.step(model_output, t, x, **step_kw).prev_sample
    return x
