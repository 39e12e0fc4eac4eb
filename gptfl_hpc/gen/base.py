"""The contracts between the synthesis engine and the generator kinds, and what they share.

* :class:`Task` -- what to generate: the class names and the shape and dtype of one sample
  (images: uint8 ``(H, W, C)`` in dataset "images"; audio: int16 ``(L,)`` mono waveforms at the
  dataset's sampling rate in dataset "audio"); :func:`task_for` makes it from a manifest.
* :class:`Sampler` -- what a kind's ``load`` returns: ``sampler(labels, prompts, guidance,
  seeds) -> (B, *task.sample_shape)`` of ``task.dtype``, row i a function of row i's inputs only.
* :class:`GeneratorKind` -- one entry of the registry (``gen/registry.py``): detect / check /
  load and the default call shape on GPU. A kind is one module in ``gen/kinds/``.
* :func:`to_uint8` -- the one float -> uint8 image conversion; it raises :class:`NonFiniteOutput`
  instead of storing NaN/Inf as black, so the engine can regenerate the block in fp32.
  :func:`to_int16` is its audio twin (float waveforms in [-1, 1] -> int16, cut or padded to the
  task length, NaN/Inf refused the same way).
* :func:`resolve_dtype` / :func:`torch_dtype` -- the one gen.dtype resolver.
* :class:`CallShape` -- fixed-shape model calls, halved once for all later calls when the GPU runs
  out of memory (the one out-of-memory fallback of every generator).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gptfl_hpc.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from gptfl_hpc.gen.spec import GeneratorSpec

log = logging.getLogger(__name__)

SAMPLE_DTYPES = ("uint8", "int16")
DEFAULT_SAMPLE_RATE = 16000
"""Audio tasks without a rate: 16 kHz (Speech Commands, AudioLDM, SpeechT5, FedAudio)."""
DTYPES = ("fp32", "fp16", "bf16")


# --------------------------------------------------------------------------------------------
# task and sampler


@dataclass(frozen=True)
class Task:
    """What to generate: one sample per (class, prompt, guidance, seed) row.

    ``dataset`` names the HDF5 dataset the samples are stored in ("images" for images).
    """

    label_names: tuple[str, ...]
    sample_shape: tuple[int, ...]
    dtype: str = "uint8"
    dataset: str = "images"
    sample_rate: int = 0
    """Audio tasks: samples per second of the waveforms (0: 16000, the default rate)."""

    @classmethod
    def image(cls, label_names: Sequence[str], out_shape: Sequence[int]) -> Task:
        """uint8 (H, W, C) images, channel-last."""
        return cls(tuple(label_names), tuple(out_shape), "uint8", "images")

    @classmethod
    def audio(cls, label_names: Sequence[str], length: int, sample_rate: int = 16000) -> Task:
        """int16 (L,) mono waveforms (full scale 32767) at `sample_rate`."""
        return cls(tuple(label_names), (int(length),), "int16", "audio", int(sample_rate))

    @classmethod
    def for_shape(cls, label_names: Sequence[str], shape: Sequence[int],
                  sample_rate: int = 16000) -> Task:
        """The task of a dataset's per-sample shape: (H, W, C) -> images, (L,) -> audio."""
        shape = tuple(int(v) for v in shape)
        if len(shape) == 1:
            return cls.audio(label_names, shape[0], sample_rate)
        return cls.image(label_names, shape)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def is_image(self) -> bool:
        return self.dataset == "images"

    @property
    def is_audio(self) -> bool:
        return self.dataset == "audio"

    def check(self) -> None:
        """Validate the task before anything is read or loaded (one-line errors)."""
        names = self.label_names
        if (not names or not all(isinstance(n, str) and n.strip() for n in names)
                or len(set(names)) != len(names)):
            raise ConfigError(f"synthesis: label names {list(names)!r}; valid: distinct "
                              "non-empty strings, one per class (data.label_names)")
        shape = self.sample_shape
        ok = bool(shape) and all(isinstance(v, (int, np.integer)) and v >= 1 for v in shape)
        if self.is_image and not (ok and len(shape) == 3 and shape[2] in (1, 3)
                                  and self.dtype == "uint8"):
            raise DataError(f"synthesis: out_shape {tuple(shape)} ({self.dtype}); valid: (H, W, C) "
                            "with H, W >= 1 and C in 1, 3, uint8")
        if self.is_audio and not (ok and len(shape) == 1 and self.dtype == "int16"
                                  and self.sample_rate >= 0):
            raise DataError(f"synthesis: audio sample shape {tuple(shape)} ({self.dtype}, "
                            f"{self.sample_rate} Hz); valid: (L,) with L >= 1, int16")
        if not ok or self.dtype not in SAMPLE_DTYPES:
            raise DataError(f"synthesis: sample shape {tuple(shape)} of {self.dtype}; valid: "
                            f"positive sizes and a dtype in {', '.join(SAMPLE_DTYPES)}")


def require_images(task: Task, kind: str) -> tuple[int, int, int]:
    """The (H, W, C) of an image task; ModelError when `kind` cannot make what `task` asks."""
    if not task.is_image:
        raise ModelError(f"generator kind {kind} makes images, the task asks for {task.dataset} "
                         f"{task.sample_shape} of {task.dtype}; valid: a generator of that "
                         "modality")
    h, w, c = (int(v) for v in task.sample_shape)
    return h, w, c


def require_audio(task: Task, kind: str) -> tuple[int, int]:
    """(length, sample rate) of an audio task; ModelError when `kind` cannot make it."""
    if not task.is_audio:
        raise ModelError(f"generator kind {kind} makes audio, the task asks for {task.dataset} "
                         f"{task.sample_shape} of {task.dtype}; valid: a generator of that "
                         "modality")
    return int(task.sample_shape[0]), int(task.sample_rate or DEFAULT_SAMPLE_RATE)


def task_for(manifest: Any) -> Task:
    """The synthesis task of a prepared dataset: its label names and per-sample shape; audio
    datasets (kind "audio") also their sampling rate (manifest ``extra["sample_rate"]``,
    16000 when absent)."""
    if getattr(manifest, "kind", "image") == "audio":
        rate = int((getattr(manifest, "extra", None) or {}).get("sample_rate", 16000))
        return Task.audio(manifest.label_names, int(manifest.input_shape[0]), rate)
    return Task.image(manifest.label_names, manifest.input_shape)


class Sampler(Protocol):
    """``sampler(labels, prompts, guidance, seeds) -> (B, *task.sample_shape)`` of task.dtype.

    Row i depends on (labels[i], prompts[i], guidance[i], seeds[i]) only (the call's other rows
    change at most the last float bits through batched kernels). Raises :class:`NonFiniteOutput`
    when the model produced NaN/Inf. Kinds with a speaker table (``GeneratorKind.speakers``)
    also take ``speakers=`` (int64 (B,), the row of the table that speaks sample i).
    """

    kind: str

    def __call__(self, labels: np.ndarray, prompts: list[str], guidance: np.ndarray,
                 seeds: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class GeneratorKind:
    """One kind of generator: how to recognise, check and load a directory of it.

    ``check`` reads descriptor files only (no weights) and raises a one-line ModelError;
    ``load`` returns a :class:`Sampler` with the model on `device` in `dtype` ('fp32', 'fp16',
    'bf16'); ``call_rows`` is the default rows per call on GPU (gen.micro_batch unset).
    Kinds are tried for auto-detection in ``priority`` order (lower first).
    """

    name: str
    family: str
    """The gen.kind value that selects this kind (several kinds may share one)."""
    describe: str
    """What a directory of this kind holds (for error messages)."""
    detect: Callable[[GeneratorSpec], bool]
    check: Callable[[GeneratorSpec, Task, Any], None]
    load: Callable[[GeneratorSpec, Any, Task, Any, str], Sampler]
    call_rows: Callable[[GeneratorSpec], int]
    priority: int = 100
    speakers: Callable[[GeneratorSpec, Any], int] | None = None
    """Kinds with a speaker table: ``speakers(spec, gen_cfg)`` = its number of rows (descriptor
    files only); the plan then draws a speaker per sample (gen/prompts.py) and the sampler gets
    ``speakers=``. None: no speakers."""


def batch_arrays(what: str, labels: Any, guidance: Any, seeds: Any, rows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's per-row labels (int64), guidance (float32) and seeds (int64), same length."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    guidance = np.asarray(guidance, dtype=np.float32).reshape(-1)
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
    b = len(labels) if rows is None else rows
    if not (len(labels) == len(guidance) == len(seeds) == b):
        raise ModelError(f"{what} batch: labels {len(labels)}, guidance {len(guidance)} and "
                         f"seeds {len(seeds)} must have the same length"
                         + ("" if rows is None else f" as the {rows} prompts"))
    return labels, guidance, seeds


def check_steps(steps: int) -> int:
    if steps < 1:
        raise ModelError(f"config key gen.steps: invalid value {steps!r}; valid: >= 1")
    return int(steps)


# --------------------------------------------------------------------------------------------
# output conversion


class NonFiniteOutput(ModelError):
    """The model produced NaN/Inf (typically fp16 overflow); the samples would be garbage."""

    def __init__(self, rows: int, total: int) -> None:
        super().__init__(f"generator output: {rows} of {total} samples are not finite (NaN/Inf)")
        self.rows, self.total = rows, total


def count_nonfinite(x: Any) -> int:
    """Rows of tensor `x` (B, ...) holding a NaN or Inf."""
    import torch

    return int((~torch.isfinite(x)).reshape(len(x), -1).any(dim=1).sum())


def to_uint8(images: Any, out_shape: tuple[int, int, int]) -> np.ndarray:
    """(B, C, h, w) float in [0, 1] (any device) -> uint8 (B, H, W, C) numpy.

    Antialiased bilinear resize to (H, W) on the device, then channels: ITU-R 601 luma (as PIL's
    "L") for 3 -> 1, the mean for other counts -> 1, repetition for 1 -> C. Raises
    NonFiniteOutput when any value is NaN/Inf.
    """
    import torch
    import torch.nn.functional as F

    h, w, c = out_shape
    x = images.float()
    bad = count_nonfinite(x)
    if bad:
        raise NonFiniteOutput(bad, len(x))
    x = x.clamp(0.0, 1.0)
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    cin = x.shape[1]
    if cin != c:
        if c == 1 and cin == 3:
            x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        elif c == 1:
            x = x.mean(1, keepdim=True)
        elif cin == 1:
            x = x.expand(-1, c, -1, -1)
        else:
            raise ModelError(f"generator makes {cin}-channel images, the task needs {c}; valid: "
                             "equal counts, or 1 on either side")
    x = (x.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def fit_length(wave: np.ndarray, length: int, align: str = "start") -> np.ndarray:
    """A 1-d waveform cut or zero-padded to `length` samples. align="start": keep the first
    `length` samples, pad at the end; "center": keep / place the middle."""
    wave = np.asarray(wave).reshape(-1)
    n = len(wave)
    if align not in ("start", "center"):
        raise ValueError(f"fit_length: align {align!r}; valid: start, center")
    if n >= length:
        a = (n - length) // 2 if align == "center" else 0
        return wave[a:a + length]
    out = np.zeros(length, dtype=wave.dtype)
    a = (length - n) // 2 if align == "center" else 0
    out[a:a + n] = wave
    return out


def to_int16(waves: Any, length: int, *, align: str = "start") -> np.ndarray:
    """(B, n) float waveforms in [-1, 1] (torch tensor of any device, numpy array, or a list of
    1-d arrays of different lengths) -> int16 (B, length) numpy.

    Each row is cut or zero-padded to `length` (:func:`fit_length`), clipped to [-1, 1] and
    scaled by 32767 with rounding (the inverse of the front end's int16 / 32768 up to one
    step). Raises NonFiniteOutput when any value is NaN/Inf (a silent clip is never stored in
    place of a broken one)."""
    if hasattr(waves, "detach"):
        waves = waves.detach().float().cpu().numpy()
    rows = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
    bad = sum(int(not np.isfinite(r).all()) for r in rows)
    if bad:
        raise NonFiniteOutput(bad, len(rows))
    out = np.empty((len(rows), int(length)), dtype=np.int16)
    for i, r in enumerate(rows):
        x = np.clip(fit_length(r, int(length), align), -1.0, 1.0)
        out[i] = np.rint(x * 32767.0).astype(np.int16)
    return out


# --------------------------------------------------------------------------------------------
# dtype


def resolve_dtype(name: str, device_type: str) -> str:
    """gen.dtype -> 'fp32' | 'fp16' | 'bf16' (auto: fp16 on GPU, fp32 on CPU)."""
    if name == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ConfigError(f"config key gen.dtype: invalid value {name!r}; valid: auto, "
                          + ", ".join(DTYPES))
    return name


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# --------------------------------------------------------------------------------------------
# call shape and the out-of-memory fallback


class CallShape:
    """Rows per model call, and the one GPU out-of-memory fallback of every generator.

    ``run(fn, n)`` calls ``fn(index)`` on consecutive chunks of ``rows`` of the n rows; with
    ``pad`` every chunk has exactly ``rows`` entries (a short tail repeats its last row, the
    extra outputs are dropped), so the model always sees one shape: byte-identical results on
    CPU, and one compiled graph under torch.compile. On ``torch.cuda.OutOfMemoryError`` the
    failing call is halved and the smaller size is kept for all later calls, so a compiled model
    recompiles once per halving, not per call; finished chunks are kept.
    """

    def __init__(self, rows: int, *, what: str, pad: bool = True, compiled: bool = False
                 ) -> None:
        if rows < 1:
            raise ModelError(f"{what}: {rows} rows per call; valid: >= 1")
        self.rows, self.what, self.pad, self.compiled = int(rows), what, pad, compiled
        self.min_rows = self.rows
        self.halvings = 0
        self._first_call: set[int] = set()

    def run(self, fn: Callable[[np.ndarray], Any], n: int) -> np.ndarray:
        import torch

        if n < 1:
            raise ValueError(f"{self.what}: CallShape.run needs at least one row")
        out: list[np.ndarray] = []
        start = 0
        while start < n:
            size = self.rows
            stop = min(start + size, n)
            idx = np.arange(start, stop)
            if self.pad and len(idx) < size:
                idx = np.concatenate([idx, np.full(size - len(idx), stop - 1)])
            t0 = time.perf_counter()
            try:
                res = np.asarray(fn(idx))
            except torch.cuda.OutOfMemoryError:
                res = None  # handled outside the except block, which pins the failed frames
            if res is None:
                self._halve(len(idx))
                continue
            self._note_call(len(idx), time.perf_counter() - t0)
            out.append(res[: stop - start])
            start = stop
        return np.concatenate(out)

    def _halve(self, size: int) -> None:
        import torch

        if size <= 1:
            raise ModelError(f"{self.what}: one sample per call does not fit in GPU memory; "
                             "valid: gen.dtype=fp16 or bf16, a smaller model, or a GPU with more "
                             "memory")
        self.rows = min(self.rows, (size + 1) // 2)
        self.min_rows = min(self.min_rows, self.rows)
        self.halvings += 1
        log.warning("%s: out of GPU memory at %d rows per call; using %d from now on%s",
                    self.what, size, self.rows,
                    " (torch.compile compiles this new shape once)" if self.compiled else "")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _note_call(self, size: int, seconds: float) -> None:
        if self.compiled and size not in self._first_call:
            self._first_call.add(size)
            log.info("%s: first call with %d rows took %.1f s (includes torch.compile for this "
                     "shape)", self.what, size, seconds)
