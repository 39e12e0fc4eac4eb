"""Audio readers (gptfl_hpc/data/audio.py): Speech Commands, ESC-50 and audio-folder layouts
written here as real WAV/FLAC files, the embedded eSpeak NG source, resampling and mix-down,
worker-count invariance, the speaker (natural) partition, and one-line errors for bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gptfl_hpc.config import DataConfig, load_config
from gptfl_hpc.data import audio
from gptfl_hpc.data.manifest import Manifest
from gptfl_hpc.data.prepare import prepare_data
from gptfl_hpc.data.shards import read_shard
from gptfl_hpc.data.sources import load_source
from gptfl_hpc.errors import ConfigError, DataError, GptflError

SR = 16000


def tone(freq: float, seconds: float, rate: int, channels: int = 1, amp: float = 0.5
         ) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([x * (1 - 0.5 * c) for c in range(channels)], axis=1) if channels > 1 else x


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# Speech Commands


def make_speech_commands(root: Path, words=("yes", "no", "up"), speakers=4, takes=2,
                         seconds: float = 0.6) -> Path:
    """A Speech Commands v0.02 tree: <word>/<speaker>_nohash_<n>.wav, the two lists, noise."""
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"{0xa0b0c0 + 17 * s:08x}" for s in range(speakers)]
    val, test = [], []
    for w_i, w in enumerate(words):
        (root / w).mkdir(exist_ok=True)
        for s_i, sid in enumerate(ids):
            for n in range(takes):
                rel = f"{w}/{sid}_nohash_{n}.wav"
                sf.write(root / rel, tone(300 + 100 * w_i + 10 * s_i, seconds, SR), SR,
                         subtype="PCM_16")
                if s_i == speakers - 1:
                    test.append(rel)
                elif s_i == speakers - 2 and n == 0:
                    val.append(rel)
    (root / "_background_noise_").mkdir(exist_ok=True)
    sf.write(root / "_background_noise_" / "white.wav", tone(50, 1.5, SR), SR)
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    return root


def sc_cfg(root: Path, **kw) -> DataConfig:
    base = {"source": "speech_commands", "root": str(root), "partition": "natural",
            "num_clients": 3, "workers": 1}
    return DataConfig(**{**base, **kw})


def test_speech_commands_layout_split_and_speaker_partition(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    out = tmp_path / "prepared"
    m = prepare_data(sc_cfg(root), seed=0, out_dir=out)
    assert m.kind == "audio" and m.input_shape == [SR] and m.label_names == ["no", "up", "yes"]
    assert m.num_classes == 3 and m.norm_mean == [0.0] and m.norm_std == [1.0]
    # 3 training speakers (the 4th is the test speaker); the validation take is held out
    assert m.num_clients == 3 and m.test.num_samples == 3 * 2
    assert m.num_train == 3 * 3 * 2 - 3  # 3 words x 3 speakers x 2 takes, minus 3 validation
    sizes = sorted(c.num_samples for c in m.clients)
    assert sizes == [3, 6, 6]  # speaker 2 lost its validation takes
    x, y, attrs = read_shard(out / m.clients[0].file, num_classes=3, input_shape=(SR,))
    assert x.dtype == np.int16 and x.shape == (6, SR) and attrs["kind"] == "audio"
    # the 0.6 s clips are zero-padded at the end; the tone is intact (amplitude 0.5)
    assert np.all(x[:, int(0.6 * SR) + 1:] == 0)
    assert abs(int(np.abs(x[:, :9000]).max()) - 16384) < 20
    # one client per speaker: a client's clips are one speaker's words (one take of each word
    # per tone frequency step) -- read back the frequencies: speaker s has +10 s Hz
    spec = np.abs(np.fft.rfft(x[:, :int(0.6 * SR)].astype(np.float64), axis=1))
    freqs = spec.argmax(axis=1) / 0.6
    offsets = {round(f - 100 * round((f - 300) / 100) - 300) for f in freqs}
    assert len(offsets) == 1  # the same speaker offset in every clip of the client


def test_speech_commands_natural_needs_the_speaker_count(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    with pytest.raises(ConfigError, match=r"data.num_clients: invalid value 5; the natural key "
                                          r"has 3 distinct values, so valid: 3") as e:
        prepare_data(sc_cfg(root, num_clients=5), seed=0, out_dir=tmp_path / "o")
    one_line(e)
    # a Dirichlet partition of the same pool works too
    m = prepare_data(sc_cfg(root, partition="dirichlet", num_clients=2, alpha=1.0,
                            min_client_size=2), seed=0, out_dir=tmp_path / "d")
    assert m.num_clients == 2 and m.num_train == 15


def test_speech_commands_bad_inputs_are_one_line(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    # a file at another sampling rate: a wrong or damaged copy
    bad = root / "up" / f"{0xa0b0c0:08x}_nohash_1.wav"
    sf.write(bad, tone(300, 0.5, 8000), 8000)
    with pytest.raises(DataError) as e:
        load_source(sc_cfg(root), 0)
    msg = one_line(e)
    assert str(bad) in msg and "8000 Hz" in msg and "16000 Hz" in msg
    # an unreadable file
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    with pytest.raises(DataError) as e:
        load_source(sc_cfg(root), 0)
    assert str(bad) in one_line(e) and "cannot use this audio file" in str(e.value)
    bad.unlink()
    # an empty word folder
    (root / "wow").mkdir()
    with pytest.raises(DataError, match=r"wow: no \.wav files") as e:
        load_source(sc_cfg(root), 0)
    one_line(e)
    (root / "wow").rmdir()
    # a file that does not follow the speaker naming convention
    sf.write(root / "up" / "someone.wav", tone(300, 0.5, SR), SR)
    with pytest.raises(DataError, match="<speaker>_nohash_<n>.wav") as e:
        load_source(sc_cfg(root), 0)
    one_line(e)
    (root / "up" / "someone.wav").unlink()
    # a list naming a missing file
    (root / "testing_list.txt").write_text("up/ffffffff_nohash_9.wav\n")
    with pytest.raises(DataError, match="testing_list.txt line 1") as e:
        load_source(sc_cfg(root), 0)
    one_line(e)
    with pytest.raises(DataError, match="no speech_commands layout") as e:
        load_source(sc_cfg(tmp_path / "nowhere"), 0)
    assert "speech_commands_v0.02.tar.gz" in one_line(e)


def test_decoding_is_byte_identical_for_any_worker_count(tmp_path):
    root = make_speech_commands(tmp_path / "sc", speakers=5, takes=3)
    one = load_source(sc_cfg(root, num_clients=4, workers=1), 0)
    two = load_source(sc_cfg(root, num_clients=4, workers=2), 0)
    assert one.train_images.tobytes() == two.train_images.tobytes()
    assert one.test_images.tobytes() == two.test_images.tobytes()
    assert np.array_equal(one.keys, two.keys)


# --------------------------------------------------------------------------------------------
# ESC-50


def make_esc50(root: Path, classes=("dog", "rooster", "rain"), per_fold: int = 1,
               seconds: float = 0.5) -> Path:
    d = root / "ESC-50-master"
    (d / "audio").mkdir(parents=True)
    (d / "meta").mkdir()
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for t, cat in enumerate(classes):
            for k in range(per_fold):
                name = f"{fold}-{1000 + 10 * t + k}-A-{t}.wav"
                sf.write(d / "audio" / name, tone(200 + 150 * t, seconds, audio.ESC50_RATE,
                                                  channels=2), audio.ESC50_RATE)
                lines.append(f"{name},{fold},{t},{cat},False,{1000 + t},A")
    (d / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root


def esc_cfg(root: Path, **kw) -> DataConfig:
    base = {"source": "esc50", "root": str(root), "partition": "dirichlet", "alpha": 1.0,
            "num_clients": 2, "min_client_size": 1, "clip_seconds": 0.5, "workers": 1}
    return DataConfig(**{**base, **kw})


def test_esc50_fold_split_mixdown_and_resampling(tmp_path):
    root = make_esc50(tmp_path / "esc")
    src = load_source(esc_cfg(root), 0)
    assert src.kind == "audio" and src.label_names == ["dog", "rooster", "rain"]
    assert src.train_images.shape == (12, 8000) and src.test_images.shape == (3, 8000)
    assert sorted(src.test_labels.tolist()) == [0, 1, 2]
    # stereo (0.5 and 0.25 amplitude) mixed down to the mean: 0.375; 44.1 kHz -> 16 kHz keeps
    # the frequency of every tone
    x = src.test_images.astype(np.float64) / 32767
    assert np.allclose(np.abs(x[:, 200:7800]).max(axis=1), 0.375, atol=0.01)
    peak = np.abs(np.fft.rfft(x, axis=1)).argmax(axis=1) / 0.5
    assert np.allclose(sorted(peak), [200, 350, 500], atol=2)
    # another test fold; the default clip length is 5 s (zero-padded here)
    other = load_source(esc_cfg(root, test_fold=2, clip_seconds=0.0), 0)
    assert other.test_images.shape == (3, 5 * SR)
    assert np.all(other.test_images[:, 8001:] == 0)
    m = prepare_data(esc_cfg(root), seed=0, out_dir=tmp_path / "p")
    assert m.kind == "audio" and m.num_train == 12 and m.partition == "dirichlet"


def test_esc50_bad_inputs_are_one_line(tmp_path):
    root = make_esc50(tmp_path / "esc")
    d = root / "ESC-50-master"
    with pytest.raises(ConfigError, match="speech_commands / speech_embedded: one client per "
                                          "speaker") as e:
        load_source(esc_cfg(root, partition="natural"), 0)
    one_line(e)
    with pytest.raises(ConfigError, match="data.test_fold: only for data.source=esc50") as e:
        load_source(DataConfig(source="audio_folder", root=str(root), test_fold=2), 0)
    one_line(e)
    wav = sorted((d / "audio").iterdir())[0]
    sf.write(wav, tone(200, 0.5, 22050), 22050)
    with pytest.raises(DataError) as e:
        load_source(esc_cfg(root), 0)
    assert str(wav) in one_line(e) and "44100 Hz" in str(e.value)
    wav.unlink()
    with pytest.raises(DataError, match="listed in .*esc50.csv but not found") as e:
        load_source(esc_cfg(root), 0)
    one_line(e)
    (d / "meta" / "esc50.csv").write_text("filename,fold\nx.wav,1\n")
    with pytest.raises(DataError, match="the ESC-50 header") as e:
        load_source(esc_cfg(root), 0)
    one_line(e)


# --------------------------------------------------------------------------------------------
# audio_folder


def test_audio_folder_rates_formats_and_splits(tmp_path):
    root = tmp_path / "af"
    for c, (rate, fmt) in enumerate(((8000, "WAV"), (22050, "FLAC"), (48000, "WAV"))):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(5):
            sf.write(root / f"class{c}" / f"{k}.{fmt.lower()}",
                     tone(250 + 100 * k, 0.4, rate, channels=1 + (c == 2)), rate, format=fmt)
    cfg = DataConfig(source="audio_folder", root=str(root), test_size=3, num_clients=2,
                     partition="iid", workers=1, clip_seconds=0.4)
    src = load_source(cfg, 0)
    assert src.train_images.shape == (12, 6400) and src.test_images.shape == (3, 6400)
    assert sorted(np.bincount(src.test_labels).tolist()) == [1, 1, 1]
    # every rate lands at 16 kHz with its tone at the right frequency
    for x, y in zip(src.train_images, src.train_labels):
        f = np.abs(np.fft.rfft(x.astype(np.float64))).argmax() / 0.4
        assert any(abs(f - (250 + 100 * k)) < 5 for k in range(5)), (y, f)
    # train/ + test/ folders
    split = tmp_path / "split"
    for part, n in (("train", 3), ("test", 1)):
        for c in ("a", "b"):
            (split / part / c).mkdir(parents=True)
            for k in range(n):
                sf.write(split / part / c / f"{k}.wav", tone(440, 0.2, SR), SR)
    s2 = load_source(dataclasses.replace(cfg, root=str(split), test_size=360), 0)
    assert s2.train_images.shape == (6, 6400) and s2.test_images.shape == (2, 6400)
    (split / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"train/c: no audio files") as e:
        load_source(dataclasses.replace(cfg, root=str(split)), 0)
    one_line(e)
    (split / "train" / "c").rmdir()
    (split / "test" / "zzz").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) zzz are not in") as e:
        load_source(dataclasses.replace(cfg, root=str(split)), 0)
    one_line(e)


def test_audio_bad_config_values_are_one_line(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    with pytest.raises(ConfigError, match="data.sample_rate: 8000 Hz is not supported") as e:
        load_source(sc_cfg(root, sample_rate=8000), 0)
    one_line(e)
    with pytest.raises(ConfigError, match="at least 1024 samples") as e:
        load_source(sc_cfg(root, clip_seconds=0.01), 0)
    one_line(e)
    with pytest.raises(ConfigError, match="data.test_fold") as e:
        DataConfig(source="esc50", root="x", test_fold=6)
    one_line(e)
    with pytest.raises(ConfigError, match="data.natural_key") as e:
        DataConfig(source="audio_folder", root="x", partition="natural")
    one_line(e)
    with pytest.raises(ConfigError, match="data.root: speech_embedded is made offline") as e:
        load_source(DataConfig(source="speech_embedded", root=str(root)), 0)
    one_line(e)


def test_resample_and_pcm_conversion():
    x = tone(1000, 1.0, 44100).astype(np.float32)
    y = audio.resample(x, 44100, 16000)
    assert len(y) == 16000 and abs(np.abs(np.fft.rfft(y)).argmax() - 1000) <= 1
    assert abs(np.abs(y[1000:15000]).max() - 0.5) < 0.01
    assert np.array_equal(audio.resample(x, 16000, 16000), x)
    assert audio.to_pcm16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])).tolist() == \
        [-32767, -32767, 0, 16384, 32767, 32767]
    assert audio.fit(np.arange(5), 3).tolist() == [0, 1, 2]
    assert audio.fit(np.arange(2), 4).tolist() == [0, 1, 0, 0]


# --------------------------------------------------------------------------------------------
# speech_embedded (eSpeak NG)


def emb_cfg(**kw) -> DataConfig:
    base = {"source": "speech_embedded", "num_clients": 3, "partition": "natural",
            "test_size": 20, "workers": 1}
    return DataConfig(**{**base, **kw})


def test_speech_embedded_is_deterministic_and_speaker_split(tmp_path):
    a = load_source(emb_cfg(), 0)
    b = load_source(emb_cfg(workers=2), 0)
    assert a.kind == "audio" and a.label_names == list(audio.EMBEDDED_WORDS)
    assert a.train_images.dtype == np.int16 and a.train_images.shape[1] == SR
    assert a.train_images.tobytes() == b.train_images.tobytes()  # any worker count
    assert a.test_images.tobytes() == b.test_images.tobytes()
    assert a.test_images.shape == (20, SR)  # one held-out speaker says every word twice
    assert sorted(np.unique(a.keys).tolist()) == [0, 1, 2]
    # each speaker says some words (>= 3), some of them several times: label skew per speaker
    for s in range(3):
        words = np.unique(a.train_labels[a.keys == s])
        assert 3 <= len(words) <= 10
    # real speech, not silence, placed inside the 1 s clip, below full scale
    peak = np.abs(a.train_images).max(axis=1)
    assert (peak > 2000).all() and (peak < 32767).all()
    c = load_source(emb_cfg(), 1)  # another seed: other speakers
    assert c.train_images.tobytes() != a.train_images.tobytes()
    m = prepare_data(emb_cfg(), seed=0, out_dir=tmp_path / "p")
    assert m.kind == "audio" and m.num_clients == 3 and m.public is None
    assert Manifest.load(tmp_path / "p").dataset == "speech_embedded"


def test_speech_embedded_voices_never_meet_the_server_voices():
    from gptfl_hpc.pipeline import ASSETS

    shipped = json.loads((ASSETS / "espeak-generator" / "espeak_generator.json").read_text())
    server = {v["variant"] for v in shipped["voices"]}
    assert server == set(audio.SERVER_VARIANTS)
    assert not server & set(audio.PEOPLE_VARIANTS)
    people = {audio.draw_speaker(s, role, i).variant for s in range(3)
              for role in ("client", "test") for i in range(200)}
    assert not people & server and len(people) > 40
    assert audio.draw_speaker(0, "client", 0) != audio.draw_speaker(0, "test", 0)


def test_speech_embedded_words_and_config():
    src = load_source(emb_cfg(label_names=["alpha", "bravo"], num_clients=2, test_size=8), 0)
    assert src.label_names == ["alpha", "bravo"] and src.test_images.shape == (8, SR)
    with pytest.raises(ConfigError, match="two or more distinct words") as e:
        load_source(emb_cfg(label_names=["a", "a"]), 0)
    one_line(e)
    cfg = load_config("configs/speech.yaml")
    assert cfg.data.source == "speech_embedded" and cfg.data.partition == "natural"


def test_espeak_utterance_depends_on_its_inputs_only():
    from gptfl_hpc.data import espeak

    v = espeak.Voice("en-us", "m3", rate=160)
    first, rate = espeak.speak("stop", v, 11)
    espeak.speak("go", espeak.Voice("en-gb-scotland", "klatt"), 2)
    again, _ = espeak.speak("stop", v, 11)
    assert rate == 22050 and first.dtype == np.int16 and first.tobytes() == again.tobytes()
    slow, _ = espeak.speak("stop", espeak.Voice("en-us", "m3", rate=100), 11)
    assert len(slow) > 1.3 * len(first)  # the rate is applied
    with pytest.raises(GptflError, match="no voice") as e:
        espeak.speak("stop", espeak.Voice("xx-nowhere", ""), 1)
    one_line(e)
