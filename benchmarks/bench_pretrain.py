"""Benchmark: our pretraining step against the data-on-GPU ceiling, in the same run.

    python benchmarks/bench_pretrain.py                           # GPU: batches 128 and 1024
    python benchmarks/bench_pretrain.py --batch 1024 --paths device,stream --json b.json
    python benchmarks/bench_pretrain.py --device cpu --tiny       # plumbing only (CI), ~10 s

Workload: ResNet-18 (``model.name=resnet18``, torchvision's layout) on 32x32x3 images, 10
classes, AdamW, the configured precision (``auto``: bf16 autocast on GPUs that have it) and
channels_last on GPU, at each ``--batch`` (default: the configured ``pretrain.batch_size``, 128,
and 1024, the batch of the earlier H100 anchor of 127k img/s in bf16).

- **ceiling**: the bare loop with the data already on the device in its final form: one fixed,
  normalised float batch, channels_last; per step zero_grad, forward under autocast,
  cross-entropy, backward, optimizer step, lr-schedule step. No data handling, no accelerate.
- **ours**: the pretraining stage's own :class:`gptfl_hpc.train.pretrain.Trainer` built as the
  stage builds it (accelerate's ``Accelerator`` on one process, the same optimizer and
  schedule), on a random uint8 set of ``--n`` images, with augmentation (random shift + flip),
  for each ``--paths`` entry: ``device`` (the set on the GPU: per-step gather, shift/flip and
  normalisation on the device) and ``stream`` (the set in host memory: the prefetch thread
  gathers rows into pinned memory and copies them ahead). An epoch includes the epoch's host
  set-up (permutation, augmentation draws, one copy) and its single loss read.

Both run under the stage's kernels (``run.cpu_kernels=invariant``; on a GPU both autotune
cuDNN). Each measurement runs ``--warmup`` epochs (cuDNN autotuning, allocator) and then
``--epochs`` timed epochs of N // B steps (the ceiling: the same number of steps),
synchronising the device before reading the clock; the best epoch is reported (img/s) with the
median beside it. The ratio is ours / ceiling; target >= 0.8 (printed, not asserted). Exit
status 0, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 0.8
JSON_VERSION = 1
DEFAULT_BATCHES = (128, 1024)
PATHS = ("device", "stream")


class UsageError(Exception):
    pass


def _int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise UsageError(f"{what} {text!r}: expected comma-separated integers >= 1")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when visible), cuda or cpu")
    ap.add_argument("--batch", default=None, help="comma-separated global batch sizes "
                    f"(default {','.join(map(str, DEFAULT_BATCHES))}; --tiny: 16)")
    ap.add_argument("--n", type=int, default=None,
                    help="images in the set (default 32768; --tiny: 64)")
    ap.add_argument("--paths", default="device,stream", help="data paths to measure: device, "
                    "stream")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="a few steps at batch 16 (plumbing)")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    if a.device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device {a.device!r}: valid: auto, cuda, cpu")
    a.batches = _int_list(a.batch, "--batch") if a.batch else (
        [16] if a.tiny else list(DEFAULT_BATCHES))
    a.n = a.n if a.n is not None else (64 if a.tiny else 32768)
    a.path_list = [p.strip() for p in a.paths.split(",") if p.strip()]
    bad = [p for p in a.path_list if p not in PATHS]
    if bad or not a.path_list:
        raise UsageError(f"--paths {a.paths!r}: valid: a comma-separated subset of "
                         f"{', '.join(PATHS)}")
    if a.tiny:
        a.epochs = min(a.epochs, 1)
    if a.epochs < 1 or a.warmup < 0:
        raise UsageError("--epochs must be >= 1 and --warmup >= 0")
    if max(a.batches) > a.n:
        raise UsageError(f"--n {a.n}: fewer images than the largest batch {max(a.batches)}")
    return a


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _summary(rates: list[float]) -> dict:
    return {"img_s": max(rates), "img_s_median": statistics.median(rates),
            "img_s_epochs": [round(r, 1) for r in rates]}


def ceiling(cfg: Any, model_cfg: Any, dev: Any, mixed: str, steps: int, epochs: int,
            warmup: int) -> dict:
    """The bare training loop on one fixed float batch already on the device."""
    import torch
    import torch.nn.functional as F

    from gptfl_hpc.train.models import build_model
    from gptfl_hpc.train.pretrain import _optimizer, lr_factor

    torch.manual_seed(0)
    cl = dev.type == "cuda"
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = build_model(model_cfg, (32, 32, 3), 10).to(dev, memory_format=fmt)
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, 10 ** 9))
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (cfg.batch_size,), device=dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    scaler = torch.amp.GradScaler("cuda") if mixed == "fp16" else None
    if cl:
        torch.backends.cudnn.benchmark = True
    model.train()
    rates = []
    for e in range(warmup + epochs):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
        _sync(dev)
        if e >= warmup:
            rates.append(steps * cfg.batch_size / (time.perf_counter() - t0))
    return _summary(rates)


def ours(cfg: Any, model_cfg: Any, device: str, mixed: str, images: Any, labels: Any,
         path: str, epochs: int, warmup: int) -> dict:
    """The stage's Trainer (accelerate on one process) on the uint8 set, on `path`."""
    import torch

    from gptfl_hpc.numerics import training_kernels
    from gptfl_hpc.parallel.accel import accelerator
    from gptfl_hpc.parallel.comm import LocalComm
    from gptfl_hpc.train.models import build_model
    from gptfl_hpc.train.pretrain import Trainer, make_source
    from gptfl_hpc.train.transforms import ImageTransform

    tf = ImageTransform([0.49, 0.48, 0.45], [0.25, 0.24, 0.26], (32, 32, 3), augment=True)
    torch.manual_seed(0)
    model = build_model(model_cfg, (32, 32, 3), 10)
    kernels = "cuda" if device == "cuda" else "cpu"
    with training_kernels("invariant", kernels), \
            accelerator(LocalComm(), device=device, mixed_precision=mixed) as acc:
        dev = torch.device(acc.device)
        source = make_source(path, images, dev, cfg.batch_size)
        try:
            tr = Trainer(cfg, acc, model, source, labels, tf, seed=0, num_processes=1)
            rates = []
            for e in range(warmup + epochs):
                _sync(dev)
                t0 = time.perf_counter()
                tr.train_epoch(e)  # reads the loss once: the device is done when it returns
                _sync(dev)
                if e >= warmup:
                    rates.append(tr.steps_per_epoch * cfg.batch_size /
                                 (time.perf_counter() - t0))
        finally:
            source.close()
    return _summary(rates)


def run(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from gptfl_hpc.config import ModelConfig, PretrainConfig
    from gptfl_hpc.numerics import training_kernels
    from gptfl_hpc.parallel.accel import want_cuda
    from gptfl_hpc.train.pretrain import _resolve_precision

    if a.threads:
        torch.set_num_threads(a.threads)
    use_cuda = want_cuda(a.device)
    device = "cuda" if use_cuda else "cpu"
    dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    mixed = _resolve_precision(a.mixed_precision, use_cuda)
    model_cfg = ModelConfig(name=a.model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, a.n).astype(np.int64)
    doc: dict[str, Any] = {
        "benchmark": "bench_pretrain", "version": JSON_VERSION, "target": TARGET,
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(dev) if use_cuda else "cpu",
                    "threads": torch.get_num_threads()},
        "settings": {"model": a.model, "n": a.n, "batches": a.batches, "paths": a.path_list,
                     "epochs": a.epochs, "warmup": a.warmup, "device": device,
                     "mixed_precision": mixed, "optimizer": "adamw", "image": [32, 32, 3]},
        "rows": []}
    for b in a.batches:
        cfg = PretrainConfig(batch_size=b, epochs=a.warmup + a.epochs, lr=1e-3)
        steps = a.n // b
        with training_kernels("invariant", device):  # the same kernels as the stage's
            top = ceiling(cfg, model_cfg, dev, mixed, steps, a.epochs, a.warmup)
        for path in a.path_list:
            got = ours(cfg, model_cfg, device, mixed, images, labels, path, a.epochs, a.warmup)
            ratio = got["img_s"] / top["img_s"]
            doc["rows"].append({
                "batch": b, "path": path, "steps_per_epoch": steps,
                "ceiling_img_s": round(top["img_s"], 1),
                "ceiling_img_s_median": round(top["img_s_median"], 1),
                "ceiling_img_s_epochs": top["img_s_epochs"],
                "ours_img_s": round(got["img_s"], 1),
                "ours_img_s_median": round(got["img_s_median"], 1),
                "ours_img_s_epochs": got["img_s_epochs"], "ratio": round(ratio, 3),
                "meets_target": ratio >= TARGET})
            print(f"# batch {b} {path}: ceiling {top['img_s']:.0f} img/s, ours "
                  f"{got['img_s']:.0f} img/s, ratio {ratio:.2f}", flush=True)
    return doc


def table(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"pretraining step vs data-on-device ceiling: {s['model']} 32x32x3, "
             f"{doc['machine']['device']}, {s['mixed_precision']}, {s['n']} images, "
             f"target ratio >= {doc['target']}",
             "| batch | path | ceiling img/s | ours img/s | ratio | meets target |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['batch']} | {r['path']} | {r['ceiling_img_s']:.0f} | "
                     f"{r['ours_img_s']:.0f} | {r['ratio']:.2f} | "
                     f"{'yes' if r['meets_target'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from gptfl_hpc.numerics import set_process_env

    set_process_env()  # MKL's strict mode, before torch loads (as the gptfl-hpc command)
    try:
        a = parse_args(argv)
        doc = run(a)
    except UsageError as e:
        sys.stderr.write(f"bench_pretrain: error: {e}\n")
        return 2
    except Exception as e:  # a GptflError (e.g. run.device=cuda without a GPU) is one line
        from gptfl_hpc.errors import GptflError

        if not isinstance(e, GptflError):
            raise
        sys.stderr.write(f"bench_pretrain: error: {' '.join(str(e).split())}\n")
        return 2
    print(table(doc))
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
