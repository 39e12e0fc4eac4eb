"""Image datasets in their on-disk layouts, decoded once by ``prepare`` in a pool of processes.

Loaders (``data.source``; each ``(cfg: DataConfig, seed) -> Source``):

==============  ==========================================================  ===================
source          layout under data.root                                      test split
==============  ==========================================================  ===================
image_folder    ``<split>/<class>/**/*.jpg|png|...`` (train, test or val);   the test/val folder;
                or ``<class>/**/*`` with ``data.split_file`` (CSV inside     the split file;
                the root: ``relative/path.jpg,train|test``); or             else stratified
                ``<class>/**/*`` alone                                      ``data.test_size``
flowers102      ``jpg/image_NNNNN.jpg``, ``imagelabels.mat``, ``setid.mat``   setid ``tstid``
                (the official files; also under ``flowers-102/``)            (train = ``trnid``)
food101         ``images/<class>/<id>.jpg``, ``meta/{train,test}.txt``        ``meta/test.txt``
                (also under ``food-101/``)
eurosat         ``<class>/*.jpg`` (also under ``EuroSAT_RGB/``, ``2750/``,     20 % per class
                ``eurosat/2750/``)                                          (reference code)
covid19         ``COVID``, ``Normal``, ``Viral Pneumonia`` folders, each      20 % per class
                with ``images/`` (also the v1 names and flat folders)        (reference code)
caltech101      ``101_ObjectCategories/<class>/*.jpg``; BACKGROUND_Google     stratified
                is not a class                                              ``data.test_size``
==============  ==========================================================  ===================

The labels come from the file list, so the partition needs no decoding. A source's images are an
:class:`ImageFiles` (a lazy ``(N, S, S, 3)`` uint8 array over the files): ``prepare`` decodes
each client's files, and the test split's, exactly once with :class:`Decoder` and streams them
into the shards (gptfl_hpc/data/prepare.py); nothing decodes a JPEG per round.

Decoding policy (:func:`decode_image`): JPEGs are opened in draft mode (libjpeg's DCT scaling to
the smallest power-of-two reduction that keeps both sides >= S), every mode is converted to RGB
(grayscale, CMYK, palette, RGBA: ``convert("RGB")``, alpha dropped; 16-bit grayscale scaled to 8
bit), then ``data.resize=center_crop`` takes the central square of side min(W, H) and resizes it
to S x S with antialiased bilinear filtering (PIL), or ``stretch`` resizes the whole image to
S x S. EXIF orientation is not applied (torchvision's ImageFolder does not either). The
reference code resized the shorter side to 256 and center-cropped 224 at test time
(RandomResizedCrop at training time); COVID-19 stretched to 224 x 224. Here one stored view
serves training and test, so it keeps the whole central square.

A file that cannot be decoded (truncated, not an image) stops ``prepare`` with a one-line
DataError naming it; nothing is skipped silently.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from gptfl_hpc.config import DataConfig
from gptfl_hpc.data.partition import stratified_split
from gptfl_hpc.data.sources import (
    TAG_TEST,
    Source,
    _label_names,
    _test_count,
    dataset_root,
)
from gptfl_hpc.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_SIZE = 224
"""data.image_size=0: the resolution of the paper's 224-px datasets."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
BLOCK = 32
"""Files per decoding task (the unit a worker returns)."""
PROGRESS_SECONDS = 10.0
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}
REFERENCE_TEST_RATIO = 0.2
"""EuroSAT and COVID-19: the reference code's per-class test share."""


# --------------------------------------------------------------------------------------------
# the lazy array


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """A lazy uint8 ``(N, size, size, 3)`` array over image files, decoded only by ``prepare``.

    Indexing with an index array or a slice gives another ImageFiles (no decoding); only
    :class:`Decoder` reads pixels. ``paths`` are absolute.
    """

    paths: np.ndarray
    size: int
    resize: str = "center_crop"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> ImageFiles:
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return ImageFiles(np.asarray(self.paths)[index], self.size, self.resize)

    def blocks(self) -> list[list[str]]:
        """The decoding tasks of this array, in order (BLOCK files each, the last shorter)."""
        p = [str(x) for x in self.paths]
        return [p[i:i + BLOCK] for i in range(0, len(p), BLOCK)]


def is_lazy(images: Any) -> bool:
    return isinstance(images, ImageFiles)


# --------------------------------------------------------------------------------------------
# decoding (runs in the worker processes)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("data.source: image folders need Pillow and scipy (pip install "
                          "'gptfl-hpc[data]'); valid: install them, or use the digits, "
                          "cifar10, cifar100 or arrays sources") from None
    return Image


def decode_image(path: str, size: int, resize: str = "center_crop") -> np.ndarray:
    """One file -> uint8 (size, size, 3); see the module docstring for the policy."""
    Image = _pil()
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(None, (size, size))  # DCT-domain downscale, both sides stay >= size
        im = _to_rgb(im, Image)
        w, h = im.size
        if resize == "center_crop":
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        else:
            box = (0, 0, w, h)
        if im.size != (size, size) or box != (0, 0, w, h):
            im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(im, dtype=np.uint8).copy()


def _to_rgb(im: Any, Image: Any) -> Any:
    im.load()  # decode now: a truncated file fails here, inside the caller's error handling
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):  # 16/32-bit grayscale (PNG): keep the top 8 bits of 16
        a = np.asarray(im).astype(np.int64)
        a = (a >> 8) if a.max(initial=0) > 255 else a
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":  # palette with transparency: via RGBA, as PIL recommends
        im = im.convert("RGBA")
    return im.convert("RGB")


def channel_counts(block: np.ndarray) -> np.ndarray:
    """(C, 256) int64 histogram of each channel's values of a uint8 (N,H,W,C) block (the
    normalisation statistics are computed from these exact counts: prepare.PixelStats)."""
    c = block.shape[-1]
    return np.stack([np.bincount(block[..., i].reshape(-1), minlength=256) for i in range(c)]
                    ).astype(np.int64)


Decoded = tuple[np.ndarray, np.ndarray]
"""A block's images, uint8 (n, S, S, 3), and their per-channel value counts, int64 (3, 256)."""


def _decode_block(paths: list[str], size: int, resize: str) -> tuple[Decoded | None, str]:
    """A task: the block's images and pixel counts (counted here, so that the parent, which
    writes every shard, does not become the bottleneck), or None and 'path: reason' for the
    first file that cannot be decoded."""
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        try:
            out[i] = decode_image(p, size, resize)
        except Exception as e:  # noqa: BLE001 (PIL raises many types for a bad file)
            why = " ".join(str(e).split())[:160] or type(e).__name__
            return None, f"{p}: {why}"
    return (out, channel_counts(out)), ""


def _init_worker() -> None:
    """Decode workers leave Slurm's warning signals and Ctrl-C to the parent, which stops at a
    shard boundary and shuts the pool down; SIGTERM still ends them."""
    import signal

    for name in ("SIGINT", "SIGUSR1", "SIGUSR2"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------
# the pool


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Decoder:
    """Decodes groups of ImageFiles in order with ``workers`` processes (1: in this process).

    Use as a context manager; :meth:`stream` yields each group's blocks in file order. Workers
    are spawned (never forked: the parent may be an MPI rank). At most ``4 * workers`` blocks
    are in flight, so memory stays bounded. A progress line (files/s, ETA) every 10 s.
    """

    def __init__(self, workers: int, total: int, what: str) -> None:
        self.workers = max(1, int(workers))
        self.total, self.what = int(total), what
        self.done = 0
        self.pool: Any = None
        self.t0 = self.last = time.monotonic()

    def __enter__(self) -> Decoder:
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, initializer=_init_worker,
                                            mp_context=multiprocessing.get_context("spawn"))
        log.info("decoding %s: %d files with %d worker process(es)", self.what, self.total,
                 self.workers)
        self.t0 = self.last = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def stream(self, groups: Sequence[ImageFiles]) -> Generator[Decoded, None, None]:
        """All blocks of all groups, in order (a block never spans two groups)."""
        tasks = [(b, g.size, g.resize) for g in groups for b in g.blocks()]
        if self.pool is None:
            for paths, size, resize in tasks:
                yield self._checked(_decode_block(paths, size, resize), len(paths))
            return
        from concurrent.futures.process import BrokenProcessPool

        window: deque[tuple[Future, int]] = deque()
        it = iter(tasks)
        depth = 4 * self.workers
        try:
            while True:
                while len(window) < depth:
                    t = next(it, None)
                    if t is None:
                        break
                    window.append((self.pool.submit(_decode_block, *t), len(t[0])))
                if not window:
                    return
                fut, n = window.popleft()
                yield self._checked(fut.result(), n)
        except BrokenProcessPool:
            raise DataError(f"decoding {self.what}: a decode worker process died (killed, or "
                            "out of memory); lower data.workers or give the job more memory"
                            ) from None

    def _checked(self, result: tuple[Decoded | None, str], n: int) -> Decoded:
        block, error = result
        if block is None:
            raise DataError(f"{error} (cannot decode this image; fix or remove the file and "
                            "run prepare again)")
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            log.info("decoding %s: %d/%d files (%.1f%%), %.0f files/s (%.1f per worker), "
                     "ETA %s", self.what, self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate, rate / self.workers,
                     _hms(eta))
        return block

    def summary(self) -> dict[str, float]:
        seconds = time.monotonic() - self.t0
        rate = self.done / max(seconds, 1e-9)
        log.info("decoded %s: %d files in %.1fs, %.0f files/s with %d worker(s) (%.1f per "
                 "worker)", self.what, self.done, seconds, rate, self.workers,
                 rate / self.workers)
        return {"files": self.done, "seconds": round(seconds, 3), "workers": self.workers,
                "files_per_second": round(rate, 2)}


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def workers_for(cfg: DataConfig) -> int:
    return cfg.workers or cpu_count()


# --------------------------------------------------------------------------------------------
# file lists


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _images_under(d: Path) -> list[str]:
    """Image files under `d` (recursively, following links), sorted by relative path."""
    found = []
    for base, dirs, files in os.walk(d, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found += [os.path.join(base, f) for f in files if _is_image(f)]
    return sorted(found, key=lambda p: os.path.relpath(p, d))


def _class_dirs(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _size(cfg: DataConfig) -> int:
    return cfg.image_size or DEFAULT_SIZE


def _files(paths: Sequence[str], cfg: DataConfig) -> ImageFiles:
    return ImageFiles(np.asarray([str(p) for p in paths], dtype=str), _size(cfg), cfg.resize)


def _source(cfg: DataConfig, name: str, names: list[str], train: tuple[list[str], np.ndarray],
            test: tuple[list[str], np.ndarray]) -> Source:
    _pil()  # Pillow is there, before any work
    k = len(names)
    label_names = _label_names(cfg, names, k)
    for split, (paths, labels) in (("train", train), ("test", test)):
        if not paths:
            raise DataError(f"data.root={cfg.root}: no {split} images found for {name}")
        counts = np.bincount(labels, minlength=k)
        if split == "train" and (counts == 0).any():
            missing = [names[i] for i in np.flatnonzero(counts == 0)[:3]]
            raise DataError(f"data.root={cfg.root}: {name} has no training images of class(es) "
                            f"{', '.join(missing)}; every class needs some")
    # the Source holds lazy arrays (ImageFiles) where in-memory sources hold decoded images
    return Source(name=name, kind="image", train_images=cast(np.ndarray, _files(train[0], cfg)),
                  train_labels=train[1].astype(np.int64), label_names=label_names,
                  test_images=cast(np.ndarray, _files(test[0], cfg)),
                  test_labels=test[1].astype(np.int64))


def split_per_class(labels: np.ndarray, ratio: float, seed: int,
                    purpose: str) -> tuple[np.ndarray, np.ndarray]:
    """(test, train) sorted indices: round(ratio * n_c) of each class c for the test split,
    chosen from (seed, purpose, c) only (the reference code's per-class split, seeded)."""
    from gptfl_hpc.seeding import rng

    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(np.floor(ratio * len(idx) + 0.5))
        test.append(rng(int(seed), purpose, int(c)).permutation(idx)[:k])
    t = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[t] = False
    return t.astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def _split(paths: list[str], labels: np.ndarray, idx: np.ndarray) -> tuple[list[str], np.ndarray]:
    return [paths[i] for i in idx], labels[idx]


def _check_not_other_keys(cfg: DataConfig) -> None:
    if cfg.split_file and cfg.source != "image_folder":
        raise ConfigError(f"config key data.split_file: only for data.source=image_folder (got "
                          f"{cfg.source}, whose official split is used); valid: empty")


# --------------------------------------------------------------------------------------------
# image_folder


def load_image_folder(cfg: DataConfig, seed: int) -> Source:
    root = Path(cfg.root or "").expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root}: not a directory; valid: a folder with <class>/ "
                        "folders of images, or train/<class>/ and test/<class>/")
    split_dirs = {s: next((root / n for n in names if (root / n).is_dir()), None)
                  for s, names in SPLIT_DIRS.items()}
    if cfg.split_file:
        return _image_folder_split_file(cfg, root)
    if split_dirs["train"] is not None:
        train_dir = split_dirs["train"]
        names = [d.name for d in _class_dirs(train_dir)]
        train = _labelled(train_dir, names)
        if split_dirs["test"] is None:
            raise DataError(f"data.root={root}: has train/ but no test/ (or val/) folder; valid: "
                            "both, or class folders directly in the root")
        test_dir = split_dirs["test"]
        extra = sorted({d.name for d in _class_dirs(test_dir)} - set(names))
        if extra:
            raise DataError(f"{test_dir}: class folder(s) {', '.join(extra[:3])} are not in "
                            f"{train_dir}; valid: the training classes")
        test = _labelled(test_dir, names)
        return _source(cfg, "image_folder", names, train, test)
    names = [d.name for d in _class_dirs(root)]
    paths, labels = _labelled(root, names)
    n_test = _test_count(cfg, len(labels), f"images in {root}")
    test_idx, train_idx = stratified_split(labels, n_test, seed, TAG_TEST)
    return _source(cfg, "image_folder", names, _split(paths, labels, train_idx),
                   _split(paths, labels, test_idx))


def _labelled(d: Path, names: list[str]) -> tuple[list[str], np.ndarray]:
    if not names:
        raise DataError(f"{d}: no class folders; valid: <class>/ folders holding images "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    paths: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(names):
        files = _images_under(d / name) if (d / name).is_dir() else []
        paths += files
        labels += [c] * len(files)
    return paths, np.asarray(labels, np.int64)


def _image_folder_split_file(cfg: DataConfig, root: Path) -> Source:
    split_path = Path(cfg.split_file)
    if split_path.is_absolute() or ".." in split_path.parts:
        raise ConfigError(f"config key data.split_file: {cfg.split_file!r} must be a path inside "
                          f"data.root ({root}), relative to it (so that its content is part of "
                          "the data's identity); valid: e.g. splits.csv")
    f = root / split_path
    if not f.is_file():
        raise DataError(f"data.split_file: {f} not found")
    names = [d.name for d in _class_dirs(root)]
    index = {n: i for i, n in enumerate(names)}
    out: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    with open(f, newline="", encoding="utf-8") as fh:
        for line_no, row in enumerate(csv.reader(fh), 1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) != 2 or row[1].strip() not in out:
                raise DataError(f"{f} line {line_no}: expected `relative/path.jpg,train` or "
                                f"`...,test`, got {','.join(row)[:80]!r}")
            rel = Path(row[0].strip())
            cls = rel.parts[0] if len(rel.parts) > 1 else None
            if cls not in index or rel.is_absolute() or ".." in rel.parts:
                raise DataError(f"{f} line {line_no}: {rel} is not inside a class folder of "
                                f"{root} (<class>/.../file); classes: {', '.join(names[:5])}...")
            p = root / rel
            if not p.is_file():
                raise DataError(f"{f} line {line_no}: {p} not found")
            out[row[1].strip()][0].append(str(p))
            out[row[1].strip()][1].append(index[cls])
    return _source(cfg, "image_folder", names,
                   (out["train"][0], np.asarray(out["train"][1], np.int64)),
                   (out["test"][0], np.asarray(out["test"][1], np.int64)))


# --------------------------------------------------------------------------------------------
# Flowers-102 (Nilsback & Zisserman): jpg/ + imagelabels.mat + setid.mat


def load_flowers102(cfg: DataConfig, seed: int) -> Source:
    _check_not_other_keys(cfg)
    d = dataset_root(cfg, "flowers-102", "flowers102", need=["jpg", "imagelabels.mat", "setid.mat"],
              hint="download 102flowers.tgz, imagelabels.mat and setid.mat from "
                   "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into it and extract the "
                   "tgz (it unpacks to jpg/)")
    labels_1 = _mat_vector(d / "imagelabels.mat", "labels")
    sets = {k: _mat_vector(d / "setid.mat", k) for k in ("trnid", "tstid")}
    k = int(labels_1.max())
    if labels_1.min() < 1 or k < 2:
        raise DataError(f"{d / 'imagelabels.mat'}: labels must be 1..K, got {labels_1.min()}.."
                        f"{labels_1.max()}")

    def split(ids: np.ndarray, key: str) -> tuple[list[str], np.ndarray]:
        if ids.min(initial=1) < 1 or ids.max(initial=0) > len(labels_1):
            raise DataError(f"{d / 'setid.mat'}: {key} holds image ids outside 1.."
                            f"{len(labels_1)}")
        ids = np.sort(ids)
        paths = [str(d / "jpg" / f"image_{i:05d}.jpg") for i in ids]
        missing = next((p for p in paths if not os.path.isfile(p)), None)
        if missing:
            raise DataError(f"{missing}: listed in setid.mat ({key}) but not found; extract "
                            "102flowers.tgz completely")
        return paths, labels_1[ids - 1] - 1

    # the reference code (torchvision split='train'/'test'): train = trnid (10 per class,
    # 1,020 images), test = tstid (6,149); the validation ids (valid) are not used
    return _source(cfg, "flowers102", [f"flower {i}" for i in range(1, k + 1)],
                   split(sets["trnid"], "trnid"), split(sets["tstid"], "tstid"))


def _mat_vector(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat  # MATLAB v5 files; no pickle

    try:
        m = loadmat(str(path))
    except Exception as e:  # noqa: BLE001 (scipy raises several types for a bad file)
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__})") from None
    if key not in m:
        raise DataError(f"{path}: no variable '{key}' (has: "
                        f"{', '.join(k for k in m if not k.startswith('__'))})")
    v = np.asarray(m[key]).reshape(-1)
    if not np.issubdtype(v.dtype, np.number) or not np.all(v == np.round(v)):
        raise DataError(f"{path}: '{key}' must hold integers")
    return v.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Food-101: images/<class>/<id>.jpg + meta/train.txt, meta/test.txt (+ classes.txt, labels.txt)


def load_food101(cfg: DataConfig, seed: int) -> Source:
    _check_not_other_keys(cfg)
    d = dataset_root(cfg, "food-101", "food101", need=["images", "meta/train.txt", "meta/test.txt"],
              hint="download http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz and extract it "
                   "there (it unpacks to food-101/images and food-101/meta)")
    classes_txt = d / "meta" / "classes.txt"
    if classes_txt.is_file():
        classes = _lines(classes_txt)
    else:
        classes = [c.name for c in _class_dirs(d / "images")]
    labels_txt = d / "meta" / "labels.txt"
    names = _lines(labels_txt) if labels_txt.is_file() else [c.replace("_", " ")
                                                             for c in classes]
    if len(names) != len(classes):
        raise DataError(f"{labels_txt}: {len(names)} names for {len(classes)} classes")
    index = {c: i for i, c in enumerate(classes)}

    def split(name: str) -> tuple[list[str], np.ndarray]:
        f = d / "meta" / name
        paths, labels = [], []
        for i, entry in enumerate(_lines(f), 1):
            cls = entry.split("/", 1)[0]
            if cls not in index or "/" not in entry:
                raise DataError(f"{f} line {i}: {entry!r} is not <class>/<image id> of a class "
                                "in meta/classes.txt")
            p = d / "images" / f"{entry}.jpg"
            paths.append(str(p))
            labels.append(index[cls])
        missing = next((p for p in paths if not os.path.isfile(p)), None)
        if missing:
            raise DataError(f"{missing}: listed in {f} but not found; extract food-101.tar.gz "
                            "completely")
        return paths, np.asarray(labels, np.int64)

    return _source(cfg, "food101", names, split("train.txt"), split("test.txt"))


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


# --------------------------------------------------------------------------------------------
# EuroSAT (RGB): <class>/*.jpg, 80/20 per class as in the reference code


EUROSAT_DIRS = ("EuroSAT_RGB", "2750", "eurosat/2750", "EuroSAT", "eurosat")


def load_eurosat(cfg: DataConfig, seed: int) -> Source:
    _check_not_other_keys(cfg)
    root = Path(cfg.root or "").expanduser()
    d = next((root / c for c in ("", *EUROSAT_DIRS) if (root / c / "AnnualCrop").is_dir()),
             None)
    if d is None:
        raise DataError(f"data.root={root}: no EuroSAT class folders (AnnualCrop/, Forest/, ...) "
                        f"in it or in {', '.join(EUROSAT_DIRS)}; download EuroSAT_RGB.zip "
                        "(https://zenodo.org/records/7711810) and extract it there")
    classes = [c.name for c in _class_dirs(d)]
    paths, labels = _labelled(d, classes)
    test, train = split_per_class(labels, REFERENCE_TEST_RATIO, seed, "split.eurosat-test")
    return _source(cfg, "eurosat", [_words(c) for c in classes], _split(paths, labels, train),
                   _split(paths, labels, test))


def _words(camel: str) -> str:
    """AnnualCrop -> 'annual crop', SeaLake -> 'sea lake'."""
    import re

    return " ".join(w.lower() for w in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", camel)) or camel


# --------------------------------------------------------------------------------------------
# COVID-19 radiography: COVID/images, Normal/images, Viral Pneumonia/images


COVID_CLASSES = (("Normal", ("Normal", "NORMAL")),
                 ("Viral Pneumonia", ("Viral Pneumonia",)),
                 ("COVID", ("COVID", "COVID-19")))
"""The reference code's three classes, in its label order (Lung_Opacity is not used)."""


def load_covid19(cfg: DataConfig, seed: int) -> Source:
    """Labels come from each file's class folder. (The reference loader drew a random class in
    __getitem__ and returned that class's image at index % size, so its labels and samples did
    not follow the split it had made; here the sample at index i is file i with its label.)"""
    _check_not_other_keys(cfg)
    root = Path(cfg.root or "").expanduser()
    d = None
    for c in ("", "COVID-19_Radiography_Dataset", "COVID-19 Radiography Database"):
        if all(any((root / c / a).is_dir() for a in alts) for _, alts in COVID_CLASSES):
            d = root / c
            break
    if d is None:
        raise DataError(f"data.root={root}: no COVID-19 radiography folders (COVID/, Normal/, "
                        "Viral Pneumonia/) in it or in COVID-19_Radiography_Dataset/; download "
                        "the Kaggle dataset tawsifurrahman/covid19-radiography-database and "
                        "extract it there")
    paths: list[str] = []
    labels: list[int] = []
    for label, (_, alts) in enumerate(COVID_CLASSES):
        folder = next(d / a for a in alts if (d / a).is_dir())
        src = folder / "images" if (folder / "images").is_dir() else folder
        files = [p for p in _images_under(src) if "masks" not in Path(p).relative_to(src).parts]
        paths += files
        labels += [label] * len(files)
    y = np.asarray(labels, np.int64)
    test, train = split_per_class(y, REFERENCE_TEST_RATIO, seed, "split.covid19-test")
    return _source(cfg, "covid19", [n for n, _ in COVID_CLASSES], _split(paths, y, train),
                   _split(paths, y, test))


# --------------------------------------------------------------------------------------------
# Caltech-101: 101_ObjectCategories/<class>/*.jpg without BACKGROUND_Google


def load_caltech101(cfg: DataConfig, seed: int) -> Source:
    _check_not_other_keys(cfg)
    d = dataset_root(cfg, "caltech101", "caltech-101", need=["101_ObjectCategories"],
              hint="download caltech-101.zip (https://data.caltech.edu/records/mzrjq-6wc02) and "
                   "extract 101_ObjectCategories.tar.gz there")
    d = d / "101_ObjectCategories"
    classes = [c.name for c in _class_dirs(d) if c.name != "BACKGROUND_Google"]
    paths, labels = _labelled(d, classes)
    n_test = _test_count(cfg, len(labels), f"images in {d}")
    test, train = stratified_split(labels, n_test, seed, TAG_TEST)
    return _source(cfg, "caltech101", [c.replace("_", " ") for c in classes],
                   _split(paths, labels, train), _split(paths, labels, test))

