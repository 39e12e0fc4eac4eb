"""Audio front end: HTK mel filterbank, DFT-matmul STFT vs torch.stft, thread-count and batch
invariance of the features, AudioTransform's contract, augmentation and normalisation."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, env

from gptfl_hpc.errors import DataError
from gptfl_hpc.train.audio import (
    AudioTransform,
    LogMel,
    dft_basis,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
)
from gptfl_hpc.train.models import build_model
from gptfl_hpc.train.transforms import ImageTransform, make_transform

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000


def tones(length: int, seed: int = 0) -> torch.Tensor:
    """(1, L) float: two tones + white noise, every mel bin well above the -100 dB floor."""
    t = torch.arange(length, dtype=torch.float64) / SR
    g = torch.Generator().manual_seed(seed)
    x = (0.3 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 3000 * t)
         + 0.05 * torch.randn(length, generator=g, dtype=torch.float64))
    return x[None].float()


def speechish(b: int, length: int, seed: int = 0) -> torch.Tensor:
    """(B, L) int16 test clips: noise bursts of random level in silence."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, generator=g) * torch.rand(b, 1, generator=g) * 8000
    x[:, : length // 5] = 0
    return x.round().clamp(-32768, 32767).to(torch.int16)


# ------------------------------------------------------------------- filterbank and STFT


def test_mel_filterbank_is_htk_without_area_norm():
    n_freqs, n_mels = 513, 128
    fb = mel_filterbank(n_freqs, n_mels, SR)
    assert fb.shape == (n_freqs, n_mels) and fb.dtype == np.float64

    # the reference formula, written out: HTK mel, triangles with peak 1 (torchaudio's
    # melscale_fbanks(norm=None, mel_scale="htk"), what FedAudio's MelSpectrogram used)
    def mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    m_lo, m_hi = mel(0.0), mel(SR / 2)
    pts = [hz(m_lo + (m_hi - m_lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    ref = np.zeros((n_freqs, n_mels))
    for i in range(n_freqs):
        f = i * (SR // 2) / (n_freqs - 1)
        for m in range(n_mels):
            lo, mid, hi = pts[m], pts[m + 1], pts[m + 2]
            rise = (f - lo) / (mid - lo)
            fall = (hi - f) / (hi - mid)
            ref[i, m] = max(0.0, min(rise, fall))
    np.testing.assert_allclose(fb, ref, rtol=0, atol=1e-12)

    # HTK, not Slaney: 1 kHz is ~1000 mel (Slaney's scale gives 15); the scale round-trips
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.02)
    f = np.array([0.0, 123.0, 1000.0, 7999.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, atol=1e-9)
    # no area normalisation: peaks stay <= 1; at these settings every filter covers a bin
    assert fb.max() <= 1.0 and (fb.sum(axis=0) > 0).all()


def test_dft_basis_is_a_windowed_rfft():
    n = 1024
    x = np.random.default_rng(0).standard_normal((3, n))
    window = torch.hann_window(n, dtype=torch.float64).numpy()  # periodic, as torchaudio
    ref = np.fft.rfft(x * window, axis=1)
    out = x @ dft_basis(n)
    np.testing.assert_allclose(out[:, : n // 2 + 1], ref.real, atol=1e-9)
    np.testing.assert_allclose(out[:, n // 2 + 1:], ref.imag[:, 1: n // 2], atol=1e-9)
    assert np.abs(ref.imag[:, [0, n // 2]]).max() < 1e-9  # the two dropped columns are zero


@pytest.mark.parametrize("length", [16000, 80000])
def test_logmel_matches_torch_stft(length):
    lm = LogMel()
    x = tones(length)
    assert lm.num_frames(length) == 1 + length // 160
    spec = torch.stft(x.double(), 1024, 160, 1024, torch.hann_window(1024, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True).abs() ** 2
    power = lm.power(x).transpose(1, 2).double()
    assert power.shape == spec.shape == (1, 513, 1 + length // 160)
    assert float((power - spec).abs().max() / spec.max()) < 1e-5   # float32 rounding
    fb = torch.from_numpy(mel_filterbank(513, 128, SR))
    ref_db = 10.0 * torch.log10(torch.clamp(fb.T @ spec[0], min=1e-10))
    db = lm(x)
    assert db.shape == (1, 128, 1 + length // 160) and db.dtype == torch.float32
    assert float((db[0].double() - ref_db).abs().max()) < 1e-3      # dB


def test_logmel_puts_a_tone_in_the_right_mel_bin():
    t = torch.arange(SR) / SR
    db = LogMel()(torch.sin(2 * math.pi * 1000.0 * t)[None])
    centers = mel_to_hz(np.linspace(0, hz_to_mel(SR / 2), 130))[1:-1]
    assert int(db[0, :, 50].argmax()) == int(np.abs(centers - 1000.0).argmin())
    assert LogMel()(torch.zeros(1, 4000)).unique().tolist() == [-100.0]  # amin 1e-10


def test_top_db_clips_each_utterance_below_its_peak():
    x = speechish(3, 16000).float() / 32768  # a fifth of each clip is digital silence
    plain, clipped = LogMel()(x), LogMel(top_db=80.0)(x)
    assert float(plain.amin()) == -100.0
    peak = plain.amax(dim=(1, 2), keepdim=True)
    assert torch.equal(clipped, torch.maximum(plain, peak - 80.0))
    assert bool((clipped.amin(dim=(1, 2)) == peak.flatten() - 80.0).all())


def test_logmel_does_not_depend_on_the_batch():
    lm = LogMel()
    x = speechish(5, 16000).float() / 32768
    alone = torch.cat([lm(x[i:i + 1]) for i in range(5)])
    assert torch.equal(lm(x), alone)
    assert torch.equal(lm(x[1:4]), alone[1:4])


THREAD_SCRIPT = r"""
import hashlib, json, sys, torch
n = int(sys.argv[1])
torch.set_num_threads(n)
torch.backends.mkldnn.enabled = False
from gptfl_hpc.train.audio import AudioTransform, LogMel
g = torch.Generator().manual_seed(5)
out = {"threads": torch.get_num_threads()}
for b, length in ((1, 80000), (3, 16000), (8, 80000)):
    w = (torch.randn(b, length, generator=g) * 4000).to(torch.int16)
    feats = LogMel()(w.float() / 32768).numpy().tobytes()
    aug = AudioTransform(None, None, (length,), True)(w, torch.Generator().manual_seed(9))
    out[f"{b}x{length}"] = hashlib.sha256(feats + aug.numpy().tobytes()).hexdigest()
print(json.dumps(out))
"""


def test_features_do_not_depend_on_the_thread_count():
    """Bitwise, in the numerics mode of gptfl_hpc.numerics (strict MKL, no oneDNN)."""
    results = []
    for n in (1, 2):
        p = subprocess.run([sys.executable, "-c", THREAD_SCRIPT, str(n)], capture_output=True,
                           text=True, timeout=180, cwd=REPO,
                           env=env(MKL_CBWR="AUTO,STRICT", OMP_NUM_THREADS=str(n)))
        assert p.returncode == 0, p.stderr[-3000:]
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert [r.pop("threads") for r in results] == [1, 2]
    assert results[0] == results[1]


# ------------------------------------------------------------------------- AudioTransform


def test_transform_contract_and_factory():
    tf = AudioTransform([0.0], [1.0], (16000,), False)
    x = speechish(4, 16000)
    out = tf(x)
    assert out.shape == (4, 1, 128, 101) and out.dtype == torch.float32
    assert tf.output_shape == (128, 101, 1) and tf.augment is False
    assert torch.equal(tf(x.float() / 32768), out)  # int16 is scaled by 1/32768

    audio = make_transform("audio", [0.0], [1.0], [80000], True)
    assert isinstance(audio, AudioTransform) and audio.augment
    assert audio.output_shape == (128, 501, 1)
    image = make_transform("image", [0.5], [0.25], [8, 8, 1], False)
    assert isinstance(image, ImageTransform) and image.output_shape == (8, 8, 1)
    assert ImageTransform([0.5] * 3, [0.2] * 3, (32, 32, 3), True).output_shape == (32, 32, 3)
    with pytest.raises(DataError, match="valid: image, audio"):
        make_transform("features", [0.0], [1.0], [10], False)


def test_transform_rejects_bad_input():
    with pytest.raises(DataError, match="too short"):  # shapes come from the manifest
        AudioTransform(None, None, (400,), False)
    with pytest.raises(DataError, match=r"\(L,\)"):
        make_transform("audio", None, None, (128, 101, 1), False)
    tf = AudioTransform(None, None, (16000,), False)
    with pytest.raises(ValueError, match=r"\(B, 16000\)"):
        tf(torch.zeros(2, 8000, dtype=torch.int16))
    with pytest.raises(TypeError, match="int16 or float"):
        tf(torch.zeros(2, 16000, dtype=torch.int32))


def test_no_augmentation_is_deterministic_and_draws_nothing():
    tf = AudioTransform(None, None, (16000,), False)
    x = speechish(3, 16000)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a, b = tf(x, g), tf(x, g)
    assert torch.equal(a, b)
    assert torch.equal(g.get_state(), state)


def test_augmentation_comes_from_the_generator_only():
    tf = AudioTransform(None, None, (16000,), True)
    x = speechish(6, 16000)
    a = tf(x, torch.Generator().manual_seed(11))
    torch.manual_seed(123)  # the global RNG plays no part
    b = tf(x, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert not torch.equal(a, tf(x, torch.Generator().manual_seed(12)))
    assert not torch.equal(a, AudioTransform(None, None, (16000,), False)(x))
    # the number of draws does not depend on the data: the generator ends in the same state
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    tf(x, g1)
    tf(speechish(6, 16000, seed=99), g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_time_shift_zero_fills():
    length, max_shift = 4000, 160
    tf = AudioTransform(None, None, (length,), True, max_shift_s=max_shift / SR, noise_prob=0.0)
    x = torch.randn(8, length, generator=torch.Generator().manual_seed(0))
    out = tf.augment_wave(x, torch.Generator().manual_seed(1))
    shifts = []
    for row, src in zip(out, x):
        found = [s for s in range(-max_shift, max_shift + 1)
                 if torch.equal(row, F.pad(src, (s, 0))[:length] if s >= 0
                                else F.pad(src, (0, -s))[-s:])]
        assert len(found) == 1
        shifts.append(found[0])
    assert len(set(shifts)) > 1


def test_noise_has_the_drawn_snr_and_spares_silence():
    length = 16000
    tf = AudioTransform(None, None, (length,), True, max_shift_s=0.0, noise_prob=1.0,
                        snr_db=(20.0, 20.0))
    x = torch.randn(4, length, generator=torch.Generator().manual_seed(0)) * 0.1
    x[3] = 0.0
    out = tf.augment_wave(x, torch.Generator().manual_seed(2))
    noise = (out - x).double()
    signal = x.double()
    snr = 10 * torch.log10(signal[:3].pow(2).mean(1) / noise[:3].pow(2).mean(1))
    # the noise power estimate over 16,000 samples has a relative sd of sqrt(2/16000) ~ 1.1%
    # (0.05 dB): 0.3 dB is 6 sd
    assert torch.allclose(snr, torch.full_like(snr, 20.0), atol=0.3), snr
    assert bool((out[3] == 0).all())
    # noise_prob 0 adds nothing
    none = AudioTransform(None, None, (length,), True, max_shift_s=0.0, noise_prob=0.0)
    assert torch.equal(none.augment_wave(x, torch.Generator().manual_seed(2)), x)


def test_per_utterance_normalisation_is_fedaudios():
    tf = AudioTransform([-40.0], [20.0], (16000,), False)  # mean/std unused in this mode
    x = speechish(3, 16000)
    out = tf(x)[:, 0].double().numpy()
    db = LogMel()(x.float() / 32768).double().numpy()
    # FedAudio: features (T, F); (f - mean(axis=0)) / (std(axis=0) + 1e-5), per utterance
    for i in range(3):
        f = db[i].T
        ref = (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-5)
        np.testing.assert_allclose(out[i].T, ref, atol=2e-5)
    assert np.abs(out.mean(axis=2)).max() < 1e-5
    assert np.allclose(out.std(axis=2), 1.0, atol=1e-3)
    assert torch.equal(AudioTransform(None, None, (16000,), False)(x), tf(x))


def test_dataset_normalisation():
    mean = np.linspace(-60, -20, 128)
    std = np.linspace(5, 15, 128)
    tf = AudioTransform(mean.tolist(), std.tolist(), (16000,), False, norm="dataset")
    x = speechish(2, 16000)
    db = LogMel()(x.float() / 32768).double().numpy()
    ref = (db - mean[None, :, None]) / std[None, :, None]
    np.testing.assert_allclose(tf(x)[:, 0].double().numpy(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1 or 128 values"):
        AudioTransform([0.0, 1.0], [1.0, 1.0], (16000,), False, norm="dataset")
    with pytest.raises(ValueError, match="valid: utterance, dataset"):
        AudioTransform(None, None, (16000,), False, norm="global")


@pytest.mark.parametrize("name", ["audio_crnn", "audio_cnn"])
def test_one_training_step_on_transformed_audio(name):
    tf = make_transform("audio", [0.0], [1.0], [16000], True)
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(name=name, width=128, depth=3), tf.output_shape, 35)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = tf(speechish(4, 16000), torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 7, 34])
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
