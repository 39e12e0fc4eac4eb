"""The stages of GPT-FL, each one command, and `gptfl-hpc run` = all of them plus the baselines.

1. prepare      data shards (rank 0)                          -> data.dir or <out>/data/
2. generator    the embedded generator (rank 0)               -> <out>/generator/
3. synthesize   labelled synthetic set (server ranks)         -> <out>/synthetic.h5
4. pretrain     downstream model on it (server ranks, DDP)    -> <out>/pretrained.safetensors
5. federate     GPT-FL: FL initialised from the pretrained model   -> <out>/gptfl/
6. federate     FedAvg from random init, SAME client sequence       -> <out>/fedavg/
   (run.algorithms: for each algorithm X, <out>/X-gptfl/ and <out>/X-scratch/ instead)
7. local_only   every client fine-tunes the pretrained model alone -> <out>/local_only/
8. centralised  reference upper bound, not FL (run.methods: centralised): rank 0 alone pools
                every client's shard and trains the model on it  -> <out>/centralised/
9. report       report.md, accuracy.png, samples.png (rank 0)

Every stage goes through :func:`_stage`: rank 0 locks the stage's directory, computes the stage's
request (gptfl_hpc/provenance.py) and asks for its status there. A complete output of this
request is reused; an output or partial state of any other request is refused with the keys
that differ; otherwise the stage runs on its ranks and rank 0 commits the record last. A stage
with partial state of this request (a checkpoint) continues it only with ``--resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptfl_hpc import faults, provenance, signals
from gptfl_hpc.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHIPPED_GENERATOR = ASSETS / "digits-generator"
"""configs/digits.yaml's generator; configs/mnist.yaml's is assets/mnist-generator. Every
assets/*-generator with a generator record is a candidate (:func:`shipped_generator`)."""
GENERATOR_OUTPUTS = {"unet": "unet", "scheduler": "scheduler"}
_LOCKS: list[Any] = []  # directory locks this process holds until it exits


@dataclass(frozen=True)
class Output:
    """A stage's result: where it is, its content digest, and its record's extra info."""

    path: Path
    digest: str
    info: dict


@dataclass(frozen=True)
class Prepared:
    manifest: Any
    dir: Path
    digest: str
    """Content digest of the whole prepared dataset (its manifest): what FL depends on."""

    @property
    def task_digest(self) -> str:
        """What synthesis depends on: the classes, the sample shape and kind, and the private
        pool's size (gen.volume is relative to it) -- not how the pool is partitioned, so a
        synthetic set is shared by runs that differ only in data.alpha or data.num_clients."""
        m = self.manifest
        return provenance.canonical_digest({"label_names": m.label_names, "kind": m.kind,
                                           "input_shape": m.input_shape,
                                           "num_train": m.num_train})

    @property
    def eval_digest(self) -> str:
        """What pretraining depends on besides the synthetic set: the test split it reports on
        and the normalisation (the task too)."""
        m = self.manifest
        return provenance.canonical_digest({"task": self.task_digest, "test": m.test.sha256,
                                           "norm": [m.norm_mean, m.norm_std]})


def data_dir_of(cfg: Any, out: Path, req: provenance.Request | None = None) -> Path:
    if cfg.data.dir:
        return Path(cfg.data.dir)
    if cfg.run.store and req is not None:
        return stored(cfg, req)
    return Path(out) / "data"


def stored(cfg: Any, req: provenance.Request) -> Path:
    """A stage's directory in the shared store (run.store)."""
    return Path(cfg.run.store) / f"{req.stage}-{req.fingerprint[:16]}"


def _store_lock(cfg: Any) -> dict[str, Any]:
    """Store directories are shared: wait for a concurrent writer instead of failing."""
    return {"lock_what": "run.store", "lock_wait": 3 * 3600.0} if cfg.run.store else {}


def lock(directory: Path, what: str = "--out", wait: float = 0.0) -> None:
    """Lock `directory` for the rest of this command (rank 0 only; see fsio.DirLock). The lock
    is ``_LOCKS[-1]`` afterwards. Returns None: callers run it through ``on_root``, which
    broadcasts the result as JSON."""
    from gptfl_hpc.fsio import DirLock

    lk = DirLock(directory, what=what, wait=wait)
    lk.acquire()
    _LOCKS.append(lk)


def _stage(name: str, comm: Any, directory: Path, req: provenance.Request, *, what: str,
           outputs: dict[str, str], work: Any, lock_what: str = "--out",
           lock_wait: float = 0.0, lock_dir: Path | None = None) -> Output:
    """Run (or reuse) one stage; see the module docstring. `work()` runs on every rank and
    returns the record's extra info on rank 0."""
    from gptfl_hpc.parallel.comm import on_root

    t0 = time.perf_counter()
    faults.point(name, comm.rank)

    held: list[Any] = []

    def decide() -> str:
        lock(lock_dir or directory, lock_what, lock_wait)
        held.append(_LOCKS[-1])
        state = provenance.status(directory, req, what=what, outputs=outputs)
        if state == "extend":  # the old record no longer describes what is being written
            provenance.record_path(directory, name).unlink()
        return state

    state = on_root(comm, decide)
    if state == "complete":
        if comm.rank == 0:
            log.info("== stage %s: complete for this request in %s (reused)", name, directory)
    else:
        if comm.rank == 0:
            log.info("== stage %s%s", name, " (extending a finished run)" if state == "extend"
                     else "")
        info = work()

        def commit() -> None:
            provenance.write_record(directory, req, outputs,
                                    seconds=round(time.perf_counter() - t0, 3),
                                    **(info or {}), env=provenance.environ_fingerprint())

        on_root(comm, commit)
    if lock_wait and held:
        # a shared directory (data.dir, run.store): once its output is committed (or found
        # complete) it never changes, so readers need no lock and the next run may go on
        held[0].release()
    if signals.stop_requested():  # a stage without internal boundaries honours it here
        from gptfl_hpc.errors import Preempted

        comm.barrier()
        raise Preempted(f"stopped after stage {name} ({signals.reason()}); its output is "
                        "complete; rerun with --resume to continue")

    def read() -> dict:
        rec = provenance.read_record(directory, name) or {}
        main = next(iter(outputs))
        return {"path": str(provenance.output_path(directory, rec, main)),
                "digest": rec["outputs"][main]["digest"],
                "info": {k: v for k, v in rec.items() if k not in ("request", "outputs")}}

    r = on_root(comm, read)
    return Output(Path(r["path"]), r["digest"], r["info"])


# ------------------------------------------------------------------------------ stages


def stage_prepare(cfg: Any, out: Path, comm: Any = None) -> Prepared:
    """The client shards, test set, public split and manifest (rank 0 writes)."""
    from gptfl_hpc.data.manifest import Manifest
    from gptfl_hpc.data.prepare import prepare_data
    from gptfl_hpc.parallel.comm import get_comm

    comm = comm or get_comm()
    inputs = {"source": provenance.source_identity(cfg.data.root)} if cfg.data.root else {}
    if cfg.data.source == "speech_embedded":  # the clients' voices are eSpeak NG's output
        from gptfl_hpc.data.espeak import version

        inputs["espeak"] = version()
    req = provenance.request("prepare", cfg, inputs=inputs)
    d = data_dir_of(cfg, out, req)

    def work() -> dict:
        if comm.rank == 0:
            prepare_data(cfg.data, seed=cfg.run.seed, out_dir=d, fingerprint=req.fingerprint)
        comm.barrier()
        return {}

    lock = ({"lock_what": "data.dir", "lock_wait": 3600.0} if cfg.data.dir
            else _store_lock(cfg))
    o = _stage("prepare", comm, d, req, what="prepared data", outputs={"manifest":
               "manifest.json"}, work=work, **lock)
    return Prepared(Manifest.load(d), d, o.digest)


def generator_request(cfg: Any, data: Prepared) -> provenance.Request:
    from gptfl_hpc.gen.embedded import generator_request as request

    m = data.manifest
    if m.public is None:
        raise ConfigError("config key gen.generator: 'embedded' needs a source with a public "
                          f"split (data.source=digits); {m.dataset} has none; valid: a local "
                          "diffusers directory")
    return request(cfg.gen.train, public_sha256=m.public.sha256, seed=cfg.run.seed,
                   label_names=list(m.label_names), image_shape=list(m.input_shape))


def shipped_generator(fingerprint: str) -> Path | None:
    """The shipped generator (assets/*-generator) whose record has this request fingerprint
    and whose files still have the recorded digests, or None."""
    for d in sorted(ASSETS.glob("*-generator")):
        rec = provenance.read_record(d, "generator") if d.is_dir() else None
        if rec and rec.get("fingerprint") == fingerprint and all(
                provenance.digest(d / o["path"]) == o["digest"]
                for o in rec.get("outputs", {}).values()):
            return d
    return None


def stage_generator(cfg: Any, out: Path, comm: Any, data: Prepared,
                    resume: bool = False) -> Output:
    """The generator synthesis uses: a local directory, or the embedded one trained on the
    public split only (the shipped weights are reused when their record matches)."""
    if cfg.gen.generator != "embedded":
        path = Path(cfg.gen.generator)
        if not path.is_dir():
            from gptfl_hpc.errors import ModelError
            from gptfl_hpc.gen.synthesize import missing_generator_message

            raise ModelError(missing_generator_message(path))
        return Output(path, provenance.digest(path), {})
    req = generator_request(cfg, data)
    gen_dir = stored(cfg, req) / "generator" if cfg.run.store else Path(out) / "generator"

    def work() -> dict:
        from gptfl_hpc.parallel.accel import server_count
        from gptfl_hpc.parallel.comm import on_root

        server_count(comm, cfg.run)  # collective (cached): before only rank 0 goes on
        how = on_root(comm, rank0)  # every rank takes part (a broadcast), whichever way it went
        return {"trained": how}

    def rank0() -> str:
        shipped = shipped_generator(req.fingerprint)
        if shipped is not None and not gen_dir.exists():
            tmp = gen_dir.with_name(f".{gen_dir.name}.copy")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(shipped, tmp)
            (tmp / provenance.record_path(tmp, "generator").name).unlink()
            tmp.rename(gen_dir)
            log.info("embedded generator: the shipped weights were trained for exactly this "
                     "request; reusing them (%s)", shipped)
            return "shipped"
        from gptfl_hpc.gen.embedded import train_generator
        from gptfl_hpc.numerics import training_kernels
        from gptfl_hpc.parallel.accel import want_cuda

        images, labels = data.manifest.read_public(data.dir)
        device = "cuda" if want_cuda(cfg.run.device) else "cpu"
        # generator training runs on rank 0 alone, so its thread count does not depend on
        # the rank count: it uses the fast kernels (invariant ones cost 2.4x on the UNet)
        with _server_threads(comm, cfg), training_kernels("fast", device):
            train_generator(cfg.gen.train, images, labels, data.manifest.num_classes,
                            gen_dir, seed=cfg.run.seed, device=device,
                            label_names=data.manifest.label_names,
                            fingerprint=req.fingerprint, resume=resume)
        return "here"

    o = _stage("generator", comm, gen_dir, req, what="the embedded generator",
               outputs=GENERATOR_OUTPUTS, work=work, lock_dir=gen_dir.parent,
               **_store_lock(cfg))
    return Output(gen_dir, provenance.digest(gen_dir), o.info)


def synthetic_count(cfg: Any, manifest: Any) -> int:
    return int(cfg.gen.count or round(cfg.gen.volume * manifest.num_train))


def stage_synthesize(cfg: Any, out: Path, comm: Any, data: Prepared, generator: Output,
                     resume: bool = False) -> Output:
    m = data.manifest
    n_total = synthetic_count(cfg, m)
    inputs = {"task": data.task_digest, "generator": generator.digest}
    if cfg.gen.expand_prompts:
        inputs["expand_prompts"] = provenance.digest(cfg.gen.expand_prompts)
    if getattr(cfg.gen, "speakers", ""):
        inputs["speakers"] = provenance.digest(cfg.gen.speakers)
    spec = _open_generator(comm, generator.path, cfg.gen.kind)
    from gptfl_hpc.gen.synthesize import synthesis_numerics
    from gptfl_hpc.parallel.accel import want_cuda

    device_type = "cuda" if want_cuda(cfg.run.device) else "cpu"
    derived = {"n_total": n_total, **synthesis_numerics(cfg.gen, spec, device_type)}
    req = provenance.request("synthesize", cfg, inputs=inputs, derived=derived)
    where = stored(cfg, req) if cfg.run.store else Path(out)
    path = where / "synthetic.h5"

    def work() -> dict:
        from gptfl_hpc.gen.synthesize import synthesize
        from gptfl_hpc.parallel.accel import server_comm

        sub = server_comm(comm, cfg.run)
        if sub is not None:
            with _server_threads(comm, cfg):
                synthesize(cfg.gen, generator_dir=generator.path, label_names=m.label_names,
                           out_shape=tuple(m.input_shape), n_total=n_total, out_path=path,
                           seed=cfg.run.seed, comm=sub, device=cfg.run.device, spec=spec,
                           fingerprint=req.fingerprint, resume=resume)
            sub.free()
        comm.barrier()
        return {"n_total": n_total}

    return _stage("synthesize", comm, where, req, what="a synthetic set",
                  outputs={"synthetic": path.name}, work=work, **_store_lock(cfg))


def stage_pretrain(cfg: Any, out: Path, comm: Any, data: Prepared, synthetic: Output,
                   resume: bool = False) -> Output:
    from gptfl_hpc.parallel.accel import server_comm
    from gptfl_hpc.train.pretrain import pretrain

    inputs = {"data": data.eval_digest, "synthetic": synthetic.digest}
    if getattr(cfg.pretrain, "init", None):
        inputs["init"] = provenance.digest(cfg.pretrain.init)
    req = provenance.request("pretrain", cfg, inputs=inputs)
    where = stored(cfg, req) if cfg.run.store else Path(out)

    def work() -> dict:
        sub = server_comm(comm, cfg.run)
        info = None
        if sub is not None:
            with _server_threads(comm, cfg):
                info = pretrain(cfg.pretrain, model_cfg=cfg.model, run_cfg=cfg.run,
                                synthetic_path=synthetic.path, manifest=data.manifest,
                                data_dir=data.dir, out_dir=where, augment=cfg.fl.augment,
                                fingerprint=req.fingerprint, resume=resume, comm=sub)
            sub.free()
        comm.barrier()
        return {"test_accuracy": info["test_accuracy"]} if info else {}

    o = _stage("pretrain", comm, where, req, what="a pretrained model",
               outputs={"info": "pretrained.json", "weights": "pretrained.safetensors"},
               work=work, **_store_lock(cfg))
    weights = where / "pretrained.safetensors"
    return Output(weights, provenance.digest(weights), o.info)


def stage_federate(cfg: Any, run_dir: Path, comm: Any, data: Prepared, init: str,
                   resume: bool = False) -> Output:
    """FL from `init` ('random' or a .safetensors path) into `run_dir`."""
    from gptfl_hpc.config import dump_yaml
    from gptfl_hpc.fl.engine import federate

    inputs = {"data": data.digest}
    val_ref = None
    if init != "random":
        inputs["init"] = provenance.digest(init)
        if cfg.fl.select == "synthetic_val":
            val_ref = synthetic_val_of(init)
            inputs["synthetic_val"] = val_ref["digest"]
    sub_cfg = dataclasses.replace(cfg, fl=dataclasses.replace(cfg.fl, init=init))
    req = provenance.request("federate", sub_cfg, inputs=inputs)

    def work() -> dict:
        from gptfl_hpc.train.synval import read_rows

        val = (read_rows(val_ref["path"], val_ref["rows"], val_ref["dataset"])
               if val_ref is not None and comm.rank == 0 else None)
        summary = federate(cfg.fl, cfg.model, cfg.run, manifest=data.manifest,
                           data_dir=data.dir, out_dir=run_dir, init=init,
                           fingerprint=req.fingerprint, resume=resume, comm=comm,
                           config_yaml=dump_yaml(sub_cfg), dp=cfg.dp, val=val)
        return {"final_accuracy": summary["final_accuracy"]} if summary else {}

    return _stage("federate", comm, run_dir, req, what="FL results",
                  outputs={"summary": "summary.json", "final": "final.safetensors",
                           "metrics": "metrics.jsonl"}, work=work)


def synthetic_val_of(init: str) -> dict[str, Any]:
    """The synthetic validation split the model at `init` was pretrained without: from the
    ``pretrained.json`` beside it (whose fingerprint must be the weights' own). One-line
    errors name the file and what is missing."""
    from gptfl_hpc.train.synval import rows_digest

    weights = Path(init)
    info_path = weights.with_name("pretrained.json")
    if not info_path.is_file():
        raise ConfigError(f"config key fl.select: 'synthetic_val' needs {info_path} (the "
                          f"pretraining record beside {weights}); valid: 'last', or an init "
                          "made by `gptfl-hpc pretrain` with pretrain.val_fraction > 0")
    info = read_json(info_path)
    if info.get("fingerprint") != provenance.embedded_fingerprint(weights):
        raise ConfigError(f"config key fl.select: {info_path} does not describe {weights} (their "
                          "fingerprints differ); rerun `gptfl-hpc pretrain`")
    split = info.get("synthetic_val")
    if not split or not split.get("rows"):
        raise ConfigError(f"config key fl.select: 'synthetic_val', but {weights} was pretrained "
                          "on the whole synthetic set (pretrain.val_fraction 0); valid: 'last', "
                          "or pretrain with pretrain.val_fraction > 0")
    syn = info["synthetic"]
    return {"path": syn["path"], "dataset": syn.get("dataset", "images"), "rows": split["rows"],
            "digest": rows_digest(split["rows"], str(info["fingerprint"]))}


def stage_local_only(cfg: Any, run_dir: Path, comm: Any, data: Prepared, init: str) -> Output:
    """The local-fine-tuning-only control from `init` into `run_dir` (gptfl_hpc/fl/local.py)."""
    from gptfl_hpc.fl.local import local_only

    inputs = {"data": data.digest}
    if init != "random":
        inputs["init"] = provenance.digest(init)
    req = provenance.request("local_only", cfg, inputs=inputs)

    def work() -> dict:
        summary = local_only(cfg.fl, cfg.model, cfg.run, manifest=data.manifest,
                             data_dir=data.dir, out_dir=run_dir, init=init,
                             fingerprint=req.fingerprint, comm=comm)
        return {"final_accuracy": summary["final_accuracy"]} if summary else {}

    return _stage("local_only", comm, run_dir, req, what="local-only results",
                  outputs={"summary": "summary.json"}, work=work)


def stage_centralised(cfg: Any, out: Path, comm: Any, data: Prepared,
                      resume: bool = False) -> Output:
    """The centralised upper bound into <out>/centralised (gptfl_hpc/train/centralised.py):
    rank 0 alone reads and pools every client's shard; the other ranks wait."""
    from gptfl_hpc.parallel.accel import server_count
    from gptfl_hpc.train.centralised import INFO_NAME, SUMMARY_NAME, WEIGHTS_NAME, centralised

    req = provenance.request("centralised", cfg, inputs={"data": data.digest})
    run_dir = Path(out) / "centralised"

    def work() -> dict:
        server_count(comm, cfg.run)  # collective (cached): before only rank 0 goes on
        # rank 0 trains alone (with the node's cores); the others wait, sleeping
        with _server_threads(comm, cfg) if comm.rank == 0 else contextlib.nullcontext():
            summary = centralised(cfg.pretrain, model_cfg=cfg.model, run_cfg=cfg.run,
                                  manifest=data.manifest, data_dir=data.dir, out_dir=run_dir,
                                  augment=cfg.fl.augment, fingerprint=req.fingerprint,
                                  resume=resume, comm=comm)
        return {"final_accuracy": summary["final_accuracy"],
                "best_accuracy": summary["best_accuracy"]} if summary else {}

    return _stage("centralised", comm, run_dir, req, what="the centralised reference",
                  outputs={"summary": SUMMARY_NAME, "weights": WEIGHTS_NAME, "info": INFO_NAME},
                  work=work)


def algorithm_configs(cfg: Any) -> list[tuple[str, Any]]:
    """(name, config) of every run.algorithms entry: fl.algorithm and dp.enabled set by the
    name, then the entry's own fl./dp. overrides; validated like a config file (one-line
    ConfigError naming the entry) before any stage runs."""
    from gptfl_hpc import config as C

    out = []
    for entry in cfg.run.algorithms:
        name, overrides = C.RunConfig.parse_algorithm(entry)
        algorithm = "fedavg" if name == "dp_fedavg" else name
        raw = C.to_dict(cfg)
        raw["run"]["algorithms"] = []
        try:
            raw = C.apply_overrides(raw, [f"fl.algorithm={algorithm}",
                                          f"dp.enabled={str(name == 'dp_fedavg').lower()}",
                                          *overrides])
            sub = C._build(C.Config, raw)
            C._cross_checks(sub)
        except ConfigError as e:
            raise ConfigError(f"run.algorithms entry {entry!r}: {e}") from None
        out.append((name, sub))
    return out


# ------------------------------------------------------------------------------ helpers


def _open_generator(comm: Any, path: Path, kind: str) -> Any:
    """The generator's spec, read and fingerprinted once on rank 0 (gen/spec.py)."""
    from gptfl_hpc.gen.registry import open_generator
    from gptfl_hpc.gen.spec import GeneratorSpec
    from gptfl_hpc.parallel.comm import on_root

    return GeneratorSpec.from_json(on_root(comm, lambda: open_generator(path, kind).to_json()))


class _server_threads:
    """Server stages: the waiting ranks sleep, so the server ranks share the node's cores.
    (server_count must have been computed collectively before: it is cached on the comm.)"""

    def __init__(self, comm: Any, cfg: Any) -> None:
        self.comm, self.cfg = comm, cfg

    def __enter__(self) -> None:
        import torch

        from gptfl_hpc.numerics import set_threads
        from gptfl_hpc.parallel.accel import server_count
        from gptfl_hpc.parallel.comm import cpu_affinity

        self.saved = torch.get_num_threads()
        p = server_count(self.comm, self.cfg.run)
        n = self.cfg.run.threads or max(1, len(cpu_affinity()) // max(1, min(
            self.comm.cpu_sharers, p)))
        set_threads(n)

    def __exit__(self, *exc: object) -> None:
        from gptfl_hpc.numerics import set_threads

        set_threads(self.saved)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({' '.join(str(e).split())})") from None


# ------------------------------------------------------------------------------ the whole method


def run_pipeline(cfg: Any, out: str | Path, resume: bool = False, comm: Any = None,
                 data: Prepared | None = None) -> dict | None:
    from gptfl_hpc.parallel.comm import get_comm

    comm = comm or get_comm()
    out = Path(out)
    methods = cfg.run.methods
    t0 = time.perf_counter()
    algorithms = algorithm_configs(cfg)  # every entry validated before any work
    data = data or stage_prepare(cfg, out, comm)
    stages = {"prepare": data}
    pre = None
    if any(m in methods for m in ("gptfl", "synthetic_only", "local_only")):
        gen = stage_generator(cfg, out, comm, data, resume)
        syn = stage_synthesize(cfg, out, comm, data, gen, resume)
        pre = stage_pretrain(cfg, out, comm, data, syn, resume)
        stages.update(generator=gen, synthesize=syn, pretrain=pre)
    results = {}
    # (row, config, init): the single fl.algorithm as gptfl/fedavg, or X-gptfl/X-scratch per X
    runs = [(f"{name}-{kind}", sub, init) for name, sub in algorithms
            for kind, init in (("scratch", "random"), ("gptfl", "pretrained"))
            if (kind == "gptfl" and "gptfl" in methods) or
            (kind == "scratch" and "fedavg" in methods)] if algorithms else \
        [(m, cfg, "pretrained" if m == "gptfl" else "random") for m in ("gptfl", "fedavg")
         if m in methods]
    for row, sub, init in runs:
        if init == "pretrained":
            assert pre is not None
            init = str(pre.path)
        stages[row] = stage_federate(sub, out / row, comm, data, init, resume)
        results[row] = out / row
    local = None
    if "local_only" in methods:
        assert pre is not None
        stages["local_only"] = stage_local_only(cfg, out / "local_only", comm, data,
                                                str(pre.path))
        local = out / "local_only"
    central = None
    if "centralised" in methods:
        stages["centralised"] = stage_centralised(cfg, out, comm, data, resume)
        central = out / "centralised"
    comm.barrier()
    if comm.rank != 0:
        return None
    faults.point("report", comm.rank)
    from gptfl_hpc.report import write_report

    times = {k: {"seconds": v.info.get("seconds", 0.0)} for k, v in stages.items()
             if isinstance(v, Output)}
    report = write_report(cfg, out, data.manifest, data.dir, results,
                          read_json(pre.path.parent / "pretrained.json") if pre else None, times,
                          synthetic=stages["synthesize"].path if pre else None,
                          local_only=read_json(local / "summary.json") if local else None,
                          algorithms=[name for name, _ in algorithms],
                          centralised=read_json(central / "summary.json") if central else None)
    log.info("run finished in %.1fs; report in %s", time.perf_counter() - t0, out / "report.md")
    return report
