"""Audio datasets: mono int16 waveforms of one fixed length, decoded once by ``prepare``.

Loaders (``data.source``; each ``(cfg: DataConfig, seed) -> Source`` of kind "audio", samples
int16 ``(N, L)`` with ``L = data.sample_rate x clip length``):

===============  =========================================================  =====================
source           layout under data.root                                     test split
===============  =========================================================  =====================
speech_commands  Speech Commands v0.02: ``<word>/<speaker>_nohash_<n>.wav``,    ``testing_list.txt``
                 ``validation_list.txt``, ``testing_list.txt`` (also under     (validation files
                 ``speech_commands_v0.02/``); ``_background_noise_`` is not   are held out of
                 a class: the 35-word task                                   both)
esc50            ESC-50: ``audio/*.wav`` + ``meta/esc50.csv`` (also under      fold data.test_fold
                 ``ESC-50-master/``); 50 classes, 5 folds of 400 clips          (0: fold 5)
audio_folder     ``<class>/**/*.wav|flac|ogg`` (or ``train/<class>``,          the test/ folder,
                 ``test/<class>``)                                           else data.test_size
speech_embedded  made offline by eSpeak NG (below); no data.root               held-out speakers
===============  =========================================================  =====================

**Decoding policy.** Files are read with ``soundfile`` (libsndfile; torchaudio's loader now
needs TorchCodec/FFmpeg), mixed down to mono (mean of the channels), resampled to
``data.sample_rate`` with a polyphase filter (``scipy.signal.resample_poly``, exact rational
ratio, deterministic), then cut to the clip length or zero-padded at the end, and stored as
int16 (``round(clip(x, -1, 1) x 32767)``). Speech Commands and ESC-50 files have one known rate
(16 kHz, 44.1 kHz); a file at another rate means a wrong or damaged copy and stops ``prepare``
with a one-line DataError naming it, as does an unreadable file, a silent-or-empty file list, a
class without files and a label outside the classes. ``audio_folder`` accepts any rate (>= 1 kHz).
Labels come from the file lists, so the partition needs no decoding; the audio is decoded once,
in parallel (``data.workers`` spawned processes, :class:`gptfl_hpc.data.decode.OrderedPool`),
into one int16 array in memory (Speech Commands: 96k clips x 32 KB = 3.1 GB; ESC-50: 2,000 x
160 KB = 320 MB), from which ``prepare`` writes the shards.

**Shard format: int16 waveforms, not precomputed features.** (1) Size: one second is 32,000
bytes as int16 and 51,712 bytes as float32 log-mel (128 bins x 101 frames; 1.6x more), 25,856 as
fp16 (lossy). (2) The augmentation (time shift, additive noise at a random SNR) works on the
waveform, and it must be the same in pretraining and FL: features precomputed once could not be
augmented that way on either side. (3) The log-mel front end runs on the device per batch
(train/audio.py); measured on the 2-core VM (CPU time, 1 thread, torch 2.13) it costs 3.7 ms
per 1-s clip against 1.2 ms for the audio_crnn model's forward+backward, a price paid instead of
1.6x the bytes and a fixed, un-augmentable input; on a GPU it is one batched matmul.
(4) Lossless: int16 is the recordings' own resolution (Speech Commands and ESC-50 ship 16-bit
PCM).

**speech_embedded: the embedded audio default, made offline.** No labelled speech dataset ships
inside a Python package, but a real text-to-speech engine does: eSpeak NG (the ``espeakng-loader``
wheel; gptfl_hpc/data/espeak.py). The task is the 10 command words of Speech Commands (yes, no,
up, down, left, right, on, off, stop, go; ``data.label_names`` may name any other words). The
clients are *speakers* (``data.num_clients`` of them; with ``data.partition=natural`` one client
per speaker, as FedAudio partitions Speech Commands): each is a distinct eSpeak voice, an English
accent (8) x a human-like voice variant (:data:`PEOPLE_VARIANTS`, 78 named variants) with its own
speaking rate, pitch and pitch range, recorded through its own channel (a band limit, a
background noise of its own colour and level, a gain). Like the real speakers of Speech Commands,
a speaker says only some of the words (each with probability 0.6, at least 3), 1-4 times each,
with the rate, pitch and onset in the clip varying per utterance. The test split is
``data.test_size`` utterances of held-out speakers (each says every word twice), so a test
speaker is never a client. The server's generator (gen/kinds/espeak.py,
gptfl_hpc/assets/espeak-generator) is the same kind of pre-trained TTS, restricted to
:data:`SERVER_VARIANTS` (the numbered eSpeak voices, American English, clean studio output),
disjoint from every client's voice: the synthetic set differs from the clients' speech in
voices, accents, channel and noise, so pretraining on it leaves a real domain gap for FL to
close. Everything derives from (run.seed, speaker, utterance): the data is byte-identical for
any worker count and on every machine with the same eSpeak NG version.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_hpc.config import DataConfig
from gptfl_hpc.data.partition import stratified_split
from gptfl_hpc.data.sources import TAG_TEST, Source, _label_names, _test_count, dataset_root
from gptfl_hpc.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUPPORTED_RATES = (16000,)
"""data.sample_rate values the rest of the pipeline handles: the log-mel front end
(train/audio.py) and the synthetic task are defined at 16 kHz."""
DEFAULT_CLIP_SECONDS = {"speech_commands": 1.0, "speech_embedded": 1.0, "audio_folder": 1.0,
                        "esc50": 5.0}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".mp3")
BLOCK = 64
"""Files (or utterances) per decoding task."""
SPEECH_COMMANDS_RATE = 16000
ESC50_RATE = 44100
SPEECH_COMMANDS_WORDS = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward",
    "four", "go", "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one",
    "right", "seven", "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow",
    "yes", "zero")
"""The 35 words of Speech Commands v0.02 (its class folders, sorted)."""
NOISE_DIR = "_background_noise_"


# --------------------------------------------------------------------------------------------
# signal helpers (pure numpy / scipy; used by the worker processes and the espeak kind)


def clip_length(cfg: DataConfig) -> int:
    """Samples per clip: data.sample_rate x data.clip_seconds (or the source's default)."""
    seconds = cfg.clip_seconds or DEFAULT_CLIP_SECONDS.get(cfg.source, 1.0)
    n = int(round(cfg.sample_rate * seconds))
    if n < 1024:
        raise ConfigError(f"config key data.clip_seconds: {seconds} s at {cfg.sample_rate} Hz "
                          f"is {n} samples; valid: at least 1024 samples (the log-mel front end "
                          "needs > 512)")
    return n


def _check_rate(cfg: DataConfig) -> int:
    if cfg.sample_rate not in SUPPORTED_RATES:
        raise ConfigError(f"config key data.sample_rate: {cfg.sample_rate} Hz is not supported "
                          f"yet (the log-mel front end and the synthetic task are defined at "
                          f"16 kHz); valid: {', '.join(map(str, SUPPORTED_RATES))}")
    return int(cfg.sample_rate)


def resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 waveform(s) resampled along the last axis by the exact rational ratio
    to_rate / from_rate (polyphase FIR, scipy's Kaiser window; deterministic)."""
    if from_rate == to_rate:
        return np.asarray(x, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(from_rate), int(to_rate))
    up, down = int(to_rate) // g, int(from_rate) // g
    y = resample_poly(np.asarray(x, dtype=np.float64), up, down, axis=-1,
                      window=_resample_filter(up, down))
    return y.astype(np.float32)


@functools.cache
def _resample_filter(up: int, down: int) -> np.ndarray:
    """resample_poly's own default filter (Kaiser beta 5, 20 x max(up, down) + 1 taps),
    designed once per ratio instead of once per clip (the same output)."""
    from scipy.signal import firwin

    m = max(up, down)
    h = firwin(2 * 10 * m + 1, 1.0 / m, window=("kaiser", 5.0))
    h.setflags(write=False)
    return h


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16 (round(clip(x) * 32767)), the inverse of / 32768 up to a step."""
    return np.rint(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def fit(x: np.ndarray, length: int) -> np.ndarray:
    """Cut to `length` samples or zero-pad at the end."""
    if len(x) >= length:
        return x[:length]
    return np.concatenate([x, np.zeros(length - len(x), dtype=x.dtype)])


def _soundfile() -> Any:
    try:
        import soundfile
    except (ImportError, OSError):
        raise ConfigError("data.source: audio files need soundfile (pip install "
                          "'gptfl-hpc[audio]'); valid: install it, or use "
                          "data.source=speech_embedded") from None
    return soundfile


def read_clip(path: str, rate: int, length: int, expect_rate: int = 0) -> np.ndarray:
    """One file -> int16 (length,): mono mix-down, resampling, cut / pad (module docstring)."""
    sf = _soundfile()
    x, file_rate = sf.read(path, dtype="float32", always_2d=True)
    if expect_rate and file_rate != expect_rate:
        raise ValueError(f"sampled at {file_rate} Hz; every file of this dataset is "
                         f"{expect_rate} Hz (a wrong or damaged copy)")
    if not 1000 <= file_rate <= 384000:
        raise ValueError(f"sampling rate {file_rate} Hz; valid: 1000 .. 384000")
    if x.shape[0] == 0:
        raise ValueError("no samples (empty audio)")
    if not np.isfinite(x).all():
        raise ValueError("holds NaN/Inf samples")
    mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    return to_pcm16(fit(resample(mono, file_rate, rate), length))


def _decode_block(task: tuple[list[str], int, int, int]) -> tuple[np.ndarray | None, str]:
    """A decoding task (runs in a worker): the block's clips, or None and 'path: reason'."""
    paths, rate, length, expect = task
    out = np.empty((len(paths), length), np.int16)
    for i, p in enumerate(paths):
        try:
            out[i] = read_clip(p, rate, length, expect)
        except Exception as e:  # noqa: BLE001 (libsndfile and scipy raise many types)
            why = " ".join(str(e).split())[:160] or type(e).__name__
            return None, f"{p}: cannot use this audio file ({why})"
    return out, ""


def decode_files(paths: Sequence[str], cfg: DataConfig, what: str,
                 expect_rate: int = 0) -> np.ndarray:
    """int16 (N, L) of `paths`, decoded by ``data.workers`` processes, in file order."""
    from gptfl_hpc.data.decode import OrderedPool, cpu_count

    rate, length = _check_rate(cfg), clip_length(cfg)
    _soundfile()  # installed, before any worker starts
    out = np.empty((len(paths), length), np.int16)
    tasks = [(list(paths[i:i + BLOCK]), rate, length, expect_rate)
             for i in range(0, len(paths), BLOCK)]
    pos = 0
    with OrderedPool(cfg.workers or cpu_count(), f"decoding {what}") as pool:
        for block in pool.map(_decode_block, tasks, [len(t[0]) for t in tasks]):
            out[pos:pos + len(block)] = block
            pos += len(block)
        pool.summary()
    return out


def _audio_source(cfg: DataConfig, name: str, names: list[str],
                  train: tuple[list[str], np.ndarray], test: tuple[list[str], np.ndarray],
                  keys: np.ndarray | None = None, expect_rate: int = 0) -> Source:
    """Check the file lists (before any decoding), then decode both splits."""
    k = len(names)
    label_names = _label_names(cfg, names, k)
    for split, (paths, labels) in (("train", train), ("test", test)):
        if not paths:
            raise DataError(f"data.root={cfg.root}: no {split} audio files found for {name} "
                            f"({', '.join(AUDIO_SUFFIXES)})")
        counts = np.bincount(labels, minlength=k)
        if split == "train" and (counts == 0).any():
            missing = [names[i] for i in np.flatnonzero(counts == 0)[:3]]
            raise DataError(f"data.root={cfg.root}: {name} has no training audio of class(es) "
                            f"{', '.join(missing)}; every class needs some")
    _check_rate(cfg)
    clip_length(cfg)
    x_train = decode_files(train[0], cfg, f"{name} train split", expect_rate)
    x_test = decode_files(test[0], cfg, f"{name} test split", expect_rate)
    return Source(name=name, kind="audio", train_images=x_train,
                  train_labels=np.asarray(train[1], np.int64), label_names=label_names,
                  test_images=x_test, test_labels=np.asarray(test[1], np.int64), keys=keys)


def _check_keys(cfg: DataConfig, natural: bool) -> None:
    if cfg.test_fold and cfg.source != "esc50":
        raise ConfigError(f"config key data.test_fold: only for data.source=esc50 (got "
                          f"{cfg.source}); valid: 0")
    if cfg.partition == "natural" and not natural:
        raise ConfigError(f"config key data.partition: natural needs speakers; {cfg.source} "
                          "has none; valid: iid, dirichlet")


# --------------------------------------------------------------------------------------------
# Speech Commands v0.02


def _audio_files(d: Path) -> list[str]:
    found = []
    for base, dirs, files in os.walk(d, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found += [os.path.join(base, f) for f in files
                  if not f.startswith(".") and f.lower().endswith(AUDIO_SUFFIXES)]
    return sorted(found, key=lambda p: os.path.relpath(p, d))


SPEAKER_RE = re.compile(r"^([0-9a-fA-F]+)_nohash_\d+\.wav$")


def load_speech_commands(cfg: DataConfig, seed: int) -> Source:
    """Speech Commands v0.02 (Warden 2018), the 35-word task; natural partition by speaker."""
    _check_keys(cfg, natural=True)
    d = dataset_root(cfg, "speech_commands_v0.02", "speech_commands",
                     need=["validation_list.txt", "testing_list.txt"],
                     hint="download http://download.tensorflow.org/data/"
                          "speech_commands_v0.02.tar.gz and extract it there (it unpacks to "
                          "<word>/ folders and the two lists)")
    words = sorted(p.name for p in d.iterdir()
                   if p.is_dir() and not p.name.startswith((".", "_")))
    if len(words) < 2:
        raise DataError(f"{d}: {len(words)} word folder(s); valid: the <word>/ folders of "
                        "Speech Commands (35 in v0.02)")
    index = {w: i for i, w in enumerate(words)}
    held = {}
    for split in ("validation", "testing"):
        f = d / f"{split}_list.txt"
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            rel = line.strip()
            if not rel:
                continue
            if rel.split("/", 1)[0] not in index or not (d / rel).is_file():
                raise DataError(f"{f} line {i}: {rel} is not a file of a word folder of {d}")
            held[rel] = split
    train: tuple[list[str], list[int], list[str]] = ([], [], [])
    test: tuple[list[str], list[int]] = ([], [])
    for w in words:
        files = sorted(p.name for p in (d / w).iterdir()
                       if p.is_file() and p.suffix.lower() == ".wav")
        if not files:
            raise DataError(f"{d / w}: no .wav files; every word folder needs recordings")
        for name in files:
            rel = f"{w}/{name}"
            split = held.get(rel)
            if split == "testing":
                test[0].append(str(d / rel))
                test[1].append(index[w])
            elif split is None:
                m = SPEAKER_RE.match(name)
                if m is None:
                    raise DataError(f"{d / rel}: not named <speaker>_nohash_<n>.wav (the "
                                    "Speech Commands convention the speaker split relies on)")
                train[0].append(str(d / rel))
                train[1].append(index[w])
                train[2].append(m.group(1).lower())
    keys = np.asarray(train[2])
    log.info("speech_commands: %d words, %d training clips from %d speakers, %d test clips "
             "(%d validation clips held out)", len(words), len(train[0]), len(set(train[2])),
             len(test[0]), sum(1 for v in held.values() if v == "validation"))
    return _audio_source(cfg, "speech_commands", words,
                         (train[0], np.asarray(train[1], np.int64)),
                         (test[0], np.asarray(test[1], np.int64)), keys=keys,
                         expect_rate=SPEECH_COMMANDS_RATE)


# --------------------------------------------------------------------------------------------
# ESC-50


def load_esc50(cfg: DataConfig, seed: int) -> Source:
    """ESC-50 (Piczak 2015): 2,000 5-s clips of 50 classes in 5 folds; fold data.test_fold
    (default 5) is the test set, the clients split the other four (data.partition)."""
    _check_keys(cfg, natural=False)
    d = dataset_root(cfg, "ESC-50-master", "ESC-50", "esc50", need=["audio", "meta/esc50.csv"],
                     hint="download https://github.com/karolpiczak/ESC-50/archive/master.zip and "
                          "extract it there (it unpacks to ESC-50-master/audio and /meta)")
    test_fold = cfg.test_fold or 5
    meta = d / "meta" / "esc50.csv"
    rows: list[tuple[str, int, int, str]] = []
    with open(meta, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"filename", "fold", "target", "category"}
        if not need <= set(reader.fieldnames or []):
            raise DataError(f"{meta}: columns {reader.fieldnames}; valid: the ESC-50 header "
                            "with filename, fold, target, category")
        for i, r in enumerate(reader, 2):
            try:
                fold, target = int(r["fold"]), int(r["target"])
            except ValueError:
                raise DataError(f"{meta} line {i}: fold/target are not integers") from None
            if not 1 <= fold <= 5 or target < 0:
                raise DataError(f"{meta} line {i}: fold {fold} / target {target}; valid: folds "
                                "1..5, targets >= 0")
            rows.append((r["filename"], fold, target, r["category"]))
    if not rows:
        raise DataError(f"{meta}: no clips listed")
    k = max(t for _, _, t, _ in rows) + 1
    names: list[str | None] = [None] * k
    for _, _, t, cat in rows:
        if names[t] not in (None, cat):
            raise DataError(f"{meta}: target {t} is both {names[t]!r} and {cat!r}")
        names[t] = cat
    if any(n is None for n in names):
        missing = [i for i, n in enumerate(names) if n is None][:3]
        raise DataError(f"{meta}: no clips of target(s) {missing}; every class needs clips")
    split: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
    for fname, fold, target, _ in rows:
        p = d / "audio" / fname
        if not p.is_file():
            raise DataError(f"{p}: listed in {meta} but not found; extract the archive "
                            "completely")
        split[fold == test_fold][0].append(str(p))
        split[fold == test_fold][1].append(target)
    label_names = [str(n).replace("_", " ") for n in names]
    return _audio_source(cfg, "esc50", label_names,
                         (split[False][0], np.asarray(split[False][1], np.int64)),
                         (split[True][0], np.asarray(split[True][1], np.int64)),
                         expect_rate=ESC50_RATE)


# --------------------------------------------------------------------------------------------
# audio_folder


def load_audio_folder(cfg: DataConfig, seed: int) -> Source:
    """<class>/ folders of audio files, or train/<class>/ and test/<class>/."""
    _check_keys(cfg, natural=False)
    root = Path(cfg.root or "").expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root}: not a directory; valid: a folder with <class>/ "
                        "folders of audio files, or train/<class>/ and test/<class>/")
    tr, te = root / "train", next((root / n for n in ("test", "val", "validation")
                                   if (root / n).is_dir()), None)
    if tr.is_dir():
        if te is None:
            raise DataError(f"data.root={root}: has train/ but no test/ (or val/) folder; "
                            "valid: both, or class folders directly in the root")
        names = _classes(tr)
        extra = sorted(set(_classes(te)) - set(names))
        if extra:
            raise DataError(f"{te}: class folder(s) {', '.join(extra[:3])} are not in {tr}; "
                            "valid: the training classes")
        return _audio_source(cfg, "audio_folder", names, _labelled(tr, names),
                             _labelled(te, names, allow_empty=True))
    names = _classes(root)
    paths, labels = _labelled(root, names)
    n_test = _test_count(cfg, len(labels), f"audio files in {root}")
    test_idx, train_idx = stratified_split(labels, n_test, seed, TAG_TEST)
    return _audio_source(cfg, "audio_folder", names,
                         ([paths[i] for i in train_idx], labels[train_idx]),
                         ([paths[i] for i in test_idx], labels[test_idx]))


def _classes(d: Path) -> list[str]:
    names = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{d}: no class folders; valid: <class>/ folders holding audio files "
                        f"({', '.join(AUDIO_SUFFIXES)})")
    return names


def _labelled(d: Path, names: list[str], allow_empty: bool = False
              ) -> tuple[list[str], np.ndarray]:
    paths: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(names):
        files = _audio_files(d / name) if (d / name).is_dir() else []
        if not files and not allow_empty:
            raise DataError(f"{d / name}: no audio files ({', '.join(AUDIO_SUFFIXES)}); every "
                            "class needs some")
        paths += files
        labels += [c] * len(files)
    return paths, np.asarray(labels, np.int64)


# --------------------------------------------------------------------------------------------
# speech_embedded: command words spoken by eSpeak NG voices (module docstring)

EMBEDDED_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
ACCENTS = ("en", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp",
           "en-us", "en-us-nyc")
"""eSpeak NG's English accents (British, Caribbean, Scottish, Lancastrian, West Midlands,
received pronunciation, American, New York)."""
SERVER_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5")
"""The numbered eSpeak voices: the server's generator speaks with these (American English) and
no client or test speaker ever does."""
PEOPLE_VARIANTS = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Denis", "Diogo", "Gene",
    "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen",
    "Reed", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "adam", "anika",
    "announcer", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "croak", "david",
    "ed", "edward", "edward2", "grandma", "grandpa", "gustave", "ian", "iven", "iven2", "iven3",
    "iven4", "john", "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "linda", "marcelo", "max", "michel", "miguel", "mike2", "norbert", "pablo", "paul", "pedro",
    "quincy", "rob", "robert", "sandro", "shelby", "steph", "steph2", "steph3", "travis",
    "victor", "whisper", "whisperf", "zac")
"""The named eSpeak voice variants that sound like people (the robot and demon variants and
the speed preset are left out): the clients' and test speakers' voices."""
ESPEAK_ROLE = {"client": 0, "test": 1}


@dataclass(frozen=True)
class Speaker:
    """A synthetic person: a voice and a recording channel (module docstring)."""

    accent: str
    variant: str
    rate: int
    """words per minute"""
    pitch: int
    pitch_range: int
    snr_db: float
    """background noise level relative to the speech (dB)"""
    noise_color: float
    """spectral slope of the noise: 0 white, 1 pink, 2 brown"""
    low_hz: float
    high_hz: float
    """the microphone's band (a smooth high-pass / low-pass)"""
    peak_dbfs: float


def draw_speaker(seed: int, role: str, index: int) -> Speaker:
    """Speaker `index` of `role` (client / test), from (seed, role, index) only."""
    from gptfl_hpc.seeding import rng

    r = rng(int(seed), "speech_embedded.speaker", ESPEAK_ROLE[role], int(index))
    return Speaker(accent=str(r.choice(ACCENTS)), variant=str(r.choice(PEOPLE_VARIANTS)),
                   rate=int(r.integers(120, 221)), pitch=int(r.integers(15, 86)),
                   pitch_range=int(r.integers(20, 91)), snr_db=float(r.uniform(8.0, 30.0)),
                   noise_color=float(r.uniform(0.0, 2.0)), low_hz=float(r.uniform(60, 300)),
                   high_hz=float(r.uniform(3000, 7600)), peak_dbfs=float(r.uniform(-20, -3)))


def speaker_script(seed: int, role: str, index: int, num_words: int,
                   take_prob: float = 0.6) -> list[tuple[int, int]]:
    """(word, take) of every utterance of a speaker: clients say each word with probability
    `take_prob` (at least 3 words), 1-4 times; test speakers say every word twice."""
    from gptfl_hpc.seeding import rng

    if role == "test":
        return [(w, t) for w in range(num_words) for t in range(2)]
    r = rng(int(seed), "speech_embedded.script", int(index))
    chosen = np.flatnonzero(r.random(num_words) < take_prob)
    if len(chosen) < min(3, num_words):
        chosen = np.sort(r.permutation(num_words)[:min(3, num_words)])
    return [(int(w), t) for w in chosen for t in range(int(r.integers(1, 5)))]


def _band_noise(r: np.random.Generator, n: int, color: float, rate: int) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1 / f**color, unit RMS."""
    spec = np.fft.rfft(r.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    spec *= 1.0 / np.maximum(f, 20.0) ** (color / 2.0)
    x = np.fft.irfft(spec, n)
    return (x / max(float(np.sqrt(np.mean(x * x))), 1e-12)).astype(np.float64)


def _band_limit(x: np.ndarray, low: float, high: float, rate: int) -> np.ndarray:
    """Smooth 2nd-order-like high-pass at `low` and low-pass at `high` (FFT magnitude mask)."""
    n = len(x)
    f = np.fft.rfftfreq(n, 1.0 / rate)
    mask = (f / low) ** 2 / (1.0 + (f / low) ** 2) / (1.0 + (f / high) ** 4)
    return np.fft.irfft(np.fft.rfft(x) * mask, n)


def render_utterance(text: str, voice: Any, seed: int, length: int, rate: int, *,
                     place: str = "random", speaker: Speaker | None = None) -> np.ndarray:
    """`text` spoken by eSpeak `voice`, resampled to `rate`, placed in a clip of `length`
    samples (place: "center" or "random" from `seed`) and, with a `speaker`, recorded through
    its channel (band limit, noise, gain). float64 in [-1, 1]."""
    from gptfl_hpc.data import espeak
    from gptfl_hpc.seeding import rng

    pcm, native = espeak.speak(text, voice, seed)
    x = resample(pcm.astype(np.float32) / 32768.0, native, rate).astype(np.float64)
    r = rng(int(seed), "speech_embedded.utterance")
    if len(x) >= length:
        a = (len(x) - length) // 2
        clip = x[a:a + length]
    else:
        room = length - len(x)
        a = int(r.integers(0, room + 1)) if place == "random" else room // 2
        clip = np.zeros(length)
        clip[a:a + len(x)] = x
    if speaker is not None:
        clip = _band_limit(clip, speaker.low_hz, speaker.high_hz, rate)
        speech_rms = float(np.sqrt(np.mean(x * x))) if len(x) else 0.0
        noise = _band_noise(r, length, speaker.noise_color, rate)
        clip = clip + noise * speech_rms * 10.0 ** (-speaker.snr_db / 20.0)
        peak = float(np.abs(clip).max())
        if peak > 0:
            clip = clip * (10.0 ** (speaker.peak_dbfs / 20.0) / peak)
    return np.clip(clip, -1.0, 1.0)


def _speak_block(task: tuple) -> tuple[np.ndarray | None, str]:
    """Worker: the utterances of one task: [(text, Voice, seed, Speaker)], rate, length."""
    items, rate, length = task
    out = np.empty((len(items), length), np.int16)
    for i, (text, voice, seed, speaker) in enumerate(items):
        try:
            out[i] = to_pcm16(render_utterance(text, voice, seed, length, rate, speaker=speaker))
        except Exception as e:  # noqa: BLE001 (ctypes / eSpeak errors)
            why = " ".join(str(e).split())[:160] or type(e).__name__
            return None, f"eSpeak NG utterance {text!r} ({voice.name}): {why}"
    return out, ""


def _utterances(seed: int, role: str, speakers: int, words: list[str]) -> tuple[
        list[tuple[str, Any, int, Speaker]], np.ndarray, np.ndarray]:
    """Every utterance of `speakers` speakers of `role`: (text, voice, seed, speaker), labels,
    speaker ids."""
    from gptfl_hpc.data.espeak import Voice
    from gptfl_hpc.seeding import derive

    items, labels, keys = [], [], []
    for s in range(speakers):
        sp = draw_speaker(seed, role, s)
        for w, take in speaker_script(seed, role, s, len(words)):
            u = derive(int(seed), "speech_embedded.take", ESPEAK_ROLE[role], s, w, take)
            jitter = np.random.default_rng(u)
            voice = Voice(sp.accent, sp.variant,
                          rate=int(np.clip(sp.rate * jitter.uniform(0.9, 1.1), 80, 450)),
                          pitch=int(np.clip(sp.pitch + jitter.integers(-5, 6), 0, 99)),
                          pitch_range=sp.pitch_range)
            items.append((words[w], voice, int(u), sp))
            labels.append(w)
            keys.append(s)
    return items, np.asarray(labels, np.int64), np.asarray(keys, np.int64)


def load_speech_embedded(cfg: DataConfig, seed: int) -> Source:
    """The embedded audio default (module docstring): eSpeak NG speakers say command words."""
    from gptfl_hpc.data import espeak
    from gptfl_hpc.data.decode import OrderedPool, cpu_count

    _check_keys(cfg, natural=True)
    if cfg.root:
        raise ConfigError("config key data.root: speech_embedded is made offline and reads no "
                          "files; valid: null")
    rate, length = _check_rate(cfg), clip_length(cfg)
    words = list(cfg.label_names) if cfg.label_names is not None else list(EMBEDDED_WORDS)
    if len(words) < 2 or len(set(words)) != len(words) or not all(w.strip() for w in words):
        raise ConfigError(f"config key data.label_names: {words!r}; valid: two or more distinct "
                          "words for eSpeak NG to say")
    espeak.library()
    espeak.check_deterministic()
    items, labels, keys = _utterances(seed, "client", cfg.num_clients, words)
    per_test = 2 * len(words)
    if cfg.test_size >= 1 and not float(cfg.test_size).is_integer():
        raise ConfigError(f"config key data.test_size: invalid value {cfg.test_size!r}; valid: "
                          "a whole number of test utterances (>= 1) or a fraction (< 1)")
    n_test = int(cfg.test_size) if cfg.test_size >= 1 else \
        max(1, int(round(cfg.test_size * len(labels))))
    test_items, test_labels, _ = _utterances(seed, "test", max(1, -(-n_test // per_test)),
                                             words)
    log.info("speech_embedded: %d words, %d client speakers saying %d utterances, %d held-out "
             "test speakers saying %d; eSpeak NG %s", len(words), cfg.num_clients, len(items),
             len(test_items) // per_test, len(test_items), espeak.version())
    out = []
    with OrderedPool(cfg.workers or cpu_count(), "speech_embedded: synthesising",
                     unit="utterances", advice="reinstall eSpeak NG") as pool:
        for group in (items, test_items):
            tasks = [(group[i:i + BLOCK], rate, length) for i in range(0, len(group), BLOCK)]
            out.append(np.concatenate(list(pool.map(_speak_block, tasks,
                                                    [len(t[0]) for t in tasks]))))
        pool.summary()
    return Source(name="speech_embedded", kind="audio", train_images=out[0], train_labels=labels,
                  label_names=words, test_images=out[1], test_labels=test_labels, keys=keys)
