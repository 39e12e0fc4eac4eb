"""Server pretraining on the synthetic set (GPT-FL step 3), data-parallel with accelerate.

The model that FL starts from is trained here on the labelled synthetic HDF5. Design:

- **Data path on the device.** Comm rank 0 reads and checks the synthetic set once and broadcasts
  it over MPI (one reader on the file system); every process puts the whole uint8 array on its
  device. Each epoch draws one permutation from a generator seeded by ``(seed, epoch)``; global
  batch ``i`` is ``perm[i*B:(i+1)*B]`` and process ``r`` of ``P`` takes the contiguous slice
  ``[r*B//P, (r+1)*B//P)`` of it. The global batch is therefore ``pretrain.batch_size`` at any
  process count. Each process's loss is its summed cross-entropy times P/B, so DDP's gradient
  average is exactly the mean gradient over the global batch, even for uneven slices. The
  incomplete last global batch of an epoch is dropped (a different tail each epoch).
- **Augmentation independent of the process count.** The random shifts/flips of global batch i
  are drawn for the whole global batch from a generator seeded by ``(seed, epoch, i)`` and each
  process applies its slice, so 1 and N processes see the same augmented images; they differ
  only in DDP's float summation order. Normalisation and augmentation go through the same
  transform the FL clients use (manifest mean/std; no ImageNet statistics).
- **GPU:** ``pretrain.mixed_precision`` auto = bf16 autocast where the GPU supports bf16 (fp16
  with loss scaling otherwise), channels_last. The per-epoch test metrics are computed in fp32 on
  rank 0 with a copy of the weights, so they equal what the FL engine measures from
  ``pretrained.safetensors`` with the same ``evaluate()``.
- **Everything derives from (seed, epoch, step)**, so a checkpoint needs no RNG state: resuming
  with the same process count on CPU gives bitwise the same final weights.
- **Checkpoint every epoch** to ``out/pretrain_ckpt/``: model and flattened optimizer tensors as
  safetensors, then ``state.json`` (epoch, request fingerprint, optimizer structure, scheduler
  state, history) written last as the commit marker. No pickle anywhere. A checkpoint of another
  request is refused; one of this request is continued only with ``resume`` (``--resume``).
- **Outputs:** ``out/pretrained.safetensors`` (``model.state_dict()`` keys exactly, loadable into
  ``build_model(model_cfg, input_shape, num_classes)``, the fingerprint in its metadata) and
  ``out/pretrained.json``. Whether a finished output is reused is decided by the stage
  (gptfl_hpc/pipeline.py, gptfl_hpc/provenance.py), not here.

Checkpoints live in ``out_dir``, which every process must see (a shared file system on HPC).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptfl_hpc import faults, signals
from gptfl_hpc.config import ModelConfig, PretrainConfig
from gptfl_hpc.errors import ConfigError, DataError, Preempted, StaleOutputError
from gptfl_hpc.fsio import load_safetensors, save_safetensors, write_json
from gptfl_hpc.parallel.comm import on_root
from gptfl_hpc.seeding import derive

log = logging.getLogger(__name__)

CKPT_DIR = "pretrain_ckpt"
WEIGHTS_NAME = "pretrained.safetensors"
INFO_NAME = "pretrained.json"
FORMAT_VERSION = 2
EVAL_BATCH_SIZE = 512


# ------------------------------------------------------------------------------------ helpers


def _shape(shape: Any) -> str:
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


SAMPLE_DATASETS = {"image": ("images", "uint8"), "audio": ("audio", "int16")}
"""Dataset kind -> (the synthetic set's sample dataset, its dtype) (gen/base.py Task)."""


def _load_synthetic(path: Path, kind: str, input_shape: tuple, num_classes: int,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the synthetic set; one-line DataErrors that name the file."""
    from gptfl_hpc.data.shards import read_arrays, read_attrs

    if not path.is_file():
        raise DataError(f"synthetic set {path}: not found; run `gptfl-hpc synthesize` first "
                        "(or pass --synthetic FILE)")
    split = read_attrs(path).get("split")
    if split in ("test", "client", "public"):
        raise DataError(f"synthetic set {path}: is a prepared {split} shard of real data, not "
                        "a synthetic set; valid: the output of `gptfl-hpc synthesize`")
    name, dtype = SAMPLE_DATASETS[kind]
    arrays = read_arrays(path, [name, "labels"])
    images, labels = arrays[name], arrays["labels"]
    if images.dtype != np.dtype(dtype) or images.ndim != 1 + len(input_shape):
        raise DataError(f"synthetic set {path}: {name} must be {dtype} with "
                        f"{1 + len(input_shape)} dimensions, got {images.dtype} "
                        f"{_shape(images.shape)}")
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise DataError(f"synthetic set {path}: samples have shape "
                        f"{_shape(images.shape[1:])} but the dataset manifest expects "
                        f"{_shape(input_shape)}; synthesise at the task's resolution")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(
            images):
        raise DataError(f"synthetic set {path}: labels must be 1-d integers, one per sample; "
                        f"got {labels.dtype} {_shape(labels.shape)} for {len(images)} samples")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"synthetic set {path}: labels out of range [0, {num_classes}): found "
                        f"min {int(labels.min())}, max {int(labels.max())}")
    if len(labels) < batch_size:
        raise DataError(f"synthetic set {path}: {len(labels)} samples, fewer than "
                        f"pretrain.batch_size={batch_size}; lower the batch size or synthesise "
                        "more")
    return np.ascontiguousarray(images), labels.astype(np.int64, copy=False)


def _resolve_precision(mixed_precision: str, use_cuda: bool) -> str:
    """auto: bf16 on GPUs that support it (Ampere and later), fp16 on older ones (V100, T4),
    none on CPU. An explicit bf16 on a GPU without bf16 is a one-line error."""
    bf16_ok = use_cuda and torch.cuda.is_bf16_supported()
    if mixed_precision == "auto":
        return ("bf16" if bf16_ok else "fp16") if use_cuda else "no"
    if mixed_precision == "fp16" and not use_cuda:
        raise ConfigError("config key pretrain.mixed_precision: 'fp16' needs a GPU; valid on "
                          "CPU: auto, no, bf16")
    if mixed_precision == "bf16" and use_cuda and not bf16_ok:
        raise ConfigError("config key pretrain.mixed_precision: this GPU has no bf16 support; "
                          "valid: auto, no, fp16")
    return mixed_precision


def _optimizer(cfg: PretrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(schedule: str, total_steps: int) -> Any:
    """Multiplier of the base lr after `step` optimiser steps: cosine from 1 to 0, or constant."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer ``state_dict()`` -> (tensors for safetensors, JSON structure). No pickle."""
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, Any] = {}
    for pid, entry in state_dict["state"].items():
        fields = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                key = f"state.{pid}.{name}"
                tensors[key] = value
                fields[name] = {"tensor": key}
            else:
                fields[name] = {"value": value}
        structure[str(pid)] = fields
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in state_dict["param_groups"]]
    return tensors, {"state": structure, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state = {}
    for pid, fields in structure["state"].items():
        state[int(pid)] = {name: tensors[f["tensor"]] if "tensor" in f else f["value"]
                           for name, f in fields.items()}
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


def _leaks_test(images: np.ndarray, test_x: np.ndarray) -> int:
    """How many synthetic samples are byte-identical to a test image (test leakage)."""
    import hashlib

    def rows(a: np.ndarray) -> set[bytes]:
        flat = np.ascontiguousarray(a).reshape(len(a), -1)
        return {hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in flat}

    test = rows(test_x)
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return sum(1 for r in flat if hashlib.blake2b(r.tobytes(), digest_size=16).digest() in test)


# ------------------------------------------------------------------------------ checkpointing


def _save_checkpoint(ckpt: Path, epoch: int, model: torch.nn.Module, opt: Any, sched: Any,
                     fingerprint: str, history: list) -> None:
    """Tensors first, then state.json (the commit marker), then drop older epochs' files."""
    model_file, optim_file = f"model-e{epoch:05d}.safetensors", f"optim-e{epoch:05d}.safetensors"
    save_safetensors(model.state_dict(), ckpt / model_file)
    tensors, structure = flatten_optimizer_state(opt.state_dict())
    save_safetensors(tensors, ckpt / optim_file)
    write_json(ckpt / "state.json", {
        "format_version": FORMAT_VERSION, "epoch": epoch, "fingerprint": fingerprint,
        "model_file": model_file, "optim_file": optim_file, "optimizer": structure,
        "scheduler": sched.state_dict(), "history": history})
    for p in ckpt.glob("*-e*.safetensors"):
        if p.name not in (model_file, optim_file):
            p.unlink(missing_ok=True)


def _find_checkpoint(ckpt: Path, fingerprint: str, resume: bool) -> dict | None:
    """The checkpoint to continue, None to start; refuse another request's or a torn one's."""
    path = ckpt / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not all((ckpt / state[k]).is_file()
                                                  for k in ("model_file", "optim_file")):
            raise ValueError("incomplete")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("pretrain: ignoring unreadable checkpoint %s (%s)", path, e)
        return None
    if state.get("fingerprint") != fingerprint:
        raise StaleOutputError(f"{ckpt} holds a pretraining checkpoint of another request; use "
                               "a new --out, or rerun with the settings that made it")
    if not resume:
        raise StaleOutputError(f"{ckpt} holds a partial pretraining of this request (epoch "
                               f"{state.get('epoch')}); rerun with --resume to continue it, or "
                               "use a new --out")
    return state


# ----------------------------------------------------------------------------------- training


class _Trainer:
    """Model, optimiser, schedule and the device-resident data; one epoch at a time."""

    def __init__(self, cfg: PretrainConfig, acc: Any, model: torch.nn.Module,
                 images: np.ndarray, labels: np.ndarray, transform: Any, seed: int,
                 P: int, state: dict | None, ckpt: Path) -> None:
        self.cfg, self.acc, self.seed, self.P = cfg, acc, seed, P
        dev = self.dev = acc.device
        self.channels_last = cfg.channels_last and dev.type == "cuda"
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # restored by numerics.training_kernels
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(dev, memory_format=fmt)
        self.N = len(labels)
        self.B = cfg.batch_size
        self.bounds = [r * self.B // P for r in range(P + 1)]
        self.steps_per_epoch = self.N // self.B
        total = self.steps_per_epoch * cfg.epochs
        self.opt = _optimizer(cfg, self.model)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg.schedule, total))
        if state is not None:
            self.model.load_state_dict(load_safetensors(ckpt / state["model_file"])[0])
            opt_tensors, _ = load_safetensors(ckpt / state["optim_file"])
            self.opt.load_state_dict(unflatten_optimizer_state(opt_tensors, state["optimizer"]))
            self.sched.load_state_dict(state["scheduler"])
        self.ddp, self.opt = acc.prepare(self.model, self.opt)
        self.x = torch.from_numpy(images).to(dev)
        self.y = torch.from_numpy(labels).to(dev)
        self.tf = transform

    def train_epoch(self, epoch: int) -> float:
        """One epoch; returns the mean training loss (averaged over all processes)."""
        B, P, acc = self.B, self.P, self.acc
        r0, r1 = self.bounds[acc.process_index], self.bounds[acc.process_index + 1]
        perm = torch.randperm(self.N, generator=torch.Generator().manual_seed(
            derive(self.seed, "pretrain.shuffle", epoch))).to(self.dev)
        self.ddp.train()
        scale = P / B
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.dev)
        devices = [self.dev.index or 0] if self.dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for step in range(self.steps_per_epoch):
                # dropout draws from torch's global RNG: one stream per (epoch, step, process),
                # so a resumed run draws the same masks (they do depend on the process count)
                torch.manual_seed(derive(self.seed, "pretrain.dropout", epoch, step,
                                         acc.process_index))
                loss_sum += self._step(perm, epoch, step, r0, r1, scale)
        return float(loss_sum.item())

    def _step(self, perm: torch.Tensor, epoch: int, step: int, r0: int, r1: int,
              scale: float) -> torch.Tensor:
        B, acc = self.B, self.acc
        idx = perm[step * B:(step + 1) * B]
        g = torch.Generator().manual_seed(derive(self.seed, "pretrain.augment", epoch, step))
        # augmentation drawn for the whole global batch, each process applies its slice
        x = self.tf(self.x[idx], g)[r0:r1] if self.tf.augment else \
            self.tf(self.x[idx[r0:r1]], None)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(self.ddp(x), self.y[idx[r0:r1]], reduction="sum") * scale
        self.opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        self.opt.step()
        if not self.opt.step_was_skipped:
            self.sched.step()
        return loss.detach().float()


def pretrain(cfg: PretrainConfig, *, model_cfg: ModelConfig, run_cfg: Any,
             synthetic_path: str | Path, data_dir: str | Path, out_dir: str | Path,
             augment: bool, manifest: Any = None, fingerprint: str = "", resume: bool = False,
             comm: Any = None) -> dict:
    """Train ``build_model(model_cfg, ...)`` on the synthetic set with DDP over the ranks of `comm`.

    Args:
        cfg: the ``pretrain`` config section; model_cfg: the ``model`` section; run_cfg: the
            ``run`` section (seed, device, cpu_kernels).
        synthetic_path: HDF5 with ``images`` uint8 (N,H,W,C) and ``labels`` int (N,).
        data_dir: prepared data directory; its manifest gives shape, classes and normalisation,
            and its test split the per-epoch metrics (the server never reads client shards).
        out_dir: where ``pretrained.safetensors``, ``pretrained.json`` and the checkpoint go.
        augment: training augmentation (the FL setting ``fl.augment``, so both phases match).
        fingerprint: the stage's request fingerprint (checkpoints and outputs carry it).
        resume: continue a checkpoint of this request (else one is refused).
        comm: the processes taking part; None = the world.

    Returns:
        The ``pretrained.json`` dict, on every process.
    """
    from gptfl_hpc.data.manifest import Manifest
    from gptfl_hpc.numerics import training_kernels
    from gptfl_hpc.parallel.accel import accelerator, want_cuda
    from gptfl_hpc.parallel.comm import get_comm
    from gptfl_hpc.train.evaluate import evaluate
    from gptfl_hpc.train.models import build_model, num_parameters
    from gptfl_hpc.train.transforms import make_transform

    t_start = time.perf_counter()
    comm = comm if comm is not None else get_comm()
    signals.install()
    faults.point("pretrain", comm.rank)
    out, seed = Path(out_dir), run_cfg.seed
    syn_path = Path(synthetic_path).resolve()
    P = comm.size
    if cfg.batch_size < P:
        raise ConfigError(f"config key pretrain.batch_size: {cfg.batch_size} is smaller than the "
                          f"{P} pretraining processes (run.server_processes); valid: >= {P}")
    use_cuda = want_cuda(run_cfg.device)
    mixed = _resolve_precision(cfg.mixed_precision, use_cuda)

    # Step 1: rank 0 reads the manifest, the synthetic set and the test split and checks them;
    # errors reach every rank as the same one-line error
    cache: dict[str, Any] = {}

    def inspect() -> dict:
        m = manifest or Manifest.load(data_dir)
        if m.kind not in SAMPLE_DATASETS:
            raise DataError(f"dataset in {data_dir}: pretraining needs images or audio, the "
                            f"manifest says kind={m.kind} {_shape(m.input_shape)}")
        images, labels = _load_synthetic(syn_path, m.kind, tuple(m.input_shape),
                                         m.num_classes, cfg.batch_size)
        test_x, test_y = m.read_test(data_dir)
        leaked = _leaks_test(images, test_x)
        if leaked:
            raise DataError(f"synthetic set {syn_path}: {leaked} sample(s) are identical to "
                            "images of the test split (test leakage); valid: a synthetic set "
                            "made by a generator, never the real test data")
        cache.update(images=images, labels=labels, test_x=test_x, test_y=test_y)
        return {"manifest": m.to_dict(), "num_samples": len(labels)}

    head = on_root(comm, inspect)
    m = manifest or Manifest.from_dict(head["manifest"])
    N = int(head["num_samples"])
    shape = tuple(int(s) for s in m.input_shape)
    if comm.rank == 0:
        images, labels = cache.pop("images"), cache.pop("labels")
    else:
        images, labels = np.empty((N, *shape), np.uint8), np.empty(N, np.int64)
    if P > 1:
        comm.bcast_(images)
        comm.bcast_(labels)

    # Step 2: model, optimiser, schedule; resume from the checkpoint when it matches
    ckpt = out / CKPT_DIR
    state = on_root(comm, lambda: _find_checkpoint(ckpt, fingerprint, resume))
    train_tf = make_transform(m.kind, m.norm_mean, m.norm_std, shape, augment)
    eval_tf = make_transform(m.kind, m.norm_mean, m.norm_std, shape, False)
    model_shape = tuple(train_tf.output_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, "pretrain.init"))
        model = build_model(model_cfg, model_shape, m.num_classes)
        eval_model = build_model(model_cfg, model_shape, m.num_classes) \
            if comm.rank == 0 else None
    backbone = None
    if cfg.init and state is None:
        from gptfl_hpc.train.models import load_pretrained_backbone

        backbone = load_pretrained_backbone(model, cfg.init)
        if comm.rank == 0:
            log.info("pretrain: backbone %s: %s", cfg.init, backbone.summary())
    history: list[dict] = list(state["history"]) if state else []
    start_epoch = int(state["epoch"]) if state else 0
    device_type = "cuda" if use_cuda else "cpu"
    with training_kernels(run_cfg.cpu_kernels, device_type), \
            accelerator(comm, device=run_cfg.device, mixed_precision=mixed,
                        rendezvous=run_cfg.rendezvous) as acc:
        tr = _Trainer(cfg, acc, model, images, labels, train_tf, seed, P, state, ckpt)
        del images, labels
        dev = tr.dev
        test = None
        if comm.rank == 0:
            eval_model.to(dev)  # type: ignore[union-attr]
            test = (torch.from_numpy(cache.pop("test_x")).to(dev),
                    torch.from_numpy(cache.pop("test_y")).to(dev))
        if start_epoch:
            log.info("pretrain: resuming after epoch %d/%d from %s", start_epoch, cfg.epochs,
                     ckpt)
        elif comm.rank == 0:
            log.info("pretrain: %s (%d parameters) on %d synthetic samples from %s; %d epochs x "
                     "%d steps, global batch %d (%s per process), %s, %s, mixed precision %s, "
                     "%d torch thread(s) per process", model_cfg.name, num_parameters(model), N,
                     syn_path, cfg.epochs, tr.steps_per_epoch, cfg.batch_size,
                     "+".join(str(b - a) for a, b in zip(tr.bounds, tr.bounds[1:])),
                     cfg.optimizer, cfg.schedule, mixed, torch.get_num_threads())
        # DDP warns once when a conv weight with one input channel gets its gradient in another
        # (equivalent) stride layout than its bucket; harmless, and it would only spam the logs.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")

        # Step 3: epochs; then rank 0 evaluates on the real test set, logs and checkpoints
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            loss = tr.train_epoch(epoch)
            mean_loss = comm.allreduce_sum_(np.array([loss], np.float64))[0] / (
                P * tr.steps_per_epoch)
            train_s = time.perf_counter() - t0
            if comm.rank == 0:
                assert eval_model is not None and test is not None
                eval_model.load_state_dict(tr.model.state_dict())
                metrics = evaluate(eval_model, test[0], test[1], eval_tf, EVAL_BATCH_SIZE, dev,
                                   m.num_classes)
                rate = tr.steps_per_epoch * cfg.batch_size / train_s
                history.append({"epoch": epoch + 1, "loss": mean_loss,
                                "lr": tr.sched.get_last_lr()[0],
                                "test_accuracy": metrics["accuracy"],
                                "test_macro_f1": metrics["macro_f1"],
                                "test_loss": metrics["loss"], "train_seconds": train_s,
                                "images_per_second": rate, "num_processes": P})
                log.info("pretrain epoch %d/%d: loss %.4f, test acc %.4f, macro-F1 %.4f, "
                         "%.0f img/s (%d process%s, %s)", epoch + 1, cfg.epochs, mean_loss,
                         metrics["accuracy"], metrics["macro_f1"], rate, P,
                         "es" if P > 1 else "", dev.type)
                _save_checkpoint(ckpt, epoch + 1, tr.model, tr.opt, tr.sched, fingerprint,
                                 history)
            # every rank marks the boundary; the max-reduce makes them agree (and waits for
            # rank 0's checkpoint before anyone goes on)
            stop = signals.boundary()
            stop = bool(comm.allreduce_max_(np.array([int(stop)], np.int32))[0])
            if stop and epoch + 1 < cfg.epochs:
                raise Preempted(f"pretraining stopped after epoch {epoch + 1}/{cfg.epochs} "
                                f"({signals.reason()}); checkpoint saved in {ckpt}; rerun with "
                                "--resume to continue")
        final_state = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
        n_params = num_parameters(tr.model)
        steps_per_epoch = tr.steps_per_epoch
        test_n = int(len(test[1])) if test is not None else 0

    # Step 4: rank 0 writes the weights, then pretrained.json
    def finish() -> dict:
        last = history[-1]
        train_s = sum(h["train_seconds"] for h in history)
        images_seen = len(history) * steps_per_epoch * cfg.batch_size
        save_safetensors(final_state, out / WEIGHTS_NAME,
                         metadata={"format": "gptfl-pretrained", "fingerprint": fingerprint,
                                   "model": json.dumps(dataclasses.asdict(model_cfg)),
                                   "input_shape": json.dumps(list(shape)),
                                   "num_classes": str(m.num_classes)})
        info = {
            "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
            "model": dataclasses.asdict(model_cfg), "num_parameters": n_params,
            "input_shape": list(shape), "num_classes": m.num_classes,
            "label_names": list(m.label_names), "norm_mean": list(m.norm_mean),
            "norm_std": list(m.norm_std), "augment": bool(augment), "seed": int(seed),
            "pretrain": dataclasses.asdict(cfg), "epochs": cfg.epochs,
            "init": ({"path": cfg.init, "summary": backbone.summary()} if backbone is not None
                     else ({"path": cfg.init, "summary": "resumed from a checkpoint"}
                           if cfg.init else "random")),
            "steps": steps_per_epoch * cfg.epochs, "global_batch_size": cfg.batch_size,
            "per_process_batch_sizes": [b - a for a, b in zip(tr.bounds, tr.bounds[1:])],
            "num_processes": P, "device": device_type, "mixed_precision": mixed,
            "synthetic": {"path": str(syn_path), "num_samples": N},
            "data_dir": str(Path(data_dir).resolve()),
            "test": {"accuracy": last["test_accuracy"], "macro_f1": last["test_macro_f1"],
                     "loss": last["test_loss"], "num_samples": test_n},
            # the same three flat, as report.py and the FL history name them
            "test_accuracy": last["test_accuracy"], "test_macro_f1": last["test_macro_f1"],
            "test_loss": last["test_loss"],
            "wall_seconds": time.perf_counter() - t_start, "train_seconds": train_s,
            "images_per_second": images_seen / train_s if train_s > 0 else None,
            "history": history,
        }
        write_json(out / INFO_NAME, info)
        shutil.rmtree(ckpt, ignore_errors=True)
        log.info("pretrain: done; synthetic-only test accuracy %.4f, macro-F1 %.4f -> %s",
                 last["test_accuracy"], last["test_macro_f1"], out / WEIGHTS_NAME)
        return info

    return on_root(comm, finish)
