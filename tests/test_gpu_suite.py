"""benchmarks/gpu_suite.sh, the one command for a lent GPU machine, in its CPU dry-run mode.

The full dry run (every step with tiny sizes on CPU: ~165 CPU-seconds, most steps one process,
so about 2.5 min on 2 otherwise idle cores) is marked slow: the full suite runs it, a quick loop
deselects it with ``-m "not slow"``.
A rerun of selected steps (SUITE_ONLY, what a second device call uses) is checked quickly.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import PY, REPO, env

SUITE = REPO / "benchmarks" / "gpu_suite.sh"

# steps that only repeat another step's code path on CPU, or need a GPU to mean anything
GPU_ONLY = {"a-tinysd-fp32", "a-emb-cuda", "c-pre32-b128", "c-pre224-device", "e-fl-digits-cpu",
            "e-fl-r18-cuda", "x-fl-rerun", "x-2servers-1gpu", "x-fl-round", "b-synth-compiled"}
DRY_RUN = {"env", "mpi-probe", "prep", "a-tinysd-fp16", "a-emb-cpu", "c-pre32-b1024",
           "c-pre224-stream", "c-bench", "e-fl-digits-cuda", "e-run-store", "e-run-reuse",
           "f-probes", "b-synth-eager", "d-exchange", "d-weak"}


def _suite(res: Path, timeout: float, **extra: str) -> subprocess.CompletedProcess:
    e = env(SUITE_CPU_DRYRUN="1", SUITE_RES=str(res), PY=PY, **extra)
    e.pop("OUT", None)
    return subprocess.run(["bash", str(SUITE)], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=REPO)


def _steps(res: Path) -> dict[str, list[str]]:
    rows = (res / "logs" / "steps.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "rc", "seconds", "start_epoch", "end_epoch", "note",
                                   "cpu_seconds"]
    out = {r.split("\t")[0]: r.split("\t") for r in rows[1:]}
    assert all(len(r) == 7 for r in out.values()), out
    return out


def test_script_parses():
    p = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


def test_rerun_of_selected_steps_keeps_the_work_dir(tmp_path):
    """SUITE_ONLY runs only the matching steps, keeps SUITE_RES (and its prepared data), appends
    to the step table, and the summary shows the newest line of each step."""
    res = tmp_path / "suite"
    (res / "logs").mkdir(parents=True)
    (res / ".gpu-suite").touch()
    (res / ".prep-done").touch()  # as after a first run: prep is not redone
    (res / "keep.txt").write_text("from the first run")
    p = _suite(res, 240, SUITE_ONLY="mpi-*,f-probes")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (res / "keep.txt").is_file()
    steps = _steps(res)
    assert set(steps) == {"mpi-probe", "f-probes"}, steps
    assert all(s[1] == "0" and float(s[6]) > 0 for s in steps.values()), steps
    summary = (res / "summary.md").read_text()
    assert "| mpi-probe | 0 |" in summary and "| f-probes | 0 |" in summary
    assert "FL per client host ms" in summary and "failed steps: none" in summary
    assert p.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed last
    assert "prep: kept from the earlier run" in p.stdout
    # a folder that is not the suite's is never deleted
    other = tmp_path / "other"
    other.mkdir()
    p = _suite(other, 60)
    assert p.returncode == 2 and "is not a gpu-suite folder" in p.stderr


@pytest.mark.slow
@pytest.mark.timeout(960)  # the suite's own hard limit below is 900 s (a busy machine)
def test_cpu_dry_run_end_to_end(tmp_path):
    """Every step of the suite runs on CPU with tiny sizes and passes; the GPU-only steps are
    listed as skipped; the summary holds each step's result. (The budget is lifted so that a
    busy machine makes the run slower, not different.)"""
    res = tmp_path / "suite"
    p = _suite(res, 900, SUITE_BUDGET="900")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    steps = _steps(res)
    assert {n for n, s in steps.items() if s[1] == "0"} == DRY_RUN, steps
    assert {n for n, s in steps.items() if s[1] == "skip"} == GPU_ONLY
    assert all("dry run" in steps[n][5] for n in GPU_ONLY)
    summary = (res / "summary.md").read_text()
    assert "CPU DRY RUN" in summary and "failed steps: none" in summary
    # what the steps measured reached the summary
    assert "data path device" in summary and "data path stream" in summary
    assert "b16 device:" in summary and "of the ceiling" in summary
    assert "stages reused from run.store: prepare, pretrain, synthesize" in summary
    assert "16 imgs fp32 on cpu" in summary and "R=2 eff 1.00" in summary
    assert (res / "gpu-suite-logs.tar.gz").is_file()
    wall = sum(float(s[2]) for s in steps.values())
    cpu = sum(float(s[6] or 0) for s in steps.values())
    print(f"gpu_suite dry run: {wall:.0f} s in steps, {cpu:.0f} CPU-seconds")
