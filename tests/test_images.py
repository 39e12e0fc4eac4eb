"""Image-folder sources (gptfl_hpc/data/images.py): every reader on small generated folders in its
official layout, decoding (modes, resize policy, bad files), and `prepare` into shards: shapes,
labels that follow the files, splits, determinism across decode worker counts."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gptfl_hpc.config import DataConfig
from gptfl_hpc.data import images as im
from gptfl_hpc.data.manifest import Manifest
from gptfl_hpc.data.prepare import PixelStats, prepare_data, stream_shard
from gptfl_hpc.data.shards import read_shard, write_shard
from gptfl_hpc.data.sources import load_source
from gptfl_hpc.errors import ConfigError, DataError, Preempted

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

S = 8  # task resolution in these tests (data.image_size)


def _h(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _picture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random picture (survives JPEG) with a random offset: distinct per call."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    slope = rng.uniform(-4, 4, (2, 3))
    img = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def _write(path: Path, rng: np.random.Generator, w: int = 24, h: int = 18, mode: str = "RGB",
           fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(_picture(rng, w, h), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"))
    return path


def _class_of(files: dict[str, list[Path]], resize: str = "center_crop") -> dict[str, str]:
    """decoded-image hash -> class, for every file (the ground truth of the labels)."""
    out = {}
    for cls, paths in files.items():
        for p in paths:
            out[_h(im.decode_image(str(p), S, resize))] = cls
    return out


def _read_all(m: Manifest, d: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]],
                                             tuple[np.ndarray, np.ndarray]]:
    return [m.read_client(d, c.id) for c in m.clients], m.read_test(d)


def _check_labels(m: Manifest, d: Path, truth: dict[str, str]) -> tuple[Counter, Counter]:
    """Every stored image is one of the files, with the label of its class folder; returns the
    per-class counts of the clients' pool and of the test split."""
    clients, test = _read_all(m, d)
    counts: list[Counter] = []
    for parts in (clients, [test]):
        c: Counter = Counter()
        for x, y in parts:
            assert x.dtype == np.uint8 and x.shape[1:] == (S, S, 3)
            for row, label in zip(x, y):
                assert truth[_h(row)] == m.label_names[label], (truth[_h(row)], label)
                c[m.label_names[label]] += 1
        counts.append(c)
    seen = [_h(r) for x, _ in clients for r in x] + [_h(r) for r in test[0]]
    assert len(seen) == len(set(seen)), "a file landed twice"
    return counts[0], counts[1]


# --------------------------------------------------------------------------------------------
# decoding


def test_decode_modes_and_resize_policies(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = _write(tmp_path / "gray.png", rng, mode="L")
    cmyk = _write(tmp_path / "cmyk.jpg", rng, mode="CMYK")
    pal = tmp_path / "pal.png"
    Image.fromarray(_picture(rng, 20, 20)).convert("P").save(pal, transparency=0)
    rgba = _write(tmp_path / "rgba.png", rng, mode="RGBA")
    big = _write(tmp_path / "big.jpg", rng, w=512, h=384)
    deep = tmp_path / "deep.png"  # 16-bit grayscale
    Image.fromarray(np.full((10, 10), 65535, np.uint16)).save(deep)
    for p in (gray, cmyk, pal, rgba, big, deep):
        x = im.decode_image(str(p), S)
        assert x.shape == (S, S, 3) and x.dtype == np.uint8, p
    g = im.decode_image(str(gray), S)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    assert im.decode_image(str(deep), S).min() == 255  # scaled to 8 bit, not clipped to 0..255
    # a wide image: black left and right, white in the middle (a bit wider than the central
    # square: the antialiasing filter reads pixels just outside it)
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 7:33] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    crop = im.decode_image(str(tmp_path / "wide.png"), S, "center_crop")
    stretch = im.decode_image(str(tmp_path / "wide.png"), S, "stretch")
    assert crop.min() == 255  # the central square only
    assert stretch[:, 0].max() == 0 and stretch[:, S // 2].min() == 255
    # JPEG draft mode: a 4x larger JPEG decodes through DCT scaling, same result shape
    assert im.decode_image(str(big), 64).shape == (64, 64, 3)


def test_bad_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "raw"
    for c in ("a", "b"):
        for i in range(4):
            _write(root / c / f"{i}.jpg", rng)
    bad = root / "b" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    (root / "a" / "notes.txt").write_text("not an image: ignored by suffix")
    cfg = DataConfig(source="image_folder", root=str(root), image_size=S, test_size=2,
                     num_clients=2, partition="iid", workers=2)
    with pytest.raises(DataError, match=r"b/2.jpg: .*cannot decode this image") as e:
        prepare_data(cfg, seed=0, out_dir=tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_stream_shard_equals_write_shard(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (37, 5, 5, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 37)
    attrs = {"dataset": "t", "client_id": 3, "split": "client", "label_names": list("abcd"),
             "partition": "iid", "seed": 7}
    a = write_shard(tmp_path / "a.h5", x, y, attrs)
    blocks = iter([x[i:i + 8] for i in range(0, 37, 8)])
    b = stream_shard(tmp_path / "b.h5", blocks, 37, (5, 5, 3), y, attrs)
    assert a == b
    xa, ya, aa = read_shard(tmp_path / "a.h5")
    xb, yb, ab = read_shard(tmp_path / "b.h5")
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and aa == ab
    # the statistics from value counts: any blocking, same numbers as float64 sums
    stats = PixelStats(3)
    for i in range(0, 37, 5):
        stats.add(x[i:i + 5])
    b = x.astype(np.float64) / 255.0
    m = b.mean(axis=(0, 1, 2))
    s = np.sqrt((b * b).mean(axis=(0, 1, 2)) - m * m)
    assert stats.result() == ([round(float(v), 6) for v in m], [round(float(v), 6) for v in s])


# --------------------------------------------------------------------------------------------
# image_folder: split folders, flat folders with test_size, a split file


def _folder(root: Path, classes: dict[str, int], rng: np.random.Generator,
            suffixes: tuple[str, ...] = (".jpg", ".png")) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for c, n in classes.items():
        files[c] = [_write(root / c / f"img{i:03d}{suffixes[i % len(suffixes)]}", rng,
                           w=20 + i % 7, h=16 + i % 5) for i in range(n)]
    return files


def test_image_folder_train_test_folders_and_worker_invariance(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    train = _folder(raw / "train", {"cat": 9, "dog": 7, "eel": 8}, rng)
    test = _folder(raw / "test", {"cat": 2, "dog": 3, "eel": 1}, rng)
    # a CMYK and a grayscale image in the pool: converted, not refused
    train["cat"].append(_write(raw / "train/cat/cmyk.jpg", rng, mode="CMYK"))
    train["dog"].append(_write(raw / "train/dog/sub/gray.png", rng, mode="L"))  # nested folder
    truth = _class_of({c: train[c] + test[c] for c in train})
    out = {}
    for w in (1, 2):
        cfg = DataConfig(source="image_folder", root=str(raw), image_size=S, num_clients=3,
                         alpha=0.5, min_client_size=2, workers=w)
        out[w] = prepare_data(cfg, seed=0, out_dir=tmp_path / f"w{w}")
    m = out[1]
    assert m.dataset == "image_folder" and m.kind == "image" and m.input_shape == [S, S, 3]
    assert m.label_names == ["cat", "dog", "eel"] and m.num_train == 26
    pool, tst = _check_labels(m, tmp_path / "w1", truth)
    assert pool == {"cat": 10, "dog": 8, "eel": 8} and tst == {"cat": 2, "dog": 3, "eel": 1}
    # byte-identical shards and manifest for any number of decode processes
    assert [c.sha256 for c in out[2].clients] == [c.sha256 for c in m.clients]
    assert out[2].test.sha256 == m.test.sha256 and out[2].norm_std == m.norm_std
    assert (tmp_path / "w1/manifest.json").read_bytes() == \
        (tmp_path / "w2/manifest.json").read_bytes()
    # the normalisation is the private pool's (clients only), as for in-memory sources
    stats = PixelStats(3)
    for x, _ in _read_all(m, tmp_path / "w1")[0]:
        stats.add(x)
    assert (m.norm_mean, m.norm_std) == stats.result()


def test_image_folder_flat_and_split_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    raw = tmp_path / "raw"
    files = _folder(raw, {"ant": 6, "bee": 6}, rng)
    truth = _class_of(files)
    cfg = DataConfig(source="image_folder", root=str(raw), image_size=S, num_clients=2,
                     partition="iid", test_size=0.25, workers=1)
    m = prepare_data(cfg, seed=0, out_dir=tmp_path / "flat")
    pool, tst = _check_labels(m, tmp_path / "flat", truth)
    assert tst == {"ant": 2, "bee": 1}  # 3 of 12, stratified: 1.5 each, the tie to class 0
    assert sum(pool.values()) == 9
    # a split file inside the root assigns the files; unlisted ones are not used
    lines = ["# path,split", "ant/img000.jpg,test", "bee/img001.png,test"]
    lines += [f"{c}/{p.name},train" for c in ("ant", "bee") for p in files[c][2:]]
    (raw / "split.csv").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="image_folder", root=str(raw), image_size=S, num_clients=2,
                     partition="iid", split_file="split.csv", workers=1)
    m = prepare_data(cfg, seed=0, out_dir=tmp_path / "csv")
    pool, tst = _check_labels(m, tmp_path / "csv", truth)
    assert tst == {"ant": 1, "bee": 1} and pool == {"ant": 4, "bee": 4}
    x, _ = m.read_test(tmp_path / "csv")
    assert _h(x[0]) == _h(im.decode_image(str(files["ant"][0]), S))
    with pytest.raises(ConfigError, match=r"data.split_file.*inside data.root"):
        load_source(DataConfig(source="image_folder", root=str(raw), image_size=S,
                               split_file="/etc/passwd"), 0)
    (raw / "bad.csv").write_text("ant/img000.jpg,holdout\n")
    with pytest.raises(DataError, match=r"bad.csv line 1: expected"):
        load_source(DataConfig(source="image_folder", root=str(raw), split_file="bad.csv"), 0)


# --------------------------------------------------------------------------------------------
# the named datasets, each in its official layout


def test_flowers102_label_and_split_files(tmp_path: Path) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(5)
    d = tmp_path / "raw" / "flowers-102"  # torchvision's folder name under the root
    labels = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])  # 1-based, image i has labels[i-1]
    paths = [_write(d / "jpg" / f"image_{i:05d}.jpg", rng) for i in range(1, 13)]
    savemat(d / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(d / "setid.mat", {"trnid": np.array([[1, 2, 3, 4, 5, 6]]),
                              "valid": np.array([[7, 8, 9]]), "tstid": np.array([[10, 11, 12]])})
    names = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    cfg = DataConfig(source="flowers102", root=str(tmp_path / "raw"), image_size=S,
                     num_clients=2, partition="iid", label_names=names, workers=1)
    m = prepare_data(cfg, seed=0, out_dir=tmp_path / "out")
    truth = {_h(im.decode_image(str(p), S)): names[labels[i] - 1] for i, p in enumerate(paths)}
    pool, tst = _check_labels(m, tmp_path / "out", truth)
    assert m.num_classes == 3 and m.label_names == names
    assert pool == {n: 2 for n in names} and tst == {n: 1 for n in names}
    x, y = m.read_test(tmp_path / "out")  # test = tstid 10, 11, 12 in order; valid unused
    assert [truth[_h(r)] for r in x] == names and y.tolist() == [0, 1, 2]
    used = {_h(r) for c in m.clients for r in m.read_client(tmp_path / "out", c.id)[0]}
    assert used == {_h(im.decode_image(str(p), S)) for p in paths[:6]}
    (d / "jpg" / "image_00011.jpg").unlink()
    with pytest.raises(DataError, match=r"image_00011.jpg: listed in setid.mat \(tstid\)"):
        load_source(cfg, 0)


def test_food101_meta_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    d = tmp_path / "raw" / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "waffles"]
    files = {c: [_write(d / "images" / c / f"{100 + i}.jpg", rng) for i in range(5)]
             for c in classes}
    (d / "meta").mkdir()
    (d / "meta/classes.txt").write_text("\n".join(classes) + "\n")
    (d / "meta/labels.txt").write_text("Apple pie\nBaby back ribs\nWaffles\n")
    (d / "meta/train.txt").write_text("".join(f"{c}/{100 + i}\n" for c in classes
                                              for i in range(4)))
    (d / "meta/test.txt").write_text("".join(f"{c}/104\n" for c in classes))
    cfg = DataConfig(source="food101", root=str(tmp_path / "raw"), image_size=S,
                     num_clients=3, alpha=1.0, min_client_size=1, workers=2)
    m = prepare_data(cfg, seed=0, out_dir=tmp_path / "out")
    assert m.label_names == ["Apple pie", "Baby back ribs", "Waffles"]
    truth = _class_of({n: files[c] for n, c in zip(m.label_names, classes)})
    pool, tst = _check_labels(m, tmp_path / "out", truth)
    assert pool == {n: 4 for n in m.label_names} and tst == {n: 1 for n in m.label_names}
    x, _ = m.read_test(tmp_path / "out")
    assert {_h(r) for r in x} == {_h(im.decode_image(str(files[c][4]), S)) for c in classes}


def test_eurosat_80_20_per_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    d = tmp_path / "raw" / "EuroSAT_RGB"
    counts = {"AnnualCrop": 10, "Forest": 5, "SeaLake": 7}
    files = {c: [_write(d / c / f"{c}_{i + 1}.jpg", rng, w=16, h=16) for i in range(n)]
             for c, n in counts.items()}
    cfg = DataConfig(source="eurosat", root=str(tmp_path / "raw"), image_size=S, num_clients=2,
                     partition="iid", workers=1)
    m = prepare_data(cfg, seed=0, out_dir=tmp_path / "out")
    assert m.label_names == ["annual crop", "forest", "sea lake"]
    truth = _class_of({n: files[c] for n, c in zip(m.label_names, counts)})
    pool, tst = _check_labels(m, tmp_path / "out", truth)
    # round(0.2 * n) per class: 2, 1, 1 (7 * 0.2 = 1.4)
    assert tst == {"annual crop": 2, "forest": 1, "sea lake": 1}
    assert pool == {"annual crop": 8, "forest": 4, "sea lake": 6}
    other = load_source(cfg, seed=1)  # the split is seeded
    assert sorted(other.test_images.paths) != sorted(load_source(cfg, 0).test_images.paths)


def test_covid19_labels_follow_the_files(tmp_path: Path) -> None:
    """The reference loader returned a random class's image for an index (random labels); here
    every stored image is the file of its class folder."""
    rng = np.random.default_rng(8)
    d = tmp_path / "raw" / "COVID-19_Radiography_Dataset"
    counts = {"COVID": 6, "Normal": 10, "Viral Pneumonia": 5}
    files = {c: [_write(d / c / "images" / f"{c}-{i + 1}.png", rng, 18, 18, mode="L")
                 for i in range(n)] for c, n in counts.items()}
    for c in counts:  # lung masks are not samples
        _write(d / c / "masks" / f"{c}-1.png", rng, 18, 18, mode="L")
    _write(d / "Lung_Opacity" / "images" / "Lung_Opacity-1.png", rng, mode="L")  # not used
    cfg = DataConfig(source="covid19", root=str(tmp_path / "raw"), image_size=S, num_clients=2,
                     partition="iid", workers=2)
    m = prepare_data(cfg, seed=0, out_dir=tmp_path / "out")
    assert m.label_names == ["Normal", "Viral Pneumonia", "COVID"]
    pool, tst = _check_labels(m, tmp_path / "out", _class_of(files))
    assert tst == {"COVID": 1, "Normal": 2, "Viral Pneumonia": 1}
    assert pool == {"COVID": 5, "Normal": 8, "Viral Pneumonia": 4}
    x, _ = m.read_test(tmp_path / "out")
    assert np.array_equal(x[..., 0], x[..., 2])  # grayscale radiographs, RGB channels equal


def test_caltech101_without_background(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    d = tmp_path / "raw" / "101_ObjectCategories"
    files = _folder(d, {"Faces_easy": 5, "accordion": 5, "yin_yang": 5}, rng, (".jpg",))
    _folder(d, {"BACKGROUND_Google": 4}, rng, (".jpg",))
    cfg = DataConfig(source="caltech101", root=str(tmp_path / "raw"), image_size=S,
                     num_clients=2, partition="iid", test_size=0.2, workers=1)
    m = prepare_data(cfg, seed=0, out_dir=tmp_path / "out")
    assert m.label_names == ["Faces easy", "accordion", "yin yang"]
    pool, tst = _check_labels(m, tmp_path / "out",
                              _class_of({n: files[c] for n, c in zip(m.label_names, files)}))
    assert sum(tst.values()) == 3 and sum(pool.values()) == 12 and set(tst) == set(pool)


# --------------------------------------------------------------------------------------------
# errors, progress, preemption, train_fraction


def test_config_and_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.image_size: only for the image-folder"):
        load_source(DataConfig(image_size=32), 0)
    with pytest.raises(DataError, match=r"no food101 layout .*food-101.tar.gz"):
        load_source(DataConfig(source="food101", root=str(tmp_path)), 0)
    with pytest.raises(DataError, match=r"no EuroSAT class folders .*EuroSAT_RGB.zip"):
        load_source(DataConfig(source="eurosat", root=str(tmp_path)), 0)
    with pytest.raises(DataError, match=r"102flowers.tgz"):
        load_source(DataConfig(source="flowers102", root=str(tmp_path)), 0)
    with pytest.raises(DataError, match=r"covid19-radiography-database"):
        load_source(DataConfig(source="covid19", root=str(tmp_path)), 0)
    with pytest.raises(ConfigError, match=r"data.split_file: only for data.source=image_folder"):
        load_source(DataConfig(source="caltech101", root=str(tmp_path), split_file="x.csv"), 0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has train/ but no test/"):
        load_source(DataConfig(source="image_folder", root=str(tmp_path)), 0)


def test_progress_preemption_and_train_fraction(tmp_path: Path, monkeypatch, caplog) -> None:
    from gptfl_hpc import signals

    rng = np.random.default_rng(10)
    raw = tmp_path / "raw"
    _folder(raw, {"a": 12, "b": 12}, rng)
    cfg = DataConfig(source="image_folder", root=str(raw), image_size=S, num_clients=3,
                     partition="iid", test_size=4, workers=1)
    monkeypatch.setattr(im, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="gptfl_hpc.data.images"):
        full = prepare_data(cfg, seed=0, out_dir=tmp_path / "full")
    lines = [r.getMessage() for r in caplog.records]
    assert any("files/s" in ln and "ETA" in ln for ln in lines), lines
    assert any(ln.startswith("decoded image_folder") and "per worker" in ln for ln in lines)
    # a smaller share of the pool: statistics stay the whole pool's (as for in-memory sources)
    half = prepare_data(DataConfig(**{**_fields(cfg), "train_fraction": 0.5}), seed=0,
                        out_dir=tmp_path / "half")
    assert half.num_train == 10 and (half.norm_mean, half.norm_std) == (full.norm_mean,
                                                                        full.norm_std)
    assert half.test.sha256 == full.test.sha256
    # a stop request at a shard boundary: Preempted, no manifest
    monkeypatch.setenv("GPTFL_STOP_AFTER", "2")
    signals.reset()
    try:
        with pytest.raises(Preempted, match=r"after 1 of 3 client shards"):
            prepare_data(DataConfig(**{**_fields(cfg), "workers": 2}), seed=0,
                         out_dir=tmp_path / "stop")
    finally:
        signals.reset()
    assert not (tmp_path / "stop" / "manifest.json").exists()


def _fields(cfg: DataConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_prepare_command_on_mpi_rank_0_with_a_decode_pool(tmp_path: Path) -> None:
    """`gptfl-hpc prepare` under mpiexec: rank 0 spawns its decode workers (never forks an MPI
    process) and writes the same shards as an in-process prepare with one worker."""
    from helpers import run_cli

    rng = np.random.default_rng(11)
    raw = tmp_path / "raw"
    _folder(raw / "train", {"x": 6, "y": 6}, rng)
    _folder(raw / "val", {"x": 2, "y": 2}, rng)  # val/ serves as the test split
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{source: image_folder, root: {raw}, image_size: {S}, num_clients: 3, "
                   "partition: iid, workers: 2}\nfl: {clients_per_round: 2}\n")
    p = run_cli(["prepare", cfg, "--out", tmp_path / "mpi"], n=2, timeout=180)
    assert "with 2 worker(s)" in p.stderr
    m = Manifest.load(tmp_path / "mpi")
    ref = prepare_data(DataConfig(source="image_folder", root=str(raw), image_size=S,
                                  num_clients=3, partition="iid", workers=1), seed=0,
                       out_dir=tmp_path / "ref")
    assert [c.sha256 for c in m.clients] == [c.sha256 for c in ref.clients]
    assert m.test.sha256 == ref.test.sha256 and m.test.num_samples == 4
