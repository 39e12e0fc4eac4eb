"""Synthesise the labelled synthetic set: plan -> generator calls -> one chunked HDF5 file.

Reading order: ``synthesize`` at the bottom checks the inputs, opens the generator once as a
:class:`~gptfl_hpc.gen.spec.GeneratorSpec` (rank 0 reads and fingerprints it, every process gets
the same spec), decides on rank 0 whether to skip / resume / start, generates the blocks assigned
to this process inside ``parallel.accel.accelerator`` and merges on rank 0. What is generated is a
:class:`~gptfl_hpc.gen.base.Task` (images: uint8 (H, W, C)); which generator makes it is a kind
of the registry (``gen/registry.py``); this module knows neither models nor modalities.

**Blocks make the set byte-identical for any batch size and process count.** CPU kernels
(oneDNN convolutions, GEMMs) pick different code paths for different batch shapes, which changes
the last float bits, which after 25 denoising steps flips uint8 pixels. So the sample indices are
cut into aligned blocks of ``micro_batch`` samples (block b = samples [b*M, (b+1)*M)) and the
generator is always called with exactly M rows (the call shape), the last, short block padded
(rows do not interact and each row sits at the same position in a same-shaped call). Default M:
64 on CPU; on GPU the kind's own per-call batch (16 images for text-to-image, 32 for DiT, up to
256 small UNet images).

**Block = unit of preemption; part = unit of writing.** After every block each process calls
``signals.boundary()`` and the processes agree on stop / error in one tiny allreduce, so all of
them stop after the same block (seconds, also for SD-2.1, within Slurm's 120 s warning). Finished
blocks are written as part files ``<out>.parts/blocks-<first>-<end>.h5`` (temp file, fsync,
rename) of consecutive blocks; a part is closed when its generation time would pass
``PART_SECONDS`` (~30 s, measured per block, so it adapts after the first block), at
``gen.batch_size`` samples, at the end of this process's run of blocks, and on a stop. A SIGKILL
loses at most the open part (~30 s of work) and never leaves a file that looks complete but is not.

**GPU failure handling.** Calls go through ``base.CallShape``: on CUDA out-of-memory the call is
halved once for all later calls (one recompile under gen.compile, logged). A block whose output
holds NaN/Inf (``base.to_uint8`` detects it; typically fp16 overflow) is regenerated with the
generator loaded in fp32; if fp32 also gives non-finite values the run fails with one line. The
number of regenerated blocks is logged and stored as ``nonfinite_blocks_regenerated``.

**Resumable.** ``<out>.parts/state.json`` pins the request's fingerprint (gptfl_hpc/provenance.py)
and the prompt table; a rerun with the same request and ``resume`` skips finished blocks (any
process count, any batch size); parts of another request are refused. Rank 0 merges the parts in
index order into ``<out>`` (temp + rename, the fingerprint in its attributes) and deletes the
parts.

See ``FORMAT`` below for the file layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc import fsio, signals
from gptfl_hpc.errors import (
    CommError,
    ConfigError,
    DataError,
    ModelError,
    Preempted,
    StaleOutputError,
)
from gptfl_hpc.gen.base import (
    DEFAULT_SAMPLE_RATE,
    CallShape,
    GeneratorKind,
    NonFiniteOutput,
    Sampler,
    Task,
    resolve_dtype,
)
from gptfl_hpc.gen.prompts import Plan, build_plan
from gptfl_hpc.gen.registry import kind_of, open_generator
from gptfl_hpc.gen.spec import GeneratorSpec, missing_generator_message
from gptfl_hpc.parallel.accel import release_device_memory
from gptfl_hpc.parallel.comm import on_root

__all__ = ["FORMAT", "missing_generator_message", "parts_dir", "read_fingerprint",
           "synthesis_numerics", "synthesis_request", "synthesize"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CPU_MICRO_BATCH = 64
PROGRESS_SECONDS = 30.0
PART_SECONDS = 30.0
"""A part file is closed before its generation time would pass this (seconds)."""
_PART_RE = re.compile(r"^blocks-(\d{9})-(\d{9})\.h5$")
_clock = time.perf_counter  # tests replace it to drive the part sizing

FORMAT = """\
Synthetic set (HDF5, one file, format_version 1)

| dataset | dtype | shape | meaning |
|---|---|---|---|
| images | uint8 | (N, H, W, C) | the samples, channel-last, chunked by ~1 MiB of rows (*) |
| labels | int64 | (N,) | class of each sample; sample g has class g % K |
| prompt_index | int32 | (N,) | row of `prompts` used for the sample |
| guidance | float32 | (N,) | classifier-free guidance scale (1.0 = none) |
| seed | int64 | (N,) | the sample's torch.Generator seed |
| speaker | int32 | (N,) | text-to-speech only: row of the generator's speaker table |
| prompts | UTF-8 string | (P,) | prompt table (all class x template/domain strings) |

(*) the task's dataset name, dtype and sample shape; for images: images, uint8, (H, W, C); for
audio: audio, int16, (L,) mono waveforms (full scale 32767) at the attribute sample_rate.

attrs: format_version, generator (path), generator_fingerprint (content digest of every file),
kind (gen.kind family), generator_kind (registry kind), steps, scheduler, seed, n_total,
num_classes, label_names (JSON), out_shape (JSON: the sample shape), config (JSON of gen),
fingerprint (the request's, gptfl_hpc/provenance.py), micro_batch (the call
shape), call_rows (the smallest call shape used: < micro_batch after GPU out-of-memory), dtype,
nonfinite_blocks_regenerated (blocks regenerated in fp32 because of NaN/Inf), device_type,
num_processes, wall_s, created, torch, diffusers; audio sets also sample_rate, and speaker
sets num_speakers (rows of the speaker table).
"""


# --------------------------------------------------------------------------------------------
# inputs, numerics and request


def check_inputs(gen_cfg: Any, *, generator: str | Path | GeneratorSpec, task: Task,
                 n_total: int, seed: int) -> GeneratorSpec:
    """Validate everything before any weights are loaded; return the generator's spec."""
    _check_scalars(n_total, seed)
    task.check()
    spec = open_generator(generator, gen_cfg.kind)
    kind_of(spec).check(spec, task, gen_cfg)
    return spec


def _check_scalars(n_total: Any, seed: Any) -> None:
    if not isinstance(n_total, (int, np.integer)) or n_total < 1:
        raise ConfigError(f"synthesis: n_total={n_total!r}; valid: >= 1 (gen.count, or gen.volume "
                          "x the private training-set size)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"config key run.seed: invalid value {seed!r}; valid: an int >= 0")


def synthesis_numerics(gen_cfg: Any, spec: GeneratorSpec, device_type: str) -> dict[str, Any]:
    """The resolved values that change the samples' bits: device type, dtype, call shape."""
    micro = gen_cfg.micro_batch or (CPU_MICRO_BATCH if device_type == "cpu"
                                    else kind_of(spec).call_rows(spec))
    return {"device_type": device_type, "dtype": resolve_dtype(gen_cfg.dtype, device_type),
            "micro_batch": int(micro)}


SYNTH_KEYS = ("prompt_mode", "templates", "domains", "guidance", "expand_prompts", "steps",
              "scheduler", "compile", "channels_last", "speaker")


def synthesis_request(gen_cfg: Any, *, spec: GeneratorSpec, task: Task, n_total: int,
                      seed: int, numerics: dict) -> Any:
    """The request of a direct `synthesize()` call (the pipeline passes its own fingerprint,
    gptfl_hpc/provenance.py: the same mechanism, keyed by the config fields it reads)."""
    from gptfl_hpc import provenance

    config = {f"gen.{k}": getattr(gen_cfg, k) for k in SYNTH_KEYS}
    config["run.seed"] = int(seed)
    derived = {"n_total": int(n_total), "label_names": list(task.label_names),
               "sample": [task.dataset, task.dtype, [int(v) for v in task.sample_shape]],
               "kind": spec.family, **numerics}
    if task.is_audio:
        derived["sample_rate"] = int(task.sample_rate)
    inputs = {"generator": spec.fingerprint}
    if getattr(gen_cfg, "speakers", ""):
        inputs["speakers"] = provenance.digest(gen_cfg.speakers)
    return provenance.Request("synthesize", config, inputs, derived)


def speaker_count(gen_cfg: Any, spec: GeneratorSpec) -> int:
    """Rows of the generator's speaker table (0: a kind without speakers)."""
    kind = kind_of(spec)
    return int(kind.speakers(spec, gen_cfg)) if kind.speakers is not None else 0


def read_fingerprint(path: str | Path) -> str | None:
    """The request fingerprint stored in a finished synthetic set (None if it has none)."""
    from gptfl_hpc.provenance import embedded_fingerprint

    return embedded_fingerprint(path)


# --------------------------------------------------------------------------------------------
# part files


def parts_dir(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".parts")


def file_mode() -> int:
    """0666 minus the process umask (what open() would have given the file)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _part_name(first: int, end: int) -> str:
    return f"blocks-{first:09d}-{end:09d}.h5"


def list_parts(pdir: Path) -> list[tuple[int, int, Path]]:
    """Finished part files as (first block, end block, path), sorted."""
    if not pdir.is_dir():
        return []
    out = []
    for p in pdir.iterdir():
        m = _PART_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


def _done_blocks(parts: list[tuple[int, int, Path]], n_blocks: int) -> np.ndarray:
    done = np.zeros(n_blocks, dtype=bool)
    for first, end, _ in parts:
        done[first:min(end, n_blocks)] = True
    return done


class _PartWriter:
    """Consecutive finished blocks of this process, written as one part file when due."""

    def __init__(self, pdir: Path, task: Task, *, micro: int, max_blocks: int) -> None:
        self.pdir, self.task, self.micro, self.max_blocks = pdir, task, micro, max_blocks
        self.first = 0
        self.samples: list[np.ndarray] = []
        self.seconds = self.last_seconds = 0.0
        self.regenerated, self.call_rows = 0, micro

    @property
    def end(self) -> int:
        return self.first + len(self.samples)

    def add(self, block: int, samples: np.ndarray, seconds: float, *, regenerated: bool,
            call_rows: int) -> None:
        if self.samples and block != self.end:
            self.flush()
        if not self.samples:
            self.first, self.seconds, self.regenerated, self.call_rows = block, 0.0, 0, self.micro
        self.samples.append(samples)
        self.seconds += seconds
        self.last_seconds = seconds
        self.regenerated += int(regenerated)
        self.call_rows = min(self.call_rows, call_rows)

    def due(self, next_block: int | None) -> bool:
        """Close the part before the next block? (end of run, size cap, or ~PART_SECONDS)."""
        return bool(self.samples) and (
            next_block != self.end or len(self.samples) >= self.max_blocks
            or self.seconds + self.last_seconds > PART_SECONDS)

    def flush(self) -> int:
        """Write the open part (atomically); return the samples written."""
        import h5py

        if not self.samples:
            return 0
        data = np.concatenate(self.samples)
        with contextlib.suppress(FileExistsError):
            self.pdir.mkdir(parents=True, exist_ok=True)
        with fsio.atomic_path(self.pdir / _part_name(self.first, self.end)) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset(self.task.dataset, data=data)
                f.attrs["first_block"], f.attrs["end_block"] = self.first, self.end
                f.attrs["start"] = self.first * self.micro
                f.attrs["stop"] = self.first * self.micro + len(data)
                f.attrs["nonfinite_blocks_regenerated"] = self.regenerated
                f.attrs["call_rows"] = self.call_rows
        self.samples = []
        return len(data)


# --------------------------------------------------------------------------------------------
# skip / resume / start, and the merge


def _prepare(gen_cfg: Any, *, out_path: Path, request: Any, fingerprint: str, resume: bool,
             label_names: list[str], n_total: int, seed: int, n_blocks: int,
             speakers: int = 0) -> dict:
    """Rank 0: decide skip / resume / start; returns what all ranks need to know."""
    from gptfl_hpc.provenance import check_partial

    if out_path.exists():
        if read_fingerprint(out_path) == fingerprint:
            shutil.rmtree(parts_dir(out_path), ignore_errors=True)
            return {"action": "skip"}
        raise StaleOutputError(f"{out_path} exists but was made for another request (or is not "
                               "a synthetic set); delete it or choose another output path")
    pdir = parts_dir(out_path)
    state_path = pdir / "state.json"
    for p in out_path.parent.glob(f".tmp-{out_path.name}.*"):  # a merge killed mid-file
        p.unlink(missing_ok=True)
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            prompts = list(state["prompts"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state_path}: unreadable ({e}); delete {pdir} to start over"
                            ) from None
        recorded = state.get("fingerprint")
        if recorded != fingerprint and isinstance(state.get("request"), dict):
            keys = request.diff(state["request"]) if request is not None else []
            raise StaleOutputError(f"{pdir} holds a partial synthesis of another request "
                                   f"(differs in {', '.join(keys[:6])}); rerun with the settings "
                                   f"that made it to finish it, or delete {pdir} to start this one")
        check_partial(pdir, recorded, fingerprint, what="synthesis")
        if not resume:
            raise StaleOutputError(f"{pdir} holds a partial synthesis of this request; rerun with "
                                   "--resume to continue it, or delete it to start over")
        for p in pdir.glob(".tmp-*"):  # a writer killed mid-file
            p.unlink(missing_ok=True)
    else:
        prompts = build_plan(gen_cfg, label_names, n_total, seed,  # expands if set
                             speakers=speakers).prompts
        pdir.mkdir(parents=True, exist_ok=True)
        fsio.write_json(state_path, {
            "fingerprint": fingerprint, "prompts": prompts, "created": time.time(),
            "request": request.to_dict() if request is not None else None})
    done = _done_blocks(list_parts(pdir), n_blocks)
    return {"action": "run", "prompts": prompts, "done": np.flatnonzero(done).tolist()}


def _merge(out_path: Path, plan: Plan, *, micro: int, task: Task, attrs: dict) -> dict:
    """Rank 0: parts -> one HDF5 in index order, written to a temp file and renamed.

    Returns the totals the parts recorded (nonfinite_blocks_regenerated, call_rows)."""
    import h5py

    n = len(plan)
    n_blocks = -(-n // micro)
    pdir = parts_dir(out_path)
    use, covered = [], 0
    for first, end, p in list_parts(pdir):
        if end <= covered:  # already covered by an earlier file (duplicate)
            continue
        if first != covered:
            break
        use.append((first, end, p))
        covered = end
    if covered != n_blocks:
        raise DataError(f"{pdir}: blocks {covered}..{n_blocks - 1} are missing from the part "
                        "files; rerun the same command to generate them")
    shape, dtype = tuple(task.sample_shape), np.dtype(task.dtype)
    rows = int(max(1, min(n, (1 << 20) // (math.prod(shape) * dtype.itemsize))))
    totals = {"nonfinite_blocks_regenerated": 0, "call_rows": micro}
    with fsio.atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset(task.dataset, shape=(n, *shape), dtype=dtype,
                                  chunks=(rows, *shape))
            for first, end, p in use:
                a, b = first * micro, min(end * micro, n)
                with h5py.File(p, "r") as part:
                    data = part[task.dataset][()]
                    totals["nonfinite_blocks_regenerated"] += int(
                        part.attrs.get("nonfinite_blocks_regenerated", 0))
                    totals["call_rows"] = min(totals["call_rows"],
                                              int(part.attrs.get("call_rows", micro)))
                if data.shape != (b - a, *shape) or data.dtype != dtype:
                    raise DataError(f"{p}: {task.dataset} of {data.dtype} {data.shape}, expected "
                                    f"{dtype} {(b - a, *shape)}; delete it and rerun")
                ds[a:b] = data
            f.create_dataset("labels", data=plan.labels.astype(np.int64))
            f.create_dataset("prompt_index", data=plan.prompt_index.astype(np.int32))
            f.create_dataset("guidance", data=plan.guidance.astype(np.float32))
            f.create_dataset("seed", data=plan.seeds.astype(np.int64))
            if plan.speakers is not None:
                f.create_dataset("speaker", data=plan.speakers.astype(np.int32))
            f.create_dataset("prompts", data=np.array(plan.prompts, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            for k, v in {**attrs, **totals}.items():
                f.attrs[k] = v
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a finished set is shared like any file
    shutil.rmtree(pdir, ignore_errors=True)
    return totals


# --------------------------------------------------------------------------------------------
# agreement between processes


def _agree(comm: Any, n_samples: int, err: BaseException | None) -> tuple[int, bool, bool]:
    """One small allreduce per block: (samples made by all, stop requested anywhere, any
    process failed)."""
    flags = np.array([n_samples, int(signals.stop_requested()), int(err is not None)],
                     dtype=np.int64)
    comm.allreduce_sum_(flags)
    return int(flags[0]), bool(flags[1]), bool(flags[2])


class _Progress:
    def __init__(self, total: int, done: int) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.t0 = self.t_last = time.perf_counter()
        self.next_frac = (done / total) + 0.1

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        frac = self.done / self.total
        if frac >= self.next_frac or now - self.t_last >= PROGRESS_SECONDS or \
                self.done == self.total:
            rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("synthesis %d/%d (%.0f%%)  %.1f img/s  ETA %.0f s", self.done, self.total,
                     100 * frac, rate, eta)
            self.t_last = now
            while self.next_frac <= frac:
                self.next_frac += 0.1


# --------------------------------------------------------------------------------------------
# this process's generator


class _BlockRunner:
    """Generates one block at the fixed call shape; regenerates non-finite blocks in fp32."""

    def __init__(self, kind: GeneratorKind, spec: GeneratorSpec, gen_cfg: Any, task: Task,
                 device: Any, dtype: str, micro: int) -> None:
        self.kind, self.spec, self.gen_cfg, self.task = kind, spec, gen_cfg, task
        self.device, self.dtype = device, dtype
        self.what = f"{kind.name} generator"
        self.sampler = kind.load(spec, gen_cfg, task, device, dtype)
        self.shape = CallShape(micro, what=self.what, compiled=gen_cfg.compile)
        self.fp32: tuple[Sampler, CallShape] | None = None
        self.regenerated = 0

    def __call__(self, rows: Plan, block: int, start: int) -> tuple[np.ndarray, bool]:
        """(samples of the block's real rows, whether it was regenerated in fp32)."""
        try:
            return self._run(self.sampler, self.shape, rows), False
        except NonFiniteOutput as e:
            bad = e
        where = f"block {block} (samples {start}..{start + len(rows) - 1})"
        if self.dtype == "fp32":
            raise ModelError(f"synthesis: {where}: {bad.rows} of {bad.total} samples of "
                             f"generator {self.spec.path} are not finite (NaN/Inf) in fp32; the "
                             "generator is broken for these inputs (check its weights, gen.steps "
                             "and gen.scheduler)") from None
        log.warning("synthesis: %s: %d of %d samples are not finite in %s; regenerating the "
                    "block in fp32", where, bad.rows, bad.total, self.dtype)
        if self.fp32 is None:
            self.fp32 = (self.kind.load(self.spec, self.gen_cfg, self.task, self.device, "fp32"),
                         CallShape(self.shape.rows, what=f"{self.what} (fp32)",
                                   compiled=self.gen_cfg.compile))
        try:
            out = self._run(*self.fp32, rows)
        except NonFiniteOutput as e:
            raise ModelError(f"synthesis: {where}: {e.rows} of {e.total} samples of generator "
                             f"{self.spec.path} are not finite (NaN/Inf) in {self.dtype} and in "
                             "fp32 too; the generator is broken for these inputs (check its "
                             "weights, gen.steps and gen.scheduler)") from None
        self.regenerated += 1
        return out, True

    @property
    def call_rows(self) -> int:
        return min(self.shape.rows, self.fp32[1].rows if self.fp32 else self.shape.rows)

    def _run(self, sampler: Sampler, shape: CallShape, rows: Plan) -> np.ndarray:
        texts = rows.prompt_texts()
        want = (*self.task.sample_shape,)

        def call(idx: np.ndarray) -> np.ndarray:
            extra = {} if rows.speakers is None else {"speakers": rows.speakers[idx]}
            out = np.asarray(sampler(rows.labels[idx], [texts[i] for i in idx],
                                     rows.guidance[idx], rows.seeds[idx], **extra))
            if out.shape != (len(idx), *want) or out.dtype != np.dtype(self.task.dtype):
                raise ModelError(f"{self.what} returned {out.dtype} {out.shape}; expected "
                                 f"{self.task.dtype} {(len(idx), *want)}")
            return out

        return shape.run(call, len(rows))


# --------------------------------------------------------------------------------------------
# main entry


def synthesize(gen_cfg: Any, *, generator_dir: str | Path | None, label_names: list[str],
               out_shape: tuple[int, ...] | None = None, n_total: int,
               out_path: str | Path, seed: int, comm: Any, device: str = "auto",
               spec: GeneratorSpec | None = None, task: Task | None = None,
               fingerprint: str | None = None, resume: bool = True) -> Path:
    """Generate `n_total` labelled samples with the generator in `generator_dir` into `out_path`.

    Every process of `comm` must call it; the work is split across them (one GPU per process on
    GPU nodes). Returns `out_path`. Skips if `out_path` is finished for the same request; resumes
    from `<out_path>.parts/` after a kill; raises Preempted after a block when asked to stop.
    `spec` (optional): the generator already opened (``registry.open_generator``); `task`
    (optional): what to generate, default ``Task.for_shape(label_names, out_shape)``: uint8
    images for an (H, W, C) shape, int16 16 kHz waveforms for an (L,) shape.
    `fingerprint`: the request's fingerprint (gptfl_hpc/provenance.py; the pipeline passes the
    stage's); None computes one from what this call is given. `resume`: continue parts of the
    same request (else they are refused with a message).
    """
    from gptfl_hpc.parallel.accel import want_cuda

    signals.install()
    out_path = Path(out_path)
    # Step 1: check the inputs; rank 0 opens (and fingerprints) the generator once
    task = _task(task, label_names, out_shape)
    _check_scalars(n_total, seed)
    generator = spec if spec is not None else generator_dir
    if generator is None:
        raise ModelError("synthesis: no generator given; valid: generator_dir or spec")
    spec = GeneratorSpec.from_json(on_root(comm, lambda: check_inputs(
        gen_cfg, generator=generator, task=task, n_total=n_total, seed=seed).to_json()))
    # Step 2: the numerics (device, dtype, call shape) and the request
    device_type = "cuda" if want_cuda(device) else "cpu"
    numerics = synthesis_numerics(gen_cfg, spec, device_type)
    request = None
    if fingerprint is None:
        request = synthesis_request(gen_cfg, spec=spec, task=task, n_total=n_total, seed=seed,
                                    numerics=numerics)
        fingerprint = request.fingerprint
    # Step 3: rank 0 decides: skip (finished), resume (parts of this request) or start
    micro = numerics["micro_batch"]
    n_blocks = -(-n_total // micro)
    speakers = speaker_count(gen_cfg, spec)
    decision = on_root(comm, lambda: _prepare(
        gen_cfg, out_path=out_path, request=request, fingerprint=fingerprint, resume=resume,
        label_names=list(task.label_names), n_total=n_total, seed=seed, n_blocks=n_blocks,
        speakers=speakers))
    if decision["action"] == "skip":
        log.info("synthetic set %s is already complete for this request; skipping", out_path)
        return out_path
    plan = build_plan(dataclasses.replace(gen_cfg, expand_prompts=None), task.label_names,
                      n_total, seed, speakers=speakers)
    plan.prompts = list(decision["prompts"])
    # Step 4: the blocks still to do, split over the processes, one agreement per block
    t0 = time.perf_counter()
    _generate(comm, gen_cfg, spec, task, plan, numerics, decision["done"], parts_dir(out_path),
              device)
    release_device_memory("synthesis")  # the pipeline is out of scope: FL starts clean
    wall = time.perf_counter() - t0
    # Step 5: rank 0 merges the parts into the set (the fingerprint in its attributes)
    attrs = _attrs(gen_cfg, spec, task, seed=seed, n_total=n_total, numerics=numerics,
                   fingerprint=fingerprint, processes=comm.size, wall=wall)
    if task.is_audio:
        attrs["sample_rate"] = int(task.sample_rate or DEFAULT_SAMPLE_RATE)
    if speakers:
        attrs["num_speakers"] = speakers
    totals = on_root(comm, lambda: _merge(out_path, plan, micro=micro, task=task, attrs=attrs))
    if comm.rank == 0:
        log.info("synthetic set written: %s (%d samples, %.0f s; %d block(s) regenerated in fp32 "
                 "for non-finite outputs; smallest call %d rows)", out_path, n_total, wall,
                 totals["nonfinite_blocks_regenerated"], totals["call_rows"])
    return out_path


def _task(task: Task | None, label_names: list[str], out_shape: tuple | None) -> Task:
    label_names = list(label_names)
    if task is None:
        if out_shape is None:
            raise DataError("synthesis: out_shape is required (or a task)")
        task = Task.for_shape(label_names, out_shape)  # (H, W, C): images; (L,): audio
    if list(task.label_names) != label_names:
        raise ConfigError(f"synthesis: label names {label_names} differ from the task's "
                          f"{list(task.label_names)}; valid: the same list")
    task.check()
    return task


def _generate(comm: Any, gen_cfg: Any, spec: GeneratorSpec, task: Task, plan: Plan,
              numerics: dict, done_blocks: list[int], pdir: Path, device: str) -> None:
    """Generate every block not yet in the part files, the processes of `comm` together."""
    from gptfl_hpc.parallel.accel import accelerator

    n_total, micro, dtype = len(plan), numerics["micro_batch"], numerics["dtype"]
    done = np.zeros(-(-n_total // micro), dtype=bool)
    done[np.asarray(done_blocks, dtype=np.int64)] = True
    todo = np.flatnonzero(~done).tolist()
    n_done = n_total - sum(min((b + 1) * micro, n_total) - b * micro for b in todo)
    per_part = max(1, -(-gen_cfg.batch_size // micro))
    kind = kind_of(spec)
    with accelerator(comm, device=device, mixed_precision="no") as acc:
        with acc.split_between_processes(todo) as mine:
            mine = list(mine)
        n_iter = max(comm.allgather_json(len(mine)))
        if comm.rank == 0:
            log.info("synthesis: %d samples of %s %s (%d classes) with %s generator %s (%s) on "
                     "%d process(es) (%s, %s); %d done, %d blocks of %d to go; parts of <= %d "
                     "blocks or ~%.0f s", n_total, "x".join(map(str, task.sample_shape)),
                     task.dtype, len(task.label_names), spec.family, spec.path, kind.name,
                     comm.size, acc.device, dtype, n_done, len(todo), micro, per_part,
                     PART_SECONDS)
        runner, err = None, None
        if n_iter:
            try:
                runner = _BlockRunner(kind, spec, gen_cfg, task, acc.device, dtype, micro)
            except Exception as e:  # agree below, so no process hangs in a collective
                err = e
            _, _, failed = _agree(comm, 0, err)
            _raise_failure(err, failed)
        writer = _PartWriter(pdir, task, micro=micro, max_blocks=per_part)
        _run_blocks(comm, runner, writer, plan, mine, n_iter, micro=micro, n_done=n_done)


def _attrs(gen_cfg: Any, spec: GeneratorSpec, task: Task, *, seed: int, n_total: int,
           numerics: dict, fingerprint: str, processes: int, wall: float) -> dict:
    """The synthetic set's HDF5 attributes (see FORMAT)."""
    import diffusers
    import torch

    return {"format_version": FORMAT_VERSION, "generator": str(spec.path),
            "generator_fingerprint": spec.fingerprint, "kind": spec.family,
            "generator_kind": spec.kind, "steps": gen_cfg.steps,
            "scheduler": gen_cfg.scheduler, "seed": int(seed), "n_total": int(n_total),
            "num_classes": len(task.label_names),
            "label_names": json.dumps(list(task.label_names)),
            "out_shape": json.dumps(list(task.sample_shape)),
            "config": json.dumps(dataclasses.asdict(gen_cfg)),
            "fingerprint": fingerprint, "micro_batch": numerics["micro_batch"],
            "dtype": numerics["dtype"], "device_type": numerics["device_type"],
            "num_processes": processes, "wall_s": round(wall, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": str(torch.__version__), "diffusers": str(diffusers.__version__)}


def _run_blocks(comm: Any, runner: _BlockRunner | None, writer: _PartWriter, plan: Plan,
                mine: list[int], n_iter: int, *, micro: int, n_done: int) -> None:
    """This process's blocks, in lockstep with the others: one agreement per block, so a stop
    or an error anywhere ends every process after the same block, with its blocks saved."""
    n_total = len(plan)
    progress = _Progress(n_total, n_done) if comm.rank == 0 else None
    made_all, err = 0, None
    for it in range(n_iter):
        made = 0
        if it < len(mine) and runner is not None:
            try:
                made = _one_block(runner, writer, plan, mine, it, micro)
                signals.boundary()
            except Exception as e:  # agree below, so no process hangs in a collective
                err = e
        total, stop, failed = _agree(comm, made, err)
        if failed:
            with contextlib.suppress(Exception):  # keep the finished blocks
                writer.flush()
            _raise_failure(err, failed)
        made_all += total
        if progress is not None:
            progress.update(total)
        if stop:
            writer.flush()
            if it + 1 < n_iter:
                raise Preempted(f"synthesis stopped by {signals.reason()} after a block "
                                f"({n_done + made_all}/{n_total} samples saved in "
                                f"{writer.pdir}); rerun the same command to resume")
    writer.flush()


def _one_block(runner: _BlockRunner, writer: _PartWriter, plan: Plan, mine: list[int], it: int,
               micro: int) -> int:
    """Generate block mine[it], add it to the open part, close the part when due."""
    b = mine[it]
    a, z = b * micro, min((b + 1) * micro, len(plan))
    t = _clock()
    samples, regenerated = runner(plan.take(np.arange(a, z)), b, a)
    writer.add(b, samples, _clock() - t, regenerated=regenerated, call_rows=runner.call_rows)
    if writer.due(mine[it + 1] if it + 1 < len(mine) else None):
        writer.flush()
    return z - a


def _raise_failure(err: BaseException | None, failed: bool) -> None:
    if err is not None:
        raise err
    if failed:
        raise CommError("synthesis: another process failed (see its log line); rerun the same "
                        "command to resume")
