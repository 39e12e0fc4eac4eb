"""Benchmark: seconds per FL round, gptfl-hpc's engine vs pfl-research, on the same workloads.

    python benchmarks/bench_fl_round.py --setup-pfl /tmp/pfl-venv      # once: pfl in its own venv
    python benchmarks/bench_fl_round.py --json bench_fl_round.json      # ~15 min on 2 quiet cores
                                                                        # (+ the vmapped runs)
    python benchmarks/bench_fl_round.py --no-pfl --tiny                 # plumbing only, ~30 s

Two workloads, each run by both systems in the same invocation:

- ``cifar``: pfl-research's CIFAR-10 benchmark shape (benchmarks/image_classification,
  configs/baseline.yaml: dataset cifar10_iid, 1000 users x 50 images of 32x32x3, cohort 50,
  1 local epoch, local batch 10, local SGD lr 0.1, central SGD lr 1.0, model ``simple_cnn``)
  on RANDOM pixels and labels (seeded; speed only, no download). Our side reads the same images
  as an ``arrays`` source (.npz, natural partition by a ``client`` key, fixed test split) with
  ``model.name=simple_cnn`` (pfl's CNN, same layers) when the registry has it; otherwise it falls
  back, LOUDLY, to ``convnet`` (width 32, depth 2) and the ratio compares different models.
- ``digits``: our default (configs/digits.yaml, FL stage only: 20 Dirichlet clients, 5 per round,
  Adam with the cosine client lr, augmentation, ``digits_cnn``). pfl trains the very client
  shards our ``prepare`` wrote, with our model class and our input transform (imported from
  this repository), its own local Adam per user, weighted by samples, cosine lr as a pfl
  HyperParam.

Runs (``--procs``, ``--pfl-workers``):

- ours: ``python -m mpi4py -m gptfl_hpc federate CFG --out DIR`` as one plain process (P=1)
  or under ``mpiexec -n P`` (rank 0 server, P-1 client ranks), P in 1,2,3 by default. Threads
  are the engine's own choice (``run.threads=0``: its share of the CPUs) unless
  ``--ours-threads``; what each rank used is read back from summary.json and printed.
- ours, vmapped (system ``ours:vmap``): the same runs with ``fl.vmap_clients=N``, each client
  rank training up to N of its clients of a round at once (gptfl_hpc/fl/cohort.py).
  ``--vmap-clients N``; default: the shape's clients per round (a rank's whole share at once);
  0 turns it off; off with ``--tiny`` unless given. ``--vmap-procs``: its process counts
  (default ``--procs``). Its rows add ``vs_ours``: its median lap over ours at the same
  process count (< 1: the vmapped mode is faster).
- ours, variant (``--ours-extra-overrides KEY=VAL ...``, label ``--ours-extra-label``): any
  other mode of ours; the same runs with those overrides.
- pfl: the PyPI ``pfl`` package (``PFL_VERSION``) with torch==2.13.0 in a SEPARATE venv
  (``--setup-pfl DIR`` makes it: ``python3 -m venv DIR && DIR/bin/pip install torch==2.13.0
  pfl==0.6.0``), driven by this file's ``--pfl-worker`` mode (the training script of pfl's
  image-classification benchmark, restated: pfl's PyPI package does not ship benchmarks/).
  1 worker: a plain process; W workers: ``torchrun --standalone --nnodes=1
  --nproc_per_node=W`` (pfl's documented multi-process mode for PyTorch models, see its
  "Fast distributed simulations" guide; it shards each cohort over the workers and all-reduces
  the update with torch.distributed/gloo). Each worker runs ``cores // W`` torch threads
  (``--pfl-threads``), set through OMP_NUM_THREADS/MKL_NUM_THREADS and torch.set_num_threads.

Timing, the same definition on both sides:

- a round's time ("lap") is wall clock from the end of the previous round to the end of this
  one, evaluation excluded: ours from metrics.jsonl (consecutive ``wall_seconds`` minus the
  round's ``t_eval``; round 1: its ``t_round``), pfl from a callback that runs first after each
  central iteration (round 1: from ``on_train_begin``);
- steady state (``s_per_round``): the MEDIAN lap over rounds ``--warmup``+1 .. R, robust to
  bursts of other work on a shared machine (mean, min and max are printed too); first round
  separately;
- start-up: launch-to-exit wall clock of the whole command minus all laps and the timed
  evaluation (process start, imports, MPI/torch.distributed init, data loading, model build,
  final save, exit);
- evaluation runs once, after the last round, outside the laps (ours: ``fl.eval_every=R``;
  pfl: one central evaluation after ``algorithm.run``; ``evaluation_frequency=R+1`` so pfl's
  per-user evaluation only happens in round 1, which the steady state skips); checkpoints only
  at the last round (``fl.checkpoint_every=R``; pfl's benchmark saves none).

pfl trains the same clients as ours in every round (``--pfl-sampler ours``: a user sampler that
replays our engine's client sequence; ``random`` is pfl's own sampler, with replacement), so
both sides do the same work per round even where client sizes differ (digits).

The ratio uses the median laps; ``ratio_best`` divides the fastest steady laps (min), the
least disturbed estimate when other work shares the machine.

Ratios pair ours at P processes with pfl at W = max(1, P-1) workers (the same number of
processes training clients). Targets, printed but not asserted: ours/pfl <= 0.8 on the cifar
shape, <= 0.5 on digits. ``--repeats N`` runs every configuration N times, interleaved, and
pools their steady-state laps. Each run records the load average when it started; a row whose
laps spread more than 2x is flagged as noisy. Seeds are fixed (run.seed / torch+numpy seeds).

Exit status: 0 when every run succeeded, 1 when some run failed (the failure is in the table
and in the JSON, with the tail of its log), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PFL_VERSION = "0.6.0"
TORCH_PIN = "torch==2.13.0"
DEFAULT_PFL_VENV = "/tmp/pfl-venv"
TARGETS = {"cifar": 0.8, "digits": 0.5}
SHAPES = ("cifar", "digits")
JSON_VERSION = 1

# what an Open MPI 5 pip wheel needs as root on a small machine (as tests/helpers.py)
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "PRTE_MCA_hwloc_default_binding_policy": "none",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ============================================================================================
# pfl side: runs under the pfl venv's python (no gptfl_hpc import except the digits model and
# transform, put on sys.path explicitly)


def _pfl_simple_cnn(input_shape: tuple[int, int, int], num_outputs: int) -> Any:
    """pfl-research benchmarks/model/pytorch/cnn.py ``simple_cnn`` (Apple, Apache-2.0), restated:
    Transpose2D, Conv(32,3x3)-ReLU-Conv(64,3x3)-ReLU-MaxPool2-Dropout(.25)-FC(128)-ReLU-
    Dropout(.5)-FC, Glorot-uniform weights; its ``loss``/``metrics`` as in benchmarks/model/
    pytorch/metrics.py (targets cast with ``.long()``)."""
    import torch
    from pfl.metrics import Weighted
    from torch import nn

    class Transpose2D(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs.permute((0, 3, 1, 2))

    class SimpleCNN(nn.Sequential):
        def loss(self, inputs: torch.Tensor, targets: torch.Tensor,
                 eval: bool = False) -> torch.Tensor:  # noqa: A002 (pfl's signature)
            self.eval() if eval else self.train()
            return nn.CrossEntropyLoss(reduction="mean")(self(inputs), targets.long())

        @torch.no_grad()
        def metrics(self, inputs: torch.Tensor, targets: torch.Tensor,
                    eval: bool = True) -> dict:  # noqa: A002
            self.eval() if eval else self.train()
            logits = self(inputs)
            correct = (logits.argmax(-1) == targets.long()).float().sum().item()
            loss = nn.CrossEntropyLoss(reduction="sum")(logits, targets.long()).item()
            return {"loss": Weighted(loss, len(inputs)),
                    "accuracy": Weighted(correct, len(inputs))}

    in_channels = input_shape[-1]
    pooled = (input_shape[0] - 4) // 2
    model = SimpleCNN(
        Transpose2D(), nn.Conv2d(in_channels, 32, kernel_size=(3, 3)), nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=(3, 3)), nn.ReLU(), nn.MaxPool2d((2, 2)), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(pooled * pooled * 64, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, num_outputs))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            torch.nn.init.xavier_uniform_(m.weight)
    return model


def _pfl_ours_model(spec: dict, in_shape: tuple[int, int, int], num_classes: int) -> Any:
    """Our registry model behind our input transform, with pfl's loss/metrics interface."""
    import torch
    import torch.nn.functional as F
    from pfl.metrics import Weighted
    from torch import nn

    sys.path.insert(0, spec["repo"])
    from gptfl_hpc.config import ModelConfig
    from gptfl_hpc.train.models import build_model
    from gptfl_hpc.train.transforms import ImageTransform

    net = build_model(ModelConfig(**spec["model_cfg"]), in_shape, num_classes)
    mean, std = spec["norm_mean"], spec["norm_std"]
    train_tf = ImageTransform(mean, std, in_shape, spec["augment"])
    eval_tf = ImageTransform(mean, std, in_shape, False)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((train_tf if self.training else eval_tf)(x))

        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False  # noqa: A002
                 ) -> torch.Tensor:
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y.long())

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True  # noqa: A002
                    ) -> dict:
            self.eval() if eval else self.train()
            logits = self(x)
            correct = (logits.argmax(-1) == y.long()).float().sum().item()
            loss = F.cross_entropy(logits, y.long(), reduction="sum").item()
            return {"loss": Weighted(loss, len(x)), "accuracy": Weighted(correct, len(x))}

    return Wrapped()


def pfl_worker(spec_path: str) -> None:
    """One pfl process (of 1, or of W under torchrun): train, time the rounds, evaluate once."""
    t_enter = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import numpy as np
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints, WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.hyperparam.base import HyperParam
    from pfl.internal.ops.pytorch_ops import get_default_device, to_tensor
    from pfl.internal.ops.selector import get_default_framework_module as get_ops
    from pfl.metrics import Metrics, StringMetricName
    from pfl.model.pytorch import PyTorchModel  # sets the framework: torch.distributed init
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, NoPrivacy

    rank, world = get_ops().distributed.global_rank, get_ops().distributed.world_size
    seed = int(spec["seed"])
    torch.random.manual_seed(seed)
    np.random.seed(seed)

    with np.load(spec["data"], allow_pickle=False) as z:
        x, y, keys = z["images"], z["labels"], z["client"]
        x_test, y_test = z["images_test"], z["labels_test"]
    in_shape = tuple(int(s) for s in x.shape[1:])
    num_classes = int(max(y.max(), y_test.max())) + 1
    if spec["model"] == "pfl_simple_cnn":
        # pfl's cifar10 benchmark: float32 pixels normalised per channel up front, then tensors
        xf = x.astype(np.float32)
        mean = xf.mean(axis=(0, 1, 2), dtype="float64")
        std = xf.std(axis=(0, 1, 2), dtype="float64")
        xt = to_tensor(((xf - mean) / std).astype(np.float32))
        xt_test = to_tensor(((x_test.astype(np.float32) - mean) / std).astype(np.float32))
        yt, yt_test = to_tensor(y), to_tensor(y_test)
        model_nn = _pfl_simple_cnn(in_shape, num_classes)
    else:
        # our digits workload: uint8 images, our transform (normalise, augment) in the model
        xt, xt_test = torch.from_numpy(x), torch.from_numpy(x_test)
        yt, yt_test = torch.from_numpy(y.astype(np.int64)), torch.from_numpy(
            y_test.astype(np.int64))
        model_nn = _pfl_ours_model(spec, in_shape, num_classes)
    order = np.argsort(keys, kind="stable")
    uniq, starts = np.unique(keys[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    users = {i: (xt[torch.from_numpy(order[bounds[i]:bounds[i + 1]])],
                 yt[torch.from_numpy(order[bounds[i]:bounds[i + 1]])])
             for i in range(len(uniq))}

    class Replay(TrainingProcessCallback):
        """User sampler replaying our engine's client sequence, round by round (user i = the
        i-th client key in sorted order = our client i). pfl's distributed sampler draws
        world_size users per user it trains and keeps its rank's one; draws past the round's
        cohort (a cohort not divisible by the workers) are never trained."""

        def __init__(self, schedule: list[list[int]]) -> None:
            self.schedule, self.round, self.pos = schedule, 0, 0

        def __call__(self) -> int:
            cohort = self.schedule[self.round]
            self.pos += 1
            return int(cohort[(self.pos - 1) % len(cohort)])

        def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Metrics]:
            self.round = min(central_iteration + 1, len(self.schedule) - 1)
            self.pos = 0
            return False, Metrics()

    replay = Replay(spec["schedule"]) if spec.get("schedule") else None
    sampler = replay or get_user_sampler("random", range(len(users)))
    train_data = FederatedDataset.from_slices(users, sampler)
    model_nn = model_nn.to(get_default_device())
    params = [p for p in model_nn.parameters() if p.requires_grad]
    local_opt = torch.optim.Adam if spec["local_optimizer"] == "adam" else torch.optim.SGD
    model = PyTorchModel(model=model_nn, local_optimizer_create=local_opt,
                         central_optimizer=torch.optim.SGD(params, spec["central_lr"]))
    weighting = WeightByDatapoints() if spec["weight_by_samples"] else WeightByUser()
    backend = SimulatedBackend(training_data=train_data, val_data=train_data,
                               postprocessors=[weighting, NoPrivacy(),
                                               CentrallyAppliedPrivacyMechanism(NoPrivacy())])
    rounds = int(spec["rounds"])

    class Laps(TrainingProcessCallback):
        """Wall clock per central iteration (first in the callback list)."""

        def __init__(self) -> None:
            self.laps: list[float] = []
            self.t = 0.0

        def on_train_begin(self, *, model: Any) -> Metrics:
            self.t = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Metrics]:
            now = time.perf_counter()
            self.laps.append(now - self.t)
            self.t = now
            return False, Metrics()

    class CosineLR(HyperParam, TrainingProcessCallback):
        """Our fl.client_lr_schedule=cosine: lr of round r = lr (1 + cos(pi (r-1)/R)) / 2."""

        def __init__(self, base: float) -> None:
            self.base, self.round = base, 1

        def value(self) -> float:
            return self.base * 0.5 * (1.0 + math.cos(math.pi * (self.round - 1) / rounds))

        def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Metrics]:
            self.round = central_iteration + 2
            return False, Metrics()

    laps = Laps()
    callbacks: list[Any] = [laps] + ([replay] if replay else [])
    lr: Any = float(spec["local_lr"])
    if spec["lr_schedule"] == "cosine":
        lr = CosineLR(lr)
        callbacks.append(lr)
    algo_params = NNAlgorithmParams(central_num_iterations=rounds,
                                    evaluation_frequency=rounds + 1,
                                    train_cohort_size=int(spec["cohort_size"]),
                                    val_cohort_size=0)
    train_params = NNTrainHyperParams(local_learning_rate=lr,
                                      local_num_epochs=int(spec["local_epochs"]),
                                      local_batch_size=int(spec["batch_size"]))
    eval_params = NNEvalHyperParams(local_batch_size=int(spec["eval_batch_size"]))
    t_setup = time.perf_counter() - t_enter
    model = FederatedAveraging().run(algorithm_params=algo_params, backend=backend, model=model,
                                     model_train_params=train_params,
                                     model_eval_params=eval_params, callbacks=callbacks)
    if rank == 0:
        te = time.perf_counter()
        m = model.evaluate(Dataset(raw_data=[xt_test, yt_test]), lambda n: StringMetricName(n),
                           eval_params).to_simple_dict(to_lowercase=True)
        import pfl

        result = {"laps": laps.laps, "eval_s": time.perf_counter() - te,
                  "accuracy": float(m.get("accuracy", float("nan"))),
                  "threads": torch.get_num_threads(), "world_size": world,
                  "users": len(users), "in_process_setup_s": t_setup,
                  "pfl_version": getattr(pfl, "__version__", None) or _dist_version("pfl"),
                  "torch_version": torch.__version__}
        Path(spec["result"]).write_text(json.dumps(result))
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ============================================================================================
# driver: runs under this repository's venv


def _bench_error(msg: str) -> Exception:
    sys.path.insert(0, str(REPO))
    from gptfl_hpc.errors import ConfigError

    return ConfigError(msg)


@dataclass
class Shape:
    name: str
    description: str
    ours_config: Path
    ours_overrides: list[str]
    rounds: int
    warmup: int
    pfl_spec: dict
    info: dict = field(default_factory=dict)
    prepare: tuple = ()
    """(config, overrides, data dir, log) of `gptfl-hpc prepare` for this shape's data."""


@dataclass
class RunResult:
    shape: str
    system: str
    """'ours', 'ours:<label>' (the --ours-extra-overrides variant) or 'pfl'."""
    procs: int
    training_procs: int
    repeat: int
    ok: bool = False
    command: str = ""
    threads_per_proc: list[int] = field(default_factory=list)
    laps: list[float] = field(default_factory=list)
    s_per_round: float | None = None
    """Median steady-state lap (robust to other processes' bursts on a shared machine)."""
    mean_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    first_round_s: float | None = None
    startup_s: float | None = None
    eval_s: float | None = None
    total_s: float | None = None
    accuracy: float | None = None
    error: str | None = None
    log: str = ""
    load_before: list[float] = field(default_factory=list)
    """1/5/15-minute load average when the run started (other work on the machine)."""
    load_after: list[float] = field(default_factory=list)


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):  # never inherit a Slurm allocation's or an outer MPI job's world
        if k.startswith(("SLURM_", "OMPI_COMM_WORLD", "PMI_", "PMIX_", "PFL_WORKER")) or \
                k in THREAD_VARS or k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
            del env[k]
    env.update(MPI_ENV)
    env.update(extra or {})
    return env


def _mpiexec() -> str:
    cand = Path(sys.executable).with_name("mpiexec")
    return str(cand) if cand.exists() else "mpiexec"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _lap_stats(res: RunResult, warmup: int) -> None:
    steady = res.laps[warmup:]
    res.first_round_s = res.laps[0] if res.laps else None
    if steady:
        res.s_per_round = statistics.median(steady)
        res.mean_s = statistics.fmean(steady)
        res.min_s, res.max_s = min(steady), max(steady)


# ---------------------------------------------------------------------------------- datasets


def make_cifar_shape(path: Path, clients: int, per_client: int, test: int, seed: int) -> None:
    """Random uint8 pixels/labels in pfl's CIFAR-10 shape, as an `arrays` .npz for our engine."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = clients * per_client
    np.savez(path,
             images=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, size=n, dtype=np.int64),
             client=np.repeat(np.arange(clients, dtype=np.int64), per_client),
             images_test=rng.integers(0, 256, size=(test, 32, 32, 3), dtype=np.uint8),
             labels_test=rng.integers(0, 10, size=test, dtype=np.int64))


def export_prepared(data_dir: Path, path: Path) -> dict:
    """Our prepared client shards + test split -> one .npz for pfl (same partition, same data)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from gptfl_hpc.data.manifest import Manifest
    from gptfl_hpc.data.shards import read_shard

    m = Manifest.load(data_dir)
    xs, ys, ks = [], [], []
    for c in m.clients:
        x, y, _ = read_shard(m.client_path(data_dir, c.id))
        xs.append(x)
        ys.append(y)
        ks.append(np.full(len(y), c.id, dtype=np.int64))
    tx, ty, _ = read_shard(m.test_path(data_dir))
    np.savez(path, images=np.concatenate(xs), labels=np.concatenate(ys),
             client=np.concatenate(ks), images_test=tx, labels_test=ty)
    return {"norm_mean": list(m.norm_mean), "norm_std": list(m.norm_std),
            "clients": len(m.clients), "samples": int(sum(len(y) for y in ys))}


def _run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: float,
                cwd: Path = REPO) -> tuple[int, float]:
    """Run `cmd` in its own session; on a timeout or an interrupt, SIGKILL its whole process
    group (mpiexec's or torchrun's ranks included: the engine turns SIGTERM into a graceful
    stop at the next round boundary, which is not what a benchmark abort wants)."""
    import signal

    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            f.write(f"\n[bench] timed out after {timeout:.0f} s\n")
            rc = 124
        finally:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return rc, time.perf_counter() - t0


def _ours_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpi4py", "-m", "gptfl_hpc", *args]


def _prepare(cfg: Path, overrides: list[str], out: Path, log: Path, timeout: float) -> None:
    """`gptfl-hpc prepare` into `out` (the shape's data.dir). It keeps complete data made for
    the same request and refuses data made for another one (an older engine version, other
    keys): that data is ours, so it is deleted and prepared afresh."""
    cmd = _ours_cli("prepare", str(cfg), *overrides, "--out", str(out))
    env = _clean_env({"OMP_NUM_THREADS": "1"})
    rc, _ = _run_logged(cmd, log, env, timeout)
    if rc != 0 and out.exists():
        shutil.rmtree(out)
        rc, _ = _run_logged(cmd, log, env, timeout)
    if rc != 0:
        raise RuntimeError(f"gptfl-hpc prepare failed (rc {rc}); log {log}:\n{_tail(log)}")


def _model_for_cifar(want: str) -> tuple[list[str], str, bool]:
    """(model overrides, model name, matches pfl's simple_cnn)."""
    sys.path.insert(0, str(REPO))
    from gptfl_hpc.config import MODEL_NAMES

    if want != "auto":
        if want not in MODEL_NAMES:
            raise _bench_error(f"--ours-model {want!r}: unknown model; valid: auto, "
                               + ", ".join(MODEL_NAMES))
        return [f"model.name={want}"], want, want == "simple_cnn"
    if "simple_cnn" in MODEL_NAMES:
        return ["model.name=simple_cnn"], "simple_cnn", True
    return ["model.name=convnet", "model.width=32", "model.depth=2"], "convnet(32x2)", False


def _schedule(args: argparse.Namespace, rounds: int, clients: int, k: int
              ) -> list[list[int]] | None:
    """Our engine's sampled clients for rounds 1..R (pfl replays them), or None: pfl's own
    'random' user sampler (--pfl-sampler random)."""
    if args.pfl_sampler != "ours":
        return None
    sys.path.insert(0, str(REPO))
    from gptfl_hpc.fl.schedule import sample_clients

    return [sample_clients(args.seed, r, clients, k) for r in range(1, rounds + 1)]


def vmap_clients(args: argparse.Namespace, shape: Shape) -> int:
    """fl.vmap_clients of the shape's vmapped runs (0: none): --vmap-clients, or by default
    the shape's clients per round (off with --tiny)."""
    if args.vmap_clients >= 0:
        return int(args.vmap_clients)
    return 0 if args.tiny else int(shape.info.get("clients_per_round", 0))


def build_shapes(args: argparse.Namespace, work: Path) -> list[Shape]:
    import yaml

    sys.path.insert(0, str(REPO))
    from gptfl_hpc.config import load_config

    shapes = []
    timeout = args.timeout
    for name in args.shapes:
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        if name == "cifar":
            t = args.tiny
            clients, per, cohort = (8, 10, 4) if t else (1000, 50, 50)
            batch, test = (5, 40) if t else (10, 10000)
            rounds = args.rounds or (3 if t else 12)
            model_ov, model_name, matches = _model_for_cifar(args.ours_model)
            if not matches:
                print(f"\n!!! WARNING: model.name=simple_cnn is not in our registry yet: the cifar "
                      f"shape runs OUR side with {model_name} while pfl runs its simple_cnn; "
                      "the cifar ratios compare DIFFERENT models !!!\n", file=sys.stderr,
                      flush=True)
            npz = d / "pixels.npz"
            stamp = {"clients": clients, "per_client": per, "test": test, "seed": args.seed}
            stamp_file = d / "shape.json"
            if not (npz.exists() and stamp_file.exists()
                    and json.loads(stamp_file.read_text()) == stamp):
                make_cifar_shape(npz, clients, per, test, args.seed)
                shutil.rmtree(d / "data", ignore_errors=True)
                stamp_file.write_text(json.dumps(stamp))
            cfg = {
                "run": {"seed": args.seed},
                "data": {"source": "arrays", "root": str(npz), "partition": "natural",
                         "natural_key": "client", "num_clients": clients,
                         "dir": str(d / "data")},
                "fl": {"algorithm": "fedavg", "rounds": rounds, "clients_per_round": cohort,
                       "local_epochs": 1, "batch_size": batch, "client_optimizer": "sgd",
                       "client_lr": 0.1, "server_lr": 1.0, "augment": False,
                       "eval_every": rounds, "checkpoint_every": rounds},
            }
            cfg_path = d / "cifar_shape.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            prep = (cfg_path, model_ov, d / "data", d / "prepare.log")
            _prepare(*prep, timeout)
            spec = {"model": "pfl_simple_cnn", "data": str(npz), "rounds": rounds,
                    "cohort_size": cohort, "local_epochs": 1, "batch_size": batch,
                    "local_optimizer": "sgd", "local_lr": 0.1, "lr_schedule": "constant",
                    "central_lr": 1.0, "weight_by_samples": False, "eval_batch_size": 10000,
                    "seed": args.seed,
                    "schedule": _schedule(args, rounds, clients, cohort)}
            shapes.append(Shape(
                name, f"pfl-research CIFAR-10 benchmark shape: {clients} clients x {per} random "
                f"32x32x3 images, {cohort} per round, 1 local epoch, batch {batch}, SGD lr 0.1",
                cfg_path, model_ov, rounds, min(args.warmup, rounds - 1), spec,
                {"clients": clients, "per_client": per, "clients_per_round": cohort,
                 "local_epochs": 1, "batch_size": batch, "test_images": test,
                 "ours_model": model_name, "pfl_model": "simple_cnn (pfl-research)",
                 "model_matches_pfl": matches}, prep))
        else:
            base = REPO / "configs" / "digits.yaml"
            pre = [f"data.dir={d / 'data'}", f"run.seed={args.seed}"]
            if args.digits_rounds or args.tiny:
                pre.append(f"fl.rounds={args.digits_rounds or 3}")
            cfg = load_config(base, pre)
            rounds, fl = cfg.fl.rounds, cfg.fl
            if fl.algorithm != "fedavg" or fl.client_optimizer == "adamw":
                raise _bench_error(f"configs/digits.yaml: fl.algorithm {fl.algorithm} / "
                                   f"client_optimizer {fl.client_optimizer} has no pfl "
                                   "counterpart here; valid: fedavg with sgd or adam")
            ov = [*pre, f"fl.eval_every={rounds}", f"fl.checkpoint_every={rounds}"]
            stamp_file, stamp = d / "shape.json", json.dumps(
                {"seed": args.seed, "config": base.read_text(), "overrides": pre})
            if not (stamp_file.exists() and stamp_file.read_text() == stamp):
                shutil.rmtree(d / "data", ignore_errors=True)
            prep = (base, ov, d / "data", d / "prepare.log")
            _prepare(*prep, timeout)
            stamp_file.write_text(stamp)
            npz = d / "clients.npz"
            meta = export_prepared(d / "data", npz)
            spec = {"model": "ours", "repo": str(REPO), "data": str(npz), "rounds": rounds,
                    "model_cfg": {"name": cfg.model.name, "width": cfg.model.width,
                                  "depth": cfg.model.depth},
                    "norm_mean": meta["norm_mean"], "norm_std": meta["norm_std"],
                    "augment": fl.augment, "cohort_size": fl.clients_per_round,
                    "local_epochs": fl.local_epochs, "batch_size": fl.batch_size,
                    "local_optimizer": fl.client_optimizer, "local_lr": fl.client_lr,
                    "lr_schedule": fl.client_lr_schedule, "central_lr": fl.server_lr,
                    "weight_by_samples": True, "eval_batch_size": fl.eval_batch_size,
                    "seed": args.seed,
                    "schedule": _schedule(args, rounds, meta["clients"], fl.clients_per_round)}
            shapes.append(Shape(
                name, f"our digits default (configs/digits.yaml, FL stage): {meta['clients']} "
                f"clients ({meta['samples']} images 8x8x1), {fl.clients_per_round} per round, "
                f"{fl.local_epochs} epoch, batch {fl.batch_size}, {fl.client_optimizer} "
                f"lr {fl.client_lr} {fl.client_lr_schedule}, augment {fl.augment}",
                base, ov, rounds, min(args.warmup, rounds - 1), spec,
                {"clients": meta["clients"], "samples": meta["samples"],
                 "clients_per_round": fl.clients_per_round, "local_epochs": fl.local_epochs,
                 "batch_size": fl.batch_size, "ours_model": cfg.model.name,
                 "pfl_model": f"{cfg.model.name} (ours, same class + transform)",
                 "model_matches_pfl": True}, prep))
    return shapes


# ------------------------------------------------------------------------------------- runs


def run_ours(shape: Shape, procs: int, repeat: int, system: str, extra: list[str],
             work: Path, args: argparse.Namespace) -> RunResult:
    if shape.prepare:  # a no-op while the data fits this engine; re-made when it does not
        _prepare(*shape.prepare, args.timeout)
    tag = system.replace(":", "-")
    out = work / shape.name / "runs" / f"{tag}-p{procs}-r{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ov = [*shape.ours_overrides, *extra]
    if args.ours_threads:
        ov.append(f"run.threads={args.ours_threads}")
    base = _ours_cli("federate", str(shape.ours_config), *ov, "--out", str(out))
    cmd = base if procs == 1 else [_mpiexec(), "-n", str(procs), *base]
    res = RunResult(shape.name, system, procs, max(1, procs - 1), repeat, command=" ".join(cmd),
                    log=str(out / "bench.log"))
    res.load_before = list(os.getloadavg())
    rc, total = _run_logged(cmd, out / "bench.log", _clean_env(), args.timeout)
    res.total_s, res.load_after = total, list(os.getloadavg())
    if rc != 0:
        res.error = f"rc {rc}: {_tail(out / 'bench.log')}"
        return res
    try:
        recs = _read_jsonl(out / "metrics.jsonl")
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError) as e:
        res.error = f"outputs unreadable: {e}"
        return res
    if len(recs) != shape.rounds:
        res.error = f"metrics.jsonl has {len(recs)} rounds, expected {shape.rounds}"
        return res
    laps = [float(recs[0]["t_round"])]
    for prev, cur in zip(recs, recs[1:]):
        laps.append(float(cur["wall_seconds"]) - float(prev["wall_seconds"])
                    - float(cur.get("t_eval") or 0.0))
    res.laps = laps
    res.eval_s = sum(float(r.get("t_eval") or 0.0) for r in recs)
    res.startup_s = total - sum(laps) - res.eval_s
    res.accuracy = summary.get("final_accuracy")
    placement = summary.get("placement") or []
    trainers = [p for p in placement if p.get("rank", 0) >= 1] if procs > 1 else placement
    res.threads_per_proc = [int(p.get("threads", 0)) for p in trainers]
    _lap_stats(res, shape.warmup)
    res.ok = True
    return res


def _read_jsonl(path: Path) -> list[dict]:
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    return sorted(recs, key=lambda r: r["round"])


def run_pfl(shape: Shape, workers: int, repeat: int, work: Path,
            args: argparse.Namespace) -> RunResult:
    out = work / shape.name / "runs" / f"pfl-w{workers}-r{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    threads = args.pfl_threads or max(1, _cores() // workers)
    spec = {**shape.pfl_spec, "threads": threads, "result": str(out / "result.json")}
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    me = str(Path(__file__).resolve())
    if workers == 1:
        cmd = [args.pfl_python, me, "--pfl-worker", str(out / "spec.json")]
    else:
        cmd = [args.pfl_python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={workers}", me, "--pfl-worker", str(out / "spec.json")]
    env = _clean_env({v: str(threads) for v in THREAD_VARS})
    res = RunResult(shape.name, "pfl", workers, workers, repeat, command=" ".join(cmd),
                    log=str(out / "bench.log"))
    res.load_before = list(os.getloadavg())
    rc, total = _run_logged(cmd, out / "bench.log", env, args.timeout, cwd=out)
    res.total_s, res.load_after = total, list(os.getloadavg())
    if rc != 0 or not (out / "result.json").exists():
        res.error = f"rc {rc}: {_tail(out / 'bench.log')}"
        return res
    r = json.loads((out / "result.json").read_text())
    res.laps = [float(x) for x in r["laps"]]
    if len(res.laps) != shape.rounds:
        res.error = f"pfl ran {len(res.laps)} rounds, expected {shape.rounds}"
        return res
    res.eval_s = float(r["eval_s"])
    res.startup_s = total - sum(res.laps) - res.eval_s
    res.accuracy = r.get("accuracy")
    res.threads_per_proc = [int(r["threads"])] * workers
    _lap_stats(res, shape.warmup)
    res.ok = True
    return res


# ---------------------------------------------------------------------------------- summary


def _med(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarise(results: list[RunResult], shapes: list[Shape]) -> list[dict]:
    rows = []
    for shape in shapes:
        groups: dict[tuple[str, int], list[RunResult]] = {}
        for r in results:
            if r.shape == shape.name:
                groups.setdefault((r.system, r.procs), []).append(r)
        pfl_rows: dict[int, dict] = {}
        mine: list[dict] = []
        for (system, procs), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] == "pfl",
                                                                        kv[0])):
            good = [r for r in rs if r.ok]
            steady = [lap for r in good for lap in r.laps[shape.warmup:]]
            row = {"shape": shape.name, "system": system, "procs": procs,
                   "training_procs": rs[0].training_procs, "runs": len(rs), "ok_runs": len(good),
                   "threads_per_proc": good[0].threads_per_proc if good else [],
                   "s_per_round": statistics.median(steady) if steady else None,
                   "mean_s": statistics.fmean(steady) if steady else None,
                   "min_s": min(steady) if steady else None,
                   "max_s": max(steady) if steady else None,
                   "s_per_round_runs": [r.s_per_round for r in good],
                   "first_round_s": _med([r.first_round_s for r in good]),
                   "startup_s": _med([r.startup_s for r in good]),
                   "eval_s": _med([r.eval_s for r in good]),
                   "accuracy": _med([r.accuracy for r in good]),
                   "load": _med([max(r.load_before[0], r.load_after[0]) for r in good
                                 if r.load_before and r.load_after])}
            if system == "pfl":
                pfl_rows[row["training_procs"]] = row
            else:
                mine.append(row)
            rows.append(row)
        target = TARGETS[shape.name]
        seq = {row["procs"]: row for row in mine if row["system"] == "ours"}
        for row in mine:
            ref_ours = seq.get(row["procs"])
            row["vs_ours"] = (row["s_per_round"] / ref_ours["s_per_round"]
                              if row["system"] != "ours" and ref_ours and ref_ours["s_per_round"]
                              and row["s_per_round"] is not None else None)
            ref = pfl_rows.get(row["training_procs"])
            ratio = best = None
            if ref and ref["s_per_round"] and row["s_per_round"] is not None:
                ratio = row["s_per_round"] / ref["s_per_round"]
                best = row["min_s"] / ref["min_s"]
            row.update(pfl_workers=ref["procs"] if ref else None,
                       pfl_s_per_round=ref["s_per_round"] if ref else None,
                       ratio=ratio, ratio_best=best, target=target,
                       meets_target=None if ratio is None else ratio <= target,
                       comparable=bool(shape.info.get("model_matches_pfl")))
    return rows


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def print_report(rows: list[dict], shapes: list[Shape], results: list[RunResult],
                 meta: dict) -> None:
    print(f"\nFL seconds per round, {meta['machine']['host']} ({meta['machine']['cpus']} cores, "
          f"{meta['machine']['cpu_model']}), torch {meta['machine']['torch']}, "
          f"pfl {meta['pfl'].get('version') or '-'}, repeats {meta['settings']['repeats']}")
    for shape in shapes:
        print(f"\n### {shape.name}: {shape.description}")
        print(f"rounds {shape.rounds}, steady state = median lap of rounds {shape.warmup + 1}.."
              f"{shape.rounds}; ours model {shape.info['ours_model']}, pfl model "
              f"{shape.info['pfl_model']}; load = 1-min load average (max of start/end of the "
              f"run; {_cores()} cores)")
        if not shape.info.get("model_matches_pfl"):
            print("!!! the two sides train DIFFERENT models here: ratios are not comparable !!!")
        print("\n| system | procs | training procs | threads/proc | s/round (median) | mean | "
              "min..max | first round s | start-up s | eval s | accuracy | load | "
              "pfl s/round (workers) | "
              f"ours/pfl (target <= {TARGETS[shape.name]}) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in (x for x in rows if x["shape"] == shape.name):
            pfl_col = ratio_col = ""
            if r["system"] != "pfl":
                pfl_col = (f"{_f(r['pfl_s_per_round'])} ({r['pfl_workers']})"
                           if r.get("pfl_workers") else "-")
                ratio_col = "-" if r.get("ratio") is None else (
                    f"{r['ratio']:.2f}x {'ok' if r['meets_target'] else 'MISSED'} "
                    f"(best laps {r['ratio_best']:.2f}x)"
                    + ("" if r["comparable"] else " (models differ)"))
            failed = r["runs"] - r["ok_runs"]
            threads = ",".join(map(str, r["threads_per_proc"])) or "-"
            print(f"| {r['system']} | {r['procs']} | {r['training_procs']} | {threads} | "
                  f"{_f(r['s_per_round'])}{f' ({failed} failed)' if failed else ''} | "
                  f"{_f(r['mean_s'])} | {_f(r['min_s'], '.2f')}..{_f(r['max_s'], '.2f')} | "
                  f"{_f(r['first_round_s'])} | "
                  f"{_f(r['startup_s'], '.1f')} | {_f(r['eval_s'], '.2f')} | "
                  f"{_f(r['accuracy'], '.4f')} | {_f(r['load'], '.1f')} | {pfl_col} | "
                  f"{ratio_col} |")
        versus = [r for r in rows if r["shape"] == shape.name and r.get("vs_ours") is not None]
        if versus:
            print("\nmedian lap vs ours (sequential clients) at the same procs: "
                  + "; ".join(f"{r['system']} procs={r['procs']} {r['vs_ours']:.2f}x"
                              for r in versus)
                  + (f" (fl.vmap_clients={shape.info['vmap_clients']})"
                     if shape.info.get("vmap_clients") else ""))
    noisy = [r for r in rows if r["min_s"] and r["max_s"] and r["max_s"] > 2 * r["min_s"]]
    if noisy:
        print("\nNOISY (steady laps spread > 2x, other work on the machine?): "
              + "; ".join(f"{r['shape']} {r['system']} procs={r['procs']} "
                          f"{r['min_s']:.2f}..{r['max_s']:.2f} s" for r in noisy)
              + ". Rerun with --repeats 3 (or on a quiet machine).")
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"\nFAILED {r.shape} {r.system} procs={r.procs} repeat={r.repeat}: {r.command}\n"
              f"  log {r.log}\n  {(r.error or '').strip()[-800:]}", file=sys.stderr)


# ------------------------------------------------------------------------------------ setup


def setup_pfl(venv: str) -> int:
    """Create VENV with torch==2.13.0 (pinned first: an unpinned one is a CUDA build) + pfl."""
    py = Path(venv) / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", venv],
             [str(py), "-m", "pip", "install", "-q", TORCH_PIN],
             [str(py), "-m", "pip", "install", "-q", TORCH_PIN, f"pfl=={PFL_VERSION}"]]
    if py.exists():
        steps = steps[1:]
    for cmd in steps:
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"bench_fl_round: error: {' '.join(cmd)} failed", file=sys.stderr)
            return 1
    v = subprocess.run([str(py), "-c", "import pfl, torch; from importlib.metadata import "
                        "version; print('pfl', version('pfl'), 'torch', torch.__version__)"],
                       capture_output=True, text=True)
    print(v.stdout.strip() or v.stderr.strip())
    print(f"pfl ready: python benchmarks/bench_fl_round.py --pfl-python {py}")
    return v.returncode


def _pfl_info(python: str) -> dict:
    p = subprocess.run([python, "-c", "import json, torch; from importlib.metadata import "
                        "version; print(json.dumps({'version': version('pfl'), "
                        "'torch': torch.__version__}))"], capture_output=True, text=True,
                       timeout=300, env=_clean_env())
    if p.returncode != 0:
        raise _bench_error(f"--pfl-python {python}: cannot import pfl and torch; valid: the "
                           "python of a venv made by --setup-pfl DIR, or pass --no-pfl")
    return {"available": True, "python": python, **json.loads(p.stdout.strip().splitlines()[-1])}


# ------------------------------------------------------------------------------------- main


def _wait_quiet(load: float, longest: float) -> None:
    """Sleep until the 1-minute load average is below `load` (or `longest` seconds passed)."""
    if load <= 0:
        return
    t0 = time.monotonic()
    while os.getloadavg()[0] >= load and time.monotonic() - t0 < longest:
        time.sleep(5)
    if os.getloadavg()[0] >= load:
        print(f"[bench] load {os.getloadavg()[0]:.1f} still >= {load} after {longest:.0f} s: "
              "running anyway", file=sys.stderr, flush=True)


def _int_list(text: str, what: str, lo: int) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < lo for v in vals):
        raise _bench_error(f"{what} {text!r}: expected comma-separated integers >= {lo}, "
                           "e.g. 1,2,3")
    return vals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="cifar,digits", help="comma list of: cifar, digits")
    p.add_argument("--procs", default="1,2,3", help="our process counts (1: plain process)")
    p.add_argument("--pfl-workers", default="1,2", help="pfl worker process counts")
    p.add_argument("--rounds", type=int, default=0, help="cifar rounds (default 12; tiny 3)")
    p.add_argument("--digits-rounds", type=int, default=0,
                   help="digits rounds (default: the config's fl.rounds; tiny 3)")
    p.add_argument("--warmup", type=int, default=2, help="leading rounds left out of the "
                   "steady state (at most rounds-1)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (interleaved)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-model", default="auto", help="cifar shape, our side: auto "
                   "(simple_cnn when registered, else convnet width 32 depth 2) or a model name")
    p.add_argument("--ours-threads", type=int, default=0,
                   help="run.threads for our runs (0: the engine's automatic share)")
    p.add_argument("--ours-overrides", nargs="*", default=[], metavar="KEY=VAL",
                   help="extra config overrides for all of our runs")
    p.add_argument("--ours-extra-overrides", nargs="*", default=[], metavar="KEY=VAL",
                   help="another mode of ours: these runs repeat ours with the overrides, as "
                   "system ours:<label>")
    p.add_argument("--ours-extra-label", default="extra", help="label of that variant")
    p.add_argument("--vmap-clients", type=int, default=-1, metavar="N",
                   help="also run ours with fl.vmap_clients=N (system ours:vmap); default: the "
                   "shape's clients per round (off with --tiny); 0: off")
    p.add_argument("--vmap-procs", default="", help="process counts of the vmapped runs "
                   "(default: --procs)")
    p.add_argument("--ours-extra-procs", default="", help="process counts of the variant "
                   "(default: --procs)")
    p.add_argument("--pfl-python", default=os.environ.get("PFL_PYTHON",
                                                          f"{DEFAULT_PFL_VENV}/bin/python"),
                   help="python of the pfl venv (env PFL_PYTHON; made by --setup-pfl)")
    p.add_argument("--pfl-threads", type=int, default=0,
                   help="torch threads per pfl worker (0: cores // workers)")
    p.add_argument("--pfl-sampler", choices=("ours", "random"), default="ours",
                   help="pfl's users per round: ours (replay our engine's client sequence: the "
                   "same clients, so the same work per round) or random (pfl's sampler)")
    p.add_argument("--no-pfl", action="store_true", help="only our engine (pfl not installed)")
    p.add_argument("--setup-pfl", metavar="VENV", default=None,
                   help=f"create VENV with {TORCH_PIN} + pfl=={PFL_VERSION}, then exit")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a plumbing smoke run")
    p.add_argument("--workdir", default=None, help="keep data and runs here (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--quiet-load", type=float, default=0.0, metavar="LOAD",
                   help="before each run, wait until the 1-minute load average is below LOAD "
                   "(a shared machine; 0: do not wait)")
    p.add_argument("--quiet-wait", type=float, default=900.0, metavar="S",
                   help="longest wait for --quiet-load before running anyway")
    p.add_argument("--pfl-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pfl_worker or args.setup_pfl:
        return args
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad or not args.shapes:
        raise _bench_error(f"--shapes {bad[0] if bad else ''!r}: unknown shape; valid: "
                           + ", ".join(SHAPES))
    args.procs = _int_list(args.procs, "--procs", 1)
    args.pfl_workers = _int_list(args.pfl_workers, "--pfl-workers", 1)
    args.ours_extra_procs = (_int_list(args.ours_extra_procs, "--ours-extra-procs", 1)
                             if args.ours_extra_procs else args.procs)
    args.vmap_procs = (_int_list(args.vmap_procs, "--vmap-procs", 1) if args.vmap_procs
                       else args.procs)
    if args.vmap_clients < -1:
        raise _bench_error(f"--vmap-clients {args.vmap_clients}: valid: >= 0 (0: off)")
    for key in ("repeats",):
        if getattr(args, key) < 1:
            raise _bench_error(f"--{key} {getattr(args, key)}: valid: >= 1")
    for key in ("rounds", "digits_rounds", "warmup", "ours_threads", "pfl_threads",
                "quiet_load", "quiet_wait"):
        if getattr(args, key) < 0:
            raise _bench_error(f"--{key.replace('_', '-')} {getattr(args, key)}: valid: >= 0")
    if args.rounds == 1 or args.digits_rounds == 1:
        raise _bench_error("--rounds/--digits-rounds 1: valid: >= 2 (one warm-up round plus at "
                           "least one steady-state round)")
    for ov in [*args.ours_overrides, *args.ours_extra_overrides]:
        if "=" not in ov:
            raise _bench_error(f"override {ov!r}: expected KEY=VALUE, e.g. fl.sync=bcast")
    if not args.ours_extra_label.replace("_", "").replace("-", "").isalnum():
        raise _bench_error(f"--ours-extra-label {args.ours_extra_label!r}: valid: letters, "
                           "digits, - and _")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except Exception as e:  # our ConfigError: one line, exit 2
        if type(e).__name__ != "ConfigError":
            raise
        print(f"bench_fl_round: error: {e}", file=sys.stderr)
        return 2
    if args.pfl_worker:
        pfl_worker(args.pfl_worker)
        return 0
    if args.setup_pfl:
        return setup_pfl(args.setup_pfl)
    try:
        return _bench(args)
    except Exception as e:
        if type(e).__name__ not in ("ConfigError", "DataError"):
            raise
        print(f"bench_fl_round: error: {e}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    import signal

    import torch

    # SIGTERM ends the benchmark through its finally blocks: running children are killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    pfl_meta: dict = {"available": False}
    if not args.no_pfl:
        if not Path(args.pfl_python).exists():
            raise _bench_error(f"--pfl-python {args.pfl_python}: not found; valid: run python "
                               f"benchmarks/bench_fl_round.py --setup-pfl {DEFAULT_PFL_VENV} "
                               "first, or pass --no-pfl")
        pfl_meta = _pfl_info(args.pfl_python)
    tmp = None
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench-fl-round-")
        work = Path(tmp)
    try:
        t0 = time.perf_counter()
        shapes = build_shapes(args, work)
        print(f"[bench] data ready in {time.perf_counter() - t0:.1f} s ({work})", file=sys.stderr,
              flush=True)
        results: list[RunResult] = []
        for shape in shapes:
            variants: list[tuple[str, list[str], list[int]]] = [
                ("ours", list(args.ours_overrides), args.procs)]
            vmap = vmap_clients(args, shape)
            if vmap:
                variants.append(("ours:vmap", [*args.ours_overrides, f"fl.vmap_clients={vmap}"],
                                 args.vmap_procs))
                shape.info["vmap_clients"] = vmap
            if args.ours_extra_overrides:
                variants.append((f"ours:{args.ours_extra_label}",
                                 [*args.ours_overrides, *args.ours_extra_overrides],
                                 args.ours_extra_procs))
            for rep in range(args.repeats):
                plan: list[tuple[str, int, list[str]]] = []
                for system, extra, procs in variants:
                    plan += [(system, p, extra) for p in procs]
                if not args.no_pfl:
                    plan += [("pfl", w, []) for w in args.pfl_workers]
                # interleave ours and pfl so that drifting machine load hits both alike
                plan.sort(key=lambda t: (max(1, t[1] - 1) if t[0] != "pfl" else t[1],
                                         t[0] == "pfl", t[0], t[1]))
                for system, n, extra in plan:
                    _wait_quiet(args.quiet_load, args.quiet_wait)
                    print(f"[bench] {shape.name} {system} procs={n} repeat {rep + 1}/"
                          f"{args.repeats} ...", file=sys.stderr, flush=True)
                    r = (run_pfl(shape, n, rep, work, args) if system == "pfl" else
                         run_ours(shape, n, rep, system, extra, work, args))
                    results.append(r)
                    state = (f"{_f(r.s_per_round)} s/round, start-up {_f(r.startup_s, '.1f')} s"
                             if r.ok else f"FAILED ({r.log})")
                    print(f"[bench]   -> {state}", file=sys.stderr, flush=True)
        rows = summarise(results, shapes)
        meta = {
            "benchmark": "bench_fl_round", "version": JSON_VERSION,
            "machine": {"host": platform.node(), "cpus": _cores(), "cpu_model": _cpu_model(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "settings": {"shapes": args.shapes, "procs": args.procs,
                         "pfl_workers": [] if args.no_pfl else args.pfl_workers,
                         "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
                         "tiny": args.tiny, "ours_overrides": args.ours_overrides,
                         "ours_extra_overrides": args.ours_extra_overrides,
                         "ours_extra_label": args.ours_extra_label,
                         "vmap_clients": {s.name: s.info.get("vmap_clients", 0)
                                          for s in shapes},
                         "ours_threads": args.ours_threads or "engine default",
                         "pfl_threads": args.pfl_threads or "cores // workers",
                         "quiet_load": args.quiet_load, "pfl_sampler": args.pfl_sampler},
            "pfl": pfl_meta,
            "targets": TARGETS,
        }
        print_report(rows, shapes, results, meta)
        if args.json:
            doc = {**meta,
                   "shapes": {s.name: {"description": s.description, "rounds": s.rounds,
                                       "warmup": s.warmup, **s.info} for s in shapes},
                   "runs": [vars(r) for r in results], "summary": rows}
            Path(args.json).write_text(json.dumps(doc, indent=1))
            print(f"\nwrote {args.json}")
        return 0 if all(r.ok for r in results) else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
