"""End to end on audio: `gptfl-hpc run configs/speech.yaml` (shrunk) on 4 MPI ranks from the
embedded eSpeak NG data and generator: prepare -> synthesize -> pretrain -> GPT-FL and FedAvg
-> report; a second run reuses every stage; a run stopped in FL resumes to the same weights.
The paper audio configs are checked here too (they are not runnable without the data)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from helpers import REPO, run_cli

from gptfl_hpc.config import load_config

SMALL = ["data.num_clients=6", "data.test_size=40", "gen.count=60", "pretrain.epochs=1",
         "pretrain.batch_size=32", "fl.rounds=3", "fl.clients_per_round=3", "fl.eval_every=1",
         "fl.checkpoint_every=1", "fl.eval_batch_size=40"]


def test_speech_run_end_to_end_reuse_and_resume(tmp_path):
    import shutil

    out = tmp_path / "speech"
    p = run_cli(["run", "configs/speech.yaml", *SMALL, "--out", out], n=4, timeout=600)
    assert "| method | final acc |" in p.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["gptfl", "fedavg", "synthetic_only"]
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()
    with h5py.File(out / "synthetic.h5", "r") as f:
        assert f["audio"].dtype == np.int16 and f["audio"].shape == (60, 16000)
        assert f["speaker"].shape == (60,) and f.attrs["generator_kind"] == "espeak"
        assert set(f["prompts"].asstr()[()].tolist()) == {"yes", "no", "up", "down", "left",
                                                           "right", "on", "off", "stop", "go"}
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["kind"] == "audio" and manifest["num_clients"] == 6
    for method in ("gptfl", "fedavg"):
        s = json.loads((out / method / "summary.json").read_text())
        assert 0.0 <= s["final_accuracy"] <= 1.0
    # FL stopped after its second round, then resumed with every other stage reused: the
    # same final weights, byte for byte
    out2 = tmp_path / "stopped"
    shutil.copytree(out, out2)
    shutil.rmtree(out2 / "gptfl")
    (out2 / ".gptfl.lock").unlink(missing_ok=True)
    stop = run_cli(["run", "configs/speech.yaml", *SMALL, "--out", out2, "--resume"], n=4,
                   timeout=600, check=False, extra_env={"GPTFL_STOP_AFTER": "2"})
    assert stop.returncode == 124 and "stopped after round" in stop.stderr, stop.stderr[-3000:]
    again = run_cli(["run", "configs/speech.yaml", *SMALL, "--out", out2, "--resume"], n=4,
                    timeout=600)
    assert again.stderr.count("(reused)") >= 4, again.stderr[-3000:]
    for f in ("gptfl/final.safetensors", "fedavg/final.safetensors", "pretrained.safetensors"):
        assert (out / f).read_bytes() == (out2 / f).read_bytes(), f


def test_paper_audio_configs_are_valid():
    sc = load_config(REPO / "configs" / "paper" / "speech_commands-speecht5.yaml")
    assert (sc.data.source, sc.data.partition, sc.model.name) == ("speech_commands", "natural",
                                                                  "audio_crnn")
    assert (sc.gen.kind, sc.gen.prompt_mode, sc.gen.count) == ("text2speech", "multi_speaker",
                                                               60000)
    esc = load_config(REPO / "configs" / "paper" / "esc50-audioldm.yaml")
    assert (esc.data.source, esc.data.partition, esc.data.test_fold) == ("esc50", "dirichlet", 5)
    assert (esc.gen.kind, esc.gen.steps, esc.gen.count, esc.data.clip_seconds) == \
        ("text2audio", 100, 2000, 5.0)
    assert esc.gen.prompt_mode == "multi_domain" and len(esc.gen.domains) == 4


@pytest.mark.parametrize("name", ["speech.yaml"])
def test_speech_config_is_the_documented_one(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.gen.generator == "gptfl_hpc/assets/espeak-generator"
    assert (REPO / cfg.gen.generator / "espeak_generator.json").is_file()
    assert cfg.model.name == "audio_crnn" and cfg.data.num_clients == 40
