"""benchmarks/bench_pretrain.py: its CPU plumbing (--device cpu --tiny), not its GPU numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, env

SCRIPT = REPO / "benchmarks" / "bench_pretrain.py"


def _bench(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=REPO)


def test_tiny_cpu_run_reports_ceiling_ours_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    p = _bench(["--device", "cpu", "--tiny", "--json", str(out)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bench_pretrain" and doc["version"] == 1 and doc["target"] == 0.8
    s = doc["settings"]
    assert (s["model"], s["n"], s["batches"], s["device"], s["mixed_precision"]) == (
        "resnet18", 64, [16], "cpu", "no")
    assert [(r["batch"], r["path"]) for r in doc["rows"]] == [(16, "device"), (16, "stream")]
    for r in doc["rows"]:
        assert r["steps_per_epoch"] == 4
        assert r["ceiling_img_s"] > 0 and r["ours_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_img_s"] / r["ceiling_img_s"], abs=2e-3)
        assert r["meets_target"] == (r["ratio"] >= 0.8)
        assert len(r["ours_img_s_epochs"]) == len(r["ceiling_img_s_epochs"]) == 1
    assert "| 16 | device |" in p.stdout and "| 16 | stream |" in p.stdout


@pytest.mark.parametrize("args, needle", [
    (["--paths", "disk"], "--paths 'disk': valid: a comma-separated subset of device, stream"),
    (["--batch", "0"], "--batch '0': expected comma-separated integers >= 1"),
    (["--batch", "128", "--n", "64"], "--n 64: fewer images than the largest batch 128"),
    (["--device", "tpu"], "--device 'tpu': valid: auto, cuda, cpu"),
    pytest.param(["--device", "cuda"],
                 "config key run.device: 'cuda' requested but no GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_usage_errors_are_one_line(args, needle):
    p = _bench(["--tiny", *args], timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_pretrain: error: "), lines
    assert needle in lines[0]
