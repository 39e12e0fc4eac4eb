"""Synthesise the labelled synthetic set: plan -> generator calls -> one chunked HDF5 file.

Single readable file (style: diffusers' single-file policy). Reading order: ``synthesize`` at the
bottom calls ``check_inputs``, decides on rank 0 whether to skip / resume / start, runs the batches
assigned to this process inside ``dist.accel.accelerator`` and merges on rank 0.

**Blocks make the set byte-identical for any batch size and process count.** CPU kernels
(oneDNN convolutions, GEMMs) pick different code paths for different batch shapes, which changes
the last float bits, which after 25 denoising steps flips uint8 pixels. So the sample indices are
cut into aligned blocks of ``micro_batch`` samples (block b = samples [b*M, (b+1)*M)) and the
generator is always called on exactly one block, padded to M rows when it is the last, short one
(rows do not interact and each row sits at the same position in a same-shaped call). Batches
(``gen.batch_size``, rounded up to a multiple of M) are only the unit of work and of writing.

**Resumable.** Each finished batch is written as its own small HDF5 file
``<out>.parts/blocks-<first>-<end>.h5`` (temp file, fsync, rename), so a SIGKILL at any moment
loses at most the batches in flight and never leaves a file that looks complete but is not.
``<out>.parts/state.json`` pins the request, the numerics and the prompt table; a rerun with the
same request skips finished blocks (any process count, any batch size) and refuses a different
one. Rank 0 merges the parts in index order into ``<out>`` (temp + rename) and deletes the parts.
After every batch each process calls ``signals.boundary()``; the processes agree on stop / error
in one tiny allreduce per batch, so all of them stop at the same batch and raise ``Preempted``.

See ``FORMAT`` below for the file layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gptfl_hpc import fsio, signals
from gptfl_hpc.errors import CommError, ConfigError, DataError, GptflError, ModelError, Preempted
from gptfl_hpc.gen.prompts import Plan, build_plan

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CPU_MICRO_BATCH = 64
PROGRESS_SECONDS = 30.0
EXAMPLE_REPO = "stabilityai/stable-diffusion-2-1"
_PART_RE = re.compile(r"^blocks-(\d{9})-(\d{9})\.h5$")

FORMAT = """\
Synthetic set (HDF5, one file, format_version 1)

| dataset | dtype | shape | meaning |
|---|---|---|---|
| images | uint8 | (N, H, W, C) | the samples, channel-last, chunked by ~1 MiB of rows |
| labels | int64 | (N,) | class of each sample; sample g has class g % K |
| prompt_index | int32 | (N,) | row of `prompts` used for the sample |
| guidance | float32 | (N,) | classifier-free guidance scale (1.0 = none) |
| seed | int64 | (N,) | the sample's torch.Generator seed |
| prompts | UTF-8 string | (P,) | prompt table (all class x template/domain strings) |

attrs: format_version, generator (path), generator_fingerprint, kind, steps, scheduler, seed,
n_total, num_classes, label_names (JSON), out_shape (JSON), config (JSON of gen), request (JSON:
what identifies the set; a rerun with the same request skips), micro_batch, dtype, device_type,
num_processes, wall_s, created, torch, diffusers.
"""


class Sampler(Protocol):
    """``sampler(labels, prompts, guidance, seeds) -> uint8 (B, H, W, C)`` at the task size."""

    kind: str

    def __call__(self, labels: np.ndarray, prompts: list[str], guidance: np.ndarray,
                 seeds: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# generator directory


def missing_generator_message(generator_dir: str | Path) -> str:
    d = str(generator_dir)
    return (f"generator directory {d} not found: put a diffusers model saved with save_pretrained "
            f"there (e.g. `huggingface-cli download {EXAMPLE_REPO} --local-dir {d}` on a machine "
            "with network), or use gen.generator=embedded (`gptfl-hpc train-generator` writes "
            "<out>/generator)")


def resolve_kind(generator_dir: str | Path, kind: str = "auto") -> str:
    """'text2image' or 'class_conditional' (auto: model_index.json naming a text_encoder ->
    text2image; a DiTPipeline model_index.json or unet/config.json -> class_conditional)."""
    d = Path(generator_dir)
    if not d.is_dir():
        raise ModelError(missing_generator_message(d))
    if kind in ("class_conditional", "text2image"):
        return kind
    if kind != "auto":
        raise ConfigError(f"config key gen.kind: invalid value {kind!r}; valid: auto, "
                          "class_conditional, text2image")
    index = d / "model_index.json"
    if index.is_file():
        try:
            spec = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{index}: not readable JSON ({e})") from None
        te = spec.get("text_encoder")
        if isinstance(te, list) and te and te[0] is not None:
            return "text2image"
        if is_dit_index(spec):
            return "class_conditional"
    if (d / "unet" / "config.json").is_file():
        return "class_conditional"
    raise ModelError(f"generator directory {d}: neither a text-to-image pipeline (model_index.json "
                     "with a text_encoder) nor a class-conditional model (unet/config.json, or a "
                     "DiTPipeline model_index.json); valid: a save_pretrained directory of either")


def is_dit_index(spec: Any) -> bool:
    """model_index.json of a class-conditional DiT pipeline (DiTPipeline, or a transformer and
    no text encoder)."""
    if not isinstance(spec, dict):
        return False
    te = spec.get("text_encoder")
    has_te = isinstance(te, list) and bool(te) and te[0] is not None
    return spec.get("_class_name") == "DiTPipeline" or ("transformer" in spec and not has_te)


def is_dit_dir(generator_dir: str | Path) -> bool:
    index = Path(generator_dir) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return is_dit_index(json.loads(index.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{index}: not readable JSON ({e})") from None


def fingerprint(generator_dir: str | Path) -> str:
    """Content fingerprint: every file's path and size; small files hashed whole, big files by
    their first and last MiB (cheap for multi-GB pipelines, still changes when retrained)."""
    root = Path(generator_dir)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        size = p.stat().st_size
        h.update(f"{rel.as_posix()}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= 2 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


def resolve_dtype(name: str, device_type: str) -> str:
    """gen.dtype -> 'fp32' | 'fp16' | 'bf16' (auto: fp16 on GPU, fp32 on CPU)."""
    if name == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    return name


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_sampler(generator_dir: str | Path, *, gen_cfg: Any, out_shape: tuple[int, int, int],
                 num_classes: int, device: Any, dtype: Any,
                 label_names: list[str] | None = None) -> Sampler:
    """Load the generator in `generator_dir` (offline) as a Sampler for `out_shape` images.

    `label_names` (optional) lets a DiT with an id2label table map task classes by name."""
    kind = resolve_kind(generator_dir, gen_cfg.kind)
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    if kind == "text2image":
        from gptfl_hpc.gen.text2image import load_text2image

        return load_text2image(str(generator_dir), gen_cfg=gen_cfg, out_shape=tuple(out_shape),
                               device=str(device), dtype=dtype)
    if is_dit_dir(generator_dir):
        from gptfl_hpc.gen.dit import load_dit

        return load_dit(generator_dir, gen_cfg=gen_cfg, out_shape=tuple(out_shape),
                        num_classes=num_classes, label_names=label_names, device=device,
                        dtype=dtype)
    from gptfl_hpc.gen.class_cond import load_class_conditional

    return load_class_conditional(generator_dir, gen_cfg=gen_cfg, out_shape=tuple(out_shape),
                                  num_classes=num_classes, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# inputs and request


def check_inputs(gen_cfg: Any, *, generator_dir: str | Path, label_names: list[str],
                 out_shape: tuple[int, ...], n_total: int, seed: int) -> str:
    """Validate everything before any model is loaded; return the generator kind."""
    if not isinstance(n_total, (int, np.integer)) or n_total < 1:
        raise ConfigError(f"synthesis: n_total={n_total!r}; valid: >= 1 (gen.count, or gen.volume "
                          "x the private training-set size)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"config key run.seed: invalid value {seed!r}; valid: an int >= 0")
    if (len(out_shape) != 3 or not all(isinstance(v, (int, np.integer)) and v >= 1
                                       for v in out_shape) or out_shape[2] not in (1, 3)):
        raise DataError(f"synthesis: out_shape {tuple(out_shape)}; valid: (H, W, C) with "
                        "H, W >= 1 and C in 1, 3")
    if (not label_names or not all(isinstance(n, str) and n.strip() for n in label_names)
            or len(set(label_names)) != len(label_names)):
        raise ConfigError(f"synthesis: label names {list(label_names)!r}; valid: distinct "
                          "non-empty strings, one per class (data.label_names)")
    kind = resolve_kind(generator_dir, gen_cfg.kind)
    if kind == "class_conditional" and is_dit_dir(generator_dir):
        from gptfl_hpc.gen.dit import check_dit

        check_dit(generator_dir, num_classes=len(label_names), label_names=label_names)
    elif kind == "class_conditional":
        from gptfl_hpc.gen.class_cond import check_classes, read_unet_config
        from gptfl_hpc.gen.embedded import read_provenance

        check_classes(read_unet_config(generator_dir), len(label_names), generator_dir,
                      float(max(gen_cfg.guidance)))
        prov = read_provenance(generator_dir)
        names = (prov or {}).get("label_names")
        if names is not None and list(names) != list(label_names):
            raise ModelError(f"generator {generator_dir} was trained on classes {names}, the task"
                             f" has {list(label_names)}; train a generator for this dataset")
    else:
        from gptfl_hpc.gen.text2image import check_generator_dir

        check_generator_dir(generator_dir)
    return kind


def _request(gen_cfg: Any, *, kind: str, fp: str, label_names: list[str],
             out_shape: tuple[int, ...], n_total: int, seed: int) -> dict:
    keys = ("prompt_mode", "templates", "domains", "guidance", "expand_prompts", "steps",
            "scheduler")
    return {"format_version": FORMAT_VERSION, "generator_fingerprint": fp, "kind": kind,
            "n_total": int(n_total), "seed": int(seed), "label_names": list(label_names),
            "out_shape": [int(v) for v in out_shape],
            "gen": {k: getattr(gen_cfg, k) for k in keys}}


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def read_request(path: str | Path) -> dict:
    """The request stored in a finished synthetic set (DataError if it is not one)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["request"])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: exists but is not a finished synthetic set ({e}); delete it or "
                        "choose another output path") from None


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(prefix + k)
    return out


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


def _write_part(pdir: Path, first: int, end: int, images: np.ndarray, start: int) -> None:
    import h5py

    with fsio.atomic_path(pdir / _part_name(first, end)) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images)
            f.attrs["first_block"], f.attrs["end_block"] = first, end
            f.attrs["start"], f.attrs["stop"] = start, start + len(images)


def _done_blocks(parts: list[tuple[int, int, Path]], n_blocks: int) -> np.ndarray:
    done = np.zeros(n_blocks, dtype=bool)
    for first, end, _ in parts:
        done[first:min(end, n_blocks)] = True
    return done


def _batches(todo: np.ndarray, per_batch: int) -> list[tuple[int, int]]:
    """Runs of consecutive unfinished blocks, cut into batches of at most `per_batch` blocks."""
    out: list[tuple[int, int]] = []
    idx = np.flatnonzero(todo)
    if idx.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    for run in np.split(idx, breaks):
        a, b = int(run[0]), int(run[-1]) + 1
        out += [(s, min(s + per_batch, b)) for s in range(a, b, per_batch)]
    return out


def _prepare(gen_cfg: Any, *, out_path: Path, request: dict, numerics: dict,
             label_names: list[str], n_total: int, seed: int, n_blocks: int) -> dict:
    """Rank 0: decide skip / resume / start; returns what all ranks need to know."""
    if out_path.exists():
        old = read_request(out_path)
        if _canon(old) == _canon(request):
            shutil.rmtree(parts_dir(out_path), ignore_errors=True)
            return {"action": "skip"}
        raise DataError(f"{out_path} exists but was made for a different request (differs in "
                        f"{', '.join(_diff_keys(old, request)) or 'format'}); delete it or choose "
                        "another output path")
    pdir = parts_dir(out_path)
    state_path = pdir / "state.json"
    for p in out_path.parent.glob(f".tmp-{out_path.name}.*"):  # a merge killed mid-file
        p.unlink(missing_ok=True)
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{state_path}: unreadable ({e}); delete {pdir} to start over"
                            ) from None
        if _canon(state.get("request")) != _canon(request) or \
                _canon(state.get("numerics")) != _canon(numerics):
            diff = _diff_keys(state.get("request") or {}, request) + \
                _diff_keys(state.get("numerics") or {}, numerics, "numerics.")
            raise DataError(f"{pdir} holds a partial synthesis for a different request or "
                            f"numerics (differs in {', '.join(diff)}); rerun with the same "
                            f"settings to resume, or delete {pdir} to start over")
        prompts = state["prompts"]
        for p in pdir.glob(".tmp-*"):  # a writer killed mid-file
            p.unlink(missing_ok=True)
    else:
        prompts = build_plan(gen_cfg, label_names, n_total, seed).prompts  # expands if set
        pdir.mkdir(parents=True, exist_ok=True)
        fsio.write_json(state_path, {"request": request, "numerics": numerics,
                                     "prompts": prompts, "created": time.time()})
    done = _done_blocks(list_parts(pdir), n_blocks)
    return {"action": "run", "prompts": prompts, "done": np.flatnonzero(done).tolist()}


def _merge(out_path: Path, plan: Plan, *, micro: int, out_shape: tuple[int, int, int],
           attrs: dict) -> None:
    """Rank 0: parts -> one HDF5 in index order, written to a temp file and renamed."""
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
    h, w, c = out_shape
    rows = int(max(1, min(n, (1 << 20) // (h * w * c))))
    with fsio.atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("images", shape=(n, h, w, c), dtype=np.uint8,
                                  chunks=(rows, h, w, c))
            for first, end, p in use:
                a, b = first * micro, min(end * micro, n)
                with h5py.File(p, "r") as part:
                    imgs = part["images"][()]
                if imgs.shape != (b - a, h, w, c):
                    raise DataError(f"{p}: images of shape {imgs.shape}, expected "
                                    f"{(b - a, h, w, c)}; delete it and rerun")
                ds[a:b] = imgs
            f.create_dataset("labels", data=plan.labels.astype(np.int64))
            f.create_dataset("prompt_index", data=plan.prompt_index.astype(np.int32))
            f.create_dataset("guidance", data=plan.guidance.astype(np.float32))
            f.create_dataset("seed", data=plan.seeds.astype(np.int64))
            f.create_dataset("prompts", data=np.array(plan.prompts, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            for k, v in attrs.items():
                f.attrs[k] = v
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a finished set is shared like any file
    shutil.rmtree(pdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# agreement between processes


def _root_decides(comm: Any, fn: Any) -> Any:
    """Run fn() on rank 0, broadcast its result or its one-line error to every rank."""
    res: Any = None
    if comm.rank == 0:
        try:
            res = {"ok": fn()}
        except GptflError as e:
            res = {"err": type(e).__name__, "msg": str(e)}
    res = comm.bcast_json(res)
    if "err" in res:
        import gptfl_hpc.errors as errors

        raise getattr(errors, res["err"], GptflError)(res["msg"])
    return res["ok"]


def _agree(comm: Any, n_images: int, err: BaseException | None) -> tuple[int, bool]:
    """One small allreduce per batch: (images written by all, stop requested anywhere)."""
    flags = np.array([n_images, int(signals.stop_requested()), int(err is not None)],
                     dtype=np.int64)
    comm.allreduce_sum_(flags)
    if err is not None:
        raise err
    if flags[2]:
        raise CommError("synthesis: another process failed (see its log line); rerun the same "
                        "command to resume")
    return int(flags[0]), bool(flags[1])


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
# main entry


def synthesize(gen_cfg: Any, *, generator_dir: str | Path, label_names: list[str],
               out_shape: tuple[int, int, int], n_total: int, out_path: str | Path, seed: int,
               comm: Any, device: str = "auto") -> Path:
    """Generate `n_total` labelled samples with the generator in `generator_dir` into `out_path`.

    Every process of `comm` must call it; the work is split across them (one GPU per process on
    GPU nodes). Returns `out_path`. Skips if `out_path` is finished for the same request; resumes
    from `<out_path>.parts/` after a kill; raises Preempted at a batch boundary when asked to stop.
    """
    from gptfl_hpc.parallel.accel import accelerator, want_cuda

    signals.install()
    out_path = Path(out_path)
    label_names = list(label_names)
    kind = check_inputs(gen_cfg, generator_dir=generator_dir, label_names=label_names,
                        out_shape=tuple(out_shape), n_total=n_total, seed=seed)
    out_shape = tuple(int(v) for v in out_shape)
    device_type = "cuda" if want_cuda(device) else "cpu"
    dtype = resolve_dtype(gen_cfg.dtype, device_type)
    micro = gen_cfg.micro_batch or (CPU_MICRO_BATCH if device_type == "cpu" else
                                    gen_cfg.batch_size)
    per_batch = max(1, -(-gen_cfg.batch_size // micro))
    n_blocks = -(-n_total // micro)
    fp = fingerprint(generator_dir)
    request = _request(gen_cfg, kind=kind, fp=fp, label_names=label_names, out_shape=out_shape,
                       n_total=n_total, seed=seed)
    import torch

    numerics = {"micro_batch": micro, "dtype": dtype, "device_type": device_type,
                "channels_last": gen_cfg.channels_last, "compile": gen_cfg.compile,
                "torch": torch.__version__.split("+")[0]}
    decision = _root_decides(comm, lambda: _prepare(
        gen_cfg, out_path=out_path, request=request, numerics=numerics, label_names=label_names,
        n_total=n_total, seed=seed, n_blocks=n_blocks))
    if decision["action"] == "skip":
        log.info("synthetic set %s is already complete for this request; skipping", out_path)
        return out_path

    plan = build_plan(dataclasses.replace(gen_cfg, expand_prompts=None), label_names, n_total,
                      seed)
    plan.prompts = list(decision["prompts"])
    todo = np.ones(n_blocks, dtype=bool)
    todo[np.asarray(decision["done"], dtype=np.int64)] = False
    batches = _batches(todo, per_batch)
    n_done = n_total - sum(min(e * micro, n_total) - s * micro for s, e in batches)
    pdir = parts_dir(out_path)
    t0 = time.perf_counter()
    with accelerator(comm, device=device, mixed_precision="no") as acc:
        with acc.split_between_processes(batches) as mine:
            mine = list(mine)
        n_iter = max(comm.allgather_json(len(mine)))
        if comm.rank == 0:
            log.info("synthesis: %d samples of %s (%d classes) with %s generator %s on %d "
                     "process(es) (%s, %s); %d done, %d batches of <= %d to go (blocks of %d)",
                     n_total, "x".join(map(str, out_shape)), len(label_names), kind,
                     generator_dir, comm.size, acc.device, dtype, n_done, len(batches),
                     per_batch * micro, micro)
            if micro * per_batch != gen_cfg.batch_size:
                log.info("gen.batch_size %d rounded up to %d (a multiple of micro_batch %d)",
                         gen_cfg.batch_size, micro * per_batch, micro)
        sampler, err = None, None
        if n_iter:
            try:
                sampler = load_sampler(generator_dir, gen_cfg=gen_cfg, out_shape=out_shape,
                                       num_classes=len(label_names), device=acc.device,
                                       dtype=dtype, label_names=label_names)
            except Exception as e:  # agree below, so no process hangs in a collective
                err = e
            _agree(comm, 0, err)
        progress = _Progress(n_total, n_done) if comm.rank == 0 else None
        for it in range(n_iter):
            written = 0
            if it < len(mine):
                try:
                    written = _run_batch(sampler, plan, mine[it], micro=micro, pdir=pdir)
                    signals.boundary()
                except Exception as e:
                    err = e
            total, stop = _agree(comm, written, err)
            if progress is not None:
                progress.update(total)
            if stop and it + 1 < n_iter:
                done_now = n_done + (progress.done - n_done if progress else 0)
                raise Preempted(f"synthesis stopped by {signals.reason()} at a batch boundary "
                                f"({done_now}/{n_total} samples saved in {pdir}); rerun the "
                                "same command to resume")
    wall = time.perf_counter() - t0

    def finish() -> None:
        import diffusers

        attrs = {"format_version": FORMAT_VERSION, "generator": str(generator_dir),
                 "generator_fingerprint": fp, "kind": kind, "steps": gen_cfg.steps,
                 "scheduler": gen_cfg.scheduler, "seed": int(seed), "n_total": int(n_total),
                 "num_classes": len(label_names), "label_names": json.dumps(label_names),
                 "out_shape": json.dumps(list(out_shape)),
                 "config": json.dumps(dataclasses.asdict(gen_cfg)),
                 "request": _canon(request), "micro_batch": micro, "dtype": dtype,
                 "device_type": device_type, "num_processes": comm.size,
                 "wall_s": round(wall, 2),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "torch": str(torch.__version__), "diffusers": str(diffusers.__version__)}
        _merge(out_path, plan, micro=micro, out_shape=out_shape, attrs=attrs)

    _root_decides(comm, finish)
    if comm.rank == 0:
        log.info("synthetic set written: %s (%d samples, %.0f s)", out_path, n_total, wall)
    return out_path


def _run_batch(sampler: Sampler, plan: Plan, batch: tuple[int, int], *, micro: int,
               pdir: Path) -> int:
    """Generate blocks [first, end) one fixed-shape call per block; write one part file."""
    first, end = batch
    n = len(plan)
    start, stop = first * micro, min(end * micro, n)
    out = []
    for b in range(first, end):
        a, z = b * micro, min((b + 1) * micro, n)
        idx = np.arange(a, a + micro)
        idx[idx >= z] = z - 1  # pad the last, short block by repeating its last sample
        rows = plan.take(idx)
        imgs = sampler(rows.labels, rows.prompt_texts(), rows.guidance, rows.seeds)
        out.append(np.asarray(imgs)[: z - a])
    images = np.concatenate(out)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ModelError(f"sampler returned {images.dtype} {images.shape}; expected uint8 "
                         "(B, H, W, C)")
    with contextlib.suppress(FileExistsError):
        pdir.mkdir(parents=True, exist_ok=True)
    _write_part(pdir, first, end, images, start)
    return stop - start
