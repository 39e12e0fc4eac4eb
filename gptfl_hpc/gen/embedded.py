"""The embedded generator: a tiny class-conditional ``UNet2DModel`` trained on the public split.

Recipe (measured on 2 CPU cores, docs/design.md): ``UNet2DModel`` at the image size with
DownBlock2D/UpBlock2D per ``gen.train.block_out_channels`` (one layer per block, the default mid
block with attention), ``num_class_embeds = num_classes + 1`` (the last one is the null class for
classifier-free guidance, dropped in for ``cond_dropout`` of the labels), DDPM training with the
``squaredcos_cap_v2`` schedule and epsilon prediction, AdamW + OneCycle, an EMA of the weights
(the EMA is what gets saved). 2000 steps at batch 128 on digits (0.65 M parameters) take about
3.5 min on 2 CPU cores; more steps start to memorise the 539 public images.

Output directory (``save_pretrained`` layout, loadable with ``UNet2DModel.from_pretrained(d,
subfolder="unet")``)::

    out_dir/unet/{config.json, diffusion_pytorch_model.safetensors}
    out_dir/scheduler/scheduler_config.json
    out_dir/gptfl_generator.json      provenance: trained on the public split, steps, seed, ...

It is written into a hidden temp directory next to ``out_dir`` and renamed, so a half-trained
directory never looks complete. What identifies a generator is its request's fingerprint
(gptfl_hpc/provenance.py: the train config, the seed, the content of the public split, the label
names and image shape), stored in gptfl_generator.json: a finished directory with the same
fingerprint is reused, any other existing directory is refused (never silently replaced).

Determinism and resumption: the initial weights come from a seed derived from ``seed``; every
batch index, label dropout, noise tensor and timestep comes from one CPU ``torch.Generator``.
The training state (weights, EMA, AdamW moments, OneCycle state, generator state, step) is saved
as one safetensors file ``.<out_dir name>.train-ckpt.safetensors`` next to ``out_dir`` every
``gen.train.checkpoint_every`` steps and when preempted, with the fingerprint; a rerun with
``resume`` continues it (a checkpoint of another request is refused). On CPU with the same torch
version the resumed run ends with bit-identical weights (tested).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc import fsio, signals
from gptfl_hpc.errors import DataError, ModelError, Preempted

log = logging.getLogger(__name__)

PROVENANCE = "gptfl_generator.json"
FORMAT = "gptfl-embedded-generator"
FORMAT_VERSION = 1
NUM_TRAIN_TIMESTEPS = 1000


def build_unet(train_cfg: Any, image_shape: tuple[int, int, int], num_classes: int) -> Any:
    """A fresh class-conditional UNet2DModel for (H, W, C) images and num_classes + 1 embeddings."""
    from diffusers import UNet2DModel

    h, w, c = (int(v) for v in image_shape)
    chans = [int(v) for v in train_cfg.block_out_channels]
    factor = 2 ** (len(chans) - 1)
    if h % factor or w % factor:
        raise ModelError(f"config key gen.train.block_out_channels: {len(chans)} levels halve "
                         f"the image {len(chans) - 1} times, but {h}x{w} is not divisible by "
                         f"{factor}; valid: fewer levels")
    return UNet2DModel(
        sample_size=h if h == w else (h, w), in_channels=c, out_channels=c,
        block_out_channels=tuple(chans), layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(chans), up_block_types=("UpBlock2D",) * len(chans),
        norm_num_groups=math.gcd(8, *chans), attention_head_dim=min(8, chans[-1]),
        num_class_embeds=num_classes + 1)


def _check_data(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"train_generator: images must be uint8 (N, H, W, C), got "
                        f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    if len(images) < 1 or labels.shape != (len(images),):
        raise DataError(f"train_generator: {len(images)} images and labels of shape "
                        f"{labels.shape}; valid: N >= 1 images with N labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"train_generator: labels span {labels.min()}..{labels.max()}; valid: "
                        f"0..{num_classes - 1}")


def resolved_seed(train_cfg: Any, seed: int) -> int:
    """The generator's training seed: gen.train.seed when set, else `seed` (run.seed)."""
    own = getattr(train_cfg, "seed", None)
    return int(seed if own is None else own)


def generator_request(train_cfg: Any, *, public_sha256: str, seed: int,
                      label_names: list[str] | None, image_shape: list[int]) -> Any:
    """The request that identifies an embedded generator: the generator stage's request
    (gptfl_hpc/provenance.py) for a config with these sections. The training seed enters
    resolved, as run.seed (gen.train.seed when set, else `seed`), so gen.train.seed=null with
    run.seed=N and gen.train.seed=N are the same request."""
    import dataclasses

    from gptfl_hpc import provenance
    from gptfl_hpc.config import Config, GenConfig, RunConfig

    seed = resolved_seed(train_cfg, seed)
    train_cfg = dataclasses.replace(train_cfg, seed=None)
    cfg = Config(run=RunConfig(seed=seed), gen=GenConfig(train=train_cfg))
    return provenance.request(
        "generator", cfg, inputs={"public_split": public_sha256},
        derived={"label_names": list(label_names) if label_names else None,
                 "image_shape": [int(v) for v in image_shape]})


def _info(train_cfg: Any, images: np.ndarray, num_classes: int, seed: int,
          label_names: list[str] | None) -> dict:
    import dataclasses

    train = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k != "checkpoint_every"}
    return {"train": train, "seed": int(seed), "num_classes": int(num_classes),
            "image_shape": list(images.shape[1:]), "num_train_images": len(images),
            "label_names": list(label_names) if label_names is not None else None}


def read_provenance(out_dir: str | Path) -> dict | None:
    """The generator's gptfl_generator.json, or None if there is none (not an embedded one)."""
    path = Path(out_dir) / PROVENANCE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not readable JSON ({e}); delete {out_dir} and retrain") from None


def checkpoint_path(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.train-ckpt.safetensors"


class _Trainer:
    """Model, EMA, optimizer, LR schedule and RNG; state <-> one safetensors file."""

    def __init__(self, train_cfg: Any, image_shape: tuple[int, int, int], num_classes: int,
                 seed: int, device: Any) -> None:
        import torch
        from diffusers import DDPMScheduler

        from gptfl_hpc.seeding import derive

        self.cfg = train_cfg
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive(seed, "gen.train.init"))
            self.unet = build_unet(train_cfg, image_shape, num_classes).to(self.device)
        self.unet.train()
        self.noise_sched = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                         beta_schedule="squaredcos_cap_v2")
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=train_cfg.lr)
        if train_cfg.steps >= 4:  # warm-up of 5 % (at least 2 steps, or OneCycle divides by 0)
            self.lrs: Any = torch.optim.lr_scheduler.OneCycleLR(
                self.opt, max_lr=train_cfg.lr, total_steps=train_cfg.steps,
                pct_start=max(0.05, 2.0 / train_cfg.steps))
        else:
            self.lrs = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda _: 1.0)
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(train_cfg.ema_decay))
        self.gen = torch.Generator("cpu").manual_seed(derive(seed, "gen.train.batches"))
        self.step = 0
        self.elapsed = 0.0
        self.null_class = num_classes

    def train_step(self, x0: Any, y0: Any) -> float:
        import torch
        import torch.nn.functional as F

        b, g, dev = self.cfg.batch_size, self.gen, self.device
        idx = torch.randint(0, len(x0), (b,), generator=g)
        drop = torch.rand(b, generator=g) < self.cfg.cond_dropout
        noise = torch.randn((b, *x0.shape[1:]), generator=g)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=g)
        x, y = x0[idx.to(dev)], y0[idx.to(dev)].clone()
        y[drop.to(dev)] = self.null_class
        noise, t = noise.to(dev), t.to(dev)
        pred = self.unet(self.noise_sched.add_noise(x, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.lrs.step()
        self.ema.update_parameters(self.unet)
        self.step += 1
        return float(loss.detach())

    # ---------------------------------------------------------------------------- checkpoint

    def save(self, path: Path, fingerprint: str) -> None:
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v
        tensors["rng"] = self.gen.get_state()
        meta = {"step": str(self.step), "elapsed": repr(self.elapsed),
                "fingerprint": fingerprint,
                "opt_groups": json.dumps(opt["param_groups"]),
                "lrs": json.dumps(self.lrs.state_dict())}
        fsio.save_safetensors(tensors, path, metadata=meta)

    def load(self, tensors: dict, meta: dict) -> None:
        import torch

        def pick(prefix: str) -> dict:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.unet.load_state_dict(pick("unet."))
        self.ema.load_state_dict(pick("ema."))
        state: dict[int, dict] = {}
        for k, v in pick("opt.").items():
            i, name = k.split(".", 1)
            state.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": json.loads(meta["opt_groups"])})
        self.lrs.load_state_dict(json.loads(meta["lrs"]))
        self.gen.set_state(tensors["rng"].to(torch.uint8))
        self.step = int(meta["step"])
        self.elapsed = float(meta["elapsed"])


def _load_checkpoint(path: Path, fingerprint: str, resume: bool) -> tuple[dict, dict] | None:
    from gptfl_hpc.errors import StaleOutputError

    if not path.is_file():
        return None
    try:
        tensors, meta = fsio.load_safetensors(path)
    except DataError as e:
        log.warning("ignoring unreadable training checkpoint: %s", e)
        return None
    if meta.get("fingerprint") != fingerprint:
        raise StaleOutputError(f"{path}: a generator-training checkpoint of another request; "
                               "rerun with the settings that made it, or delete it")
    if not resume:
        raise StaleOutputError(f"{path}: a partial generator training of this request (step "
                               f"{meta.get('step')}); rerun with --resume to continue it, or "
                               "delete it")
    return tensors, meta


def train_generator(train_cfg: Any, images: np.ndarray, labels: np.ndarray, num_classes: int,
                    out_dir: str | Path, seed: int, device: Any = "cpu", *,
                    label_names: list[str] | None = None, fingerprint: str | None = None,
                    resume: bool = True) -> Path:
    """Train the embedded generator on the public split and save it into `out_dir`.

    `images`: uint8 (N, H, W, C); `labels`: ints in [0, num_classes). `label_names` (optional) is
    recorded so that synthesis can check that the task's classes are the generator's. `seed`:
    run.seed (``train_cfg.seed``, gen.train.seed, takes its place when set). `fingerprint`:
    the request's (the pipeline passes its stage's); None builds it with
    :func:`generator_request`. `resume`: continue a checkpoint of this request (else refused).
    Returns `out_dir`. Raises Preempted (after saving a checkpoint) on
    SIGUSR1/SIGTERM/GPTFL_STOP_AFTER.
    """
    import torch

    from gptfl_hpc.data.shards import content_sha256
    from gptfl_hpc.errors import StaleOutputError

    signals.install()
    seed = resolved_seed(train_cfg, seed)
    out_dir = Path(out_dir)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    _check_data(images, labels, num_classes)
    info = _info(train_cfg, images, num_classes, seed, label_names)
    if fingerprint is None:
        fingerprint = generator_request(
            train_cfg, public_sha256=content_sha256(images, labels), seed=seed,
            label_names=label_names, image_shape=list(images.shape[1:])).fingerprint
    if out_dir.exists():
        prov = read_provenance(out_dir)
        if prov is not None and prov.get("fingerprint") == fingerprint:
            log.info("generator %s is already trained for this request (%d steps, seed %d); "
                     "reusing it", out_dir, train_cfg.steps, seed)
            return out_dir
        raise StaleOutputError(f"generator directory {out_dir} exists but holds "
                               f"{'another request' if prov else 'no ' + PROVENANCE}; delete it "
                               "or choose another directory")

    tr = _Trainer(train_cfg, tuple(images.shape[1:]), num_classes, seed, device)
    ckpt = checkpoint_path(out_dir)
    loaded = _load_checkpoint(ckpt, fingerprint, resume)
    if loaded is not None:
        tr.load(*loaded)
        log.info("resuming generator training from %s at step %d/%d", ckpt, tr.step,
                 train_cfg.steps)
    n_params = sum(p.numel() for p in tr.unet.parameters())
    x0 = (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5
          - 1.0).to(tr.device)
    y0 = torch.from_numpy(labels).to(tr.device)
    if tr.step == 0:
        log.info("training the embedded generator: %d images %s, %d classes (+ null), %s "
                 "parameters, %d steps at batch %d on %s", len(images), tuple(images.shape[1:]),
                 num_classes, f"{n_params:,}", train_cfg.steps, train_cfg.batch_size, tr.device)
    start_step = tr.step
    last_loss = _train_loop(tr, x0, y0, train_cfg, ckpt, fingerprint)

    _finalise(tr, out_dir, {**info, "fingerprint": fingerprint}, {
        "trained_on": "public split", "steps": train_cfg.steps, "seed": int(seed),
        "wall_s": round(tr.elapsed, 2), "params": int(n_params), "final_loss": last_loss,
        "resumed_from_step": start_step or None, "device": str(tr.device),
        "null_class": int(num_classes)})
    with contextlib.suppress(FileNotFoundError):
        ckpt.unlink()
    log.info("generator saved to %s (%d steps, %.0f s, %s parameters)", out_dir, train_cfg.steps,
             tr.elapsed, f"{n_params:,}")
    return out_dir


def _train_loop(tr: _Trainer, x0: Any, y0: Any, train_cfg: Any, ckpt: Path,
                fingerprint: str) -> float:
    """Steps until train_cfg.steps: progress lines, periodic checkpoints, and a checkpoint plus
    Preempted at a stop request. Returns the last step's loss."""
    every = max(1, train_cfg.steps // 10)
    t_start = t_win = time.perf_counter()
    loss_win, n_win = 0.0, 0
    last_loss = float("nan")
    while tr.step < train_cfg.steps:
        last_loss = tr.train_step(x0, y0)
        loss_win += last_loss
        n_win += 1
        now = time.perf_counter()
        if tr.step % every == 0 or tr.step == train_cfg.steps:
            rate = n_win / max(now - t_win, 1e-9)
            log.info("generator step %d/%d loss %.4f  %.1f steps/s  ETA %.0f s", tr.step,
                     train_cfg.steps, loss_win / n_win, rate, (train_cfg.steps - tr.step) / rate)
            t_win, loss_win, n_win = now, 0.0, 0
        if tr.step == train_cfg.steps:
            break
        stop = signals.boundary()
        if stop or (train_cfg.checkpoint_every and tr.step % train_cfg.checkpoint_every == 0):
            tr.elapsed += now - t_start
            t_start = now
            tr.save(ckpt, fingerprint)
            if stop:
                raise Preempted(f"generator training stopped by {signals.reason()} at step "
                                f"{tr.step}/{train_cfg.steps}; checkpoint {ckpt}; rerun with "
                                "--resume to continue")
    tr.elapsed += time.perf_counter() - t_start
    return last_loss


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finalise(tr: _Trainer, out_dir: Path, ident: dict, info: dict) -> None:
    import diffusers
    import torch

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tr.ema.module.save_pretrained(str(tmp / "unet"))
        tr.noise_sched.save_pretrained(str(tmp / "scheduler"))
        prov = {"format": FORMAT, "format_version": FORMAT_VERSION, **info, **ident,
                "torch": str(torch.__version__), "diffusers": str(diffusers.__version__),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        fsio.write_json(tmp / PROVENANCE, prov)
        mode = 0o666 & ~_umask()  # mkstemp / save_pretrained leave some files 0600
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, mode)
        os.replace(tmp, out_dir)  # out_dir does not exist (checked at the start)
        fsio._fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
