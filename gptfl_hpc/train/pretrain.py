"""Server pretraining on the synthetic set (GPT-FL step 3), data-parallel with accelerate.

The model that FL starts from is trained here on the labelled synthetic HDF5. Design:

- **Data path on the device.** Comm rank 0 reads and checks the synthetic set once and broadcasts
  it over MPI (one reader on the file system); every process puts the whole uint8 array on its
  device (32x32x3 x 150k = 460 MB). Each epoch draws one permutation from a generator seeded by
  ``(seed, epoch)``; global batch ``i`` is ``perm[i*B:(i+1)*B]`` and process ``r`` of ``P`` takes
  the contiguous slice ``[r*B//P, (r+1)*B//P)`` of it. The global batch is therefore
  ``pretrain.batch_size`` at any process count (per-process batch = batch_size / P, differing by
  one sample when P does not divide it). Each process's loss is its summed cross-entropy times
  P/B, so DDP's gradient average is exactly the mean gradient over the global batch, even for
  uneven slices. The incomplete last global batch of an epoch is dropped (a different tail each
  epoch). Augmentation and normalisation run batched on the device through the same
  :class:`ImageTransform` the FL clients use (manifest mean/std; no ImageNet statistics), drawing
  from a CPU generator seeded by ``(seed, epoch, rank)`` (so augmented runs depend on the
  process count; without augmentation 1 and N processes agree up to float rounding).
- **GPU:** ``pretrain.mixed_precision`` auto = bf16 autocast (accelerate), channels_last. The
  per-epoch test metrics are computed in fp32 on rank 0 with a copy of the weights, so they equal
  what the FL engine measures from ``pretrained.safetensors`` with the same ``evaluate()``.
- **Everything derives from (seed, epoch)**, so a checkpoint needs no RNG state: resuming with the
  same process count on CPU gives bitwise the same final weights as an uninterrupted run.
- **Checkpoint every epoch** to ``out/pretrain_ckpt/``: model and flattened optimizer tensors as
  safetensors, then ``state.json`` (epoch, optimizer structure, scheduler state, history) written
  last as the commit marker. No pickle anywhere. ``signals.boundary()`` after each save; a stop
  request (agreed across the processes) raises :class:`Preempted`.
- **Outputs:** ``out/pretrained.safetensors`` (``model.state_dict()`` keys exactly, loadable into
  ``build_model(model_cfg, input_shape, num_classes)``) and ``out/pretrained.json``, written last.
  A complete ``pretrained.json`` for the same request makes a rerun a no-op.

Checkpoints live in ``out_dir``, which every process must see (a shared file system on HPC).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptfl_hpc import errors, signals
from gptfl_hpc.config import ModelConfig, PretrainConfig
from gptfl_hpc.errors import ConfigError, DataError, GptflError, Preempted
from gptfl_hpc.fsio import load_safetensors, save_safetensors, write_json
from gptfl_hpc.seeding import derive

log = logging.getLogger(__name__)

CKPT_DIR = "pretrain_ckpt"
WEIGHTS_NAME = "pretrained.safetensors"
INFO_NAME = "pretrained.json"
FORMAT_VERSION = 1
EVAL_BATCH_SIZE = 512


# ------------------------------------------------------------------------------------ helpers


def _on_root(comm: Any, fn: Any) -> Any:
    """Run `fn()` on comm rank 0 and broadcast its JSON result; a GptflError there is re-raised
    (same class, same message) on every rank, so no rank is left waiting in a collective."""
    payload = None
    if comm.rank == 0:
        try:
            payload = {"ok": fn()}
        except GptflError as e:
            payload = {"error": str(e), "type": type(e).__name__}
    if comm.size > 1:
        payload = comm.bcast_json(payload)
    if "error" in payload:
        raise getattr(errors, payload["type"], GptflError)(payload["error"])
    return payload["ok"]


def _shape(shape: Any) -> str:
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def _load_synthetic(path: Path, input_shape: tuple, num_classes: int, batch_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the synthetic set; one-line DataErrors that name the file."""
    from gptfl_hpc.data.shards import read_arrays

    if not path.is_file():
        raise DataError(f"synthetic set {path}: not found; run `gptfl-hpc synthesize` first "
                        "(or pass --synthetic FILE)")
    arrays = read_arrays(path, ["images", "labels"])
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"synthetic set {path}: images must be uint8 (N,H,W,C), got "
                        f"{images.dtype} {_shape(images.shape)}")
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise DataError(f"synthetic set {path}: images have shape (H,W,C)="
                        f"{_shape(images.shape[1:])} but the dataset manifest expects "
                        f"{_shape(input_shape)}; synthesise at the task's resolution")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(
            images):
        raise DataError(f"synthetic set {path}: labels must be 1-d integers, one per image; got "
                        f"{labels.dtype} {_shape(labels.shape)} for {len(images)} images")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"synthetic set {path}: labels out of range [0, {num_classes}): found "
                        f"min {int(labels.min())}, max {int(labels.max())}")
    if len(labels) < batch_size:
        raise DataError(f"synthetic set {path}: {len(labels)} samples, fewer than "
                        f"pretrain.batch_size={batch_size}; lower the batch size or synthesise "
                        "more")
    return np.ascontiguousarray(images), labels.astype(np.int64, copy=False)


def _resolve_precision(mixed_precision: str, use_cuda: bool) -> str:
    if mixed_precision == "auto":
        return "bf16" if use_cuda else "no"
    if mixed_precision == "fp16" and not use_cuda:
        raise ConfigError("config key pretrain.mixed_precision: 'fp16' needs a GPU; valid on "
                          "CPU: auto, no, bf16")
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


# ------------------------------------------------------------------------------ checkpointing


def _save_checkpoint(ckpt: Path, epoch: int, model: torch.nn.Module, opt: Any, sched: Any,
                     request: dict, history: list) -> None:
    """Tensors first, then state.json (the commit marker), then drop older epochs' files."""
    model_file, optim_file = f"model-e{epoch:05d}.safetensors", f"optim-e{epoch:05d}.safetensors"
    save_safetensors(model.state_dict(), ckpt / model_file)
    tensors, structure = flatten_optimizer_state(opt.state_dict())
    save_safetensors(tensors, ckpt / optim_file)
    write_json(ckpt / "state.json", {
        "format_version": FORMAT_VERSION, "epoch": epoch, "request": request,
        "model_file": model_file, "optim_file": optim_file, "optimizer": structure,
        "scheduler": sched.state_dict(), "history": history})
    for p in ckpt.glob("*-e*.safetensors"):
        if p.name not in (model_file, optim_file):
            p.unlink(missing_ok=True)


def _find_checkpoint(ckpt: Path, request: dict) -> dict | None:
    path = ckpt / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("pretrain: ignoring unreadable checkpoint %s (%s)", path, e)
        return None
    if state.get("format_version") != FORMAT_VERSION or state.get("request") != request:
        old = state.get("request") or {}
        diff = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
        log.warning("pretrain: checkpoint %s is for another request (differs in: %s); starting "
                    "from scratch", path, ", ".join(diff) or "format")
        return None
    return state


def _request(cfg: PretrainConfig, model_cfg: ModelConfig, manifest: Any, syn_sha: str,
             num_samples: int, seed: int, augment: bool) -> dict:
    """What determines the result: a finished run or checkpoint is reused only if this matches.
    The process count is not part of it (the global batch is the same at any count)."""
    pre = dataclasses.asdict(cfg)
    return {"pretrain": pre, "model": dataclasses.asdict(model_cfg), "seed": int(seed),
            "augment": bool(augment),
            "synthetic": {"sha256": syn_sha, "num_samples": int(num_samples)},
            "data": {"config_hash": manifest.config_hash, "test_sha256": manifest.test.sha256,
                     "norm_mean": list(manifest.norm_mean), "norm_std": list(manifest.norm_std)}}


def _finished(out: Path, request: dict) -> dict | None:
    info_path, weights = out / INFO_NAME, out / WEIGHTS_NAME
    if not (info_path.is_file() and weights.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("complete") is True and info.get("request") == request:
        return info
    return None


# ----------------------------------------------------------------------------------- training


def pretrain(cfg: PretrainConfig, *, model_cfg: ModelConfig, synthetic_path: str | Path,
             data_dir: str | Path, out_dir: str | Path, seed: int, augment: bool,
             device: str = "auto", comm: Any = None) -> dict:
    """Train ``build_model(model_cfg, ...)`` on the synthetic set with DDP over the ranks of `comm`.

    Args:
        cfg: the ``pretrain`` config section.
        model_cfg: the ``model`` section (architecture of the FL model).
        synthetic_path: HDF5 with ``images`` uint8 (N,H,W,C) and ``labels`` int (N,).
        data_dir: prepared data directory; its manifest gives shape, classes and normalisation,
            and its test split the per-epoch metrics (the server never reads client shards).
        out_dir: where ``pretrained.safetensors``, ``pretrained.json`` and the checkpoint go.
        seed: base seed (model init, shuffling and augmentation derive from it).
        augment: training augmentation (the FL setting ``fl.augment``, so both phases match).
        device: "auto", "cpu" or "cuda".
        comm: the processes taking part (a gptfl_hpc.parallel.comm communicator); None = the world.

    Returns:
        The ``pretrained.json`` dict, on every process.

    Raises:
        ConfigError / DataError before any training for bad settings or inputs; Preempted after
        saving a checkpoint when a stop was requested at an epoch boundary.
    """
    from gptfl_hpc.data.manifest import Manifest
    from gptfl_hpc.parallel.accel import want_cuda
    from gptfl_hpc.parallel.comm import get_comm

    t_start = time.perf_counter()
    comm = comm if comm is not None else get_comm()
    signals.install()
    out = Path(out_dir)
    syn_path = Path(synthetic_path).resolve()
    P = comm.size
    if cfg.batch_size < P:
        raise ConfigError(f"config key pretrain.batch_size: invalid value {cfg.batch_size}; "
                          f"valid: >= the {P} pretraining processes")
    if cfg.batch_size < P:
        raise ConfigError(f"config key pretrain.batch_size: {cfg.batch_size} is smaller than the "
                          f"{P} pretraining processes (run.server_processes); valid: >= {P}")
    use_cuda = want_cuda(device)
    mixed = _resolve_precision(cfg.mixed_precision, use_cuda)

    # Step 1: rank 0 reads the manifest and the synthetic set, checks them, and looks for a
    # finished run of the same request. Errors reach every rank as the same one-line error.
    cache: dict[str, Any] = {}

    def inspect() -> dict:
        from gptfl_hpc.data.shards import content_sha256

        manifest = Manifest.load(data_dir)
        if manifest.kind != "image" or len(manifest.input_shape) != 3:
            raise DataError(f"dataset in {data_dir}: pretraining needs images (H,W,C), the "
                            f"manifest says kind={manifest.kind} {_shape(manifest.input_shape)}")
        images, labels = _load_synthetic(syn_path, tuple(manifest.input_shape),
                                         manifest.num_classes, cfg.batch_size)
        request = _request(cfg, model_cfg, manifest, content_sha256(images, labels),
                           len(labels), seed, augment)
        done = _finished(out, request)
        if done is None:
            test_x, test_y = manifest.read_test(data_dir)
            cache.update(images=images, labels=labels, manifest=manifest, test_x=test_x,
                         test_y=test_y)
        return {"manifest": manifest.to_dict(), "request": request, "done": done,
                "num_samples": len(labels)}

    head = _on_root(comm, inspect)
    if head["done"] is not None:
        log.info("pretrain: %s is complete for this request (test accuracy %.4f); skipping",
                 out / INFO_NAME, head["done"]["test"]["accuracy"])
        return head["done"]
    manifest = cache.get("manifest") or Manifest.from_dict(head["manifest"])
    request, N = head["request"], int(head["num_samples"])
    shape = tuple(int(s) for s in manifest.input_shape)
    if comm.rank == 0:
        images, labels = cache.pop("images"), cache.pop("labels")
    else:
        images, labels = np.empty((N, *shape), np.uint8), np.empty(N, np.int64)
    if P > 1:
        comm.bcast_(images)
        comm.bcast_(labels)
    test_x, test_y = cache.pop("test_x", None), cache.pop("test_y", None)

    # Step 2: model, optimiser, schedule; resume from the checkpoint when it matches
    from gptfl_hpc.parallel.accel import accelerator
    from gptfl_hpc.train.evaluate import evaluate
    from gptfl_hpc.train.models import build_model, num_parameters
    from gptfl_hpc.train.transforms import ImageTransform

    B = cfg.batch_size
    bounds = [r * B // P for r in range(P + 1)]  # process r's slice of each global batch
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    steps_per_epoch = N // B
    total_steps = steps_per_epoch * cfg.epochs
    ckpt = out / CKPT_DIR
    state = _on_root(comm, lambda: _find_checkpoint(ckpt, request))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, "pretrain.init"))
        model = build_model(model_cfg, shape, manifest.num_classes)
        eval_model = build_model(model_cfg, shape, manifest.num_classes) if comm.rank == 0 \
            else None
    history: list[dict] = []
    start_epoch = 0

    with accelerator(comm, device=device, mixed_precision=mixed) as acc:
        dev = acc.device
        channels_last = cfg.channels_last and dev.type == "cuda"
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(dev, memory_format=fmt)
        opt = _optimizer(cfg, model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, total_steps))
        if state is not None:
            weights, _ = load_safetensors(ckpt / state["model_file"])
            model.load_state_dict(weights)
            opt_tensors, _ = load_safetensors(ckpt / state["optim_file"])
            opt.load_state_dict(unflatten_optimizer_state(opt_tensors, state["optimizer"]))
            sched.load_state_dict(state["scheduler"])
            start_epoch, history = int(state["epoch"]), list(state["history"])
            log.info("pretrain: resuming after epoch %d/%d from %s", start_epoch, cfg.epochs,
                     ckpt)
        ddp_model, opt = acc.prepare(model, opt)
        if eval_model is not None:
            eval_model.to(dev)

        x_dev = torch.from_numpy(images).to(dev)
        y_dev = torch.from_numpy(labels).to(dev)
        del images, labels
        train_tf = ImageTransform(manifest.norm_mean, manifest.norm_std, shape, augment)
        eval_tf = ImageTransform(manifest.norm_mean, manifest.norm_std, shape, False)
        if test_x is not None:
            test_x, test_y = torch.from_numpy(test_x).to(dev), torch.from_numpy(test_y).to(dev)
        threads, cores = torch.get_num_threads(), os.cpu_count() or 1
        if dev.type == "cpu" and comm.rank == 0 and threads * comm.local_size > cores:
            log.warning("pretrain: %d processes on this node x %d torch threads each > %d cores "
                        "(oversubscribed: much slower); use fewer threads per process",
                        comm.local_size, threads, cores)
        if start_epoch == 0:
            log.info("pretrain: %s (%d parameters) on %d synthetic samples from %s; %d epochs x "
                     "%d steps, global batch %d (%s per process), %s, %s, mixed precision %s, "
                     "%d torch thread(s) per process", model_cfg.name, num_parameters(model), N,
                     syn_path, cfg.epochs, steps_per_epoch, B, "+".join(map(str, sizes)),
                     cfg.optimizer, cfg.schedule, mixed, threads)

        # DDP warns once when a conv weight with one input channel gets its gradient in another
        # (equivalent) stride layout than its bucket; harmless, and it would only spam the logs.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")

        # Step 3: epochs; every random draw derives from (seed, epoch[, rank])
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(
                derive(seed, "pretrain.shuffle", epoch))).to(dev)
            g_aug = torch.Generator().manual_seed(
                derive(seed, "pretrain.augment", epoch, acc.process_index))
            ddp_model.train()
            r0, r1 = bounds[acc.process_index], bounds[acc.process_index + 1]
            scale = P / B
            loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
            for step in range(steps_per_epoch):
                idx = perm[step * B + r0:step * B + r1]
                x = train_tf(x_dev[idx], g_aug)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(ddp_model(x), y_dev[idx], reduction="sum") * scale
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                opt.step()
                if not opt.step_was_skipped:
                    sched.step()
                loss_sum += loss.detach().float()
            mean_loss = comm.allreduce_sum_(np.array([loss_sum.item()], np.float64))[0] / (
                P * steps_per_epoch)
            train_s = time.perf_counter() - t0

            # Step 4: rank 0 evaluates on the real test set, logs and checkpoints
            if comm.rank == 0:
                eval_model.load_state_dict(model.state_dict())
                metrics = evaluate(eval_model, test_x, test_y, eval_tf, EVAL_BATCH_SIZE, dev,
                                   manifest.num_classes)
                rate = steps_per_epoch * B / train_s
                history.append({"epoch": epoch + 1, "loss": mean_loss,
                                "lr": sched.get_last_lr()[0],
                                "test_accuracy": metrics["accuracy"],
                                "test_macro_f1": metrics["macro_f1"],
                                "test_loss": metrics["loss"], "train_seconds": train_s,
                                "images_per_second": rate, "num_processes": P})
                log.info("pretrain epoch %d/%d: loss %.4f, test acc %.4f, macro-F1 %.4f, "
                         "%.0f img/s (%d process%s, %s)", epoch + 1, cfg.epochs, mean_loss,
                         metrics["accuracy"], metrics["macro_f1"], rate, P,
                         "es" if P > 1 else "", dev.type)
                _save_checkpoint(ckpt, epoch + 1, model, opt, sched, request, history)
            # every rank marks the boundary; the max-reduce makes them agree (and waits for
            # rank 0's checkpoint before anyone goes on)
            stop = signals.boundary()
            stop = bool(comm.allreduce_max_(np.array([int(stop)], np.int32))[0])
            if stop and epoch + 1 < cfg.epochs:
                raise Preempted(f"pretraining stopped after epoch {epoch + 1}/{cfg.epochs} "
                                f"({signals.reason()}); checkpoint saved in {ckpt}; run again "
                                "to resume")
        final_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        n_params = num_parameters(model)
        device_type = dev.type

    # Step 5: rank 0 writes the weights, then pretrained.json (the completion marker)
    def finish() -> dict:
        last = history[-1]
        train_s = sum(h["train_seconds"] for h in history)
        images_seen = len(history) * steps_per_epoch * B
        save_safetensors(final_state, out / WEIGHTS_NAME,
                         metadata={"format": "gptfl-pretrained", "model": json.dumps(
                             dataclasses.asdict(model_cfg)),
                             "input_shape": json.dumps(list(shape)),
                             "num_classes": str(manifest.num_classes)})
        info = {
            "format_version": FORMAT_VERSION, "complete": True, "request": request,
            "weights": str((out / WEIGHTS_NAME).resolve()),
            "model": dataclasses.asdict(model_cfg), "num_parameters": n_params,
            "input_shape": list(shape), "num_classes": manifest.num_classes,
            "label_names": list(manifest.label_names), "norm_mean": list(manifest.norm_mean),
            "norm_std": list(manifest.norm_std), "augment": bool(augment), "seed": int(seed),
            "pretrain": dataclasses.asdict(cfg), "epochs": cfg.epochs,
            "steps": total_steps, "global_batch_size": B, "per_process_batch_sizes": sizes,
            "num_processes": P, "device": device_type, "mixed_precision": mixed,
            "synthetic": {"path": str(syn_path), "num_samples": N,
                          "sha256": request["synthetic"]["sha256"]},
            "data_dir": str(Path(data_dir).resolve()),
            "test": {"accuracy": last["test_accuracy"], "macro_f1": last["test_macro_f1"],
                     "loss": last["test_loss"], "num_samples": int(len(test_y))},
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

    return _on_root(comm, finish)
