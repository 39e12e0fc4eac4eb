"""Is this output complete, and made from exactly this request? One mechanism for every stage.

Every stage (prepare, generator, synthesize, pretrain, federate, local_only, centralised)
describes what determines its result as a :class:`Request`:

* ``config``: the values of the config fields the stage reads, declared once in
  :data:`STAGE_FIELDS` (a field that changes no result is declared in :data:`NO_EFFECT` with the
  reason; a field that names a file or directory is declared in :data:`INPUT_FIELDS`, and the
  *content* digest of what it names enters the request instead of the path);
* ``inputs``: content digests of what the stage consumes (the prepared data, the public split,
  the generator, the synthetic set, an init checkpoint, ...);
* ``derived``: values resolved at run time that change the numbers (e.g. the dtype and device
  type of synthesis, the synthetic-set size computed from gen.volume).

``tests/test_provenance.py`` enforces that every config field is declared in exactly one of
those places and that changing it changes exactly the declared stages' fingerprints.

A stage writes its outputs atomically, then its *record* ``<dir>/<stage>.done.json`` (request,
fingerprint, outputs with their content digests), last: the record is the commit marker.
:func:`status` answers for a directory and a request:

* ``complete``: a record with the same fingerprint, every output present with its digest;
* ``absent``: nothing of this stage there (start, or continue partial state of the same request);
* ``extend``: a finished run of the same identity with a smaller progress target (fl.rounds);
* anything else raises :class:`~gptfl_hpc.errors.StaleOutputError`, naming the keys that differ:
  outputs are never silently reused, mixed or overwritten.

Partial state (FL and pretraining checkpoints, synthesis parts, generator-training checkpoints)
stores the same fingerprint and is resumed only when it matches.

Progress targets (only ``fl.rounds`` today) are kept out of the fingerprint when the stage can
extend a finished run to a larger target without changing the earlier rounds: a 30-round FedAvg
with a constant client lr can be continued to 50 rounds. With a schedule whose shape depends on the
number of rounds (cosine), or DP noise calibrated to a target epsilon after fl.rounds rounds,
``fl.rounds`` is part of the identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptfl_hpc.errors import StaleOutputError

FORMAT = 1
"""Bump when the meaning of a stage's result changes for the same config."""
INVARIANT_KERNELS = 3
"""Version of run.cpu_kernels=invariant's CPU kernels, a derived input of the training stages
(bumped when their bits change for the same config; numerics.py, train/invconv.py)."""

STAGES = ("prepare", "generator", "synthesize", "pretrain", "federate", "local_only",
          "centralised")

# Config fields that determine each stage's result ("section.*" = every field of the section;
# fields listed in INPUT_FIELDS or NO_EFFECT are taken out of a "*" again).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "prepare": ("run.seed", "data.*"),
    "generator": ("run.seed", "gen.train.*"),
    "synthesize": ("run.seed", "gen.kind", "gen.prompt_mode", "gen.templates", "gen.domains",
                   "gen.guidance", "gen.steps", "gen.scheduler", "gen.compile",
                   "gen.channels_last", "gen.speaker"),
    "pretrain": ("run.seed", "run.cpu_kernels", "pretrain.*", "model.*", "fl.augment"),
    "federate": ("run.seed", "run.cpu_kernels", "model.*", "fl.*", "dp.*"),
    # the local-fine-tuning control: every client runs the FL client procedure for fl.rounds
    # rounds on its own model (no aggregation), then the server's test set scores it
    "local_only": ("run.seed", "run.cpu_kernels", "model.*", "fl.rounds", "fl.local_epochs",
                   "fl.batch_size", "fl.client_optimizer", "fl.client_lr",
                   "fl.client_lr_schedule", "fl.client_momentum", "fl.client_weight_decay",
                   "fl.body_lr_scale", "fl.augment", "fl.eval_batch_size"),
    # the centralised reference: cfg.model trained from random init on the pooled private data
    # with the pretraining loop and hyperparameters (gptfl_hpc/train/centralised.py)
    "centralised": ("run.seed", "run.cpu_kernels", "pretrain.*", "model.*", "fl.augment"),
}

INPUT_FIELDS: dict[str, str] = {
    "data.root": "prepare: content identity of the source files (names, sizes, bytes of small "
                 "files), not the path",
    "gen.generator": "synthesize: content fingerprint of the generator directory ('embedded': "
                     "the generator stage's output)",
    "gen.expand_prompts": "synthesize: content fingerprint of the prompt-expansion model "
                          "directory",
    "gen.speakers": "synthesize: content digest of the speaker x-vector file (empty: the "
                    "generator directory's own, inside its fingerprint)",
    "fl.init": "federate: content digest of the init checkpoint ('random': none)",
    "pretrain.init": "pretrain: content digest of the backbone checkpoint (null: none); the "
                     "centralised reference always starts from random init and ignores it",
}

NO_EFFECT: dict[str, str] = {
    "run.threads": "under run.cpu_kernels=invariant the CPU kernels give the same bits at any "
                   "thread count (tests/test_models.py); with 'fast' they do not (numerics.py)",
    "run.device": "where the stages run; the resolved device type and dtype that change the "
                  "numbers enter the synthesis request as derived values",
    "run.methods": "which stages `run` executes; each stage is identified by its own request",
    "run.algorithms": "which FL stages `run` executes; each is identified by its own request "
                      "(made from the config with that algorithm's settings)",
    "run.rendezvous": "where the server processes meet; not what they compute",
    "run.concurrent_clients": "clients trained at once on one-thread workers give the bits of "
                              "one after another (invariant kernels only; "
                              "tests/test_concurrent.py)",
    "run.store": "where stage outputs live; each is identified by its own fingerprint",
    "run.server_processes": "pretraining uses the same global batch and augmentation draws at "
                            "any process count (DDP changes the float summation order only); "
                            "synthesis is byte-identical for any process count",
    "pretrain.data_path": "where the synthetic set lives while pretraining (on the device or "
                          "streamed from one host copy per node); the same batches, permutation "
                          "and augmentation draws either way, bitwise the same weights on CPU "
                          "(tests/test_pretrain.py)",
    "data.dir": "where the prepared data lives; its content digest is the downstream input",
    "data.workers": "how many processes decode the images; each file is decoded on its own, so "
                    "the shards are byte-identical for any count (tests/test_images.py)",
    "gen.batch_size": "the unit of work only: samples are generated in fixed micro-batch calls, "
                      "byte-identical for any batch size (tests/test_synthesize.py)",
    "gen.micro_batch": "the call shape; its resolved value enters the synthesis request as a "
                       "derived value (it changes the last float bits of the samples)",
    "gen.dtype": "its resolved value (auto -> fp16 on GPU, fp32 on CPU) enters the synthesis "
                 "request as a derived value",
    "gen.volume": "together with gen.count it resolves to the number of samples, which enters "
                  "the synthesis request as a derived value",
    "gen.count": "see gen.volume",
    "gen.train.checkpoint_every": "how often training saves; resume is bitwise (tested)",
    "fl.checkpoint_every": "how often the server saves; resume is bitwise (tested)",
    "fl.keep_checkpoints": "how many checkpoints are kept",
    "fl.sync": "replicated and bcast give bit-identical weights (tests/test_federate.py)",
    "fl.placement": "which rank trains a client; with fl.aggregation=exact the weights are "
                    "bit-identical either way (tests/test_federate.py), with float32 they differ "
                    "in the last bits only",
    "fl.client_cache_mb": "memory for cached client shards",
    "fl.rounds": "a progress target: part of the identity when the client lr schedule depends "
                 "on it (cosine) or fl.select chooses the returned model, otherwise a finished "
                 "run can be extended",
    "slurm.*": "how jobs are launched",
}

RECORD_SUFFIX = ".done.json"


# ------------------------------------------------------------------------------ config fields


def leaf_fields(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> value of every leaf field of a config dataclass tree."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(leaf_fields(value, name + "."))
        else:
            out[name] = value
    return out


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1]))


def _declared(name: str, table: Iterable[str]) -> bool:
    return any(_matches(name, p) for p in table)


def stage_fields(stage: str, names: Iterable[str]) -> list[str]:
    """The config fields (of `names`) whose values enter `stage`'s request."""
    pats = STAGE_FIELDS[stage]
    return sorted(n for n in names if _declared(n, pats)
                  and not (n not in pats and (_declared(n, INPUT_FIELDS)
                                              or _declared(n, NO_EFFECT))))


def effective_overrides(overrides: Iterable[str]) -> list[str]:
    """The `key=value` overrides that can change a result: those of NO_EFFECT keys (threads,
    where outputs live, how jobs launch, ...) left out."""
    return [o for o in overrides if not _declared(o.partition("=")[0].strip(), NO_EFFECT)]


def progress_target(stage: str, cfg: Any) -> dict[str, int]:
    """Targets kept out of the identity (a finished run may be extended to a larger one)."""
    if (stage == "federate" and cfg.fl.client_lr_schedule == "constant"
            and cfg.fl.select == "last"
            and not (cfg.dp.enabled and cfg.dp.target_epsilon is not None)):
        return {"rounds": int(cfg.fl.rounds)}
    return {}


# ------------------------------------------------------------------------------ requests


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class Request:
    """What determines a stage's result. Its fingerprint identifies it."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, int] = field(default_factory=dict)
    """Targets outside the identity (see progress_target)."""

    def identity(self) -> dict[str, Any]:
        return {"format": FORMAT, "stage": self.stage, "config": self.config,
                "inputs": self.inputs, "derived": self.derived}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(canonical(self.identity()).encode()).hexdigest()[:32]

    def to_dict(self) -> dict[str, Any]:
        return {**self.identity(), "progress": self.progress, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        return cls(stage=d["stage"], config=d.get("config", {}), inputs=d.get("inputs", {}),
                   derived=d.get("derived", {}), progress=d.get("progress", {}))

    def diff(self, other: dict[str, Any] | Request | None) -> list[str]:
        """Dotted keys whose values differ from `other` (a Request or its dict)."""
        if other is None:
            return ["(no request recorded)"]
        o = other.identity() if isinstance(other, Request) else dict(other)
        mine = self.identity()
        keys: list[str] = []
        if o.get("format") != mine["format"]:
            keys.append("format")
        for part in ("config", "inputs", "derived"):
            a, b = mine[part], o.get(part) or {}
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    keys.append(k if part == "config" else f"{part}.{k}")
        return keys or ["(fingerprint)"]


def request(stage: str, cfg: Any, *, inputs: dict[str, str] | None = None,
            derived: dict[str, Any] | None = None) -> Request:
    """The request of `stage` for the root config `cfg` (see the module docstring)."""
    if stage not in STAGE_FIELDS:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    values = leaf_fields(cfg)
    config = {n: values[n] for n in stage_fields(stage, values)}
    progress = progress_target(stage, cfg)
    if stage == "federate" and not progress:
        config["fl.rounds"] = cfg.fl.rounds
    derived = dict(derived or {})
    if "run.cpu_kernels" in config and cfg.run.cpu_kernels == "invariant":
        # the invariant kernels' version: 2 = oneDNN convolutions with a one-thread weight
        # gradient (train/invconv.py); 3 = that gradient summed over fixed batch chunks and
        # evaluation's convolutions on oneDNN too; outputs of other versions differ in their
        # bits, so they are not reused
        derived["invariant_kernels"] = INVARIANT_KERNELS
    return Request(stage, config, dict(inputs or {}), derived, progress)


# ------------------------------------------------------------------------------ digests


def canonical_digest(obj: Any) -> str:
    """Digest of a JSON-able value (for derived inputs such as a dataset's task description)."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()

_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}


def digest(path: str | Path) -> str:
    """Content digest of a file or directory (hex SHA-256).

    HDF5 files: every dataset's name, dtype, shape and bytes in name order (attributes, which
    hold timestamps, are left out), so the same content written twice digests the same.
    Other files: their bytes. Directories: every non-hidden file's relative path and digest.
    Cached per (path, size, mtime) within the process.
    """
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256(b"dir\0")
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts) \
                    and not f.name.endswith(RECORD_SUFFIX):
                h.update(f"{rel.as_posix()}\0{digest(f)}\0".encode())
        return h.hexdigest()
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGEST_CACHE:
        _DIGEST_CACHE[key] = _h5_digest(p) if _is_hdf5(p) else _file_digest(p)
    return _DIGEST_CACHE[key]


def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _is_hdf5(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _h5_digest(p: Path) -> str:
    import h5py
    import numpy as np

    h = hashlib.sha256(b"hdf5\0")
    with h5py.File(p, "r", locking=False) as f:
        names: list[str] = []
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
        for name in sorted(names):
            ds = f[name]
            h.update(f"{name}\0{ds.dtype.str}\0{ds.shape}\0".encode())
            if ds.dtype.kind == "O" or h5py.check_string_dtype(ds.dtype) is not None:
                for s in ds.asstr()[()].reshape(-1).tolist():
                    h.update(s.encode("utf-8") + b"\0")
                continue
            rows = max(1, (1 << 24) // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
            for start in range(0, ds.shape[0] if ds.shape else 1, rows):
                block = ds[start:start + rows] if ds.shape else ds[()]
                arr = np.ascontiguousarray(block)
                if arr.dtype.byteorder == ">":
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                h.update(arr.tobytes())
    return h.hexdigest()


SOURCE_HASH_LIMIT = 256 << 20
"""Source trees up to this many bytes are identified by their content; larger ones (image
folders of tens of GB, read again by every run that checks them) by names, sizes and
modification times, as make and rsync do."""


def source_identity(root: str | Path) -> str:
    """Identity of a user's source data (a file or a directory tree): every file's relative name
    and size, plus the bytes of every file when the tree is small (<= SOURCE_HASH_LIMIT) and the
    modification times when it is large. Any edit, addition or removal changes it."""
    p = Path(root).expanduser()
    if not p.exists():
        return "missing:" + str(p)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    stats = [(f, f.stat()) for f in files]
    by_content = sum(st.st_size for _, st in stats) <= SOURCE_HASH_LIMIT
    h = hashlib.sha256(b"source\0content\0" if by_content else b"source\0stat\0")
    for f, st in stats:
        rel = f.name if f == p else f.relative_to(p).as_posix()
        h.update(f"{rel}\0{st.st_size}\0".encode())
        h.update((digest(f) if by_content else str(st.st_mtime_ns)).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------ records


def record_path(directory: str | Path, stage: str) -> Path:
    return Path(directory) / f"{stage}{RECORD_SUFFIX}"


def write_record(directory: str | Path, req: Request, outputs: Mapping[str, str | Path],
                 **info: Any) -> dict[str, Any]:
    """Commit a finished stage: digest its outputs and write the record, atomically, last.

    `outputs` maps a name to a path (relative to `directory`, or absolute); the record stores
    each path relative to `directory` when it lies inside it.
    """
    from gptfl_hpc.fsio import write_json

    d = Path(directory)
    files = {}
    for name, path in outputs.items():
        p = d / path if not Path(path).is_absolute() else Path(path)
        try:
            rel = p.relative_to(d).as_posix()
        except ValueError:
            rel = str(p)
        files[name] = {"path": rel, "digest": digest(p)}
    rec = {"request": req.to_dict(), "fingerprint": req.fingerprint, "outputs": files,
           "progress": dict(req.progress), **info}
    write_json(record_path(d, req.stage), rec)
    return rec


def read_record(directory: str | Path, stage: str) -> dict[str, Any] | None:
    """The stage's record in `directory`; None when absent. A torn record raises."""
    p = record_path(directory, stage)
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(rec, dict) or "fingerprint" not in rec:
            raise ValueError("not a completion record")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StaleOutputError(f"{p}: unreadable completion record ({' '.join(str(e).split())});"
                               f" delete {p} and the outputs it describes, or use a new --out"
                               ) from None
    return rec


def output_path(directory: str | Path, rec: dict[str, Any], name: str) -> Path:
    rel = rec["outputs"][name]["path"]
    return Path(rel) if Path(rel).is_absolute() else Path(directory) / rel


def embedded_fingerprint(path: str | Path) -> str | None:
    """The request fingerprint a stage embeds in its main output, if any: an HDF5 root
    attribute, safetensors metadata, or a JSON field, each named ``fingerprint``."""
    p = Path(path)
    try:
        if p.is_file() and _is_hdf5(p):
            import h5py

            with h5py.File(p, "r", locking=False) as f:
                v = f.attrs.get("fingerprint")
            return v.decode() if isinstance(v, bytes) else (str(v) if v is not None else None)
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                return (f.metadata() or {}).get("fingerprint")
        if p.suffix == ".json":
            obj = json.loads(p.read_text(encoding="utf-8"))
            v = obj.get("fingerprint", obj.get("config_hash"))  # manifests: config_hash
            return str(v) if v is not None else None
    except Exception:  # noqa: BLE001 (unreadable: no fingerprint, the caller refuses)
        return None
    return None


def status(directory: str | Path, req: Request, *, what: str,
           outputs: dict[str, str] | None = None) -> str:
    """'complete' or 'absent' for `req` in `directory`; StaleOutputError for anything else.

    `outputs` (name -> path relative to `directory`) are what the stage writes; the first is its
    main output, written after the others. A main output present without a record counts as
    complete only when it embeds this request's fingerprint (a stage killed between writing it
    and its record); then the record is written now. Otherwise it is a conflict (another run's
    result, or a file of unknown origin), never silently reused or overwritten. `what` names the
    output in messages; "extend": see the module docstring.
    """
    d = Path(directory)
    outputs = dict(outputs or {})
    rec = read_record(d, req.stage)
    if rec is None:
        # the main output is written last; before it exists the stage's partial state (if any)
        # is the stage's to check (it carries the fingerprint too)
        main = d / next(iter(outputs.values()))
        if not main.exists():
            return "absent"
        if (embedded_fingerprint(main) == req.fingerprint
                and all((d / rel).exists() for rel in outputs.values())):
            write_record(d, req, outputs)
            return "complete"
        raise StaleOutputError(
            f"{main} exists without {record_path(d, req.stage).name}, made by another run or "
            f"tool: {what} cannot be proven to match this request; delete it or use a new "
            "--out")
    recorded = rec.get("request") or {}
    if rec.get("fingerprint") != req.fingerprint:
        keys = req.diff(recorded)
        raise StaleOutputError(
            f"{d} holds {what} for another request (differs in {', '.join(keys[:8])}"
            f"{', ...' if len(keys) > 8 else ''}); use a new --out, or delete "
            f"{record_path(d, req.stage)} and its outputs to recompute")
    done = rec.get("progress") or {}
    for k, target in req.progress.items():
        if done.get(k, 0) > target:
            raise StaleOutputError(
                f"{d} holds {what} with {k}={done.get(k)} > the requested {target}; use a new "
                "--out (a finished run is not cut back)")
        if done.get(k, 0) < target:
            return "extend"  # the stage continues from its checkpoint
    for name, entry in (rec.get("outputs") or {}).items():
        p = output_path(d, rec, name)
        if not p.exists():
            raise StaleOutputError(f"{p}: listed in {record_path(d, req.stage).name} but "
                                   f"missing; delete {record_path(d, req.stage)} to recompute "
                                   f"{what}")
        if digest(p) != entry.get("digest"):
            raise StaleOutputError(f"{p}: content differs from its completion record (modified "
                                   f"after {what} was made); delete "
                                   f"{record_path(d, req.stage)} and it to recompute")
    return "complete"


def check_partial(where: str | Path, recorded: str | None, fingerprint: str, *,
                  what: str) -> None:
    """Partial state (a checkpoint, synthesis parts) may be resumed only for the same request."""
    if recorded is not None and recorded != fingerprint:
        raise StaleOutputError(
            f"{where} holds partial {what} of another request; rerun with the settings that "
            "made it to finish it, or delete it (or use a new --out) to start this one")


def environ_fingerprint() -> dict[str, str]:
    """Library versions, for records (information only, not part of the identity)."""
    import platform

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for mod in ("torch", "numpy", "h5py", "diffusers"):
        m = __import__("sys").modules.get(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    out["host"] = os.uname().nodename if hasattr(os, "uname") else platform.node()
    return out
