"""Audio front end: int16 waveforms -> normalised log-mel features, on the device, per batch.

Used by BOTH server pretraining and FL client training (through
:func:`gptfl_hpc.train.transforms.make_transform`), exactly like :class:`ImageTransform` for images.

**Features (FedAudio's, the paper's audio code).** FedAudio computed, per file,
``AmplitudeToDB()(MelSpectrogram(16000, n_fft=1024, win_length=1024, hop_length=160, n_mels=128,
window_fn=torch.hann_window))`` with torchaudio's defaults (``center=True`` with reflect padding,
power 2, HTK mel scale, no filter-area normalisation, ``f_min=0``, ``f_max=sr/2``; dB =
``10 log10(max(p, 1e-10))`` with no ``top_db`` clipping), then normalised each utterance per mel
bin over time (``(x - mean_t) / (std_t + 1e-5)``). :class:`LogMel` computes the same features
without torchaudio (not installable beside this torch):

* the STFT is ONE matrix product of the reflect-padded, framed signal with a fixed real DFT
  basis (periodic Hann window folded in: 513 cosine and 511 sine columns, the two all-zero sine
  columns dropped), so it runs the same code on CPU and GPU, batched. On the CPU the product is
  an MKL SGEMM, whose result does not depend on the thread count in MKL's strict CNR mode
  (``MKL_CBWR=AUTO,STRICT``, see :mod:`gptfl_hpc.numerics`); every reduction on the path keeps
  one thread per output element (see :func:`_row_mean_square`), so the features are bitwise
  the same at any torch thread count (tested).
* the mel filterbank is built in numpy (float64, cast once): HTK mel scale
  ``m = 2595 log10(1 + f / 700)``, triangles between ``n_mels + 2`` points equally spaced in mel
  from f_min to f_max, peak 1, no area (Slaney) normalisation: torchaudio's
  ``melscale_fbanks(norm=None, mel_scale="htk")``. At 128 bins, n_fft 1024, 16 kHz every filter
  covers at least one FFT bin (tested); with more bins or a shorter FFT some low filters would be
  all zero (torchaudio warns), giving the -100 dB floor, which normalisation maps to 0.
* float32 throughout. Results agree with a float64 ``torch.stft`` reference to 1e-3 dB (tested;
  measured 1.3e-4 dB); a sample's features do not depend on the batch it is in (bitwise,
  tested). GPU results are not bitwise equal to CPU ones (and under
  ``torch.backends.cuda.matmul.allow_tf32`` the DFT product runs in TF32: leave it off for the
  front end).
* digital silence (zero padding of short clips, the zero fill of the time shift) sits at the
  -100 dB floor and pulls the per-utterance statistics down; FedAudio normalised variable-length
  clips before padding them. ``top_db`` (off by default, as in FedAudio) clips each utterance at
  ``peak - top_db`` dB, torchaudio's AmplitudeToDB(top_db) semantics, if that matters.

**Normalisation: per utterance** (FedAudio's), not with dataset statistics, because (1) it is
what the paper's audio experiments did; (2) it needs no statistics of the clients' private audio
(a per-dataset mean/std would have to be computed over data the server must not see, or over
synthetic speech whose level differs from real recordings); (3) it removes the gain and channel
differences between synthetic (TTS / AudioLDM) and real recordings, the domain gap GPT-FL's
pretraining has to cross; (4) it is per sample, so independent of batch composition. The
per-utterance map is invariant to any per-bin affine change of the dB features, so the
``mean``/``std`` handed in (the manifest's) are not used in this mode; ``norm="dataset"`` uses
them instead (``(dB - mean) / std``, one value or one per mel bin).

**Augmentation** (``augment=True``), on the waveform before the features, every random number
drawn from the passed CPU ``torch.Generator`` in a fixed order and amount that does not depend on
the data (per batch: B shifts, B noise coin flips, B SNRs, B x L normals), then moved to the
device: identical draws on CPU and GPU, in pretraining and in FL.

* random time shift by up to ``max_shift_s`` (default 0.1 s, the TensorFlow speech-commands
  recipe's 100 ms) either way, the vacated samples zero-filled;
* with probability ``noise_prob`` (default 0.8, that recipe's background frequency) additive
  white Gaussian noise at an SNR drawn uniformly from ``snr_db`` (default 10..30 dB), relative to
  the shifted utterance's mean power (a silent utterance stays silent).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gptfl_hpc.errors import DataError

AMIN = 1e-10
"""Power floor before log10 (torchaudio AmplitudeToDB's amin): -100 dB."""
CMVN_EPS = 1e-5
"""FedAudio's epsilon in (x - mean) / (std + eps)."""


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> np.ndarray:
    """(n_freqs, n_mels) float64 triangular filters on the HTK mel scale, peak 1, no area norm.

    Equal to torchaudio's ``melscale_fbanks(n_freqs, f_min, f_max, n_mels, sample_rate,
    norm=None, mel_scale="htk")``: FFT bin i sits at ``i * (sample_rate // 2) / (n_freqs - 1)``
    Hz; filter m rises linearly from f[m] to f[m+1] and falls to f[m+2], where f are
    ``n_mels + 2`` frequencies equally spaced in mel between f_min and f_max.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    all_freqs = np.linspace(0, sample_rate // 2, n_freqs)
    m_pts = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    f_pts = mel_to_hz(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up))


def dft_basis(n_fft: int) -> np.ndarray:
    """(n_fft, n_fft) float64 real DFT basis with the periodic Hann window folded in.

    Columns 0..n_fft/2 give the real parts of bins 0..n_fft/2, columns n_fft/2+1.. the imaginary
    parts of bins 1..n_fft/2-1 (those of bins 0 and n_fft/2 are identically zero): for a frame
    x, ``x @ basis`` = [Re X_0..Re X_{N/2}, Im X_1..Im X_{N/2-1}] of X = rfft(window * x).
    """
    if n_fft < 4 or n_fft % 2:
        raise ValueError(f"n_fft must be even and >= 4, got {n_fft}")
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)  # torch.hann_window(periodic=True)
    half = n_fft // 2
    # integer phase index (n*k mod N) keeps the angles exact for large n*k
    cos_k = np.arange(half + 1)
    sin_k = np.arange(1, half)
    cos = np.cos(2.0 * np.pi * ((n[:, None] * cos_k[None, :]) % n_fft) / n_fft)
    sin = -np.sin(2.0 * np.pi * ((n[:, None] * sin_k[None, :]) % n_fft) / n_fft)
    return window[:, None] * np.concatenate([cos, sin], axis=1)


def _row_mean_square(x: torch.Tensor) -> torch.Tensor:
    """Mean of x**2 over the last axis of a (B, L) tensor, the same bits at any thread count.

    torch splits a reduction to ONE output over threads (thread-count-dependent order) once the
    input exceeds 32768 elements; with several outputs each output is summed by one thread.
    Summing 256-sample blocks first, then the blocks, keeps several outputs in the first stage
    and fewer than 32768 inputs per output in the second for L < 8.4 million samples.
    """
    b, n = x.shape
    blocks = F.pad(x * x, (0, (-n) % 256)).view(b, -1, 256)
    return blocks.sum(dim=2).sum(dim=1) / n


class LogMel:
    """Batched log-mel spectrogram in dB: float (B, L) waveform -> (B, n_mels, 1 + L // hop).

    See the module docstring for the exact definition (FedAudio's torchaudio settings).
    The DFT basis and filterbank are cached per device.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 1024, hop_length: int = 160,
                 n_mels: int = 128, f_min: float = 0.0, f_max: float | None = None,
                 top_db: float | None = None) -> None:
        if hop_length < 1 or n_mels < 1 or sample_rate < 1:
            raise ValueError("sample_rate, hop_length and n_mels must be >= 1")
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.n_mels, self.top_db = n_mels, top_db
        self.n_freqs = n_fft // 2 + 1
        self._basis = torch.from_numpy(dft_basis(n_fft).astype(np.float32))
        self._fb = torch.from_numpy(
            mel_filterbank(self.n_freqs, n_mels, sample_rate, f_min, f_max).astype(np.float32))
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def num_frames(self, length: int) -> int:
        return 1 + length // self.hop_length

    def _consts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = (self._basis.to(device), self._fb.to(device))
        return self._cache[device]

    def power(self, wave: torch.Tensor) -> torch.Tensor:
        """|STFT|^2: (B, L) -> (B, frames, n_fft // 2 + 1) (center=True, reflect padding)."""
        if wave.dim() != 2 or not wave.is_floating_point():
            raise ValueError(f"LogMel: needs a float (B, L) waveform, got {tuple(wave.shape)} "
                             f"{wave.dtype}")
        half = self.n_fft // 2
        if wave.shape[1] <= half:
            raise ValueError(f"LogMel: waveform of {wave.shape[1]} samples is too short for "
                             f"n_fft {self.n_fft} (needs > {half})")
        basis, _ = self._consts(wave.device)
        padded = F.pad(wave.float()[:, None, :], (half, half), mode="reflect")[:, 0]
        frames = padded.unfold(1, self.n_fft, self.hop_length)  # (B, T, n_fft) view
        spec = torch.matmul(frames, basis)                       # (B, T, n_fft)
        re, im = spec[..., :self.n_freqs], spec[..., self.n_freqs:]
        power = re * re
        power[..., 1:half] += im * im
        return power

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        _, fb = self._consts(wave.device)
        mel = torch.matmul(self.power(wave), fb)                 # (B, T, n_mels)
        db = 10.0 * torch.log10(torch.clamp(mel, min=AMIN))
        if self.top_db is not None:  # per utterance, as torchaudio's AmplitudeToDB(top_db)
            peak = db.amax(dim=(1, 2), keepdim=True)
            db = torch.maximum(db, peak - self.top_db)
        return db.transpose(1, 2).contiguous()                   # (B, n_mels, T)


NORMS = ("utterance", "dataset")


class AudioTransform:
    """int16 (B, L) waveforms -> float32 (B, 1, n_mels, frames) normalised log-mel features.

    The same call contract as :class:`gptfl_hpc.train.transforms.ImageTransform`:
    ``transform(batch, generator)``, attributes ``augment`` and ``output_shape`` (the model's
    (H, W, C) = (n_mels, frames, 1)). Floating-point input is taken as already scaled to
    [-1, 1]; int16 is divided by 32768 (torchaudio.load's scaling, which FedAudio used).
    """

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None,
                 input_shape: Sequence[int], augment: bool, sample_rate: int = 16000,
                 n_mels: int = 128, n_fft: int = 1024, hop_length: int = 160,
                 norm: str = "utterance", max_shift_s: float = 0.1, noise_prob: float = 0.8,
                 snr_db: tuple[float, float] = (10.0, 30.0), top_db: float | None = None
                 ) -> None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1:
            raise DataError(f"audio input_shape must be (L,) (mono waveform samples), got {shape}")
        self.length = shape[0]
        if self.length <= n_fft // 2:
            raise DataError(f"audio clips of {self.length} samples are too short for the log-mel "
                            f"front end: need >= n_fft/2 + 1 = {n_fft // 2 + 1} samples")
        if norm not in NORMS:
            raise ValueError(f"AudioTransform: norm {norm!r}; valid: {', '.join(NORMS)}")
        if not 0.0 <= noise_prob <= 1.0 or max_shift_s < 0 or snr_db[0] > snr_db[1]:
            raise ValueError("AudioTransform: needs 0 <= noise_prob <= 1, max_shift_s >= 0, "
                             "snr_db = (low, high) with low <= high")
        self.logmel = LogMel(sample_rate, n_fft, hop_length, n_mels, top_db=top_db)
        self.augment = augment
        self.norm = norm
        self.max_shift = int(round(max_shift_s * sample_rate))
        self.noise_prob = float(noise_prob)
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self.output_shape = (n_mels, self.logmel.num_frames(self.length), 1)
        self.mean = self.std = None
        if norm == "dataset":
            if mean is None or std is None:
                raise ValueError("AudioTransform: norm='dataset' needs mean and std")
            m = torch.tensor(list(mean), dtype=torch.float32)
            s = torch.tensor(list(std), dtype=torch.float32)
            if m.numel() not in (1, n_mels) or s.numel() != m.numel():
                raise ValueError(f"AudioTransform: mean/std need 1 or {n_mels} values, got "
                                 f"{m.numel()} and {s.numel()}")
            if not bool((s > 0).all()):
                raise ValueError("AudioTransform: std values must be > 0")
            self.mean, self.std = m.view(1, -1, 1), s.view(1, -1, 1)

    def __call__(self, waves: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if waves.dim() != 2 or int(waves.shape[1]) != self.length:
            raise ValueError(f"AudioTransform: expects (B, {self.length}) waveforms, got "
                             f"{tuple(waves.shape)}")
        if waves.dtype == torch.int16:
            x = waves.float().div_(32768.0)
        elif waves.is_floating_point():
            x = waves.float()
        else:
            raise TypeError(f"AudioTransform: int16 or float waveforms, got {waves.dtype}")
        if self.augment:
            x = self.augment_wave(x, generator)
        db = self.logmel(x)  # (B, n_mels, T)
        if self.norm == "utterance":
            mu = db.mean(dim=2, keepdim=True)
            sd = (db - mu).square_().mean(dim=2, keepdim=True).sqrt_()
            out = (db - mu) / (sd + CMVN_EPS)
        else:
            out = (db - self.mean.to(db.device)) / self.std.to(db.device)
        return out.unsqueeze(1)

    def augment_wave(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Random shift (zero fill) + Gaussian noise at a random SNR; see the module docstring."""
        b, n = x.shape
        dev = x.device
        s = self.max_shift
        shift = torch.randint(-s, s + 1, (b,), generator=g)
        apply = torch.rand(b, generator=g) < self.noise_prob
        lo, hi = self.snr_db
        snr = lo + (hi - lo) * torch.rand(b, generator=g, dtype=torch.float64)
        noise = torch.randn(b, n, generator=g)
        if s > 0:
            src = torch.arange(n, device=dev)[None, :] - shift.to(dev)[:, None]  # out[t]=x[t-s]
            valid = (src >= 0) & (src < n)
            x = torch.where(valid, x.gather(1, src.clamp(0, n - 1)), x.new_zeros(()))
        scale = torch.where(apply, 10.0 ** (-snr / 20.0), torch.zeros((), dtype=torch.float64))
        rms = _row_mean_square(x).double().sqrt()
        amp = (rms * scale.to(dev)).float()
        return x + amp[:, None] * noise.to(dev)

