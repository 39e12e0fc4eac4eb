"""Class-conditional DiT generators (diffusers ``DiTPipeline``): kind ``dit`` (gen.kind
class_conditional).

A DiT directory is a ``save_pretrained`` pipeline: ``model_index.json`` (``_class_name``
``DiTPipeline``, optionally an ``id2label`` table), ``transformer/`` (``DiTTransformer2DModel``
with ``num_embeds_ada_norm`` classes), ``vae/`` (``AutoencoderKL``) and ``scheduler/``. It is loaded
with ``DiTPipeline.from_pretrained(dir, local_files_only=True, dtype=...)``.

**Class ids.** When the pipeline has an ``id2label`` table (``pipe.labels``, e.g. ImageNet's for
``facebook/DiT-XL-2-256``) and every task label name is in it, task class c is generated as the
DiT class ``pipe.get_label_ids([name_c])``; otherwise task class c is DiT class c, which needs
``K <= num_embeds_ada_norm`` (a DiT trained on the task's own classes).

**Why the sampling loop is ``diffusion.denoise`` and not ``pipe(...)``.** It reproduces
``DiTPipeline.__call__`` step for step (latents ``randn * init_noise_sigma``,
``scale_model_input``, learned-sigma split, ``eps_u + g (eps_c - eps_u)`` on the first
``in_channels`` channels, ``latents / vae.scaling_factor``, ``(x / 2 + 0.5).clamp(0, 1)``; the
tests check it against the pipeline) on the pipeline's own modules, because the pipeline call
itself does not fit the synthesis engine:

* its null class is hard-coded as 1000 (ImageNet), so guidance > 1 fails on any other DiT; here
  it is ``num_embeds_ada_norm`` (the label-dropout row every DiT's label embedding has);
* it takes one ``guidance_scale`` per call, so per-sample guidance would need one call per distinct
  value, whose shape depends on the neighbours' scales; here every call runs the conditional pass
  on the whole block and, if any row has guidance > 1, the unconditional pass as a second call of
  the same shape (``diffusion.guided``, shared with the UNet kind);
* it calls ``scheduler.step`` without a generator, so a stochastic scheduler (DDPM, the saved
  default of some DiTs) would draw from the global RNG; here the per-sample generators are passed.

The decoded images go through ``base.to_uint8`` (resize, luma, NaN/Inf detection). The VAE
decodes the whole call; on GPU out-of-memory the engine halves the call (``base.CallShape``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
from gptfl_hpc.gen.diffusion import denoise, prepare_pipeline, quiet_loading
from gptfl_hpc.gen.spec import GeneratorSpec

log = logging.getLogger(__name__)

GPU_CALL_ROWS = 32
"""Rows per call on GPU (DiT-XL/2 at 256 px: ~1-2 s per call on an H100 with guidance)."""


def is_dit_index(index: Any) -> bool:
    """model_index.json of a class-conditional DiT pipeline (DiTPipeline, or a transformer and
    no text encoder)."""
    if not isinstance(index, dict):
        return False
    te = index.get("text_encoder")
    has_te = isinstance(te, list) and bool(te) and te[0] is not None
    return index.get("_class_name") == "DiTPipeline" or ("transformer" in index and not has_te)


def labels_from_id2label(id2label: dict | None) -> dict[str, int]:
    """name -> id, as ``DiTPipeline.__init__`` builds ``pipe.labels`` (comma-separated synonyms)."""
    out: dict[str, int] = {}
    for key, value in (id2label or {}).items():
        for name in str(value).split(","):
            out[name.strip()] = int(key)
    return out


def class_ids(generator_dir: Any, *, num_classes: int, n_embeds: int,
              label_names: list[str] | tuple[str, ...] | None, labels: dict[str, int],
              get_label_ids: Callable[[list[str]], list[int]] | None = None) -> np.ndarray:
    """DiT class id of each task class (int64, (num_classes,)).

    Label names all found in the pipeline's id2label -> those ids; else identity when
    ``num_classes <= n_embeds``; else a one-line ModelError.
    """
    if label_names is not None and len(label_names) != num_classes:
        raise ModelError(f"generator {generator_dir}: {len(label_names)} label names for "
                         f"{num_classes} classes; valid: one name per class")
    if labels and label_names:
        lookup = get_label_ids or (lambda names: [labels[n] for n in names])
        try:
            ids = [int(i) for i in lookup(list(label_names))]
        except (ValueError, KeyError):  # DiTPipeline.get_label_ids raises ValueError
            ids = None
        if ids is not None:
            bad = [i for i in ids if not 0 <= i < n_embeds]
            if bad:
                raise ModelError(f"generator {generator_dir}: id2label maps task labels to class "
                                 f"ids {bad} but the transformer has {n_embeds} classes "
                                 f"(num_embeds_ada_norm); valid: ids 0..{n_embeds - 1}")
            return np.asarray(ids, dtype=np.int64)
        missing = [n for n in label_names if n not in labels]
        log.info("DiT %s: label names %s not in its id2label; using task class c as DiT class c",
                 generator_dir, missing[:5])
    if num_classes > n_embeds:
        some = ", ".join(sorted(labels)[:8]) + (", ..." if len(labels) > 8 else "")
        names = f"; or task label names from its id2label ({some})" if labels else ""
        raise ModelError(f"generator {generator_dir}: the DiT has {n_embeds} classes "
                         f"(num_embeds_ada_norm), the task has {num_classes} and its label names "
                         f"are not all in the pipeline's id2label; valid: <= {n_embeds} task "
                         f"classes{names}")
    return np.arange(num_classes, dtype=np.int64)


def detect(spec: GeneratorSpec) -> bool:
    return is_dit_index(spec.index)


def check_dit(spec: GeneratorSpec, task: Task) -> np.ndarray:
    """Check a DiT directory against the task without loading weights; return the class ids."""
    require_images(task, KIND.name)
    d = spec.path
    if not is_dit_index(spec.index):
        raise ModelError(f"generator directory {d}: model_index.json missing or not a DiTPipeline"
                         "; valid: a DiTPipeline saved with save_pretrained")
    missing = [c for c in ("transformer", "vae", "scheduler") if not (d / c).is_dir()]
    if missing:
        raise ModelError(f"generator directory {d}: component folder(s) {', '.join(missing)} "
                         "missing (incomplete download?); valid: transformer/, vae/, scheduler/")
    cfg_path = d / "transformer" / "config.json"
    cfg = spec.component_config("transformer")
    if cfg is None:
        raise ModelError(f"{cfg_path}: not found (incomplete download?); valid: a DiTPipeline "
                         "saved with save_pretrained")
    n_embeds = cfg.get("num_embeds_ada_norm")
    if not isinstance(n_embeds, int) or n_embeds < 1:
        raise ModelError(f"{cfg_path}: num_embeds_ada_norm is {n_embeds!r}, so the transformer "
                         "is not class-conditional; valid: a class-conditional DiT")
    return class_ids(d, num_classes=task.num_classes, n_embeds=n_embeds,
                     label_names=task.label_names,
                     labels=labels_from_id2label((spec.index or {}).get("id2label")))


def check(spec: GeneratorSpec, task: Task, gen_cfg: Any) -> None:
    check_dit(spec, task)


class DiTSampler:
    """``sampler(labels, prompts, guidance, seeds) -> uint8 (B, H, W, C)``; prompts are ignored."""

    kind = "class_conditional"

    def __init__(self, pipe: Any, *, out_shape: tuple[int, int, int], steps: int,
                 class_ids: np.ndarray, device: Any) -> None:
        h, w, c = (int(v) for v in out_shape)
        self.out_shape = (h, w, c)
        self.steps = check_steps(steps)
        self.pipe = pipe
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        self.device = device
        cfg = pipe.transformer.config
        self.null_class = int(cfg.num_embeds_ada_norm)
        self.latent_c = int(cfg.in_channels)
        self.latent_hw = int(cfg.sample_size)
        self.learned_sigma = int(cfg.out_channels) // 2 == self.latent_c

    def __repr__(self) -> str:
        return (f"DiTSampler(latent {self.latent_c}x{self.latent_hw}x{self.latent_hw} -> "
                f"{'x'.join(map(str, self.out_shape))}, {type(self.pipe.scheduler).__name__} "
                f"{self.steps} steps, {len(self.class_ids)} classes, null class {self.null_class})")

    def _predict(self, x: Any, t: Any, labels: Any) -> Any:
        tr = self.pipe.transformer
        ts = t.reshape(-1)[:1].to(x.device).expand(x.shape[0])
        return tr(x.to(tr.dtype), timestep=ts, class_labels=labels).sample.float()

    def __call__(self, labels: np.ndarray, prompts: list[str] | None, guidance: np.ndarray,
                 seeds: np.ndarray) -> np.ndarray:
        import torch

        labels, guidance, seeds = batch_arrays("DiT", labels, guidance, seeds)
        if len(labels) == 0:
            return np.zeros((0, *self.out_shape), dtype=np.uint8)
        if labels.min() < 0 or labels.max() >= len(self.class_ids):
            raise ModelError(f"DiT batch: labels {labels.min()}..{labels.max()}; valid: "
                             f"0..{len(self.class_ids) - 1}")
        if not np.all(np.isfinite(guidance)):
            raise ModelError("DiT batch: guidance must be finite")
        c = self.latent_c
        x = denoise(self._predict, self.pipe.scheduler, steps=self.steps,
                    latent_shape=(c, self.latent_hw, self.latent_hw),
                    labels=self.class_ids[labels], guidance=guidance, seeds=seeds,
                    null_label=self.null_class, device=self.device, channels=c,
                    learned_sigma=self.learned_sigma)
        vae = self.pipe.vae
        with torch.inference_mode():
            z = (x / vae.config.scaling_factor).to(vae.dtype)
            img = (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
        return to_uint8(img, self.out_shape)


def load(spec: GeneratorSpec, gen_cfg: Any, task: Task, device: Any, dtype: str) -> DiTSampler:
    """Load the DiTPipeline (offline) and return its sampler."""
    out_shape = require_images(task, KIND.name)
    check_dit(spec, task)  # fails fast, no weights
    from diffusers import DiTPipeline

    d = str(spec.path)
    try:
        with quiet_loading():
            pipe = DiTPipeline.from_pretrained(d, dtype=torch_dtype(dtype), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (diffusers raises many types)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"generator directory {d}: cannot be loaded as a DiTPipeline "
                         f"({type(e).__name__}: {first[:200]}); valid: a DiTPipeline saved with "
                         "save_pretrained") from e
    n_embeds = int(pipe.transformer.config.num_embeds_ada_norm)
    ids = class_ids(d, num_classes=task.num_classes, n_embeds=n_embeds,
                    label_names=task.label_names, labels=dict(pipe.labels),
                    get_label_ids=pipe.get_label_ids)
    prepare_pipeline(pipe, device=str(device), scheduler=gen_cfg.scheduler,
                     channels_last=gen_cfg.channels_last, compile=gen_cfg.compile)
    sampler = DiTSampler(pipe, out_shape=out_shape, steps=gen_cfg.steps, class_ids=ids,
                         device=device)
    log.info("DiT generator %s: %s on %s (%s), task classes -> DiT ids %s", d, sampler, device,
             dtype, ids[:10].tolist())
    return sampler


KIND = GeneratorKind(
    name="dit", family="class_conditional",
    describe="a DiTPipeline model_index.json with transformer/, vae/, scheduler/",
    detect=detect, check=check, load=load, call_rows=lambda spec: GPU_CALL_ROWS, priority=20)
