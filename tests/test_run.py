"""`gptfl-hpc run` end to end on the tiny config under mpiexec -n 3, and preemption at several
points (generator training, synthesis, pretraining, FL) resuming to bitwise-identical results."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import PY, run_cli
from safetensors.torch import load_file

TINY = "configs/tiny.yaml"
PREEMPTED = 124


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = run_cli(["run", TINY, "--out", out], n=3, timeout=600)
    return out, p


def test_run_writes_report_with_all_methods(reference):
    out, p = reference
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["gptfl", "fedavg", "synthetic_only"]
    md = (out / "report.md").read_text()
    for needle in ("| gptfl |", "| fedavg |", "| synthetic_only |", "accuracy.png",
                   "Memorisation check", "samples.png"):
        assert needle in md
    for f in ("accuracy.png", "samples.png", "pretrained.safetensors", "synthetic.h5",
              "gptfl/final.safetensors", "fedavg/final.safetensors", "generator/unet"):
        assert (out / f).exists(), f
    assert "| method | final acc |" in p.stdout  # the comparison table is printed
    # both FL runs saw the same client sequence; GPT-FL started from the pretrained weights
    seq = {m: [json.loads(x)["sampled_clients"] for x in
               (out / m / "metrics.jsonl").read_text().splitlines()] for m in ("gptfl", "fedavg")}
    assert seq["gptfl"] == seq["fedavg"]
    assert json.loads((out / "gptfl" / "summary.json").read_text())["init"].endswith(
        "pretrained.safetensors")
    q = report["synthetic"]
    assert sum(q["class_counts"]) == q["num_samples"]
    assert q["memorisation"]["heldout_to_public_median"] > 0
    # a second `run` on the same --out skips every stage
    again = run_cli(["run", TINY, "--out", out], n=3, timeout=300)
    assert again.stderr.count("complete for this request") == 6, again.stderr[-3000:]


def _arrays(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("images", "labels", "seed", "guidance")}


def test_preempted_everywhere_resumes_bitwise(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    # GPTFL_STOP_AFTER=k stops at the k-th safe boundary of that process: client shards
    # written by prepare (6), generator steps, synthesis batches, pretraining epochs and FL
    # rounds each count one.
    for stop_after, where in [(3, "prepare stopped"), (16, "generator training stopped"),
                              (31, "synthesis"), (4, "pretrain"), (3, "stopped after round")]:
        p = run_cli(["run", TINY, "--out", out, "--resume"], n=3, check=False, timeout=300,
                    extra_env={"GPTFL_STOP_AFTER": str(stop_after)})
        assert p.returncode == PREEMPTED, (stop_after, p.returncode, p.stderr[-3000:])
        assert where in p.stderr, (where, p.stderr[-3000:])
    _finish_and_compare(ref, out)


def _finish_and_compare(ref, out):
    """Run `out` to completion; every output equals the uninterrupted reference bit for bit."""
    run_cli(["run", TINY, "--out", out, "--resume"], n=3, timeout=300)
    a, b = _arrays(ref / "synthetic.h5"), _arrays(out / "synthetic.h5")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for f in ("pretrained.safetensors", "gptfl/final.safetensors", "fedavg/final.safetensors",
              "generator/unet/diffusion_pytorch_model.safetensors"):
        x, y = load_file(str(ref / f)), load_file(str(out / f))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (f, k)
    # and the files themselves, byte for byte (sha256sum compares runs)
    for f in ("pretrained.safetensors", "gptfl/final.safetensors", "fedavg/final.safetensors"):
        assert (ref / f).read_bytes() == (out / f).read_bytes(), f


def _tagged_ranks(tag: str) -> list[int]:
    """PIDs of the gptfl_hpc rank processes whose environment carries `tag` (not the launcher)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        argv = cmdline.split(b"\0")
        if f"GPTFL_SIGNAL_TAG={tag}".encode() in environ.split(b"\0") and \
                argv[0] == PY.encode() and b"gptfl_hpc" in argv:
            pids.append(int(proc.name))
    return pids


@pytest.mark.timeout(600)
def test_real_signals_in_every_phase_resume_bitwise(reference, tmp_path):
    """Slurm's warning signal (USR1) or SIGTERM delivered to every rank, as srun does, at the
    start of each phase: the ranks stop at the next safe boundary with exit code 124 and the
    reruns end bitwise-identical to the uninterrupted run (signals, not GPTFL_STOP_AFTER)."""
    import os
    import signal
    import subprocess
    import time
    import uuid

    from helpers import MPIEXEC, REPO, env

    ref, _ = reference
    out = tmp_path / "run"
    cmd = [MPIEXEC, "-n", "3", PY, "-m", "mpi4py", "-m", "gptfl_hpc", "run", TINY, "--out",
           str(out), "--resume"]
    phases = [("training the embedded generator", signal.SIGUSR1),
              ("synthesis: ", signal.SIGTERM), ("pretrain: ", signal.SIGUSR1),
              ("federate: ", signal.SIGTERM)]
    stopped = []
    for marker, sig in phases:
        tag = uuid.uuid4().hex
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(GPTFL_SIGNAL_TAG=tag), text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        lines = []
        try:
            deadline = time.monotonic() + 240
            for line in proc.stderr:  # rank 0 logs each phase's start
                lines.append(line)
                if marker in line:
                    break
                assert time.monotonic() < deadline, f"no {marker!r} after 240 s"
            else:
                pytest.fail(f"run ended before {marker!r}:\n{''.join(lines)[-3000:]}")
            ranks = _tagged_ranks(tag)
            assert len(ranks) == 3, ranks
            for pid in ranks:
                os.kill(pid, sig)
            lines += proc.stderr.readlines()
            rc = proc.wait(timeout=240)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        text = "".join(lines)
        assert rc == PREEMPTED, (marker, rc, text[-3000:])
        assert sig.name in text, (marker, text[-3000:])
        stopped.append(next(ln.split("] ", 1)[-1].strip() for ln in reversed(lines)
                            if sig.name in ln))
    print("stops:", *stopped, sep="\n  ")
    _finish_and_compare(ref, out)


@pytest.mark.parametrize("rank,phase", [(0, "prepare"), (0, "generator"), (0, "synthesize"),
                                        (0, "pretrain"), (0, "federate"), (0, "server"),
                                        (0, "report"), (2, "synthesize"), (1, "pretrain")])
def test_exception_in_any_phase_on_any_rank_ends_the_job(reference, tmp_path, rank, phase):
    """A failure of the server (rank 0) in each of its phases, and of an idle client rank
    during the server phase, ends all three ranks within seconds with the one error line."""
    import shutil
    import time

    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)  # every stage complete: each phase is reached at once...
    shutil.rmtree(out / "gptfl")  # ...and the FL rounds (the server step) run again
    (out / ".gptfl.lock").unlink(missing_ok=True)
    t = time.time()
    p = run_cli(["run", TINY, "--out", out], n=3, check=False, timeout=120,
                extra_env={"GPTFL_FAULT_RAISE_RANK": str(rank), "GPTFL_FAULT_PHASE": phase})
    assert p.returncode != 0 and time.time() - t < 60, (p.returncode, p.stderr[-2000:])
    assert f"injected fault on rank {rank} in phase {phase}" in p.stderr, p.stderr[-3000:]


@pytest.mark.parametrize("config,asset,seed", [("digits", "digits-generator", 0),
                                               ("mnist", "mnist-generator", 2)])
def test_shipped_generator_is_reused_by_every_rank_count(tmp_path, config, asset, seed):
    """Each shipped config's generator request matches its shipped weights: `run` under
    mpiexec -n 3 copies them (no training) and every rank goes on (it hung once: rank 0 took
    the shipped path and skipped the barrier the other ranks waited in). With data.split_seed
    and gen.train.seed pinned in the config, another run.seed reuses them too (mnist, seed 2)."""
    from gptfl_hpc import provenance
    from gptfl_hpc.pipeline import ASSETS

    shipped = ASSETS / asset
    out = tmp_path / "run"
    # smaller stages after the generator; none of these keys is in the generator's request
    p = run_cli(["run", f"configs/{config}.yaml", "--out", out, "run.methods=[synthetic_only]",
                 f"run.seed={seed}", "gen.volume=0.1", "gen.steps=2", "pretrain.epochs=1",
                 "pretrain.batch_size=32"], n=3, timeout=300)
    assert "the shipped weights were trained for exactly this request" in p.stderr
    assert "training the embedded generator" not in p.stderr
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (out / "generator" / unet).read_bytes() == (shipped / unet).read_bytes()
    assert provenance.read_record(out / "generator", "generator")["fingerprint"] == \
        provenance.read_record(shipped, "generator")["fingerprint"]
    assert json.loads((out / "report.json").read_text())["rows"][0]["method"] == \
        "synthetic_only"


def test_shipped_generator_needs_its_fingerprint_and_intact_files(tmp_path, monkeypatch):
    """shipped_generator() hands out a shipped directory only for its own request fingerprint
    and only while its files have the recorded digests (a damaged asset is retrained, never
    used)."""
    import shutil

    from gptfl_hpc import pipeline, provenance

    assets = tmp_path / "assets"
    shutil.copytree(pipeline.SHIPPED_GENERATOR, assets / "digits-generator")
    (assets / "espeak-generator").mkdir()  # no generator record: never a candidate
    monkeypatch.setattr(pipeline, "ASSETS", assets)
    fp = provenance.read_record(assets / "digits-generator", "generator")["fingerprint"]
    assert pipeline.shipped_generator(fp) == assets / "digits-generator"
    assert pipeline.shipped_generator("0" * 32) is None
    cfg = assets / "digits-generator" / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace("squaredcos_cap_v2", "linear"))
    assert pipeline.shipped_generator(fp) is None
