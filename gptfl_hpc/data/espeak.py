"""eSpeak NG text-to-speech through ctypes: the offline speech engine of the embedded audio
default (data source ``speech_embedded``) and of the ``espeak`` generator kind (gen/kinds).

eSpeak NG is a formant synthesiser: no weights, no network, ~100 English voices (8 accents x
~130 voice variants, each variant a set of formant / pitch / breath settings), and it runs at
hundreds of times real time on one core. The library and its voice data come from the PyPI
wheel ``espeakng-loader`` (the ``audio`` extra of setup.py: no root, no apt); a system
``libespeak-ng`` (Debian package ``espeak-ng``) is the fallback.

**Determinism.** eSpeak keeps synthesis state in C statics between utterances (the pitch
"flutter" table index, the wave phase, the echo buffer) and draws breath/Klatt noise from its
own generator, so the same text with the same voice gives different samples depending on what
was said before (measured: 8576, 8573, 8580 samples for three "yes" in a row). Every utterance
here therefore runs in a freshly loaded library (dlopen, espeak_Initialize, synthesis,
espeak_Terminate, dlclose: ~5-10 ms) with its random generator seeded from the utterance's seed
(``espeak_ng_SetRandSeed`` and libc ``srand``, which the Klatt "speechPlayer" voices use): an
utterance is a function of (text, voice, seed) only, whatever ran before it, in any process.
:func:`check_deterministic` verifies that on first use (a library that cannot be unloaded
would fail it with a one-line error instead of silently giving history-dependent data).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from gptfl_hpc.errors import ConfigError, DataError

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4
INSTALL_HINT = ("pip install 'gptfl-hpc[audio]' (the espeakng-loader wheel carries the library "
                "and its voices) or apt-get install espeak-ng")

_LOCK = threading.Lock()
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


@dataclass(frozen=True)
class Voice:
    """What eSpeak speaks with: an accent (language), a voice variant and prosody settings.

    ``rate`` in words per minute (80..450), ``pitch`` and ``pitch_range`` on eSpeak's 0..99
    scales, ``volume`` 0..200 (100 = default)."""

    language: str = "en-us"
    variant: str = ""
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    volume: int = 100

    @property
    def name(self) -> str:
        return f"{self.language}+{self.variant}" if self.variant else self.language


@cache
def library() -> tuple[str, str | None]:
    """(path of libespeak-ng, the directory holding espeak-ng-data or None for the library's
    built-in path). One-line ConfigError when eSpeak NG is not installed."""
    try:
        import espeakng_loader
    except ImportError:
        espeakng_loader = None
    if espeakng_loader is not None:
        lib = espeakng_loader.get_library_path()
        data = os.path.dirname(espeakng_loader.get_data_path())
        if os.path.isfile(lib):
            return lib, data
    found = ctypes.util.find_library("espeak-ng")
    if found:
        return found, None
    raise ConfigError(f"eSpeak NG is not installed (needed by data.source=speech_embedded and "
                      f"the espeak generator); valid: {INSTALL_HINT}")


class _Session:
    """One freshly loaded library: initialise, speak, terminate, unload."""

    def __init__(self) -> None:
        path, data = library()
        self.lib = ctypes.CDLL(path)
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.chunks: list[np.ndarray] = []
        self.rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                               data.encode() if data else None, 0)
        if self.rate <= 0:
            self.close()
            raise DataError(f"eSpeak NG: espeak_Initialize failed ({self.rate}) with the data in "
                            f"{data or 'the default path'}; reinstall it ({INSTALL_HINT})")

        def collect(wav: Any, n: int, _events: Any) -> int:
            if n > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = _CALLBACK(collect)  # kept alive while the library may call it
        self.lib.espeak_SetSynthCallback(self._cb)

    def version(self) -> str:
        return (self.lib.espeak_Info(None) or b"?").decode("ascii", "replace")

    def speak(self, text: str, voice: Voice, seed: int) -> np.ndarray:
        rc = self.lib.espeak_SetVoiceByName(voice.name.encode())
        if rc != 0:
            raise DataError(f"eSpeak NG has no voice {voice.name!r} (error {rc}); valid: a "
                            "language such as en-us with an optional +variant such as +m3")
        for param, value in ((PARAM_RATE, voice.rate), (PARAM_PITCH, voice.pitch),
                             (PARAM_RANGE, voice.pitch_range), (PARAM_VOLUME, voice.volume)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        s = int(seed) % (2**31 - 1)
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(s))
        _libc().srand(ctypes.c_uint(s))
        data = text.encode("utf-8")
        self.chunks.clear()
        rc = self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8,
                                   None, None)
        if rc != 0:
            raise DataError(f"eSpeak NG could not synthesise {text!r} with {voice.name} "
                            f"(error {rc})")
        self.lib.espeak_Synchronize()
        return (np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
                ).astype(np.int16, copy=False)

    def close(self) -> None:
        import _ctypes

        self.lib.espeak_Terminate()
        handle = self.lib._handle
        del self.lib
        _ctypes.dlclose(handle)


@cache
def _libc() -> Any:
    return ctypes.CDLL(None)


def speak(text: str, voice: Voice, seed: int) -> tuple[np.ndarray, int]:
    """int16 samples of `text` spoken by `voice`, and their sampling rate (22050 Hz): a
    function of (text, voice, seed) only (see the module docstring)."""
    if not text.strip():
        raise DataError("eSpeak NG: nothing to say (empty text); valid: a word or phrase")
    with _LOCK:
        session = _Session()
        try:
            wave = session.speak(text, voice, seed)
            rate = session.rate
        finally:
            session.close()
    if not len(wave):
        raise DataError(f"eSpeak NG produced no audio for {text!r} with {voice.name}")
    return wave, rate


@cache
def version() -> str:
    """The eSpeak NG library version, e.g. '1.52.0'."""
    with _LOCK:
        session = _Session()
        try:
            return session.version()
        finally:
            session.close()


@cache
def check_deterministic() -> None:
    """Refuse a library whose output depends on what it said before (module docstring)."""
    voice = Voice("en-us", "m3")
    first, _ = speak("yes", voice, 7)
    speak("left", Voice("en-gb-scotland", "klatt"), 3)
    again, _ = speak("yes", voice, 7)
    if first.tobytes() != again.tobytes():
        raise DataError("eSpeak NG: the same utterance differs after another one (the library "
                        f"{library()[0]} could not be reloaded between utterances), so the "
                        f"speech data would not be reproducible; valid: {INSTALL_HINT}")
