"""Pre-trained text-to-image generators (Stable Diffusion and friends): kind ``text2image``.

Design:

* **Local only.** The directory must hold a diffusers ``model_index.json`` naming a text encoder;
  it is loaded with ``local_files_only=True`` whatever ``HF_HUB_OFFLINE`` says, so compute nodes
  never touch the network. Anything else is one line of :class:`ModelError` saying what to
  download and where.
* **dtype at load time** (``dtype=`` in ``from_pretrained``; diffusers 0.42 deprecates
  ``torch_dtype``), resolved by ``base.resolve_dtype`` (fp16 on GPU, fp32 on CPU by default).
* **One torch.Generator per sample**, seeded from ``seeds[i]``, passed as a list: a sample's
  initial latents depend on its seed only, so its image does not depend on which other samples
  share its batch (up to the last float bits of batched kernels, see the tests).
* **Generation at the model's native size** (``unet.sample_size * vae_scale_factor``; a
  ``height``/``width`` override exists for benchmarks), then ``base.to_uint8`` on the device
  (``output_type="pt"``): antialiased resize to the task's size, luma when ``C == 1``, and NaN/Inf
  detection (fp16 overflow is regenerated in fp32 by the engine instead of stored as black).
* **Calls** go through ``base.CallShape``: at most ``max_batch`` images per pipeline call (the
  default rows per call on GPU, 16), padded to exactly that under gen.compile (one compiled shape),
  halved once for all later calls on GPU out-of-memory.
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
  degrade to one image per call; other pipeline classes always use it.
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
    batch_arrays,
    check_steps,
    require_images,
    to_uint8,
    torch_dtype,
)
from gptfl_hpc.gen.diffusion import prepare_pipeline, quiet_loading
from gptfl_hpc.gen.spec import GeneratorSpec, download_hint

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
"""Images per pipeline call unless gen.micro_batch says otherwise (batch 8-16 at 512-768 px is
where an H100 reaches ~2x the one-image-per-call throughput, docs/benchmarks.md); also the
default rows per engine call on GPU."""

ROW_GUIDANCE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
"""Pipeline classes whose CFG step is `uncond + guidance_scale * (text - uncond)`."""


# --------------------------------------------------------------------------------------------
# kind: detect / check


def detect(spec: GeneratorSpec) -> bool:
    return spec.has_text_encoder


def check(spec: GeneratorSpec, task: Task, gen_cfg: Any) -> None:
    """A local diffusers text-to-image pipeline directory (descriptor files only)."""
    require_images(task, KIND.name)
    d = spec.path
    index = spec.index
    if index is None:
        raise ModelError(f"generator directory {d}: no model_index.json, so not a diffusers "
                         f"pipeline; {download_hint(d)}")
    if not ("unet" in index or "transformer" in index) or "text_encoder" not in index:
        raise ModelError(f"generator directory {d}: model_index.json ({index.get('_class_name')})"
                         f" names no unet/transformer and text_encoder, so not a text-to-image "
                         f"pipeline; {download_hint(d)}")
    missing = [name for name, entry in index.items()
               if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2
               and entry[0] is not None and entry[1] is not None and not (d / name).is_dir()]
    if missing:
        raise ModelError(f"generator directory {d}: component folder(s) {', '.join(missing)} "
                         f"missing (incomplete download?); {download_hint(d)}")


# --------------------------------------------------------------------------------------------
# sampler


def native_size(pipe: Any) -> tuple[int, int]:
    """(height, width) the pipeline generates at when none is given."""
    unet = getattr(pipe, "unet", None)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    if unet is not None:
        s = unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return int(h) * scale, int(w) * scale
    s = getattr(pipe, "default_sample_size", 128)
    return int(s) * scale, int(s) * scale


class _RowGuidanceIgnored(Exception):
    pass


class PromptSampler:
    """``(labels, prompts, guidance, seeds) -> samples`` around a prompt-driven diffusers
    pipeline (text-to-image here, text-to-audio in audioldm.py): rows without guidance (scale
    <= 1) in one group, guided rows with a guidance scale per row when the pipeline applies it
    (RowGuidance), else grouped by scale; calls of at most ``max_batch`` rows (``self.shape``).
    Subclasses set ``kind``, ``pipe``, ``shape``, ``row_guidance`` and define ``_out`` (the
    output array for b rows) and ``_call`` (one pipeline call)."""

    kind = "text2image"
    pipe: Any
    shape: Any
    row_guidance: bool
    _warned_groups = False

    def _out(self, rows: int) -> np.ndarray:
        raise NotImplementedError

    def _call(self, prompts: list[str], guidance: Any, seeds: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, labels: np.ndarray, prompts: list[str], guidance: np.ndarray,
                 seeds: np.ndarray) -> np.ndarray:
        prompts = list(prompts)
        b = len(prompts)
        labels, guidance, seeds = batch_arrays(self.kind, labels, guidance, seeds, rows=b)
        if not all(isinstance(p, str) for p in prompts):
            raise ModelError(f"{self.kind} batch: prompts must be a list of str")
        if not np.all(np.isfinite(guidance)) or np.any(guidance <= 0):
            raise ModelError(f"{self.kind} batch: guidance must be finite and > 0, got "
                             f"{guidance[~(np.isfinite(guidance) & (guidance > 0))][:3].tolist()}")
        out = self._out(b)
        cfg = guidance > 1.0
        no_cfg = np.flatnonzero(~cfg)  # every scale <= 1 is "no CFG" for the pipeline
        if len(no_cfg):
            out[no_cfg] = self._run(prompts, no_cfg, 1.0, seeds)
        idx = np.flatnonzero(cfg)
        if len(idx) and self.row_guidance:
            imgs = self._rows(prompts, idx, guidance, seeds)
            if imgs is not None:
                out[idx] = imgs
                return out
        values = np.unique(guidance[idx])
        if len(idx) >= 8 and len(values) > len(idx) // 4 and not self._warned_groups:
            log.warning("%s: %d distinct guidance scales among %d samples -> about one "
                        "pipeline call per image; draw scales from a small set (e.g. integers "
                        "1..5) to keep batches full", self.kind, len(values), len(idx))
            self._warned_groups = True
        for g in values:
            group = idx[guidance[idx] == g]
            out[group] = self._run(prompts, group, float(g), seeds)
        return out

    def _run(self, prompts: list[str], idx: np.ndarray, scale: float,
             seeds: np.ndarray) -> np.ndarray:
        """Rows `idx` in calls of at most max_batch images, all with guidance `scale`."""
        def call(sel: np.ndarray) -> np.ndarray:
            rows = idx[sel]
            return self._call([prompts[i] for i in rows], scale, seeds[rows])

        return self.shape.run(call, len(idx))

    def _rows(self, prompts: list[str], idx: np.ndarray, guidance: np.ndarray,
              seeds: np.ndarray) -> np.ndarray | None:
        """Rows `idx` with a guidance scale per row; None if the pipeline does not apply it."""
        def call(sel: np.ndarray) -> np.ndarray:
            rows = idx[sel]
            g = guidance[rows]
            if len(np.unique(g)) == 1:
                return self._call([prompts[i] for i in rows], float(g[0]), seeds[rows])
            scale = RowGuidance(g)
            images = self._call([prompts[i] for i in rows], scale, seeds[rows])
            if scale.applied == 0:
                raise _RowGuidanceIgnored
            return images

        try:
            return self.shape.run(call, len(idx))
        except TypeError as e:  # the pipeline used the scale in a way RowGuidance does not allow
            log.warning("%s: per-row guidance not supported by %s (%s); grouping samples "
                        "by guidance value instead", self.kind, type(self.pipe).__name__, e)
        except _RowGuidanceIgnored:
            log.warning("%s: %s did not apply the per-row guidance scale; grouping "
                        "samples by guidance value instead", self.kind, type(self.pipe).__name__)
        self.row_guidance = False
        return None



class Text2ImageSampler(PromptSampler):
    """Callable ``(labels, prompts, guidance, seeds) -> uint8 (B, H, W, C)`` around a pipeline."""

    kind = "text2image"

    def __init__(self, pipe: Any, *, out_shape: tuple[int, int, int], steps: int,
                 height: int | None = None, width: int | None = None,
                 max_batch: int | None = None, device: str | None = None,
                 compiled: bool = False) -> None:
        h, w, c = (int(v) for v in out_shape)
        self.out_shape = (h, w, c)
        self.steps = check_steps(steps)
        self.pipe = pipe
        nh, nw = native_size(pipe)
        self.height, self.width = int(height or nh), int(width or nw)
        self.device = str(device if device is not None else pipe.device)
        self.shape = CallShape(int(max_batch or DEFAULT_MAX_BATCH), what="text2image",
                               pad=compiled, compiled=compiled)
        """Images per pipeline call (padded to it when compiled; halved on out-of-memory)."""
        self.calls = 0
        """Pipeline calls made so far (grouping by guidance shows up here)."""
        unet = getattr(pipe, "unet", None)
        self.row_guidance = (type(pipe).__name__ in ROW_GUIDANCE_PIPELINES and unet is not None
                             and getattr(unet.config, "time_cond_proj_dim", None) is None)
        """Whether samples with different guidance scales share a pipeline call."""
        self._warned_groups = False

    @property
    def max_batch(self) -> int:
        return self.shape.rows

    @max_batch.setter
    def max_batch(self, rows: int) -> None:
        self.shape.rows = int(rows)

    def __repr__(self) -> str:
        return (f"Text2ImageSampler({type(self.pipe).__name__}, {self.height}x{self.width} -> "
                f"{self.out_shape}, steps={self.steps}, max_batch={self.max_batch}, "
                f"scheduler={type(self.pipe.scheduler).__name__}, device={self.device})")

    def _out(self, rows: int) -> np.ndarray:
        return np.empty((rows, *self.out_shape), dtype=np.uint8)

    def _call(self, prompts: list[str], guidance: Any, seeds: np.ndarray) -> np.ndarray:
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

    def __mul__(self, other: Any) -> Any:
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

    def __float__(self) -> float:
        raise TypeError("per-row guidance scale used as a single float")

    def __repr__(self) -> str:
        return f"RowGuidance({self.scales.tolist()})"


# --------------------------------------------------------------------------------------------
# kind: load


def load(spec: GeneratorSpec, gen_cfg: Any, task: Task, device: Any, dtype: str, *,
         height: int | None = None, width: int | None = None,
         max_batch: int | None = None) -> Text2ImageSampler:
    """Load the local pipeline and return its sampler.

    `gen_cfg` supplies steps, scheduler, channels_last (GPU only), compile and micro_batch (the
    images per pipeline call unless `max_batch` says otherwise; default 16). Generation runs at
    the pipeline's native size unless `height`/`width` override it (benchmarks).
    """
    out_shape = require_images(task, KIND.name)
    check(spec, task, gen_cfg)  # before the heavy imports: a bad directory fails in milliseconds
    from diffusers import AutoPipelineForText2Image

    d = str(spec.path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "local_files_only": True}
    if "safety_checker" in (spec.index or {}):  # SD 1.x ships one; 2.x stores [null, null]
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with quiet_loading():
            pipe = AutoPipelineForText2Image.from_pretrained(d, **kwargs)
    except Exception as e:  # noqa: BLE001  (diffusers/transformers raise many types)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"generator directory {d}: cannot be loaded as a diffusers text-to-image "
                         f"pipeline ({type(e).__name__}: {first[:200]}); "
                         f"{download_hint(d)}") from e
    prepare_pipeline(pipe, device=str(device), scheduler=gen_cfg.scheduler,
                     channels_last=gen_cfg.channels_last, compile=gen_cfg.compile)
    sampler = Text2ImageSampler(pipe, out_shape=out_shape, steps=gen_cfg.steps, height=height,
                                width=width, max_batch=max_batch or gen_cfg.micro_batch,
                                device=str(device), compiled=gen_cfg.compile)
    log.info("text2image: %s from %s (%s)", sampler, d, dtype)
    return sampler


KIND = GeneratorKind(
    name="text2image", family="text2image",
    describe="a diffusers pipeline whose model_index.json names a text_encoder",
    detect=detect, check=check, load=load, call_rows=lambda spec: DEFAULT_MAX_BATCH, priority=10)
