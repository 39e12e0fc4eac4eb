"""`gptfl-hpc run`: the whole GPT-FL method plus its baselines, each stage skipped when complete.

Stages (all ranks call every stage; server stages run on the first `server_processes` ranks
while the others wait without spinning):

1. prepare      data shards (rank 0)                         -> <out>/data/
2. generator    train the embedded generator (rank 0)        -> <out>/generator/
3. synthesize   labelled synthetic set (server ranks)        -> <out>/synthetic.h5
4. pretrain     downstream model on it (server ranks, DDP)   -> <out>/pretrained.safetensors
5. federate     GPT-FL: FL initialised from the pretrained model      -> <out>/gptfl/
6. federate     FedAvg from random init, SAME client sequence          -> <out>/fedavg/
7. report       report.md, accuracy.png, samples.png, comparison table (rank 0)

Every stage writes atomically and resumes after preemption; rerunning `run` on the same --out
continues where it stopped (Slurm requeue does exactly this).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from gptfl_hpc.errors import ConfigError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHIPPED_GENERATOR = ASSETS / "digits-generator"


# ---- helpers ----------------------------------------------------------------------------

def data_dir_of(cfg, out: Path) -> Path:
    return Path(cfg.data.dir) if cfg.data.dir else out / "data"


def server_threads(comm, requested: int = 0) -> None:
    """Server stages: the waiting ranks sleep, so the server ranks share the node's cores."""
    import torch

    from gptfl_hpc.fl.engine import cores_per_rank

    torch.set_num_threads(cores_per_rank(min(comm.cpu_sharers, server_count(comm, requested))))


def server_count(comm, requested: int = 0) -> int:
    """Ranks taking part in synthesis/pretraining: one per visible GPU, 1 on CPU."""
    if requested:
        return min(requested, comm.size)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(1, min(gpus, comm.local_size, comm.size))


def on_rank0(comm, fn):
    """Run fn on rank 0 while the others wait (sleeping); errors abort the job via the CLI."""
    result = fn() if comm.rank == 0 else None
    comm.barrier()
    return result


def _stage_times(out: Path) -> dict:
    p = out / "stages.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _record_stage(out: Path, name: str, seconds: float, skipped: bool) -> None:
    from gptfl_hpc.fsio import write_json

    times = _stage_times(out)
    if skipped and name in times:
        return  # keep the time measured when the stage actually ran
    times[name] = {"seconds": round(seconds, 3), "skipped": skipped}
    write_json(out / "stages.json", times)


class _Stage:
    def __init__(self, out: Path, name: str, comm, done: bool) -> None:
        self.out, self.name, self.comm, self.done = out, name, comm, done

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.comm.rank == 0:
            log.info("== stage %s%s", self.name, " (complete, skipped)" if self.done else "")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.comm.rank == 0:
            _record_stage(self.out, self.name, time.perf_counter() - self.t0, self.done)
        return False


# ---- stages (also the single-stage CLI commands) ----------------------------------------

_DONE: dict = {}  # stages already checked in this process (chained stages call each other)


def stage_prepare(cfg, out: Path, comm=None):
    from gptfl_hpc.data.manifest import Manifest
    from gptfl_hpc.data.prepare import prepare_data
    from gptfl_hpc.parallel.comm import get_comm

    comm = comm or get_comm()
    d = data_dir_of(cfg, out)
    if d not in _DONE:
        with _Stage(out, "prepare", comm, (d / "manifest.json").exists()):
            on_rank0(comm, lambda: prepare_data(cfg.data, seed=cfg.run.seed, out_dir=d))
        _DONE[d] = Manifest.load(d)
    return _DONE[d]


def stage_train_generator(cfg, out: Path, comm=None) -> Path:
    """The embedded generator, trained on the PUBLIC split only (rank 0)."""
    from gptfl_hpc.parallel.comm import get_comm

    comm = comm or get_comm()
    if cfg.gen.generator != "embedded":
        return Path(cfg.gen.generator)
    manifest = stage_prepare(cfg, out, comm)
    if manifest.public is None:
        raise ConfigError("config key gen.generator: 'embedded' needs a source with a public "
                          f"split (data.source=digits); {manifest.dataset} has none; valid: a "
                          "local diffusers directory")
    gen_dir = out / "generator"
    if gen_dir in _DONE:
        return gen_dir
    done = (gen_dir / "gptfl_generator.json").exists()

    def train():
        from gptfl_hpc.gen.embedded import train_generator

        server_threads(comm, cfg.run.server_processes)
        if not gen_dir.exists() and SHIPPED_GENERATOR.is_dir():
            # the shipped weights are reused only if they were trained on exactly this public
            # split with this recipe and seed (train_generator compares the request, which
            # includes the sha256 of the public images); otherwise it retrains from scratch.
            shutil.copytree(SHIPPED_GENERATOR, gen_dir)
        images, labels = manifest.read_public(data_dir_of(cfg, out))
        return train_generator(cfg.gen.train, images, labels, manifest.num_classes, gen_dir,
                               seed=cfg.run.seed, device=_device(cfg),
                               label_names=manifest.label_names)

    with _Stage(out, "generator", comm, done):
        on_rank0(comm, train)
    _DONE[gen_dir] = manifest
    return gen_dir


def _device(cfg) -> str:
    from gptfl_hpc.parallel.accel import want_cuda

    return "cuda" if want_cuda(cfg.run.device) else "cpu"


def synthetic_count(cfg, manifest) -> int:
    return int(cfg.gen.count or round(cfg.gen.volume * manifest.num_train))


def stage_synthesize(cfg, out: Path, generator: str | None = None, comm=None) -> Path:
    from gptfl_hpc.parallel.comm import get_comm
    from gptfl_hpc.gen.synthesize import synthesize

    comm = comm or get_comm()
    manifest = stage_prepare(cfg, out, comm)
    gen_dir = Path(generator) if generator else stage_train_generator(cfg, out, comm)
    path = out / "synthetic.h5"
    p = server_count(comm, cfg.run.server_processes)
    sub = comm.split(0 if comm.rank < p else -1, comm.rank)
    with _Stage(out, "synthesize", comm, path.exists()):
        if sub is not None:
            server_threads(comm, cfg.run.server_processes)
            synthesize(cfg.gen, generator_dir=gen_dir, label_names=manifest.label_names,
                       out_shape=tuple(manifest.input_shape), n_total=synthetic_count(cfg, manifest),
                       out_path=path, seed=cfg.run.seed, comm=sub, device=cfg.run.device)
            sub.free()
        comm.barrier()
    return path


def stage_pretrain(cfg, out: Path, synthetic: str | None = None, comm=None) -> dict:
    from gptfl_hpc.parallel.comm import get_comm
    from gptfl_hpc.train.pretrain import pretrain

    comm = comm or get_comm()
    stage_prepare(cfg, out, comm)
    syn = Path(synthetic) if synthetic else stage_synthesize(cfg, out, comm=comm)
    p = server_count(comm, cfg.run.server_processes)
    sub = comm.split(0 if comm.rank < p else -1, comm.rank)
    result = None
    with _Stage(out, "pretrain", comm, (out / "pretrained.json").exists()):
        if sub is not None:
            server_threads(comm, cfg.run.server_processes)
            result = pretrain(cfg.pretrain, model_cfg=cfg.model, synthetic_path=syn,
                              data_dir=data_dir_of(cfg, out), out_dir=out, seed=cfg.run.seed,
                              augment=cfg.fl.augment, device=cfg.run.device, comm=sub)
            sub.free()
        comm.barrier()
    return json.loads((out / "pretrained.json").read_text()) if comm.rank == 0 else result


def stage_federate(cfg, out: Path, name: str, init: str, comm=None) -> dict | None:
    from gptfl_hpc.parallel.comm import get_comm
    from gptfl_hpc.fl.engine import federate, setup_threads

    comm = comm or get_comm()
    run_dir = out / name
    fl = dataclasses.replace(cfg.fl, init=init)
    sub_cfg = dataclasses.replace(cfg, fl=fl, data=dataclasses.replace(
        cfg.data, dir=str(data_dir_of(cfg, out))))
    summary_path = run_dir / "summary.json"
    done = False
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        done = s.get("rounds") == fl.rounds and s.get("init") == init
    with _Stage(out, f"federate-{name}", comm, done):
        if not done:
            setup_threads(cfg.run, comm)
            federate(sub_cfg, run_dir, resume=True)
    return json.loads(summary_path.read_text()) if comm.rank == 0 else None


# ---- the whole method ----------------------------------------------------------------------

def run_pipeline(cfg, out: str | Path) -> dict | None:
    from gptfl_hpc.parallel.comm import get_comm

    comm = get_comm()
    out = Path(out)
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    methods = cfg.run.methods
    t0 = time.perf_counter()
    manifest = stage_prepare(cfg, out, comm)
    pre = None
    if "gptfl" in methods or "synthetic_only" in methods:
        syn = stage_synthesize(cfg, out, comm=comm)
        pre = stage_pretrain(cfg, out, synthetic=str(syn), comm=comm)
    results = {}
    if "gptfl" in methods:
        results["gptfl"] = stage_federate(cfg, out, "gptfl",
                                          str(out / "pretrained.safetensors"), comm)
    if "fedavg" in methods:
        results["fedavg"] = stage_federate(cfg, out, "fedavg", "random", comm)
    comm.barrier()
    if comm.rank != 0:
        return None
    from gptfl_hpc.report import write_report

    report = write_report(cfg, out, manifest, results, pre)
    log.info("run finished in %.1fs; report in %s", time.perf_counter() - t0, out / "report.md")
    return report

