"""Live tests against a real Slurm (scripts/slurm-up.sh brings one up on a Debian machine).

They skip, with the reason, only when Slurm cannot be used: no `sinfo` on PATH, or the
controller does not answer `scontrol ping`. Each test has a hard timeout; jobs are cancelled
when a test gives up on them, and every job a test submitted must be over within 60 s after the
test (no_job_outlives_its_test), so that no test's job runs next to another test's. Jobs get
this process's environment (sbatch --export=ALL), with
the venv first on PATH and the Open MPI settings of tests/helpers.py (root, oversubscription, no
binding: the test node advertises more CPUs than it has).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, env, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slurm

TINY = "configs/tiny.yaml"
ROUNDS = 14
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _unusable() -> str | None:
    """Why Slurm cannot be used here, or None. scripts/test.sh adds GPTFL_SLURM_SKIP (why it
    could not install one) to the reason; a working Slurm runs the tests regardless."""
    why = os.environ.get("GPTFL_SLURM_SKIP")
    why = f" ({why})" if why else ""
    if shutil.which("sinfo") is None:
        return f"no sinfo on PATH: bring up a test Slurm with scripts/slurm-up.sh{why}"
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}{why}"
    if "UP" not in p.stdout:
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip(" *")]
        return f"scontrol ping: controller not UP ({lines[0] if lines else 'no output'}){why}"
    return None


@pytest.fixture(scope="module")
def job_env():
    reason = _unusable()
    if reason:
        pytest.skip(reason)
    venv_bin = str(Path(sys.executable).parent)
    return env(PATH=f"{venv_bin}:{os.environ['PATH']}")


LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING",
        "CONFIGURING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def live_jobs_under(base: Path) -> dict[str, str]:
    """{job id: state} of the jobs that are not over and write their output under ``base``."""
    p = subprocess.run(["scontrol", "-o", "show", "jobs"], capture_output=True, text=True,
                       timeout=30)
    jobs = {}
    for line in p.stdout.splitlines():
        info = dict(re.findall(r"(\w+)=(\S*)", line))
        if info.get("JobState") in LIVE and info.get("StdOut", "").startswith(str(base)):
            jobs[info["JobId"]] = info["JobState"]
    return jobs


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(job_env, tmp_path_factory):
    """Every job a test submits must be over (not running, not requeued) within 60 s after the
    test: a leftover job would load the node and share it with the next tests' jobs. Leftovers
    are cancelled and fail the test."""
    base = tmp_path_factory.getbasetemp()
    before = set(live_jobs_under(base))
    yield
    deadline = time.monotonic() + 60
    while (left := {j: s for j, s in live_jobs_under(base).items() if j not in before}) \
            and time.monotonic() < deadline:
        time.sleep(1)
    if left:
        subprocess.run(["scancel", *left], timeout=30)
        pytest.fail(f"job(s) outlived the test that submitted them (now cancelled): {left}")


def sbatch(job_env, log: Path, *args: str, **variables: str) -> str:
    e = dict(job_env, **variables)
    p = subprocess.run(["sbatch", "--parsable", "-o", str(log), "--time=10", *args],
                       capture_output=True, text=True, env=e, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job_info(jid: str) -> dict:
    p = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True,
                       timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


def wait_job(jid: str, timeout: float, log: Path | None = None) -> dict:
    """Poll until the job is in a final state on two reads in a row (a requeue passes through)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        info = job_info(jid)
        seen = seen + 1 if info.get("JobState") in TERMINAL else 0
        if seen == 2:
            return info
        time.sleep(1)
    subprocess.run(["scancel", jid], timeout=30)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"job {jid} still {info.get('JobState')} after {timeout:.0f}s\n{tail}")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def rounds_written(out: Path) -> int:
    m = out / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


@pytest.fixture
def submit_env(job_env, monkeypatch):
    """This process takes the jobs' environment: submitit submits from it (sbatch --export=ALL)."""
    for k, v in job_env.items():
        monkeypatch.setenv(k, v)
    return job_env


@pytest.fixture(scope="module")
def data_dir(job_env, tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm-data") / "data"
    run_cli(["prepare", TINY, "--out", d], timeout=120)
    return d


def federate_vars(out: Path, data_dir: Path, **extra: str) -> dict:
    over = f"data.dir={data_dir} fl.rounds={ROUNDS} fl.checkpoint_every=2"
    return dict(GPTFL_COMMAND="federate", CONFIG=TINY, OUT=str(out), GPTFL_OVERRIDES=over,
                **extra)


@pytest.fixture(scope="module")
def reference(job_env, data_dir, tmp_path_factory):
    """One uninterrupted 3-rank `sbatch slurm/gptfl.sbatch` federate run."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    out, log = tmp / "out", tmp / "job.log"
    t0 = time.monotonic()
    jid = sbatch(job_env, log, "-n", "3", "slurm/gptfl.sbatch", **federate_vars(out, data_dir))
    info = wait_job(jid, 150, log)
    return out, log, info, time.monotonic() - t0


@pytest.mark.timeout(200)
def test_sbatch_template_runs_federate_on_three_ranks(reference):
    out, log, info, seconds = reference
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert "run: srun --kill-on-bad-exit=1 --mpi=pmix python -m mpi4py -m gptfl_hpc federate" \
        in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["rounds"] == ROUNDS
    assert set(load_file(str(out / "final.safetensors"))) == set(
        load_file(str(sorted((out / "ckpt").glob("round-*"))[-1] / "model.safetensors")))
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, ROUNDS + 1))
    print(f"sbatch federate {ROUNDS} rounds x 3 ranks: {seconds:.0f}s")


@pytest.mark.timeout(300)
def test_sbatch_as_written_runs_the_embedded_demo(job_env, tmp_path):
    """`sbatch slurm/gptfl.sbatch` with no variables (only the log moved out of the repo): the
    whole GPT-FL demo on 4 tasks, into the default OUT=runs/slurm-$SLURM_JOB_ID."""
    log = tmp_path / "demo.log"
    t0 = time.monotonic()
    jid = sbatch(job_env, log, "slurm/gptfl.sbatch")
    out = REPO / "runs" / f"slurm-{jid}"
    try:
        info = wait_job(jid, 280, log)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
        assert info["NumTasks"] == "4", info
        report = json.loads((out / "report.json").read_text())
        acc = {r["method"]: r["final_accuracy"] for r in report["rows"]}
        assert set(acc) == {"gptfl", "fedavg", "synthetic_only"}
        assert acc["gptfl"] > 0.9 and acc["gptfl"] > acc["fedavg"] + 0.3, acc
        assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()
        print(f"sbatch slurm/gptfl.sbatch (demo, 4 tasks): {time.monotonic() - t0:.0f}s, "
              f"final accuracy {acc}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.timeout(300)
def test_preempted_job_requeues_and_resumes_to_identical_weights(job_env, data_dir, reference,
                                                                 tmp_path):
    ref_out = reference[0]
    out, log = tmp_path / "out", tmp_path / "job.log"
    t0 = time.monotonic()
    jid = sbatch(job_env, log, "-n", "3", "slurm/gptfl.sbatch", **federate_vars(out, data_dir))
    wait_for(lambda: rounds_written(out) >= 3, 120, "3 rounds of metrics")
    # the time-limit warning: only the batch shell gets it (like --signal=B:USR1@N)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, timeout=30)
    info = wait_job(jid, 200, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert int(info["Restarts"]) >= 1, text[-4000:]
    assert "caught SIGUSR1" in text and f"requeued job {jid}" in text
    assert re.search(r"run: srun .* --resume\n", text), text[-4000:]
    assert "resuming from" in text, text[-4000:]  # it continued from a checkpoint
    a = load_file(str(ref_out / "final.safetensors"))
    b = load_file(str(out / "final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, ROUNDS + 1))
    print(f"preempt -> requeue -> resume: {time.monotonic() - t0:.0f}s")


@pytest.mark.timeout(120)
def test_wrong_mpi_type_fails_on_every_task(job_env, data_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    t0 = time.monotonic()
    # --mpi=none: every task is an MPI singleton; -K0 lets each task report for itself
    jid = sbatch(job_env, log, "-n", "3", "slurm/gptfl.sbatch",
                 **federate_vars(out, data_dir, GPTFL_SRUN_MPI="none",
                                 GPTFL_SRUN_ARGS="--kill-on-bad-exit=0"))
    info = wait_job(jid, 90, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text[-3000:]
    for rank in range(3):
        assert f"[gptfl r{rank}] gptfl-hpc federate: error: MPI world size 1 != SLURM_NTASKS 3" \
            in text, text[-3000:]
    assert not (out / "metrics.jsonl").exists()
    print(f"wrong --mpi detected: {time.monotonic() - t0:.0f}s")


@pytest.mark.timeout(200)
def test_submitit_three_rank_job_returns_summary(submit_env, data_dir, tmp_path, monkeypatch):
    from gptfl_hpc.launch import submit

    for k in [k for k in os.environ if k not in submit_env]:
        monkeypatch.delenv(k)
    out = tmp_path / "out"
    t0 = time.monotonic()
    job = submit(TINY, out, command="federate", cluster="slurm", tasks_per_node=3, time="10",
                 mpi="pmix", overrides=[f"data.dir={data_dir}", "fl.rounds=2"])
    assert job.job_id.isdigit()
    results = job.results()
    summary = json.loads((out / "summary.json").read_text())
    assert results == [summary, None, None]
    assert summary["world_size"] == 3 and summary["rounds"] == 2
    script = next((out / "submitit").glob("*/*_submission.sh")).read_text()
    assert "--mpi=pmix" in script and "#SBATCH --ntasks-per-node=3" in script
    print(f"submitit 3-rank federate: {time.monotonic() - t0:.0f}s")


@pytest.mark.timeout(300)
def test_killed_submitit_job_is_reported_failed_not_hung(submit_env, data_dir, tmp_path,
                                                         monkeypatch):
    from gptfl_hpc.launch import submit
    from gptfl_hpc.launch.jobs import JobFailed, rank0_result

    out = tmp_path / "out"
    job = submit(TINY, out, command="federate", cluster="slurm", tasks_per_node=3, time="10",
                 overrides=[f"data.dir={data_dir}", "fl.rounds=500"])
    # cancel it mid-run: the app has its signal handlers and is between two round boundaries
    wait_for(lambda: rounds_written(out) >= 1, 90, "the first round of metrics")
    subprocess.run(["scancel", job.job_id], check=True, timeout=30)
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=rf"job {job.job_id} failed: .*CANCELLED"):
        rank0_result(job)
    assert time.monotonic() - t0 < 90
    # and it stays cancelled: the app stops at a boundary on the SIGTERM (exit 124), but that
    # must not requeue the job (it did: the "killed" job came back and ran 500 rounds next to
    # the following tests' jobs)
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True,
                                        text=True, timeout=30).stdout.strip(),
             60, f"job {job.job_id} to leave the queue")
    info = job_info(job.job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    assert not (out / "summary.json").exists()
    print(f"cancelled job reported failed after {time.monotonic() - t0:.0f}s")


@pytest.mark.timeout(300)
def test_submitit_preemption_checkpoints_requeues_and_resumes(submit_env, data_dir, reference,
                                                              tmp_path, monkeypatch):
    from gptfl_hpc.launch import submit
    from gptfl_hpc.launch.jobs import rank0_result

    out = tmp_path / "out"
    t0 = time.monotonic()
    job = submit(TINY, out, command="federate", cluster="slurm", tasks_per_node=3, time="10",
                 overrides=[f"data.dir={data_dir}", f"fl.rounds={ROUNDS}",
                            "fl.checkpoint_every=2"])
    wait_for(lambda: rounds_written(out) >= 3, 120, "3 rounds of metrics")
    job._interrupt()  # what Slurm does on preemption: SIGTERM, then submitit's USR2
    summary = rank0_result(job)
    assert summary == json.loads((out / "summary.json").read_text())
    assert int(job_info(job.job_id)["Restarts"]) >= 1
    err = (out / "submitit" / job.job_id / f"{job.job_id}_0_log.err").read_text()
    assert "resuming from" in err, err[-4000:]
    a = load_file(str(reference[0] / "final.safetensors"))
    b = load_file(str(out / "final.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    print(f"submitit preempt -> requeue -> resume: {time.monotonic() - t0:.0f}s")


# ---- multi-node: scripts/slurm-up.sh emulates nodes n2.. next to the host's node --------------

@pytest.fixture(scope="module")
def two_nodes(job_env):
    """The 'multi' partition with >= 2 nodes (scripts/slurm-up.sh, SLURM_CI_NODES >= 2)."""
    p = subprocess.run(["sinfo", "-h", "-p", "multi", "-o", "%D"], capture_output=True,
                       text=True, timeout=30)
    if sum(int(x) for x in p.stdout.split() if x.isdigit()) < 2:
        pytest.skip("no partition 'multi' with 2 nodes: bring Slurm up with SLURM_CI_NODES=2 "
                    "scripts/slurm-up.sh")
    return ["-p", "multi"]


@pytest.fixture(scope="module")
def emulated_node(two_nodes) -> str:
    """A node of 'multi' that is not in 'debug' (scripts/slurm-up.sh: n2, emulated on this host)."""
    def nodes(part: str) -> set[str]:
        p = subprocess.run(["sinfo", "-h", "-N", "-p", part, "-o", "%N"], capture_output=True,
                           text=True, timeout=30)
        return set(p.stdout.split())

    emulated = sorted(nodes("multi") - nodes("debug"))
    if not emulated:
        pytest.skip("every node of 'multi' is also in 'debug': no emulated node")
    return emulated[-1]


NODE_VIEW = """
import json, os
from mpi4py import MPI
w = MPI.COMM_WORLD
shared = w.Split_type(MPI.COMM_TYPE_SHARED)
print("NODE_VIEW " + json.dumps({"rank": w.Get_rank(), "size": w.Get_size(),
      "node": os.environ["SLURMD_NODENAME"], "shared": shared.Get_size(),
      "lib": MPI.Get_library_version().split()[0]}), flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
@pytest.mark.parametrize("shape", ["2nodes-2x2", "emulated-node-3"])
def test_mpi_sees_the_nodes_slurm_placed_it_on(job_env, emulated_node, shape, mpi, tmp_path):
    """MPI_COMM_TYPE_SHARED groups exactly the ranks that share a Slurm node, on the emulated
    node too. Without PMIX_HOSTNAME=<node name> for its slurmd (scripts/slurm-up.sh), Open MPI
    on n2 finds no local peers: each rank there sees a node of its own (size 1, while the
    host's node sees 2) and reaches its node-mates over TCP, and 3 ranks on n2 abort in
    MPI_Init."""
    e = dict(job_env)
    if mpi == "mpich":
        lib = os.environ.get("GPTFL_TEST_MPICH", str(REPO / ".venv/mpich/lib/libmpi.so.12"))
        if not Path(lib).is_file():
            pytest.skip(f"no MPICH library at {lib}")
        e["MPI4PY_LIBMPI"] = lib
    script, log = tmp_path / "node_view.py", tmp_path / "job.log"
    script.write_text(NODE_VIEW)
    where = (["-p", "multi", "-N", "2", "--ntasks-per-node=2"] if shape == "2nodes-2x2"
             else ["-p", "multi", "-w", emulated_node, "-n", "3"])
    srun_mpi = "pmix" if mpi == "openmpi" else "pmi2"
    p = subprocess.run(["sbatch", "--parsable", "-o", str(log), "--time=5", *where, "--wrap",
                        f"srun --mpi={srun_mpi} python {script}"],
                       capture_output=True, text=True, env=e, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    info = wait_job(p.stdout.strip(), 100, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    views = [json.loads(ln.split(" ", 1)[1]) for ln in text.splitlines()
             if ln.startswith("NODE_VIEW ")]
    ntasks = 4 if shape == "2nodes-2x2" else 3
    assert sorted(v["rank"] for v in views) == list(range(ntasks)), text[-3000:]
    per_node = {n: sum(v["node"] == n for v in views) for n in {v["node"] for v in views}}
    assert {v["rank"]: v["shared"] for v in views} == \
        {v["rank"]: per_node[v["node"]] for v in views}, views
    assert {v["lib"] for v in views} == {"Open" if mpi == "openmpi" else "MPICH"}, views


def assert_two_node_placement(summary: dict, per_node: int) -> None:
    """Ranks spread over two Slurm nodes in blocks, node-local ranks 0..per_node-1 on each."""
    placement = summary["placement"]
    assert summary["nodes"] == 2 and len(placement) == 2 * per_node, placement
    nodes = [p["node"] for p in placement]
    assert nodes == [nodes[0]] * per_node + [nodes[-1]] * per_node and nodes[0] != nodes[-1]
    assert [p["local_rank"] for p in placement] == list(range(per_node)) * 2, placement
    assert [p["rank"] for p in placement] == list(range(2 * per_node))


@pytest.mark.timeout(200)
def test_two_node_sbatch_federate_matches_single_node(job_env, two_nodes, data_dir, reference,
                                                      tmp_path):
    """sbatch -N 2 --ntasks-per-node=2: one 4-rank MPI world over two (emulated) nodes, with
    the same result as the 3-rank single-node run up to float32 summation order."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    t0 = time.monotonic()
    jid = sbatch(job_env, log, *two_nodes, "-N", "2", "--ntasks-per-node=2",
                 "slurm/gptfl.sbatch", **federate_vars(out, data_dir))
    info = wait_job(jid, 150, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["rounds"] == ROUNDS
    assert_two_node_placement(summary, per_node=2)
    assert re.search(r"placement \(Open MPI [^)]*\): 2 node\(s\)", text), text[-3000:]
    # the same computation: same clients and samples every round, and the same losses up to
    # float32 summation order while the runs have not yet drifted apart (this tiny config is
    # chaotic: 1e-8 differences grow to ~1e-3 in the weights by round 14)
    ref = [json.loads(x) for x in (reference[0] / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["sampled_clients"], r["num_samples"]) for r in got] == \
        [(r["sampled_clients"], r["num_samples"]) for r in ref]
    assert got[0]["train_loss"] == pytest.approx(ref[0]["train_loss"], rel=1e-6)
    assert [r["train_loss"] for r in got[1:3]] == pytest.approx(
        [r["train_loss"] for r in ref[1:3]], rel=1e-4)
    print(f"sbatch federate 2 nodes x 2 ranks: {time.monotonic() - t0:.0f}s")


@pytest.mark.timeout(300)
def test_scale_through_slurm_on_two_nodes(job_env, two_nodes, data_dir, tmp_path):
    """`gptfl-hpc scale --cluster slurm --nodes 2`: one submitit job per rank count, spread over
    both nodes, and the CSV / markdown / plot report."""
    out = tmp_path / "scale"
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "gptfl_hpc", "scale", TINY, "--out", str(out), "--ranks", "2,4",
         "--nodes", "2", "--cluster", "slurm", "--partition", "multi", "--time", "10",
         f"data.dir={data_dir}", "fl.rounds=4", "fl.eval_every=4"],
        capture_output=True, text=True, env=job_env, cwd=REPO, timeout=280)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = (out / "scaling.csv").read_text().splitlines()
    assert rows[0].startswith("ranks,client_ranks,") and len(rows) == 3, rows
    assert [r.split(",")[:2] for r in rows[1:]] == [["2", "1"], ["4", "3"]]
    assert (out / "scaling.md").is_file() and (out / "scaling.png").stat().st_size > 0
    for ranks, per_node in ((2, 1), (4, 2)):
        summary = json.loads((out / f"r{ranks}" / "summary.json").read_text())
        assert_two_node_placement(summary, per_node=per_node)
    print(f"scale --cluster slurm --nodes 2 --ranks 2,4: {time.monotonic() - t0:.0f}s")


# ---- the other templates: synthesize -> federate chained, and the sweep array -----------------

@pytest.mark.timeout(400)
def test_synthesize_then_federate_chained_with_afterok(job_env, tmp_path):
    """The two-stage route: federate.sbatch waits (Dependency) for synthesize.sbatch, then
    starts from its pretrained model in the shared OUT."""
    out = tmp_path / "out"
    over = "fl.rounds=2"
    t0 = time.monotonic()
    jid1 = sbatch(job_env, tmp_path / "synth.log", "slurm/synthesize.sbatch", CONFIG=TINY,
                  OUT=str(out), GPTFL_OVERRIDES=over)
    jid2 = sbatch(job_env, tmp_path / "fed.log", f"--dependency=afterok:{jid1}", "-n", "3",
                  "slurm/federate.sbatch", CONFIG=TINY, OUT=str(out), GPTFL_OVERRIDES=over)
    first = job_info(jid2)
    assert first["JobState"] == "PENDING" and first["Reason"] == "Dependency", first
    info1 = wait_job(jid1, 300, tmp_path / "synth.log")
    synth_log = (tmp_path / "synth.log").read_text()
    assert info1["JobState"] == "COMPLETED", synth_log[-3000:]
    for stage in ("prepare", "train-generator", "synthesize", "pretrain"):
        assert re.search(rf"run: srun .* -m gptfl_hpc {stage} ", synth_log), stage
    assert (out / "pretrained.safetensors").is_file()
    info2 = wait_job(jid2, 150, tmp_path / "fed.log")
    fed_log = (tmp_path / "fed.log").read_text()
    assert info2["JobState"] == "COMPLETED", fed_log[-3000:]
    assert f"fl.init={out / 'pretrained.safetensors'}" in fed_log, fed_log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init"] == str(out / "pretrained.safetensors")
    assert summary["world_size"] == 3 and summary["rounds"] == 2
    print(f"synthesize -> afterok -> federate: {time.monotonic() - t0:.0f}s")


@pytest.mark.timeout(120)
def test_failed_stage_one_never_starts_stage_two(job_env, tmp_path):
    out = tmp_path / "out"
    jid1 = sbatch(job_env, tmp_path / "synth.log", "slurm/synthesize.sbatch",
                  CONFIG="configs/missing.yaml", OUT=str(out))
    jid2 = sbatch(job_env, tmp_path / "fed.log", f"--dependency=afterok:{jid1}", "-n", "3",
                  "slurm/federate.sbatch", CONFIG=TINY, OUT=str(out))
    try:
        info1 = wait_job(jid1, 60, tmp_path / "synth.log")
        assert info1["JobState"] == "FAILED"
        assert "config file configs/missing.yaml: not found" in \
            (tmp_path / "synth.log").read_text()
        wait_for(lambda: job_info(jid2).get("Reason") == "DependencyNeverSatisfied", 30,
                 "the dependent job to be marked DependencyNeverSatisfied")
        assert job_info(jid2)["JobState"] == "PENDING"
        assert not (tmp_path / "fed.log").exists()
    finally:
        subprocess.run(["scancel", jid2], timeout=30)


@pytest.mark.timeout(300)
def test_sweep_array_runs_one_configuration_per_task(job_env, tmp_path):
    sweep = tmp_path / "sweep"
    t0 = time.monotonic()
    jid = sbatch(job_env, tmp_path / "sweep-%a.log", "--array=0-1", "-n", "3",
                 "slurm/sweep.sbatch", CONFIG=TINY, GPTFL_METHODS="fedavg", GPTFL_SEEDS="0 1",
                 GPTFL_ALPHAS="0.5", GPTFL_SWEEP_DIR=str(sweep), GPTFL_OVERRIDES="fl.rounds=2")
    for task in (0, 1):
        info = wait_job(f"{jid}_{task}", 250, tmp_path / f"sweep-{task}.log")
        text = (tmp_path / f"sweep-{task}.log").read_text()
        assert info["JobState"] == "COMPLETED", text[-3000:]
    dirs = sorted(d.name for d in sweep.iterdir())
    assert dirs == ["fedavg-seed0-alpha0.5", "fedavg-seed1-alpha0.5"]
    assert all((sweep / d / "report.json").is_file() for d in dirs)
    finals = [json.loads((sweep / d / "fedavg" / "summary.json").read_text()) for d in dirs]
    assert all(f["world_size"] == 3 and f["rounds"] == 2 for f in finals)
    used = [yaml.safe_load((sweep / d / "fedavg" / "config.yaml").read_text()) for d in dirs]
    assert [(c["run"]["seed"], c["run"]["methods"], c["data"]["alpha"]) for c in used] == \
        [(0, ["fedavg"], 0.5), (1, ["fedavg"], 0.5)]
    print(f"sweep array 2 tasks: {time.monotonic() - t0:.0f}s")


# ---- MPICH under srun --mpi=pmi2 (the PyPI mpich wheel that scripts/test.sh installs) ---------

@pytest.fixture(scope="module")
def mpich(job_env):
    lib = os.environ.get("GPTFL_TEST_MPICH", str(REPO / ".venv/mpich/lib/libmpi.so.12"))
    if not Path(lib).is_file():
        pytest.skip(f"no MPICH library at {lib}: scripts/test.sh installs the mpich wheel there "
                    "(pip install --prefix .venv/mpich mpich)")
    return {"MPI4PY_LIBMPI": lib, "GPTFL_SRUN_MPI": "pmi2"}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("shape", [["-n", "3"], ["-p", "multi", "-N", "2",
                                                 "--ntasks-per-node=2"]],
                         ids=["1node-3ranks", "2nodes-2x2ranks"])
def test_mpich_with_srun_pmi2(job_env, mpich, data_dir, shape, tmp_path, request):
    if "multi" in shape:
        request.getfixturevalue("two_nodes")  # skips without a second node
    out, log = tmp_path / "out", tmp_path / "job.log"
    t0 = time.monotonic()
    jid = sbatch(job_env, log, *shape, "slurm/gptfl.sbatch",
                 **federate_vars(out, data_dir, **mpich))
    info = wait_job(jid, 150, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert "run: srun --kill-on-bad-exit=1 --mpi=pmi2 " in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mpi_library"].startswith("MPICH"), summary["mpi_library"]
    assert summary["world_size"] == (3 if "-n" in shape else 4)
    if "multi" in shape:
        assert_two_node_placement(summary, per_node=2)
    print(f"MPICH srun --mpi=pmi2 {' '.join(shape)}: {time.monotonic() - t0:.0f}s")


@pytest.mark.timeout(150)
def test_submitit_wrong_mpi_type_fails_not_singletons(submit_env, data_dir, tmp_path,
                                                      monkeypatch):
    """submit(mpi="none"): srun starts 3 singletons; each refuses, and the job is reported
    failed with the app's one-line error instead of 3 copies of the run."""
    from gptfl_hpc.launch import submit
    from gptfl_hpc.launch.jobs import JobFailed, rank0_result

    monkeypatch.delenv("SLURM_MPI_TYPE", raising=False)
    out = tmp_path / "out"
    t0 = time.monotonic()
    job = submit(TINY, out, command="federate", cluster="slurm", tasks_per_node=3, time="10",
                 mpi="none", overrides=[f"data.dir={data_dir}", "fl.rounds=2"])
    with pytest.raises(JobFailed, match=r"MPI world size 1 != SLURM_NTASKS 3"):
        rank0_result(job)
    assert not (out / "metrics.jsonl").exists() and not (out / "summary.json").exists()
    print(f"submitit --mpi=none refused: {time.monotonic() - t0:.0f}s")
