"""Class-conditional DiT generators (diffusers ``DiTPipeline``) from a local directory.

A DiT directory is a ``save_pretrained`` pipeline: ``model_index.json`` (``_class_name``
``DiTPipeline``, optionally an ``id2label`` table), ``transformer/`` (``DiTTransformer2DModel``
with ``num_embeds_ada_norm`` classes), ``vae/`` (``AutoencoderKL``) and ``scheduler/``. It is loaded
with ``DiTPipeline.from_pretrained(dir, local_files_only=True, dtype=...)``::

    sampler = load_dit(generator_dir, gen_cfg=gen_cfg, out_shape=(H, W, C), num_classes=K,
                       label_names=names, device=device, dtype=dtype)
    images = sampler(labels, prompts, guidance, seeds)   # -> uint8 (B, H, W, C); prompts ignored

**Class ids.** When the pipeline has an ``id2label`` table (``pipe.labels``, e.g. ImageNet's for
``facebook/DiT-XL-2-256``) and every task label name is in it, task class c is generated as the
DiT class ``pipe.get_label_ids([name_c])``; otherwise task class c is DiT class c, which needs
``K <= num_embeds_ada_norm`` (a DiT trained on the task's own classes).

**Why the sampling loop is here and not ``pipe(...)``.** It reproduces ``DiTPipeline.__call__``
step for step (latents ``randn * init_noise_sigma``, ``scale_model_input``, learned-sigma split,
``eps_u + g (eps_c - eps_u)`` on the first ``in_channels`` channels, ``latents /
vae.scaling_factor``, ``(x / 2 + 0.5).clamp(0, 1)``; the tests check it against the pipeline) on the
pipeline's own modules, because the pipeline call itself does not fit the synthesis engine:

* its null class is hard-coded as 1000 (ImageNet), so guidance > 1 fails on any other DiT; here
  it is ``num_embeds_ada_norm`` (the label-dropout row every DiT's label embedding has);
* it takes one ``guidance_scale`` per call, so per-sample guidance would need one call per distinct
  value, whose shape depends on the neighbours' scales; the engine's byte-identity guarantee
  needs every row to see the same call shape. Here every call runs the conditional pass on the
  whole block and, if any row has guidance > 1, the unconditional pass on the whole block as a
  second call of the same shape; rows with guidance <= 1 keep their conditional prediction;
* it calls ``scheduler.step`` without a generator, so a stochastic scheduler (DDPM, the saved
  default of some DiTs) would draw from the global RNG; here the per-sample generators are passed.

One CPU ``torch.Generator`` per sample, seeded from ``seeds[i]``, draws its initial latents (and
any per-step noise), so a sample depends on its seed only. The latent trajectory is kept in
float32 (the transformer and VAE may run in fp16/bf16 on GPU); the decoded images go through
``text2image.to_uint8`` (antialiased resize to the task size, luma when C == 1).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gptfl_hpc.errors import ModelError
from gptfl_hpc.gen.base import batch_arrays, check_sampler_args

log = logging.getLogger(__name__)

def read_index(generator_dir: str | os.PathLike) -> dict | None:
    """Parsed generator_dir/model_index.json, None if absent; one-line ModelError if unreadable."""
    path = Path(generator_dir) / "model_index.json"
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    return index


def labels_from_id2label(id2label: dict | None) -> dict[str, int]:
    """name -> id, as ``DiTPipeline.__init__`` builds ``pipe.labels`` (comma-separated synonyms)."""
    out: dict[str, int] = {}
    for key, value in (id2label or {}).items():
        for name in str(value).split(","):
            out[name.strip()] = int(key)
    return out


def class_ids(generator_dir: str | os.PathLike, *, num_classes: int, n_embeds: int,
              label_names: list[str] | None, labels: dict[str, int],
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


def check_dit(generator_dir: str | os.PathLike, *, num_classes: int,
              label_names: list[str] | None = None) -> np.ndarray:
    """Check a DiT directory against the task without loading weights; return the class ids."""
    d = os.fspath(generator_dir)
    if not os.path.isdir(d):
        raise ModelError(f"generator directory {d}: not found; put a DiTPipeline saved with "
                         "save_pretrained there (e.g. `hf download facebook/DiT-XL-2-256 "
                         f"--local-dir {d}` on a machine with network)")
    from gptfl_hpc.gen.synthesize import is_dit_index

    index = read_index(d)
    if index is None or not is_dit_index(index):
        raise ModelError(f"generator directory {d}: model_index.json missing or not a DiTPipeline"
                         "; valid: a DiTPipeline saved with save_pretrained")
    missing = [c for c in ("transformer", "vae", "scheduler")
               if not os.path.isdir(os.path.join(d, c))]
    if missing:
        raise ModelError(f"generator directory {d}: component folder(s) {', '.join(missing)} "
                         "missing (incomplete download?); valid: transformer/, vae/, scheduler/")
    cfg_path = Path(d) / "transformer" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{cfg_path}: not readable JSON ({' '.join(str(e).split())})") from None
    n_embeds = cfg.get("num_embeds_ada_norm")
    if not isinstance(n_embeds, int) or n_embeds < 1:
        raise ModelError(f"{cfg_path}: num_embeds_ada_norm is {n_embeds!r}, so the transformer "
                         "is not class-conditional; valid: a class-conditional DiT")
    return class_ids(d, num_classes=num_classes, n_embeds=n_embeds, label_names=label_names,
                     labels=labels_from_id2label(index.get("id2label")))


class DiTSampler:
    """``sampler(labels, prompts, guidance, seeds) -> uint8 (B, H, W, C)``; prompts are ignored."""

    kind = "class_conditional"

    def __init__(self, pipe: Any, *, out_shape: tuple[int, int, int], steps: int,
                 class_ids: np.ndarray, device: Any) -> None:
        self.out_shape, self.steps = check_sampler_args("DiT", out_shape, steps)
        self.pipe = pipe
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        self.device = device
        cfg = pipe.transformer.config
        self.null_class = int(cfg.num_embeds_ada_norm)
        self.latent_c = int(cfg.in_channels)
        self.latent_hw = int(cfg.sample_size)
        self.learned_sigma = int(cfg.out_channels) // 2 == self.latent_c
        self._step_takes_generator = "generator" in inspect.signature(
            pipe.scheduler.step).parameters

    def __repr__(self) -> str:
        return (f"DiTSampler(latent {self.latent_c}x{self.latent_hw}x{self.latent_hw} -> "
                f"{'x'.join(map(str, self.out_shape))}, {type(self.pipe.scheduler).__name__} "
                f"{self.steps} steps, {len(self.class_ids)} classes, null class {self.null_class})")

    def _eps(self, x: Any, t: Any, labels: Any) -> Any:
        tr = self.pipe.transformer
        ts = t.reshape(-1)[:1].to(x.device).expand(x.shape[0])
        out = tr(x.to(tr.dtype), timestep=ts, class_labels=labels).sample.float()
        return out

    def __call__(self, labels: np.ndarray, prompts: list[str] | None, guidance: np.ndarray,
                 seeds: np.ndarray) -> np.ndarray:
        import torch

        from gptfl_hpc.gen.text2image import to_uint8

        labels, guidance, seeds = batch_arrays("DiT", labels, guidance, seeds)
        b = len(labels)
        if b == 0:
            return np.zeros((0, *self.out_shape), dtype=np.uint8)
        if labels.min() < 0 or labels.max() >= len(self.class_ids):
            raise ModelError(f"DiT batch: labels {labels.min()}..{labels.max()}; valid: "
                             f"0..{len(self.class_ids) - 1}")
        if not np.all(np.isfinite(guidance)):
            raise ModelError("DiT batch: guidance must be finite")
        pipe, dev, c = self.pipe, self.device, self.latent_c
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (c, self.latent_hw, self.latent_hw)
        x = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        sched = pipe.scheduler
        sched.set_timesteps(self.steps)
        x = x.to(dev) * sched.init_noise_sigma
        y = torch.as_tensor(self.class_ids[labels], device=dev)
        y_null = torch.full_like(y, self.null_class)
        cfg_rows = guidance > 1.0
        g = torch.as_tensor(guidance, device=dev).view(-1, 1, 1, 1)
        mask = torch.as_tensor(cfg_rows, device=dev).view(-1, 1, 1, 1)
        step_kw = {"generator": gens} if self._step_takes_generator else {}
        with torch.inference_mode():
            for t in sched.timesteps:
                t = torch.as_tensor(t)
                xin = sched.scale_model_input(x, t)
                out = self._eps(xin, t, y)
                if cfg_rows.any():
                    eps_c = out[:, :c]
                    eps_u = self._eps(xin, t, y_null)[:, :c]
                    eps = torch.where(mask, eps_u + g * (eps_c - eps_u), eps_c)
                    out = torch.cat([eps, out[:, c:]], dim=1)
                model_output = out[:, :c] if self.learned_sigma else out
                x = sched.step(model_output, t, x, **step_kw).prev_sample
            vae = pipe.vae
            z = (x / vae.config.scaling_factor).to(vae.dtype)
            img = (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)
        return to_uint8(img, self.out_shape)


def load_dit(generator_dir: str | os.PathLike, *, gen_cfg: Any, out_shape: tuple[int, int, int],
             num_classes: int, label_names: list[str] | None = None, device: Any = "cpu",
             dtype: Any = None) -> DiTSampler:
    """Load the DiTPipeline in `generator_dir` (offline) and return its sampler."""
    d = os.fspath(generator_dir)
    check_dit(d, num_classes=num_classes, label_names=label_names)  # fails fast, no weights
    from diffusers import DiTPipeline

    from gptfl_hpc.gen.text2image import _quiet_loading, prepare_pipeline, resolve_dtype

    torch_dtype = resolve_dtype(str(device), dtype, getattr(gen_cfg, "dtype", "auto"))
    try:
        with _quiet_loading():
            pipe = DiTPipeline.from_pretrained(d, dtype=torch_dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001  (diffusers raises many types)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"generator directory {d}: cannot be loaded as a DiTPipeline "
                         f"({type(e).__name__}: {first[:200]}); valid: a DiTPipeline saved with "
                         "save_pretrained") from e
    n_embeds = int(pipe.transformer.config.num_embeds_ada_norm)
    ids = class_ids(d, num_classes=num_classes, n_embeds=n_embeds, label_names=label_names,
                    labels=dict(pipe.labels), get_label_ids=pipe.get_label_ids)
    prepare_pipeline(pipe, device=str(device), scheduler=gen_cfg.scheduler,
                     channels_last=gen_cfg.channels_last, compile=gen_cfg.compile)
    sampler = DiTSampler(pipe, out_shape=out_shape, steps=gen_cfg.steps, class_ids=ids,
                         device=device)
    log.info("DiT generator %s: %s on %s (%s), task classes -> DiT ids %s", d, sampler, device,
             str(torch_dtype).replace("torch.", ""), ids[:10].tolist())
    return sampler
