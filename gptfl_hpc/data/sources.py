"""Dataset sources: raw arrays in memory, before partitioning. No torch.

A :class:`Source` holds the private training pool (what the clients will split), the test split,
the public split reserved for the generator (digits only) and, for the natural partition, one key
per training sample. Sources are looked up in :data:`SOURCES` by ``data.source``.

CIFAR batches are python pickles; they are read with :class:`RestrictedUnpickler`, which resolves
only numpy's array-reconstruction globals and refuses everything else.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc.config import DataConfig
from gptfl_hpc.data.partition import purpose_tag, stratified_split
from gptfl_hpc.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TAG_PUBLIC = purpose_tag("split.public")
TAG_TEST = purpose_tag("split.test")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

# Per-channel mean/std of pixel values scaled to [0, 1].
NORM: dict[str, tuple[list[float], list[float]]] = {
    # all 1797 digits after the uint8 conversion below (a fixed constant, independent of the seed)
    "digits": ([0.3053], [0.3759]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


IMAGE_FOLDER_SOURCES = ("image_folder", "flowers102", "food101", "eurosat", "covid19",
                        "caltech101")
"""Sources whose images are files on disk (gptfl_hpc/data/images.py): train_images/test_images
are lazy ImageFiles arrays that only `prepare` decodes, streaming them into the shards."""


@dataclass
class Source:
    """One dataset in memory. Images: uint8 (N,H,W,C); features: float32 (N,D); labels int64.
    Image-folder sources hold lazy arrays (images.ImageFiles) instead of decoded images."""

    name: str
    kind: str
    """Either "image" or "features"."""
    train_images: np.ndarray
    """The private pool that the clients split."""
    train_labels: np.ndarray
    label_names: list[str]
    test_images: np.ndarray
    test_labels: np.ndarray
    public_images: np.ndarray | None = None
    """Reserved for the generator; no client ever holds it (digits only)."""
    public_labels: np.ndarray | None = None
    keys: np.ndarray | None = None
    """Natural-partition key per training sample (arrays source with data.natural_key)."""
    norm_mean: list[float] | None = None
    """Fixed normalisation constants of the source; None: computed on the private pool."""
    norm_std: list[float] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.train_images.shape[1:])



def dataset_root(cfg: DataConfig, *candidates: str, need: Sequence[str], hint: str) -> Path:
    """The first of data.root/<candidate> (data.root itself first) that holds every path in
    `need`: where a downloaded dataset archive was extracted. Else a one-line DataError naming
    the places looked at and `hint` (what to download)."""
    root = Path(cfg.root or "").expanduser()
    for c in ("", *candidates):
        d = root / c
        if all((d / n).exists() for n in need):
            return d
    where = ", ".join(str(root / c) for c in ("", *candidates))
    raise DataError(f"data.root={root}: no {cfg.source} layout ({', '.join(need)}) in {where}; "
                    f"{hint}")

def load_source(cfg: DataConfig, seed: int) -> Source:
    """Load ``cfg.source`` and split it (public / test / private pool) with ``seed``."""
    if cfg.source not in SOURCES and cfg.source not in LAZY_SOURCES:
        raise ConfigError(f"config key data.source: invalid value {cfg.source!r}; valid: "
                          + ", ".join([*SOURCES, *LAZY_SOURCES]))
    if cfg.source not in IMAGE_FOLDER_SOURCES:
        for key, value in (("image_size", cfg.image_size), ("split_file", cfg.split_file)):
            if value:
                raise ConfigError(f"config key data.{key}: only for the image-folder sources "
                                  f"({', '.join(IMAGE_FOLDER_SOURCES)}); data.source="
                                  f"{cfg.source} keeps its own size and split; valid: "
                                  f"{0 if key == 'image_size' else repr('')}")
    loader = _loader(cfg.source)
    src = loader(cfg, seed)
    _check_source(src, cfg)
    log.info("loaded %s: %d private, %d test, %s public samples of shape %s, %d classes",
             src.name, len(src.train_labels), len(src.test_labels),
             "no" if src.public_labels is None else len(src.public_labels), src.input_shape,
             src.num_classes)
    return src


# --------------------------------------------------------------------------------------------
# helpers


def _test_count(cfg: DataConfig, n: int, where: str) -> int:
    t = cfg.test_size
    if t < 1:
        count = int(round(t * n))
    elif float(t).is_integer():
        count = int(t)
    else:
        raise ConfigError(f"config key data.test_size: invalid value {t!r}; valid: a whole "
                          "number of samples (>= 1) or a fraction (< 1)")
    if not 1 <= count < n:
        raise ConfigError(f"config key data.test_size: {t!r} gives {count} test samples out of "
                          f"the {n} {where}; valid: 1..{n - 1} samples or a fraction that keeps "
                          "both sides non-empty")
    return count


def _label_names(cfg: DataConfig, default: list[str], num_classes: int) -> list[str]:
    names = list(cfg.label_names) if cfg.label_names is not None else list(default)
    if cfg.label_names is not None and len(names) != len(default):
        raise ConfigError(f"config key data.label_names: {len(names)} names given but the "
                          f"{cfg.source} source has {len(default)} classes; valid: a list of "
                          f"{len(default)} names")
    if len(names) < num_classes:
        raise ConfigError(f"config key data.label_names: {len(names)} names but labels go up to "
                          f"{num_classes - 1}; valid: a list of at least {num_classes} names")
    return names


def _check_source(src: Source, cfg: DataConfig) -> None:
    k = src.num_classes
    for split, y in (("train", src.train_labels), ("test", src.test_labels),
                     ("public", src.public_labels)):
        if y is not None and len(y) and (y.min() < 0 or y.max() >= k):
            raise DataError(f"{cfg.source} source: {split} labels outside [0, {k}) "
                            f"(min {y.min()}, max {y.max()})")
    if src.test_images.shape[1:] != src.train_images.shape[1:]:
        raise DataError(f"{cfg.source} source: test samples have shape "
                        f"{src.test_images.shape[1:]}, training samples "
                        f"{src.train_images.shape[1:]}")


# --------------------------------------------------------------------------------------------
# digits


def _load_digits(cfg: DataConfig, seed: int) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = d.target.astype(np.int64)
    n = len(labels)
    n_public = int(np.floor(cfg.public_fraction * n))
    public, rest = stratified_split(labels, n_public, seed, TAG_PUBLIC)
    n_test = _test_count(cfg, len(rest), "digits left after the public split")
    test_local, train_local = stratified_split(labels[rest], n_test, seed, TAG_TEST)
    test, train = rest[test_local], rest[train_local]
    names = _label_names(cfg, [str(i) for i in range(10)], 10)
    mean, std = NORM["digits"]
    return Source(name="digits", kind="image", train_images=images[train],
                  train_labels=labels[train], label_names=names, test_images=images[test],
                  test_labels=labels[test],
                  public_images=images[public] if n_public else None,
                  public_labels=labels[public] if n_public else None,
                  norm_mean=list(mean), norm_std=list(std))


# --------------------------------------------------------------------------------------------
# CIFAR (python pickle batches, read with a restricted unpickler)

_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    if not _NUMPY_GLOBALS:
        try:
            from numpy._core import multiarray, numeric
        except ImportError:  # numpy < 2
            from numpy.core import multiarray, numeric  # type: ignore[no-redef]

        for mod in ("numpy.core", "numpy._core"):
            _NUMPY_GLOBALS[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
            _NUMPY_GLOBALS[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
            _NUMPY_GLOBALS[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
        _NUMPY_GLOBALS[("numpy", "ndarray")] = np.ndarray
        _NUMPY_GLOBALS[("numpy", "dtype")] = np.dtype
    return _NUMPY_GLOBALS


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array/dtype reconstruction globals."""

    def __init__(self, file: Any, source_path: str | Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source_path = source_path

    def find_class(self, module: str, name: str) -> Any:
        obj = _numpy_globals().get((module, name))
        if obj is None:
            raise DataError(f"{self.source_path}: refusing to unpickle global {module}.{name} "
                            "(only numpy array reconstruction is allowed); the file is not a "
                            "genuine CIFAR batch")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source_path}: refusing pickle persistent id; not a CIFAR batch")


def restricted_load(path: Path) -> Any:
    """Unpickle a CIFAR batch file with :class:`RestrictedUnpickler`."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbage pickles raise many different types
        raise DataError(f"{path}: not a readable CIFAR python batch ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]})") from None


def _cifar_dir(cfg: DataConfig, subdir: str, needed: list[str], url: str) -> Path:
    root = Path(cfg.root or "")
    for cand in (root, root / subdir):
        if all((cand / f).is_file() for f in needed):
            return cand
    what = "CIFAR-10" if cfg.source == "cifar10" else "CIFAR-100"
    raise DataError(f"data.root={root}: no {what} batches ({', '.join(needed)}) in {root} or "
                    f"{root / subdir}; download the {what} python version ({url}) and extract it "
                    f"in {root} (it unpacks to {root / subdir})")


def _batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = restricted_load(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise DataError(f"{path}: not a CIFAR batch (expected a dict with b'data' and "
                        f"{label_key!r})")
    x = np.asarray(d[b"data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be uint8 (N, 3072), got {x.dtype} {x.shape}")
    y = np.asarray(d[label_key])
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} must be {len(x)} integer labels")
    images = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), y.astype(np.int64)


def _meta_names(path: Path, key: bytes) -> list[str]:
    meta = restricted_load(path)
    if not isinstance(meta, dict) or key not in meta:
        raise DataError(f"{path}: expected a dict with {key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[key]]


def _load_cifar(cfg: DataConfig, seed: int) -> Source:
    if cfg.source == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        d = _cifar_dir(cfg, "cifar-10-batches-py", [*train_files, "test_batch", "batches.meta"],
                       CIFAR10_URL)
        label_key, meta_file, names_key = b"labels", "batches.meta", b"label_names"
        test_file = "test_batch"
    else:
        train_files = ["train"]
        d = _cifar_dir(cfg, "cifar-100-python", ["train", "test", "meta"], CIFAR100_URL)
        label_key, meta_file, names_key = b"fine_labels", "meta", b"fine_label_names"
        test_file = "test"
    default_names = _meta_names(d / meta_file, names_key)
    parts = [_batch(d / f, label_key) for f in train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _batch(d / test_file, label_key)
    names = _label_names(cfg, default_names, int(max(train_y.max(), test_y.max())) + 1)
    mean, std = NORM[cfg.source]
    return Source(name=cfg.source, kind="image", train_images=train_x, train_labels=train_y,
                  label_names=names, test_images=test_x, test_labels=test_y,
                  norm_mean=list(mean), norm_std=list(std))


# --------------------------------------------------------------------------------------------
# arrays (.npz / .h5)

ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")


def _arrays_file(cfg: DataConfig) -> Path:
    root = Path(cfg.root or "")
    if root.is_file():
        if root.suffix not in ARRAY_SUFFIXES:
            raise DataError(f"data.root={root}: expected an .npz or .h5 file")
        return root
    if root.is_dir():
        found = sorted(p for p in root.iterdir() if p.suffix in ARRAY_SUFFIXES and p.is_file())
        if len(found) == 1:
            return found[0]
        raise DataError(f"data.root={root}: expected exactly one .npz/.h5 file in the directory, "
                        f"found {len(found)}; point data.root at the file")
    raise DataError(f"data.root={root}: not found; expected an .npz or .h5 file holding arrays "
                    f"'{cfg.images_key}' and '{cfg.labels_key}'")


def _read_array_file(path: Path, required: list[str], optional: list[str]) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                have = set(z.files)
                missing = [n for n in required if n not in have]
                if missing:
                    raise DataError(f"{path}: no array '{missing[0]}' (has: "
                                    f"{', '.join(sorted(have)) or 'nothing'}); set "
                                    "data.images_key / data.labels_key / data.natural_key")
                return {n: z[n] for n in [*required, *optional] if n in have}
        except DataError:
            raise
        except ValueError as e:  # object arrays need pickle: refused
            raise DataError(f"{path}: cannot load without pickle ({' '.join(str(e).split())[:120]}"
                            "); store plain numeric/string arrays") from None
        except Exception as e:
            raise DataError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    from gptfl_hpc.data.shards import read_arrays

    try:
        return read_arrays(path, required, optional=optional)
    except DataError as e:
        if "no dataset" in str(e):
            raise DataError(f"{e}; set data.images_key / data.labels_key / data.natural_key") \
                from None
        raise


def _as_samples(x: np.ndarray, path: Path, key: str) -> tuple[np.ndarray, str]:
    if x.dtype == np.uint8 and x.ndim in (3, 4):
        return (x[..., None] if x.ndim == 3 else x), "image"
    if np.issubdtype(x.dtype, np.floating) and x.ndim == 2:
        return x.astype(np.float32), "features"
    raise DataError(f"{path}: array '{key}' is {x.dtype} with shape {x.shape}; valid: uint8 "
                    "images (N,H,W) or (N,H,W,C), or float features (N,D)")


def _as_labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: array '{key}' must hold {n} integer labels, got {y.dtype} "
                        f"with shape {y.shape}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: array '{key}' has negative labels (min {y.min()})")
    return y.astype(np.int64)


def _load_arrays(cfg: DataConfig, seed: int) -> Source:
    path = _arrays_file(cfg)
    ik, lk = cfg.images_key, cfg.labels_key
    tik, tlk = f"{ik}_test", f"{lk}_test"
    optional = [tik, tlk] + ([cfg.natural_key] if cfg.natural_key else [])
    arrs = _read_array_file(path, [ik, lk], optional)
    x, kind = _as_samples(arrs[ik], path, ik)
    y = _as_labels(arrs[lk], len(x), path, lk)
    keys = None
    if cfg.partition == "natural":
        if cfg.natural_key not in arrs:
            raise DataError(f"{path}: no array '{cfg.natural_key}' for data.natural_key")
        keys = np.asarray(arrs[cfg.natural_key])
        if keys.shape != (len(x),):
            raise DataError(f"{path}: array '{cfg.natural_key}' has shape {keys.shape}; "
                            f"expected ({len(x)},), one key per sample")
    if (tik in arrs) != (tlk in arrs):
        raise DataError(f"{path}: has only one of '{tik}' / '{tlk}'; provide both or neither")
    if tik in arrs:
        tx, tkind = _as_samples(arrs[tik], path, tik)
        ty = _as_labels(arrs[tlk], len(tx), path, tlk)
        if tkind != kind or tx.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: '{tik}' is {tx.dtype} {tx.shape[1:]} per sample but "
                            f"'{ik}' is {x.dtype} {x.shape[1:]}")
        train_x, train_y = x, y
    else:
        n_test = _test_count(cfg, len(y), f"samples in {path}")
        test, train = stratified_split(y, n_test, seed, TAG_TEST)
        tx, ty, train_x, train_y = x[test], y[test], x[train], y[train]
        keys = keys[train] if keys is not None else None
    k = int(max(train_y.max(initial=0), ty.max(initial=0))) + 1
    names = _label_names(cfg, [str(i) for i in range(k)] if cfg.label_names is None
                         else list(cfg.label_names), k)
    return Source(name="arrays", kind=kind, train_images=np.ascontiguousarray(train_x),
                  train_labels=train_y, label_names=names, test_images=np.ascontiguousarray(tx),
                  test_labels=ty, keys=keys)


SOURCES: dict[str, Callable[[DataConfig, int], Source]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "arrays": _load_arrays,
}
"""data.source -> loader(cfg, seed)."""

LAZY_SOURCES: dict[str, str] = {
    # images in their on-disk layouts (decoded and resized once, in parallel)
    "image_folder": "gptfl_hpc.data.images:load_image_folder",
    "flowers102": "gptfl_hpc.data.images:load_flowers102",
    "food101": "gptfl_hpc.data.images:load_food101",
    "eurosat": "gptfl_hpc.data.images:load_eurosat",
    "covid19": "gptfl_hpc.data.images:load_covid19",
    "caltech101": "gptfl_hpc.data.images:load_caltech101",
    # audio (int16 waveforms)
    "speech_commands": "gptfl_hpc.data.audio:load_speech_commands",
    "esc50": "gptfl_hpc.data.audio:load_esc50",
    "audio_folder": "gptfl_hpc.data.audio:load_audio_folder",
    "speech_embedded": "gptfl_hpc.data.audio:load_speech_embedded",
    "mnist_embedded": "gptfl_hpc.data.embedded:load_mnist_embedded",
}
"""data.source -> "module:function" of loaders in their own modules, imported when used."""


def _loader(name: str) -> Callable[[DataConfig, int], Source]:
    import importlib

    if name in SOURCES:
        return SOURCES[name]
    module, _, fn = LAZY_SOURCES[name].partition(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError):
        raise ConfigError(f"config key data.source: {name!r} is not available in this "
                          f"installation ({LAZY_SOURCES[name]} missing); valid: "
                          + ", ".join(SOURCES)) from None
