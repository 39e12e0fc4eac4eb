"""Pre-trained text-to-image generators (Stable Diffusion and friends) from a local directory.

The synthesis engine calls ``load_text2image`` lazily and then the returned sampler per batch::

    sampler = load_text2image(generator_dir, gen_cfg=gen_cfg, out_shape=(H, W, C), device=device,
                              dtype=dtype)
    images = sampler(labels, prompts, guidance, seeds)   # -> uint8 (B, H, W, C)

Design:

* **Local only.** The directory must exist and hold a diffusers ``model_index.json``; it is loaded
  with ``local_files_only=True`` whatever ``HF_HUB_OFFLINE`` says, so compute nodes never touch
  the network. Anything else is one line of :class:`ModelError` saying what to download and where.
* **dtype at load time** (``dtype=`` in ``from_pretrained``; diffusers 0.42 deprecates
  ``torch_dtype``). Default: fp16 on GPU, fp32 on CPU (``gen.dtype`` overrides).
* **One torch.Generator per sample**, seeded from ``seeds[i]``, passed as a list (style item 11):
  a sample's initial latents depend on its seed only, so its image does not depend on which other
  samples share its batch (up to the last float bits of batched kernels, see the tests).
* **Generation at the model's native size** (``unet.sample_size * vae_scale_factor``; a
  ``height``/``width`` override exists for benchmarks), then antialiased bilinear resize to the
  task's ``out_shape`` on the device (``output_type="pt"``, so only small images are copied back),
  luma (ITU-R 601, as PIL's ``"L"``) when ``C == 1``.
* **Per-sample guidance** (GPT-FL's ``ucg`` mode draws a scale per image). A diffusers pipeline
  takes one ``guidance_scale`` per call. Every scale <= 1 means "no CFG" (the UNet then runs one
  row per image instead of two), so those samples form one group. For the pipelines whose
  guidance step is ``uncond + guidance_scale * (text - uncond)`` (StableDiffusionPipeline and
  StableDiffusionXLPipeline, checked in the tests) the remaining samples run in full batches with a
  per-row scale: ``guidance_scale`` is passed as a small object that multiplies row i by g_i
  (in float32 opmath, like a Python scalar, so the result equals a call with that scalar). If it
  was not used during a call (another diffusers version), the sampler warns and regenerates the
  batch the fallback way: group by guidance value, one call per distinct value. Tradeoff of the
  fallback: B samples with k distinct scales cost k calls of ~B/k images, so continuous draws
  degrade to one image per call, the reference pattern at half the throughput (anchors.md);
  other pipeline classes always use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from gptfl_hpc.errors import ModelError
from gptfl_hpc.gen.base import batch_arrays, check_sampler_args

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
"""Images per pipeline call unless the caller says otherwise (batch 8-16 at 512-768 px is where
an H100 reaches ~2x the one-image-per-call throughput, anchors.md)."""

EXAMPLE_REPO = "stabilityai/stable-diffusion-2-1"

ROW_GUIDANCE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
"""Pipeline classes whose CFG step is `uncond + guidance_scale * (text - uncond)`."""


# --------------------------------------------------------------------------------------------
# checks


def _download_hint(generator_dir: str) -> str:
    looks_like_repo = (generator_dir.count("/") == 1 and not generator_dir.startswith((".", "/"))
                       and not os.path.exists(generator_dir))
    if looks_like_repo:
        return (f"download it on a machine with internet access (`hf download {generator_dir} "
                f"--local-dir /path/to/generator`) and set gen.generator to that directory")
    return (f"download a diffusers text-to-image pipeline on a machine with internet access "
            f"(e.g. `hf download {EXAMPLE_REPO} --local-dir {generator_dir}`) and set "
            f"gen.generator to that directory")


def check_generator_dir(generator_dir: str | os.PathLike) -> dict:
    """Return the parsed model_index.json of a local diffusers text-to-image pipeline directory.

    Raises a one-line ModelError when the directory is missing, is not a diffusers pipeline, has
    no text encoder, or lacks a component's subfolder (an incomplete download). Never networks.
    """
    d = os.fspath(generator_dir)
    if not os.path.isdir(d):
        raise ModelError(f"generator directory {d}: not found; {_download_hint(d)}")
    index_path = os.path.join(d, "model_index.json")
    if not os.path.isfile(index_path):
        raise ModelError(f"generator directory {d}: no model_index.json, so not a diffusers "
                         f"pipeline; {_download_hint(d)}")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ModelError(f"generator directory {d}: model_index.json is unreadable ({e}); "
                         f"{_download_hint(d)}") from None
    if not ("unet" in index or "transformer" in index) or "text_encoder" not in index:
        raise ModelError(f"generator directory {d}: model_index.json ({index.get('_class_name')})"
                         f" names no unet/transformer and text_encoder, so not a text-to-image "
                         f"pipeline; {_download_hint(d)}")
    missing = [name for name, spec in index.items()
               if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2
               and spec[0] is not None and spec[1] is not None
               and not os.path.isdir(os.path.join(d, name))]
    if missing:
        raise ModelError(f"generator directory {d}: component folder(s) {', '.join(missing)} "
                         f"missing (incomplete download?); {_download_hint(d)}")
    return index


def resolve_dtype(device: str, dtype: Any = None, gen_dtype: str = "auto"):
    """torch dtype to load with: `dtype` if given, else gen.dtype, where auto = fp16 on GPU."""
    import torch

    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise ModelError(f"text2image dtype {dtype!r}: expected a torch.dtype or None")
        return dtype
    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if gen_dtype in named:
        return named[gen_dtype]
    return torch.float16 if str(device).startswith("cuda") else torch.float32


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# pipeline set-up


def set_scheduler(pipe, scheduler: str) -> None:
    """'dpm' -> DPM-Solver++ multistep, 'ddim' -> DDIM, 'default' keeps the pipeline's own."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++")
    elif scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "default":
        raise ModelError(f"config key gen.scheduler: invalid value {scheduler!r}; valid: "
                         "default, ddim, dpm")


def prepare_pipeline(pipe, *, device: str, scheduler: str = "default", channels_last: bool = True,
                     compile: bool = False, compile_mode: str | None = None):
    """Move `pipe` to `device` and apply scheduler / channels_last (GPU only) / torch.compile.

    ``compile`` compiles the UNet in place (``nn.Module.compile``, static shapes): each new batch
    size or resolution compiles once (tens of seconds on a GPU with max-autotune), so keep batch
    sizes constant. Default mode: 'max-autotune-no-cudagraphs' on CUDA, 'default' elsewhere.
    """
    import torch

    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    pipe.to(device)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    on_gpu = str(device).startswith("cuda")
    if channels_last and on_gpu and denoiser is not None:
        denoiser.to(memory_format=torch.channels_last)
    if compile and denoiser is not None:
        mode = compile_mode or ("max-autotune-no-cudagraphs" if on_gpu else "default")
        denoiser.compile(mode=mode, dynamic=False)
    return pipe


def native_size(pipe) -> tuple[int, int]:
    """(height, width) the pipeline generates at when none is given."""
    unet = getattr(pipe, "unet", None)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    if unet is not None:
        s = unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return int(h) * scale, int(w) * scale
    s = getattr(pipe, "default_sample_size", 128)
    return int(s) * scale, int(s) * scale


# --------------------------------------------------------------------------------------------
# sampler


class Text2ImageSampler:
    """Callable ``(labels, prompts, guidance, seeds) -> uint8 (B, H, W, C)`` around a pipeline."""

    kind = "text2image"

    def __init__(self, pipe, *, out_shape: tuple[int, int, int], steps: int,
                 height: int | None = None, width: int | None = None,
                 max_batch: int | None = None, device: str | None = None) -> None:
        self.out_shape, self.steps = check_sampler_args("text2image", out_shape, steps)
        self.pipe = pipe
        nh, nw = native_size(pipe)
        self.height, self.width = int(height or nh), int(width or nw)
        self.max_batch = int(max_batch or DEFAULT_MAX_BATCH)
        self.device = str(device if device is not None else pipe.device)
        self.calls = 0
        """Pipeline calls made so far (grouping by guidance shows up here)."""
        unet = getattr(pipe, "unet", None)
        self.row_guidance = (type(pipe).__name__ in ROW_GUIDANCE_PIPELINES and unet is not None
                             and getattr(unet.config, "time_cond_proj_dim", None) is None)
        """Whether samples with different guidance scales share a pipeline call."""
        self._warned_groups = False

    def __repr__(self) -> str:
        return (f"Text2ImageSampler({type(self.pipe).__name__}, {self.height}x{self.width} -> "
                f"{self.out_shape}, steps={self.steps}, max_batch={self.max_batch}, "
                f"scheduler={type(self.pipe.scheduler).__name__}, device={self.device})")

    def __call__(self, labels: np.ndarray, prompts: list[str], guidance: np.ndarray,
                 seeds: np.ndarray) -> np.ndarray:
        prompts = list(prompts)
        b = len(prompts)
        labels, guidance, seeds = batch_arrays("text2image", labels, guidance, seeds, rows=b)
        if not all(isinstance(p, str) for p in prompts):
            raise ModelError("text2image batch: prompts must be a list of str")
        if not np.all(np.isfinite(guidance)) or np.any(guidance <= 0):
            raise ModelError(f"text2image batch: guidance must be finite and > 0, got "
                             f"{guidance[~(np.isfinite(guidance) & (guidance > 0))][:3].tolist()}")
        h, w, c = self.out_shape
        out = np.empty((b, h, w, c), dtype=np.uint8)
        if b == 0:
            return out
        cfg = guidance > 1.0
        no_cfg = np.flatnonzero(~cfg)  # every scale <= 1 is "no CFG" for the pipeline
        for start in range(0, len(no_cfg), self.max_batch):
            part = no_cfg[start:start + self.max_batch]
            out[part] = self._generate([prompts[i] for i in part], 1.0, seeds[part])
        idx = np.flatnonzero(cfg)
        if self.row_guidance:
            for start in range(0, len(idx), self.max_batch):
                part = idx[start:start + self.max_batch]
                imgs = self._generate_rows([prompts[i] for i in part], guidance[part], seeds[part])
                if imgs is None:  # per-row guidance unsupported: fall back for this and later
                    idx = idx[start:]
                    break
                out[part] = imgs
            else:
                return out
        values = np.unique(guidance[idx])
        if len(idx) >= 8 and len(values) > len(idx) // 4 and not self._warned_groups:
            log.warning("text2image: %d distinct guidance scales among %d samples -> about one "
                        "pipeline call per image; draw scales from a small set (e.g. integers "
                        "1..5) to keep batches full", len(values), len(idx))
            self._warned_groups = True
        for g in values:
            group = idx[guidance[idx] == g]
            for start in range(0, len(group), self.max_batch):
                part = group[start:start + self.max_batch]
                out[part] = self._generate([prompts[i] for i in part], float(g), seeds[part])
        return out

    def _generate_rows(self, prompts: list[str], guidance: np.ndarray,
                       seeds: np.ndarray) -> np.ndarray | None:
        """One call with a per-row guidance scale; None if the pipeline did not apply it."""
        if len(np.unique(guidance)) == 1:
            return self._generate(prompts, float(guidance[0]), seeds)
        scale = RowGuidance(guidance)
        try:
            images = self._generate(prompts, scale, seeds)
        except TypeError as e:  # the pipeline used the scale in a way RowGuidance does not allow
            log.warning("text2image: per-row guidance not supported by %s (%s); grouping samples "
                        "by guidance value instead", type(self.pipe).__name__, e)
            self.row_guidance = False
            return None
        if scale.applied == 0:
            log.warning("text2image: %s did not apply the per-row guidance scale; grouping "
                        "samples by guidance value instead", type(self.pipe).__name__)
            self.row_guidance = False
            return None
        return images

    def _generate(self, prompts: list[str], guidance, seeds: np.ndarray) -> np.ndarray:
        """One pipeline call; on GPU out-of-memory, halve the call (and later calls) and retry.

        Every image keeps its own generator, so a split call makes the same images (up to the
        batch-size float effects described in the module docstring).
        """
        import torch

        try:
            return self._call(prompts, guidance, seeds)
        except torch.OutOfMemoryError:
            if len(prompts) == 1:
                raise ModelError(f"text2image: one {self.height}x{self.width} image does not fit "
                                 "in GPU memory; valid: gen.dtype fp16/bf16, a smaller "
                                 "model or a larger GPU") from None
            half = (len(prompts) + 1) // 2
            self.max_batch = max(1, min(self.max_batch, half))
            log.warning("text2image: out of GPU memory at %d images per call; using %d from now "
                        "on", len(prompts), self.max_batch)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            parts, start = [], 0
            while start < len(prompts):  # max_batch may shrink again inside
                sl = slice(start, start + self.max_batch)
                start = min(sl.stop, len(prompts))
                g = guidance
                if isinstance(guidance, RowGuidance):
                    g = RowGuidance(guidance.scales[sl].numpy())
                parts.append(self._generate(prompts[sl], g, seeds[sl]))
                if isinstance(guidance, RowGuidance):
                    guidance.applied += g.applied
            return np.concatenate(parts)

    def _call(self, prompts: list[str], guidance, seeds: np.ndarray) -> np.ndarray:
        import torch

        gen_device = "cpu" if self.device.startswith("mps") else self.device
        generators = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            images = self.pipe(prompt=prompts, height=self.height, width=self.width,
                               num_inference_steps=self.steps, guidance_scale=guidance,
                               generator=generators, output_type="pt").images
            self.calls += 1
            return to_uint8(images, self.out_shape)


class RowGuidance:
    """A guidance scale per batch row, passed as a pipeline's ``guidance_scale``.

    Supports exactly what StableDiffusion(XL)Pipeline does with it: ``scale > 1`` (true when
    every row's scale is) and ``scale * tensor`` / ``tensor * scale`` on a (rows, ...) tensor,
    computed in float32 and cast back (as PyTorch does for a Python scalar). Anything else
    (``float(scale)``, ``scale - 1``...) raises TypeError, so a pipeline that would use it
    differently fails loudly instead of silently applying one scale to all rows.
    """

    def __init__(self, scales: np.ndarray) -> None:
        import torch

        self.scales = torch.as_tensor(np.asarray(scales, dtype=np.float32))
        self.applied = 0

    def __gt__(self, other: float) -> bool:
        return bool((self.scales > float(other)).all())

    def __le__(self, other: float) -> bool:
        return not self.__gt__(other)

    def __mul__(self, other):
        import torch

        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.ndim == 0 or other.shape[0] != len(self.scales):
            raise TypeError(f"per-row guidance for {len(self.scales)} rows applied to a tensor "
                            f"of shape {tuple(other.shape)}")
        s = self.scales.to(other.device).view(-1, *([1] * (other.ndim - 1)))
        self.applied += 1
        return (other.float() * s).to(other.dtype)

    __rmul__ = __mul__

    def __float__(self):
        raise TypeError("per-row guidance scale used as a single float")

    def __repr__(self) -> str:
        return f"RowGuidance({self.scales.tolist()})"


def to_uint8(images, out_shape: tuple[int, int, int]) -> np.ndarray:
    """(B, 3, h, w) float in [0, 1] (any device) -> uint8 (B, H, W, C) numpy, resized on device."""
    import torch
    import torch.nn.functional as F

    h, w, c = out_shape
    x = torch.nan_to_num(images.float(), nan=0.0).clamp_(0.0, 1.0)
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    if c == 1:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------
# loader


def load_text2image(generator_dir: str | os.PathLike, *, gen_cfg, out_shape: tuple[int, int, int],
                    device: str = "cpu", dtype: Any = None, height: int | None = None,
                    width: int | None = None, max_batch: int | None = None) -> Text2ImageSampler:
    """Load a local diffusers text-to-image pipeline and return its sampler.

    `gen_cfg` (GenConfig) supplies steps, scheduler, dtype ('auto' when `dtype` is None),
    channels_last (GPU only) and compile. The output is resized to `out_shape` = (H, W, C);
    generation runs at the pipeline's native size unless `height`/`width` override it (benchmarks).
    `max_batch` caps images per pipeline call (default 16).
    """
    d = os.fspath(generator_dir)
    index = check_generator_dir(d)  # before the heavy imports: a bad path fails in milliseconds
    from diffusers import AutoPipelineForText2Image

    torch_dtype = resolve_dtype(device, dtype, getattr(gen_cfg, "dtype", "auto"))
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if "safety_checker" in index:  # SD 1.x ships one; 2.x stores [null, null]
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with _quiet_loading():
            pipe = AutoPipelineForText2Image.from_pretrained(d, **kwargs)
    except Exception as e:  # noqa: BLE001  (diffusers/transformers raise many types)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"generator directory {d}: cannot be loaded as a diffusers text-to-image "
                         f"pipeline ({type(e).__name__}: {first[:200]}); "
                         f"{_download_hint(d)}") from e
    prepare_pipeline(pipe, device=device, scheduler=gen_cfg.scheduler,
                     channels_last=gen_cfg.channels_last, compile=gen_cfg.compile)
    sampler = Text2ImageSampler(pipe, out_shape=out_shape, steps=gen_cfg.steps, height=height,
                                width=width, max_batch=max_batch, device=device)
    log.info("text2image: %s from %s (%s)", sampler, d, torch_dtype)
    return sampler
