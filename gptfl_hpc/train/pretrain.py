"""Server pretraining on the synthetic set (GPT-FL step 3), data-parallel with accelerate.

The model that FL starts from is trained here on the labelled synthetic HDF5. :func:`pretrain` is
a short loop over named parts (as pfl-research's ``algorithm.run`` with callbacks, or
torchtitan's ``Trainer.train``):

- **Inputs** (:func:`read_inputs`): rank 0 checks the set's layout and labels and reads the test
  split; errors reach every rank as the same one-line error.
- **Host copy** (:func:`load_host_copy`): the uint8 set is held ONCE per node, in an MPI
  shared-memory window that the node's ranks share (``Comm.host_array``); rank 0 reads the file
  (the only reader on the file system), checks it against the test split (leakage) and sends it
  to one rank per other node. Before anything is allocated, :func:`plan_host` checks that every
  node can hold it (MemAvailable, the cgroup limit, /dev/shm). Where one cannot, the set goes
  straight to the GPUs slab by slab (:func:`load_to_devices`) if every GPU can hold it; if
  neither fits (or on CPU), one line names the sizes and what to change, before training.
- **Data path** (:func:`plan_device`, ``pretrain.data_path``): on a GPU the set is copied to the
  device when it fits next to the training step (one forward/backward at the per-process batch
  is measured, plus optimizer state, DDP buckets and a margin), else it is *streamed*: a
  background thread gathers each step's rows from the host copy into pinned memory and copies
  them on a side stream, :data:`PREFETCH_DEPTH` steps ahead (:class:`StreamedRows`). On CPU the
  host copy itself is the "device" copy. The choice and its numbers are logged and recorded.
- **Trainer** (:class:`Trainer`): each epoch draws one permutation from ``(seed, epoch)``;
  global batch ``i`` is ``perm[i*B:(i+1)*B]`` and process ``r`` of ``P`` takes its contiguous
  slice ``[r*B//P, (r+1)*B//P)``, so the global batch is ``pretrain.batch_size`` at any process
  count. Each process's loss is its summed cross-entropy times P/B, so DDP's gradient average is
  the mean gradient over the global batch, even for uneven slices. The incomplete last global
  batch of an epoch is dropped. The random shifts/flips of global batch i are drawn for the
  whole global batch from ``(seed, epoch, i)`` (as :class:`ImageTransform` draws them) and each
  process applies its slice, so 1 and N processes, and the device and streaming paths, see the
  same augmented images. A step makes no host<->device copy and reads nothing back: an epoch's
  permutation, augmentation draws and dropout seeds are made on the host at its start and copied
  once; rows are gathered, shifted, flipped and normalised on the device; the loss is summed
  there and read once per epoch. GPU: channels_last and bf16 autocast (fp16 with loss scaling
  where the GPU has no bf16).
- **Evaluator** (:class:`Evaluator`): rank 0 computes the per-epoch test metrics in fp32 with a
  copy of the weights, so they equal what the FL engine measures from ``pretrained.safetensors``.
- **Checkpointer** (:class:`Checkpointer`): every epoch to ``out/pretrain_ckpt/``, model and
  flattened optimizer tensors as safetensors, then ``state.json`` (epoch, request fingerprint,
  optimizer structure, scheduler state, history) last as the commit marker. No pickle. A
  checkpoint of another request is refused; one of this request is continued only with
  ``resume`` (``--resume``). Everything derives from (seed, epoch, step), so a checkpoint needs
  no RNG state: resuming with the same process count on CPU gives bitwise the same weights.
- **Stop agreement** (:func:`agree_to_stop`): at every epoch boundary the ranks agree (max-reduce)
  whether a preemption signal arrived anywhere; then every rank raises Preempted together.
- **Outputs** (:func:`write_outputs`): ``pretrained.safetensors`` (``model.state_dict()`` keys,
  the fingerprint in its metadata) and ``pretrained.json``. Whether a finished output is reused
  is decided by the stage (gptfl_hpc/pipeline.py, gptfl_hpc/provenance.py), not here.
- **Release** (:func:`release_device_memory`): the models, optimizers and device tensors are gone
  when the stage returns and the cached GPU memory goes back to the driver, so FL on the same
  GPUs starts clean (logged).

Checkpoints live in ``out_dir``, which every process must see (a shared file system on HPC).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptfl_hpc import faults, signals
from gptfl_hpc.config import ModelConfig, PretrainConfig
from gptfl_hpc.errors import ConfigError, DataError, GptflError, Preempted, StaleOutputError
from gptfl_hpc.fsio import load_safetensors, save_safetensors, write_json
from gptfl_hpc.parallel.accel import release_device_memory
from gptfl_hpc.parallel.comm import on_root
from gptfl_hpc.seeding import derive
from gptfl_hpc.train.transforms import ImageTransform

log = logging.getLogger(__name__)

CKPT_DIR = "pretrain_ckpt"
WEIGHTS_NAME = "pretrained.safetensors"
INFO_NAME = "pretrained.json"
FORMAT_VERSION = 2
EVAL_BATCH_SIZE = 512
GiB = 1 << 30
PREFETCH_DEPTH = 2
"""Steps the streaming path gathers and copies ahead of the step being trained."""
SLAB_BYTES = 256 << 20
"""The set is read from the file, and copied to a GPU, in slabs of about this size."""
HOST_MEMORY_ENV = "GPTFL_HOST_MEMORY_GIB"
"""Host memory (GiB) a node offers to the synthetic set, instead of what the kernel reports
(for VMs whose memory grows on demand, where MemAvailable starts low, or to test the plan)."""
SAMPLE_DATASETS = {"image": ("images", "uint8"), "audio": ("audio", "int16")}
"""Dataset kind -> (the synthetic set's sample dataset, its dtype) (gen/base.py Task)."""


def _shape(shape: Any) -> str:
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f}"


# ------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass(frozen=True)
class SetInfo:
    """The synthetic set as rank 0 found it (JSON-able, the same on every rank)."""

    path: str
    dataset: str
    dtype: str
    num_samples: int
    sample_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.sample_shape)) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.num_samples * self.row_bytes

    def describe(self) -> str:
        return (f"{self.num_samples} x {_shape(self.sample_shape)} {self.dtype} = "
                f"{_gib(self.nbytes)} GiB")


@dataclasses.dataclass
class Inputs:
    """What every rank knows after :func:`read_inputs` (rank 0 also holds the test split)."""

    manifest: Any
    set: SetInfo
    labels: np.ndarray
    test: tuple[np.ndarray, np.ndarray] | None
    leak_check: bool = True
    """Refuse samples byte-identical to a test image (off for the centralised reference, whose
    'set' is the real private pool: duplicates there are the source's, not a leak)."""
    train_rows: np.ndarray | None = None
    """The rows pretraining draws from (None: all); the rest is the validation split."""
    val_rows: np.ndarray | None = None
    val: tuple[np.ndarray, np.ndarray] | None = None
    """Rank 0: the validation split's samples and labels (pretrain.val_fraction > 0)."""


def check_synthetic(path: Path, kind: str, input_shape: tuple, num_classes: int,
                    batch_size: int) -> tuple[SetInfo, np.ndarray]:
    """The set's layout and labels, without reading the samples; one-line DataErrors that name
    the file."""
    from gptfl_hpc.data.shards import open_h5, read_arrays, read_attrs

    if not path.is_file():
        raise DataError(f"synthetic set {path}: not found; run `gptfl-hpc synthesize` first "
                        "(or pass --synthetic FILE)")
    split = read_attrs(path).get("split")
    if split in ("test", "client", "public"):
        raise DataError(f"synthetic set {path}: is a prepared {split} shard of real data, not "
                        "a synthetic set; valid: the output of `gptfl-hpc synthesize`")
    name, dtype = SAMPLE_DATASETS[kind]
    labels = read_arrays(path, ["labels"])["labels"]
    with open_h5(path, "r", what="synthetic set") as f:
        ds = f.get(name)
        if ds is None or not hasattr(ds, "dtype") or ds.external or ds.is_virtual:
            raise DataError(f"synthetic set {path}: no self-contained dataset '{name}' (has: "
                            f"{', '.join(sorted(f.keys())) or 'nothing'}); re-create the file")
        got_dtype, got_shape = np.dtype(ds.dtype), tuple(int(s) for s in ds.shape)
    if got_dtype != np.dtype(dtype) or len(got_shape) != 1 + len(input_shape):
        raise DataError(f"synthetic set {path}: {name} must be {dtype} with "
                        f"{1 + len(input_shape)} dimensions, got {got_dtype} {_shape(got_shape)}")
    if got_shape[1:] != tuple(input_shape):
        raise DataError(f"synthetic set {path}: samples have shape {_shape(got_shape[1:])} but "
                        f"the dataset manifest expects {_shape(input_shape)}; synthesise at the "
                        "task's resolution")
    n = got_shape[0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != n:
        raise DataError(f"synthetic set {path}: labels must be 1-d integers, one per sample; "
                        f"got {labels.dtype} {_shape(labels.shape)} for {n} samples")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"synthetic set {path}: labels out of range [0, {num_classes}): found "
                        f"min {int(labels.min())}, max {int(labels.max())}")
    if n < batch_size:
        raise DataError(f"synthetic set {path}: {n} samples, fewer than "
                        f"pretrain.batch_size={batch_size}; lower the batch size or synthesise "
                        "more")
    return (SetInfo(str(path), name, dtype, n, got_shape[1:]),
            labels.astype(np.int64, copy=False))


def read_samples_into(info: SetInfo, out: np.ndarray) -> None:
    """Read the set's samples into `out` (a host copy) in slabs, without a second copy."""
    from gptfl_hpc.data.shards import open_h5

    step = max(1, SLAB_BYTES // max(1, info.row_bytes))
    with open_h5(info.path, "r", what="synthetic set") as f:
        ds = f[info.dataset]
        try:
            for a in range(0, info.num_samples, step):
                b = min(info.num_samples, a + step)
                ds.read_direct(out, np.s_[a:b], np.s_[a:b])
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"synthetic set {info.path}: dataset '{info.dataset}' unreadable "
                            f"({' '.join(str(e).split())}); the file is truncated or corrupt"
                            ) from None


class LeakCheck:
    """Counts synthetic samples that are byte-identical to a test image (test leakage)."""

    def __init__(self, test_x: np.ndarray) -> None:
        flat = np.ascontiguousarray(test_x).reshape(len(test_x), -1)
        self.test = {self._digest(r) for r in flat}
        self.leaked = 0

    @staticmethod
    def _digest(row: np.ndarray) -> bytes:
        import hashlib

        return hashlib.blake2b(row.tobytes(), digest_size=16).digest()

    def count(self, images: np.ndarray) -> int:
        self.leaked += sum(1 for r in images.reshape(len(images), -1)
                           if self._digest(r) in self.test)
        return self.leaked

    def verdict(self, path: str) -> None:
        if self.leaked:
            raise DataError(f"synthetic set {path}: {self.leaked} sample(s) are identical to "
                            "images of the test split (test leakage); valid: a synthetic set "
                            "made by a generator, never the real test data")


def read_inputs(cfg: PretrainConfig, comm: Any, manifest: Any, data_dir: str | Path,
                syn_path: Path, seed: int = 0) -> Inputs:
    """Rank 0 reads the manifest, checks the set and reads the test split (and the validation
    split's samples); every rank gets the manifest, the set's description, the labels and the
    rows of the split (synval.split_rows from `seed`)."""
    from gptfl_hpc.data.manifest import Manifest
    from gptfl_hpc.train.synval import read_rows, split_rows

    cache: dict[str, Any] = {}

    def inspect() -> dict:
        m = manifest or Manifest.load(data_dir)
        if m.kind not in SAMPLE_DATASETS:
            raise DataError(f"dataset in {data_dir}: pretraining needs images or audio, the "
                            f"manifest says kind={m.kind} {_shape(m.input_shape)}")
        info, labels = check_synthetic(syn_path, m.kind, tuple(m.input_shape), m.num_classes,
                                       cfg.batch_size)
        cache.update(labels=labels, test=m.read_test(data_dir))
        if cfg.val_fraction > 0:
            train_rows, val_rows = split_rows(labels, cfg.val_fraction, seed)
            if len(train_rows) < cfg.batch_size or len(val_rows) == 0:
                raise ConfigError(
                    f"config key pretrain.val_fraction: {cfg.val_fraction} of {syn_path}'s "
                    f"{len(labels)} samples leaves {len(train_rows)} to train on and "
                    f"{len(val_rows)} to validate on; valid: a fraction that leaves >= "
                    f"pretrain.batch_size ({cfg.batch_size}) and >= 1 (or 0: no split)")
            cache["val"] = read_rows(syn_path, val_rows, info.dataset)
            cache["split"] = (train_rows, val_rows)
        return {"manifest": m.to_dict(), "set": dataclasses.asdict(info)}

    head = on_root(comm, inspect)
    s = head["set"]
    info = SetInfo(s["path"], s["dataset"], s["dtype"], int(s["num_samples"]),
                   tuple(int(d) for d in s["sample_shape"]))
    labels = cache.pop("labels") if comm.rank == 0 else np.empty(info.num_samples, np.int64)
    if comm.size > 1:
        comm.bcast_(labels)
    inputs = Inputs(manifest or Manifest.from_dict(head["manifest"]), info, labels,
                    cache.pop("test", None))
    if cfg.val_fraction > 0:  # the same split on every rank (labels and seed are the same)
        inputs.train_rows, inputs.val_rows = (cache.pop("split", None)
                                              or split_rows(labels, cfg.val_fraction, seed))
        inputs.val = cache.pop("val", None)
    return inputs


# ------------------------------------------------------------------------ the host copy's plan


def host_memory_available() -> tuple[int | None, str]:
    """(bytes a new allocation on this host can still get, where the number comes from): the
    smallest of MemAvailable and the cgroup's limit minus its usage; GPTFL_HOST_MEMORY_GIB wins."""
    env = os.environ.get(HOST_MEMORY_ENV)
    if env:
        try:
            return int(float(env) * GiB), HOST_MEMORY_ENV
        except ValueError:
            raise ConfigError(f"{HOST_MEMORY_ENV}={env!r}: not a number of GiB") from None
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim = Path(limit).read_text().strip()
            if lim != "max" and int(lim) < 1 << 60:
                found.append((int(lim) - int(Path(usage).read_text()), "cgroup limit"))
        except (OSError, ValueError):
            continue
    return min(found) if found else (None, "unknown")


def shm_available(path: str = "/dev/shm") -> int | None:
    """Free bytes of /dev/shm, where Open MPI and MPICH put shared-memory windows."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def host_margin(set_bytes: int) -> int:
    return GiB + set_bytes // 20


def plan_host(comm: Any, info: SetInfo) -> list[dict]:
    """Can each node hold one copy of the set? Collective: every rank gets one entry per node
    (host, ranks, available bytes and their source, need, fits), the same on every rank."""
    avail, source = host_memory_available()
    mine = {"host": socket.gethostname(), "available": avail, "source": source,
            "shm": shm_available()}
    everyone = comm.allgather_json(mine) if comm.size > 1 else [mine]
    need = info.nbytes + host_margin(info.nbytes)
    nodes: list[dict] = []
    for r, e in enumerate(everyone):
        ranks = sum(1 for x in everyone if x["host"] == e["host"])
        if any(n["host"] == e["host"] for n in nodes):
            continue
        limit, why = e["available"], e["source"]
        if ranks > 1 and e["shm"] is not None and (limit is None or e["shm"] < limit):
            limit, why = e["shm"], f"/dev/shm, where the {ranks} ranks' shared window lives"
        nodes.append({"host": e["host"], "first_rank": r, "ranks": ranks, "available": limit,
                      "source": why, "need": need, "fits": limit is None or limit >= need})
    return nodes


def too_big_message(info: SetInfo, nodes: list[dict], plans: list[dict] | None = None) -> str:
    """The one-line error when the set fits in no node's host memory (and, on GPUs, not on
    every GPU either): the sizes, and what changes them."""
    n = next(x for x in nodes if not x["fits"])
    gpu = ""
    if plans:
        p = min((x for x in plans if "free" in x), key=lambda x: x["free"] - x["step"])
        gpu = (f" nor on every GPU ({p['device']} of rank {p['rank']}: {_gib(p['free'])} GiB "
               f"free, {_gib(info.nbytes + p['step'] + p['margin'])} GiB needed with the "
               "training step and a margin)")
    return (f"synthetic set {info.path}: {info.describe()} fits neither in host memory (node "
            f"{n['host']} offers {_gib(n['available'])} GiB ({n['source']}), {_gib(n['need'])} "
            f"GiB are needed with a margin){gpu}; pretrain.batch_size does not change this: "
            "lower gen.count or gen.volume (a smaller set), or use nodes with more memory "
            f"({HOST_MEMORY_ENV} overrides a wrong host number)")


def load_host_copy(comm: Any, inputs: Inputs) -> Any:
    """Allocate and fill the node-shared host copy of the set (collective; see plan_host).

    Rank 0 reads the file into its node's copy and checks it against the test split; then one
    rank per other node receives it. Returns the HostArray.
    """
    info = inputs.set
    host = comm.host_array((info.num_samples, *info.sample_shape), np.dtype(info.dtype))
    failure: GptflError | None = None
    if comm.rank == 0:
        try:
            read_samples_into(info, host.array)
            if inputs.leak_check:
                assert inputs.test is not None
                check = LeakCheck(inputs.test[0])
                check.count(host.array)
                check.verdict(info.path)
        except GptflError as e:
            failure = e
    comm.barrier()  # the other ranks sleep while rank 0 reads

    def verdict() -> None:
        if failure is not None:
            raise failure

    try:
        on_root(comm, verdict)
    except GptflError:
        host.free()
        raise
    host.bcast_from_root()
    return host


def load_to_devices(comm: Any, inputs: Inputs, dev: torch.device) -> torch.Tensor:
    """The set straight onto every process's device when no node's host memory can hold it:
    rank 0 reads and checks one slab at a time and broadcasts it; each process copies it to
    its device (one slab of host memory per process). Collective."""
    import contextlib

    from gptfl_hpc.data.shards import open_h5

    info = inputs.set
    dtype = np.dtype(info.dtype)
    x = torch.empty((info.num_samples, *info.sample_shape), dtype=torch.from_numpy(
        np.empty(0, dtype)).dtype, device=dev)
    step = max(1, SLAB_BYTES // max(1, info.row_bytes))
    buf = np.empty((min(step, info.num_samples), *info.sample_shape), dtype)
    check = LeakCheck(inputs.test[0]) if inputs.test is not None and inputs.leak_check \
        else None
    with contextlib.ExitStack() as stack:
        ds = stack.enter_context(open_h5(info.path, "r", what="synthetic set"))[info.dataset] \
            if comm.rank == 0 else None
        for a in range(0, info.num_samples, step):
            b = min(info.num_samples, a + step)
            part = buf[:b - a]
            if ds is not None:
                ds.read_direct(part, np.s_[a:b], np.s_[0:b - a])
                if check is not None:
                    check.count(part)
            if comm.size > 1:
                comm.bcast_(part)
            x[a:b].copy_(torch.from_numpy(part))
    on_root(comm, lambda: check.verdict(info.path) if check is not None else None)
    return x


# ---------------------------------------------------------------------- the device's data path


def choose_path(mode: str, *, set_bytes: int, free: int, besides: int, margin: int
                ) -> tuple[str, str | None]:
    """('device' | 'stream', an error or None) for a GPU with `free` bytes, when the training
    step needs `besides` bytes next to the set and `margin` is kept free."""
    need = set_bytes + besides + margin
    if mode == "stream":
        return "stream", None
    if need <= free:
        return "device", None
    if mode == "device":
        return "device", (
            f"config key pretrain.data_path: 'device', but the synthetic set ({_gib(set_bytes)} "
            f"GiB) does not fit on the GPU: {_gib(free)} GiB free, {_gib(need)} GiB needed with "
            f"the training step ({_gib(besides)} GiB) and a margin ({_gib(margin)} GiB); valid: "
            "auto, stream")
    return "stream", None


def step_bytes(model: torch.nn.Module, cfg: PretrainConfig, local_batch: int,
               model_shape: tuple, mixed: str, dev: torch.device, *, num_processes: int,
               eval_bytes: int) -> int:
    """Device bytes the training needs besides the set: the measured peak of one forward and
    backward at the per-process batch (activations, gradients, workspaces; in eval mode, so no
    BatchNorm statistic moves), plus optimizer state, DDP's buckets and `eval_bytes` (rank 0's
    evaluation copy and test split). 0 on CPU (the host plan covers it)."""
    if dev.type != "cuda":
        return 0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = {"sgd": int(cfg.momentum > 0), "adam": 2, "adamw": 2}[cfg.optimizer]
    h, w, c = (int(s) for s in model_shape)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    was = model.training
    model.eval()
    try:
        x = torch.zeros((local_batch, c, h, w), device=dev).contiguous(memory_format=fmt)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        out.float().sum().backward()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return int(peak + slots * params + (params if num_processes > 1 else 0) + eval_bytes)


def plan_device(cfg: PretrainConfig, comm: Any, dev: torch.device, info: SetInfo,
                besides: int) -> list[dict]:
    """Every process's data path (collective): where the set fits on its GPU next to `besides`
    bytes of training, 'device', else 'stream' (pretrain.data_path forces one). On CPU the host
    copy is the device copy ('device'), unless 'stream' is forced."""
    mine: dict[str, Any] = {"rank": comm.rank, "device": str(dev), "error": None}
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        # what torch's allocator holds but does not use (the trial step's activations) is free
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        margin = max(GiB, total // 20)
        path, err = choose_path(cfg.data_path, set_bytes=info.nbytes, free=free,
                                besides=besides, margin=margin)
        mine.update(path=path, error=err, free=free, total=total, step=besides, margin=margin)
    else:
        mine["path"] = "stream" if cfg.data_path == "stream" else "device"
    plans = comm.allgather_json(mine) if comm.size > 1 else [mine]
    errors = [p["error"] for p in plans if p["error"]]
    if errors:
        raise ConfigError(errors[0])
    return plans


# ------------------------------------------------------------------------------- batch sources


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host tensor -> `dev` without blocking the host (pinned, non_blocking) on CUDA."""
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


class ResidentRows:
    """The set where the step runs: copied to the GPU once, or on CPU the host copy itself (one
    per node). A step's rows are gathered there."""

    path = "device"

    def __init__(self, host: np.ndarray | None, dev: torch.device,
                 on_device: torch.Tensor | None = None) -> None:
        if host is None:  # already there (load_to_devices)
            assert on_device is not None
            self.x = on_device
            return
        src = torch.from_numpy(host)
        if dev.type == "cpu":
            self.x = src
            return
        self.x = torch.empty(src.shape, dtype=src.dtype, device=dev)
        step = max(1, SLAB_BYTES // max(1, src[0].numel() * src.element_size()))
        for a in range(0, len(src), step):
            self.x[a:a + step].copy_(src[a:a + step])

    def start_epoch(self, rows: list[np.ndarray]) -> None:
        pass

    def rows(self, step: int, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]

    def close(self) -> None:
        self.x = torch.empty(0)


_END = object()


class StreamedRows:
    """A step's rows from the host copy: a background thread gathers them (numpy ``take``, which
    releases the GIL) into a pinned buffer and copies that to the device on a side stream,
    :data:`PREFETCH_DEPTH` steps ahead; the training stream waits on the copy's event only. On
    CPU the gathered rows are used as they are (a test and fallback path)."""

    path = "stream"

    def __init__(self, host: np.ndarray, dev: torch.device, max_rows: int,
                 depth: int = PREFETCH_DEPTH) -> None:
        self.host, self.dev, self.depth = host, dev, depth
        self.cuda = dev.type == "cuda"
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        slots = depth + 2
        self.pinned = [torch.empty((max_rows, *host.shape[1:]), dtype=torch.from_numpy(
            host[:0]).dtype).pin_memory() for _ in range(slots)] if self.cuda else []
        self.copied: list[Any] = [None] * slots
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.next_step = 0

    def start_epoch(self, rows: list[np.ndarray]) -> None:
        self.close()
        self.stop.clear()
        self.q = queue.Queue(maxsize=self.depth)
        self.next_step = 0
        self.thread = threading.Thread(target=self._produce, args=(rows,), daemon=True,
                                       name="pretrain-prefetch")
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, rows: list[np.ndarray]) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.dev)  # the current device is per thread
            for i, r in enumerate(rows):
                if self.stop.is_set():
                    return
                if not self.cuda:
                    if not self._put((torch.from_numpy(np.take(self.host, r, axis=0)), None)):
                        return
                    continue
                slot = i % len(self.pinned)
                if self.copied[slot] is not None:
                    self.copied[slot].synchronize()  # its previous copy has left the buffer
                buf = self.pinned[slot][:len(r)]
                np.take(self.host, r, axis=0, out=buf.numpy(), mode="clip")
                assert self.stream is not None
                with torch.cuda.stream(self.stream):
                    d = buf.to(self.dev, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self.stream)
                self.copied[slot] = done
                if not self._put((d, done)):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 (handed to the training thread)
            self._put(e)

    def rows(self, step: int, idx: torch.Tensor) -> torch.Tensor:
        assert step == self.next_step, (step, self.next_step)
        self.next_step += 1
        while True:
            try:
                item = self.q.get(timeout=1.0)
                break
            except queue.Empty:
                if self.thread is None or not self.thread.is_alive():
                    raise RuntimeError("pretrain: the prefetch thread ended early") from None
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            raise RuntimeError("pretrain: the prefetch thread ran out of steps")
        x, done = item
        if done is not None:
            current = torch.cuda.current_stream(self.dev)
            current.wait_event(done)
            x.record_stream(current)  # its memory is not reused before this step has run
        return x

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def make_source(path: str, host: np.ndarray, dev: torch.device, max_rows: int) -> Any:
    return ResidentRows(host, dev) if path == "device" else StreamedRows(host, dev, max_rows)


# ----------------------------------------------------------------------------------- training


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


def epoch_draws(tf: ImageTransform, seed: int, epoch: int, steps: int, batch: int
                ) -> torch.Tensor:
    """(steps, 3, batch) int64: every global batch's (dy, dx, flip) of an epoch, drawn exactly as
    ``ImageTransform`` draws them from the generator seeded by (seed, epoch, step)."""
    out = torch.zeros((steps, 3, batch), dtype=torch.int64)
    for s in range(steps):
        g = torch.Generator().manual_seed(derive(seed, "pretrain.augment", epoch, s))
        out[s, 0] = torch.randint(0, 2 * tf.pad + 1, (batch,), generator=g)
        out[s, 1] = torch.randint(0, 2 * tf.pad + 1, (batch,), generator=g)
        if tf.flip:
            out[s, 2] = torch.rand(batch, generator=g) < 0.5
    return out


def shift_flip(x: torch.Tensor, draws: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """uint8 (B,H,W,C) shifted by (dy-pad, dx-pad) with zero fill and, where flip, mirrored:
    ``ImageTransform``'s augmentation done on the bytes, in one gather (zero bytes normalise
    as its zero padding does, so the result is bitwise the same)."""
    b, h, w, c = x.shape
    dy, dx = draws[0], draws[1]
    padded = x.new_zeros((b, h + 2 * pad, w + 2 * pad, c))
    padded[:, pad:pad + h, pad:pad + w] = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h)[:, :, None]
    cols = dx[:, None] + ar_w
    if flip:
        cols = torch.where(draws[2][:, None].bool(), dx[:, None] + (w - 1 - ar_w), cols)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    return padded[bidx, rows, cols[:, None, :]]


@dataclasses.dataclass
class EpochPlan:
    """What an epoch's steps need, made on the host at its start and copied once."""

    epoch: int
    perm: torch.Tensor
    """The permutation on the device (labels and resident rows are gathered with it)."""
    rows: list[np.ndarray]
    """Per step, the rows this process's batch source must deliver (host indices)."""
    draws: torch.Tensor | None
    """(steps, 3, local batch) augmentation draws on the device (image sets)."""
    dropout: list[int]
    """Per step, the seed of torch's global RNG (dropout masks)."""


class Trainer:
    """Model, optimiser, schedule and the batch source; :meth:`train_epoch` runs one epoch.

    Args:
        cfg: the ``pretrain`` section. acc: the accelerate ``Accelerator`` (or anything with
        ``device``, ``process_index``, ``prepare``, ``backward``). model: built, on any device.
        source: a batch source (:class:`ResidentRows` / :class:`StreamedRows`). labels: (N,).
        transform: the training transform. restore: called with (model, optimizer, scheduler)
        before accelerate wraps them (a checkpoint).
    """

    def __init__(self, cfg: PretrainConfig, acc: Any, model: torch.nn.Module, source: Any,
                 labels: np.ndarray, transform: Any, *, seed: int, num_processes: int,
                 restore: Callable[..., None] | None = None,
                 rows: np.ndarray | None = None) -> None:
        self.cfg, self.acc, self.seed, self.P = cfg, acc, seed, num_processes
        dev = self.dev = torch.device(acc.device)
        self.channels_last = cfg.channels_last and dev.type == "cuda"
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # restored by numerics.training_kernels
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(dev, memory_format=fmt)
        # rows: the training rows (the validation split left out); None: every row
        self.rows = None if rows is None else torch.from_numpy(np.asarray(rows, np.int64))
        self.N, self.B = len(labels) if rows is None else len(rows), cfg.batch_size
        self.bounds = [r * self.B // num_processes for r in range(num_processes + 1)]
        self.r0, self.r1 = self.bounds[acc.process_index], self.bounds[acc.process_index + 1]
        self.steps_per_epoch = self.N // self.B
        self.opt = _optimizer(cfg, self.model)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_factor(cfg.schedule, self.steps_per_epoch * cfg.epochs))
        if restore is not None:
            restore(self.model, self.opt, self.sched)
        self.ddp, self.opt = acc.prepare(self.model, self.opt)
        self.y = to_device(torch.from_numpy(labels), dev)
        self.source, self.tf = source, transform
        self.fast = isinstance(transform, ImageTransform)
        self.local_rows = self.fast or not transform.augment
        if self.fast:
            self.mean, self.std = transform.mean.to(dev), transform.std.to(dev)

    @property
    def local_batch(self) -> int:
        return self.r1 - self.r0

    def plan_epoch(self, epoch: int) -> EpochPlan:
        B, pi = self.B, self.acc.process_index
        perm = torch.randperm(self.N, generator=torch.Generator().manual_seed(
            derive(self.seed, "pretrain.shuffle", epoch)))
        if self.rows is not None:  # positions in the training rows -> rows of the set
            perm = self.rows[perm]
        p = perm.numpy()
        steps = range(self.steps_per_epoch)
        rows = [p[s * B + self.r0:s * B + self.r1] if self.local_rows else p[s * B:(s + 1) * B]
                for s in steps]
        draws = None
        if self.fast and self.tf.augment:
            all_draws = epoch_draws(self.tf, self.seed, epoch, self.steps_per_epoch, B)
            draws = to_device(all_draws[:, :, self.r0:self.r1].contiguous(), self.dev)
        # dropout draws from torch's global RNG: one stream per (epoch, step, process), so a
        # resumed run draws the same masks (they do depend on the process count)
        dropout = [derive(self.seed, "pretrain.dropout", epoch, s, pi) for s in steps]
        return EpochPlan(epoch, to_device(perm, self.dev), rows, draws, dropout)

    def run_epoch(self, epoch: int) -> torch.Tensor:
        """One epoch's steps; returns the summed loss on the device (not read back)."""
        plan = self.plan_epoch(epoch)
        self.source.start_epoch(plan.rows)
        self.ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.dev)
        devices = [self.dev.index or 0] if self.dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for step in range(self.steps_per_epoch):
                torch.manual_seed(plan.dropout[step])
                loss_sum += self.step(plan, step)
        return loss_sum

    def train_epoch(self, epoch: int) -> float:
        """One epoch; this process's summed training loss (one device read per epoch)."""
        return float(self.run_epoch(epoch).item())

    def batch(self, plan: EpochPlan, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised inputs, labels) of this process's slice of global batch `step`."""
        B, r0, r1 = self.B, self.r0, self.r1
        if not self.local_rows:  # a transform that needs the whole global batch (audio)
            idx = plan.perm[step * B:(step + 1) * B]
            g = torch.Generator().manual_seed(derive(self.seed, "pretrain.augment", plan.epoch,
                                                     step))
            return self.tf(self.source.rows(step, idx), g)[r0:r1], self.y[idx[r0:r1]]
        idx = plan.perm[step * B + r0:step * B + r1]
        xb = self.source.rows(step, idx)
        if not self.fast:
            return self.tf(xb, None), self.y[idx]
        if plan.draws is not None:
            xb = shift_flip(xb, plan.draws[step], self.tf.pad, self.tf.flip)
        x = (xb.permute(0, 3, 1, 2).float().div_(255.0) - self.mean) / self.std
        # NHWC bytes permuted are channels_last already; CPU trains on contiguous NCHW
        return (x if self.channels_last else x.contiguous()), self.y[idx]

    def step(self, plan: EpochPlan, step: int) -> torch.Tensor:
        x, y = self.batch(plan, step)
        if self.channels_last and not self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(self.ddp(x), y, reduction="sum") * (self.P / self.B)
        self.opt.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        self.opt.step()
        if not getattr(self.opt, "step_was_skipped", False):
            self.sched.step()
        return loss.detach().float()

    def close(self) -> None:
        self.source.close()


class Evaluator:
    """Rank 0's per-epoch metrics on the real test split: an fp32 copy of the weights measured
    with the FL engine's ``evaluate()``, so they equal what FL measures from the outputs."""

    def __init__(self, model_cfg: ModelConfig, model_shape: tuple, num_classes: int,
                 transform: Any, test: tuple[np.ndarray, np.ndarray], dev: torch.device,
                 val: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        from gptfl_hpc.train.models import build_model

        with torch.random.fork_rng(devices=[]):  # its init is overwritten; keep torch's RNG
            self.model = build_model(model_cfg, model_shape, num_classes).to(dev)
        self.x, self.y = torch.from_numpy(test[0]).to(dev), torch.from_numpy(test[1]).to(dev)
        self.val = None if val is None else (torch.from_numpy(val[0]).to(dev),
                                             torch.from_numpy(val[1]).to(dev))
        self.tf, self.dev, self.num_classes = transform, dev, num_classes

    @property
    def num_samples(self) -> int:
        return int(len(self.y))

    def __call__(self, trained: torch.nn.Module) -> dict:
        from gptfl_hpc.train.evaluate import evaluate

        self.model.load_state_dict(trained.state_dict())
        m = evaluate(self.model, self.x, self.y, self.tf, EVAL_BATCH_SIZE, self.dev,
                     self.num_classes)
        if self.val is not None:  # the synthetic validation split (pretrain.val_fraction)
            v = evaluate(self.model, self.val[0], self.val[1], self.tf, EVAL_BATCH_SIZE,
                         self.dev, self.num_classes)
            m.update(val_accuracy=v["accuracy"], val_loss=v["loss"])
        return m


# ------------------------------------------------------------------------------ checkpointing


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


class Checkpointer:
    """``out/pretrain_ckpt/``: one epoch's model and optimizer tensors, then ``state.json``."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.dir, self.fingerprint = directory, fingerprint

    def find(self, resume: bool) -> dict | None:
        """The checkpoint to continue, None to start; refuse another request's."""
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not all((self.dir / state[k]).is_file()
                                                      for k in ("model_file", "optim_file")):
                raise ValueError("incomplete")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("pretrain: ignoring unreadable checkpoint %s (%s)", path, e)
            return None
        if state.get("fingerprint") != self.fingerprint:
            raise StaleOutputError(f"{self.dir} holds a pretraining checkpoint of another "
                                   "request; use a new --out, or rerun with the settings that "
                                   "made it")
        if not resume:
            raise StaleOutputError(f"{self.dir} holds a partial pretraining of this request "
                                   f"(epoch {state.get('epoch')}); rerun with --resume to "
                                   "continue it, or use a new --out")
        return state

    def restorer(self, state: dict | None) -> Callable[..., None] | None:
        """A Trainer ``restore`` callback loading `state` (None: nothing to load)."""
        if state is None:
            return None

        def restore(model: torch.nn.Module, opt: Any, sched: Any) -> None:
            model.load_state_dict(load_safetensors(self.dir / state["model_file"])[0])
            tensors, _ = load_safetensors(self.dir / state["optim_file"])
            opt.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
            sched.load_state_dict(state["scheduler"])

        return restore

    def save(self, epoch: int, trainer: Trainer, history: list) -> None:
        """Tensors first, then state.json (the commit marker), then drop older epochs' files."""
        model_file = f"model-e{epoch:05d}.safetensors"
        optim_file = f"optim-e{epoch:05d}.safetensors"
        save_safetensors(trainer.model.state_dict(), self.dir / model_file)
        tensors, structure = flatten_optimizer_state(trainer.opt.state_dict())
        save_safetensors(tensors, self.dir / optim_file)
        write_json(self.dir / "state.json", {
            "format_version": FORMAT_VERSION, "epoch": epoch, "fingerprint": self.fingerprint,
            "model_file": model_file, "optim_file": optim_file, "optimizer": structure,
            "scheduler": trainer.sched.state_dict(), "history": history})
        for p in self.dir.glob("*-e*.safetensors"):
            if p.name not in (model_file, optim_file):
                p.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def agree_to_stop(comm: Any) -> bool:
    """Every rank marks the epoch boundary; the max-reduce makes them agree whether any rank got
    a stop request (and waits for rank 0's checkpoint before anyone goes on)."""
    stop = signals.boundary()
    return bool(comm.allreduce_max_(np.array([int(stop)], np.int32))[0])


# ------------------------------------------------------------------------------ GPU memory


def oom_message(dev: torch.device, inputs: Inputs, plan: dict | None, local_batch: int) -> str:
    p = plan or {}
    where = ("on the device" if p.get("path") == "device" else
             "streamed from host memory" if p.get("path") == "stream" else "not placed yet")
    return (f"pretraining ran out of GPU memory on {dev} ({_gib(p.get('total'))} GiB, "
            f"{_gib(p.get('free'))} GiB free at the start): synthetic set "
            f"{inputs.set.describe()} {where}, training step {_gib(p.get('step'))} GiB "
            f"estimated at {local_batch} samples per process; lower pretrain.batch_size "
            "(activations), set pretrain.data_path=stream (the set off the GPU), or use GPUs "
            "with more memory")


# ------------------------------------------------------------------------------------ the stage


@dataclasses.dataclass
class Result:
    """What the training part hands to the outputs (no model or device tensor in it)."""

    final_state: dict[str, torch.Tensor]
    num_parameters: int
    steps_per_epoch: int
    per_process: list[int]
    history: list[dict]
    test_samples: int
    backbone: Any
    data: dict


def pretrain(cfg: PretrainConfig, *, model_cfg: ModelConfig, run_cfg: Any,
             synthetic_path: str | Path, data_dir: str | Path, out_dir: str | Path,
             augment: bool, manifest: Any = None, fingerprint: str = "", resume: bool = False,
             comm: Any = None, leak_check: bool = True,
             names: tuple[str, str] = (WEIGHTS_NAME, INFO_NAME)) -> dict:
    """Train ``build_model(model_cfg, ...)`` on the synthetic set with DDP over the ranks of `comm`.

    Args:
        cfg: the ``pretrain`` config section; model_cfg: the ``model`` section; run_cfg: the
            ``run`` section (seed, device, cpu_kernels, rendezvous).
        synthetic_path: HDF5 with ``images`` uint8 (N,H,W,C) (or ``audio`` int16 (N,L)) and
            ``labels`` int (N,).
        data_dir: prepared data directory; its manifest gives shape, classes and normalisation,
            and its test split the per-epoch metrics (the server never reads client shards).
        out_dir: where ``pretrained.safetensors``, ``pretrained.json`` and the checkpoint go.
        augment: training augmentation (the FL setting ``fl.augment``, so both phases match).
        fingerprint: the stage's request fingerprint (checkpoints and outputs carry it).
        resume: continue a checkpoint of this request (else one is refused).
        comm: the processes taking part; None = the world.
        leak_check: refuse samples identical to test images (see Inputs.leak_check).
        names: the file names of the weights and the info JSON in `out_dir`.

    Returns:
        The ``pretrained.json`` dict, on every process.
    """
    from gptfl_hpc.parallel.accel import want_cuda
    from gptfl_hpc.parallel.comm import get_comm

    t_start = time.perf_counter()
    comm = comm if comm is not None else get_comm()
    signals.install()
    faults.point("pretrain", comm.rank)
    if cfg.batch_size < comm.size:
        raise ConfigError(f"config key pretrain.batch_size: {cfg.batch_size} is smaller than the "
                          f"{comm.size} pretraining processes (run.server_processes); valid: "
                          f">= {comm.size}")
    use_cuda = want_cuda(run_cfg.device)
    mixed = _resolve_precision(cfg.mixed_precision, use_cuda)
    inputs = read_inputs(cfg, comm, manifest, data_dir, Path(synthetic_path).resolve(),
                         run_cfg.seed)
    inputs.leak_check = leak_check
    ckpt = Checkpointer(Path(out_dir) / CKPT_DIR, fingerprint)
    state = on_root(comm, lambda: ckpt.find(resume))
    nodes = plan_host(comm, inputs.set)
    host = None  # no node can hold a host copy: the GPUs must (load_to_devices)
    if all(n["fits"] for n in nodes):
        host = load_host_copy(comm, inputs)
    elif not use_cuda:
        raise DataError(too_big_message(inputs.set, nodes))
    try:
        result = train(cfg, model_cfg, run_cfg, comm, inputs, host, nodes, state, ckpt,
                       augment=augment, mixed=mixed)
    except Preempted:  # agreed by every rank: free the host copy together
        if host is not None:
            host.free()
        raise
    if host is not None:
        host.free()
    result.data.update(host_copies=host.hosts if host else 0, nodes=nodes,
                       rank0_shared_window=bool(host is not None and host.shared))
    release_device_memory("pretraining")
    return on_root(comm, lambda: write_outputs(
        cfg, model_cfg, run_cfg, inputs, result, out=Path(out_dir), data_dir=data_dir,
        ckpt=ckpt, augment=augment, fingerprint=fingerprint, mixed=mixed,
        device_type="cuda" if use_cuda else "cpu", num_processes=comm.size,
        wall=time.perf_counter() - t_start, names=names))


def make_model(model_cfg: ModelConfig, cfg: PretrainConfig, inputs: Inputs, model_shape: tuple,
               seed: int, fresh: bool, rank: int) -> tuple[torch.nn.Module, Any]:
    """The model, initialised from (seed, "pretrain.init"), and the backbone it loaded."""
    from gptfl_hpc.train.models import build_model, load_pretrained_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, "pretrain.init"))
        model = build_model(model_cfg, model_shape, inputs.manifest.num_classes)
    backbone = None
    if cfg.init and fresh:
        backbone = load_pretrained_backbone(model, cfg.init)
        if rank == 0:
            log.info("pretrain: backbone %s: %s", cfg.init, backbone.summary())
    return model, backbone


def place_data(cfg: PretrainConfig, comm: Any, dev: torch.device, inputs: Inputs, host: Any,
               nodes: list[dict], besides: int, step_rows: int) -> tuple[list[dict], Any]:
    """Every process's data path and batch source (collective): see plan_device. Without a
    host copy the set must fit on every GPU (else the one-line error names both sizes); when
    every GPU holds it, the host copy is released."""
    plans = plan_device(cfg, comm, dev, inputs.set, besides)
    if host is None:
        if any(p["path"] != "device" for p in plans):
            raise DataError(too_big_message(inputs.set, nodes, plans))
        return plans, ResidentRows(None, dev, load_to_devices(comm, inputs, dev))
    source = make_source(plans[comm.rank]["path"], host.array, dev, step_rows)
    if dev.type == "cuda" and all(p["path"] == "device" for p in plans):
        host.free()  # every GPU holds the set: the host copy is not needed any more
    return plans, source


def train(cfg: PretrainConfig, model_cfg: ModelConfig, run_cfg: Any, comm: Any, inputs: Inputs,
          host: Any, nodes: list[dict], state: dict | None, ckpt: Checkpointer, *,
          augment: bool, mixed: str) -> Result:
    """Set up the trainer (and rank 0's evaluator) on each process's device, run the epochs,
    and return the final weights on the host; every model and device tensor is gone after."""
    from gptfl_hpc.numerics import training_kernels
    from gptfl_hpc.parallel.accel import accelerator, want_cuda
    from gptfl_hpc.train.models import num_parameters
    from gptfl_hpc.train.transforms import make_transform

    m, seed, P, B = inputs.manifest, run_cfg.seed, comm.size, cfg.batch_size
    shape = tuple(int(s) for s in m.input_shape)
    train_tf = make_transform(m.kind, m.norm_mean, m.norm_std, shape, augment)
    model_shape = tuple(train_tf.output_shape)
    model, backbone = make_model(model_cfg, cfg, inputs, model_shape, seed, state is None,
                                 comm.rank)
    history: list[dict] = list(state["history"]) if state else []
    plans: list[dict] = []
    local_batch = (comm.rank + 1) * B // P - comm.rank * B // P
    # rows a step's source delivers: this process's slice, or the global batch for a transform
    # that draws its augmentation for the whole batch itself (audio)
    step_rows = B if train_tf.augment and not isinstance(train_tf, ImageTransform) else \
        -(-B // P)
    with training_kernels(run_cfg.cpu_kernels, "cuda" if want_cuda(run_cfg.device) else "cpu"), \
            accelerator(comm, device=run_cfg.device, mixed_precision=mixed,
                        rendezvous=run_cfg.rendezvous) as acc:
        dev, source, trainer = torch.device(acc.device), None, None
        try:
            test = inputs.test
            eval_bytes = (sum(p.numel() * 4 for p in model.parameters()) + test[0].nbytes
                          if test is not None else 0)
            cl = cfg.channels_last and dev.type == "cuda"
            model.to(dev, memory_format=torch.channels_last if cl else torch.contiguous_format)
            besides = step_bytes(model, cfg, local_batch, model_shape, mixed, dev,
                                 num_processes=P, eval_bytes=eval_bytes)
            plans, source = place_data(cfg, comm, dev, inputs, host, nodes,
                                       besides + inputs.labels.nbytes, step_rows)
            trainer = Trainer(cfg, acc, model, source, inputs.labels, train_tf, seed=seed,
                              num_processes=P, restore=ckpt.restorer(state),
                              rows=inputs.train_rows)
            eval_tf = make_transform(m.kind, m.norm_mean, m.norm_std, shape, False)
            evaluator = Evaluator(model_cfg, model_shape, m.num_classes, eval_tf, test, dev,
                                  val=inputs.val) \
                if comm.rank == 0 and test is not None else None
            _log_start(cfg, model_cfg, comm, trainer, inputs, plans, mixed, state, ckpt)
            run_epochs(cfg, comm, trainer, evaluator, ckpt, history,
                       int(state["epoch"]) if state else 0)
            return Result(
                final_state={k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                num_parameters=num_parameters(trainer.model),
                steps_per_epoch=trainer.steps_per_epoch,
                per_process=[b - a for a, b in zip(trainer.bounds, trainer.bounds[1:])],
                history=history, test_samples=evaluator.num_samples if evaluator else 0,
                backbone=backbone, data={"set_bytes": inputs.set.nbytes, "per_process": [
                    {k: p.get(k) for k in ("path", "device", "free", "step", "margin")}
                    for p in plans]})
        except torch.cuda.OutOfMemoryError:
            mine = plans[comm.rank] if plans else None
            raise ConfigError(oom_message(dev, inputs, mine, local_batch)) from None
        finally:
            if source is not None:
                source.close()


def _log_start(cfg: PretrainConfig, model_cfg: ModelConfig, comm: Any, trainer: Trainer,
               inputs: Inputs, plans: list[dict], mixed: str, state: dict | None,
               ckpt: Checkpointer) -> None:
    from gptfl_hpc.train.models import num_parameters

    # DDP warns once when a conv weight with one input channel gets its gradient in another
    # (equivalent) stride layout than its bucket; harmless, and it would only spam the logs.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    if state:
        log.info("pretrain: resuming after epoch %d/%d from %s", int(state["epoch"]),
                 cfg.epochs, ckpt.dir)
    if comm.rank != 0:
        return
    paths = ", ".join(
        f"r{p['rank']} {p['path']}" + (f" ({_gib(p['free'])} GiB free, step "
                                        f"{_gib(p['step'])} GiB)" if "free" in p else "")
        for p in plans)
    log.info("pretrain data: %s; one host copy per node; data path per process: %s",
             inputs.set.describe(), paths)
    if not state:
        if inputs.val_rows is not None:
            log.info("pretrain: %d of %d synthetic samples held out as the server's validation "
                     "split (pretrain.val_fraction %g)", len(inputs.val_rows),
                     inputs.set.num_samples, cfg.val_fraction)
        log.info("pretrain: %s (%d parameters) on %d synthetic samples from %s; %d epochs x "
                 "%d steps, global batch %d (%s per process), %s, %s, mixed precision %s, "
                 "%d torch thread(s) per process", model_cfg.name,
                 num_parameters(trainer.model), trainer.N, inputs.set.path, cfg.epochs,
                 trainer.steps_per_epoch, cfg.batch_size,
                 "+".join(str(b - a) for a, b in zip(trainer.bounds, trainer.bounds[1:])),
                 cfg.optimizer, cfg.schedule, mixed, torch.get_num_threads())


def run_epochs(cfg: PretrainConfig, comm: Any, trainer: Trainer,
               evaluator: Evaluator | None, ckpt: Checkpointer, history: list[dict],
               start: int) -> None:
    """The loop: train an epoch, agree on the mean loss; rank 0 evaluates, logs and
    checkpoints; the ranks agree whether to stop."""
    P, steps = comm.size, trainer.steps_per_epoch
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        loss = trainer.train_epoch(epoch)
        mean_loss = comm.allreduce_sum_(np.array([loss], np.float64))[0] / (P * steps)
        train_s = time.perf_counter() - t0
        if evaluator is not None:
            metrics = evaluator(trainer.model)
            rate = steps * cfg.batch_size / train_s
            history.append({"epoch": epoch + 1, "loss": mean_loss,
                            "lr": trainer.sched.get_last_lr()[0],
                            "test_accuracy": metrics["accuracy"],
                            "test_macro_f1": metrics["macro_f1"], "test_loss": metrics["loss"],
                            "train_seconds": train_s, "images_per_second": rate,
                            "num_processes": P,
                            **{k: metrics[k] for k in ("val_accuracy", "val_loss")
                               if k in metrics}})
            log.info("pretrain epoch %d/%d: loss %.4f, test acc %.4f, macro-F1 %.4f%s, %.0f "
                     "img/s (%d process%s, %s)", epoch + 1, cfg.epochs, mean_loss,
                     metrics["accuracy"], metrics["macro_f1"],
                     f", synthetic-val acc {metrics['val_accuracy']:.4f}"
                     if "val_accuracy" in metrics else "", rate, P, "es" if P > 1 else "",
                     trainer.dev.type)
            ckpt.save(epoch + 1, trainer, history)
        if agree_to_stop(comm) and epoch + 1 < cfg.epochs:
            raise Preempted(f"pretraining stopped after epoch {epoch + 1}/{cfg.epochs} "
                            f"({signals.reason()}); checkpoint saved in {ckpt.dir}; rerun with "
                            "--resume to continue")


def write_outputs(cfg: PretrainConfig, model_cfg: ModelConfig, run_cfg: Any, inputs: Inputs,
                  r: Result, *, out: Path, data_dir: str | Path, ckpt: Checkpointer,
                  augment: bool, fingerprint: str, mixed: str, device_type: str,
                  num_processes: int, wall: float,
                  names: tuple[str, str] = (WEIGHTS_NAME, INFO_NAME)) -> dict:
    """Rank 0: the weights, then pretrained.json; the checkpoint goes."""
    m, history = inputs.manifest, r.history
    last = history[-1]
    shape = [int(s) for s in m.input_shape]
    train_s = sum(h["train_seconds"] for h in history)
    images_seen = len(history) * r.steps_per_epoch * cfg.batch_size
    save_safetensors(r.final_state, out / names[0],
                     metadata={"format": "gptfl-pretrained", "fingerprint": fingerprint,
                               "model": json.dumps(dataclasses.asdict(model_cfg)),
                               "input_shape": json.dumps(shape),
                               "num_classes": str(m.num_classes)})
    init: Any = "random"
    if r.backbone is not None:
        init = {"path": cfg.init, "summary": r.backbone.summary()}
    elif cfg.init:
        init = {"path": cfg.init, "summary": "resumed from a checkpoint"}
    info = {
        "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
        "model": dataclasses.asdict(model_cfg), "num_parameters": r.num_parameters,
        "input_shape": shape, "num_classes": m.num_classes,
        "label_names": list(m.label_names), "norm_mean": list(m.norm_mean),
        "norm_std": list(m.norm_std), "augment": bool(augment), "seed": int(run_cfg.seed),
        "pretrain": dataclasses.asdict(cfg), "epochs": cfg.epochs, "init": init,
        "steps": r.steps_per_epoch * cfg.epochs, "global_batch_size": cfg.batch_size,
        "per_process_batch_sizes": r.per_process, "num_processes": num_processes,
        "device": device_type, "mixed_precision": mixed,
        "synthetic": {"path": inputs.set.path, "num_samples": inputs.set.num_samples,
                      "dataset": inputs.set.dataset},
        # the server's validation split (pretrain.val_fraction): never trained on; the FL
        # server chooses GPT-FL's model on it (fl.select=synthetic_val)
        "synthetic_val": None if inputs.val_rows is None else {
            "fraction": cfg.val_fraction, "num_samples": int(len(inputs.val_rows)),
            "rows": [int(i) for i in inputs.val_rows], "accuracy": last.get("val_accuracy"),
            "loss": last.get("val_loss")},
        "data_path": r.data,
        "data_dir": str(Path(data_dir).resolve()),
        "test": {"accuracy": last["test_accuracy"], "macro_f1": last["test_macro_f1"],
                 "loss": last["test_loss"], "num_samples": r.test_samples},
        # the same three flat, as report.py and the FL history name them
        "test_accuracy": last["test_accuracy"], "test_macro_f1": last["test_macro_f1"],
        "test_loss": last["test_loss"],
        "wall_seconds": wall, "train_seconds": train_s,
        "images_per_second": images_seen / train_s if train_s > 0 else None,
        "history": history,
    }
    write_json(out / names[1], info)
    ckpt.remove()
    log.info("pretrain: done; synthetic-only test accuracy %.4f, macro-F1 %.4f -> %s",
             last["test_accuracy"], last["test_macro_f1"], out / names[0])
    return info
