"""Slurm scripts without a Slurm: golden files, the shipped templates, and the job-script logic
(signal forwarding, requeue, --resume, launchers, quoting) run by bash against fake srun/scontrol.

Regenerate the golden files with GPTFL_UPDATE_GOLDEN=1 and the templates with
``python -m gptfl_hpc.launch.slurm``; review both diffs.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, run_cli

from gptfl_hpc.config import SlurmConfig, load_config
from gptfl_hpc.errors import ConfigError
from gptfl_hpc.launch.slurm import (
    TEMPLATES,
    render_sbatch,
    render_template,
    sbatch_directives,
    time_minutes,
)

DATA = Path(__file__).parent / "data"
# documented in the table of docs/slurm.md; every template must define each of these
COMMON_VARS = ("GPTFL_PYTHON", "GPTFL_LAUNCH", "GPTFL_SRUN_MPI", "GPTFL_SRUN_ARGS",
               "GPTFL_MPIEXEC", "GPTFL_GPUS_PER_TASK", "GPTFL_REQUEUE", "GPTFL_MAX_RESTARTS",
               "GPTFL_WORKDIR", "HF_HUB_OFFLINE", "CONFIG", "GPTFL_OVERRIDES")
TEMPLATE_VARS = {"gptfl": ("GPTFL_COMMAND", "OUT"), "federate": ("GPTFL_COMMAND", "OUT",
                 "GPTFL_INIT"), "synthesize": ("OUT", "GPTFL_STAGES"),
                 "sweep": ("GPTFL_METHODS", "GPTFL_SEEDS", "GPTFL_ALPHAS", "GPTFL_SWEEP_DIR")}
BIG = SlurmConfig(partition="gpu", account="proj42", qos="normal", time="1-12:00:00", nodes=2,
                  tasks_per_node=4, cpus_per_task=8, gpus_per_node=4, gpus_per_task=1,
                  mem="64G", mpi="pmi2", signal_seconds=300, max_restarts=5,
                  setup=["module load openmpi/4.1", "source $HOME/venvs/gptfl/bin/activate"],
                  extra=["--exclusive", "--constraint=a100"])


def golden(name: str, text: str) -> None:
    path = DATA / name
    if os.environ.get("GPTFL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with GPTFL_UPDATE_GOLDEN=1 and review"


# ---- pure rendering ------------------------------------------------------------------------

def test_render_sbatch_golden():
    cmd = ["federate", "configs/digits.yaml", "fl.rounds=50", "run.methods=[gptfl, fedavg]"]
    golden("sbatch_federate_golden.sh",
           render_sbatch(BIG, cmd, job_name="gptfl-federate", out_dir="/scratch/me/runs/demo"))


def test_render_sbatch_defaults_golden():
    golden("sbatch_defaults_golden.sh", render_sbatch(SlurmConfig(), ["run", "configs/tiny.yaml"]))


@pytest.mark.parametrize("name", TEMPLATES)
def test_shipped_templates_are_rendered_and_valid_bash(name):
    path = REPO / "slurm" / f"{name}.sbatch"
    text = path.read_text()
    assert text == render_template(name), (
        f"{path} differs from the renderer: run python -m gptfl_hpc.launch.slurm")
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    for var in COMMON_VARS + TEMPLATE_VARS[name]:
        assert f"\n{var}=${{{var}:-" in text and f"#   {var} " in text, var
    for directive in ("--signal=B:USR1@120", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}\n" in text


def test_directives_reflect_config_and_reject_unsafe_values():
    lines = sbatch_directives(BIG, "job")
    for want in ("--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=8", "--time=1-12:00:00",
                 "--partition=gpu", "--account=proj42", "--qos=normal", "--mem=64G",
                 "--gpus-per-node=4", "--signal=B:USR1@300", "--requeue", "--exclusive",
                 "--constraint=a100"):
        assert f"#SBATCH {want}" in lines, want
    assert "#SBATCH --no-requeue" in sbatch_directives(SlurmConfig(requeue=False), "job")
    with pytest.raises(ConfigError, match=r"slurm\.partition: invalid value 'a b'.*no spaces"):
        sbatch_directives(SlurmConfig(partition="a b"), "job")
    with pytest.raises(ConfigError, match=r"COMMAND one of run, federate"):
        render_sbatch(SlurmConfig(), ["scale", "c.yaml"])


@pytest.mark.parametrize("text,minutes", [("30", 30), ("1:30", 2), ("01:00:00", 60),
                                          ("2-00", 2880), ("1-02:03", 1563),
                                          ("0-00:00:30", 1)])
def test_time_minutes(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("over,match", [
    ("slurm.time=1h", r"slurm\.time: invalid value '1h'; valid: M, M:S, H:M:S, D-H"),
    ("slurm.mpi=openmpi", r"slurm\.mpi: invalid value 'openmpi'; valid: pmix, pmix_vN, pmi2"),
    ("slurm.launcher=mpirun", r"slurm\.launcher: invalid value 'mpirun'; valid: srun, mpiexec"),
    ("slurm.gpus_per_task=-1", r"slurm\.gpus_per_task: invalid value -1; valid: >= 0"),
    ("slurm.extra=[-p gpu]", r"slurm\.extra: invalid value '-p gpu'; valid: long sbatch"),
    ("slurm.max_restarts=-2", r"slurm\.max_restarts: invalid value -2; valid: >= 0"),
])
def test_slurm_config_errors_name_key_and_choices(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [over])
    with pytest.raises(ConfigError, match=r"slurm\.gpus_per_task: invalid value 2; valid: <= "):
        SlurmConfig(gpus_per_node=4, tasks_per_node=4, gpus_per_task=2)


# ---- the job-script logic, run by bash with fake Slurm tools --------------------------------

FAKE = r"""#!/bin/bash
# records its name and arguments, then behaves as $FAKE_MODE says
{ echo "CALL $(basename "$0")"; printf '%s\n' "$@"; } >> "$FAKE_LOG"
[ "$(basename "$0")" = scontrol ] && exit 0
case "${FAKE_MODE:-ok}" in
  ok) exit 0 ;;
  fail) exit 2 ;;
  self124) exit 124 ;;
  wait)
    trap 'echo "GOT USR1" >> "$FAKE_LOG"; exit 124' USR1
    trap 'echo "GOT TERM" >> "$FAKE_LOG"; exit 143' TERM
    touch "$FAKE_LOG.ready"
    for _ in $(seq 300); do sleep 0.1; done
    exit 99 ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("srun", "scontrol", "mpiexec"):
        (bin_ / tool).write_text(FAKE)
        (bin_ / tool).chmod(0o755)
    log = tmp_path / "calls.log"

    def run(script: str | Path, sig: int | None = None, **env) -> tuple[int, list[list[str]]]:
        e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPTFL_"))}
        e.update(PATH=f"{bin_}:{os.environ['PATH']}", FAKE_LOG=str(log), SLURM_JOB_ID="4242",
                 SLURM_NTASKS="3", GPTFL_WORKDIR=str(tmp_path))
        e.update(env)
        if isinstance(script, str):
            path = tmp_path / "job.sbatch"
            path.write_text(script)
            script = path
        p = subprocess.Popen(["bash", str(script)], env=e, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        if sig is not None:
            ready = Path(f"{log}.ready")
            deadline = time.monotonic() + 20
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready.exists(), "fake launcher never started"
            p.send_signal(sig)
        out, _ = p.communicate(timeout=60)
        calls: list[list[str]] = []
        if log.exists():
            for line in log.read_text().splitlines():
                if line.startswith("CALL "):
                    calls.append([line[5:]])
                else:
                    calls[-1].append(line)
            log.unlink()
        run.output = out
        return p.returncode, calls

    return run


def template(name: str) -> Path:
    return REPO / "slurm" / f"{name}.sbatch"


def test_preemption_signal_is_forwarded_then_the_job_requeues(fake):
    rc, calls = fake(template("gptfl"), sig=signal.SIGUSR1, FAKE_MODE="wait")
    assert rc == 0, fake.output
    srun, requeue = calls
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--mpi=pmix", "python"]
    assert srun[4:] == ["-m", "mpi4py", "-m", "gptfl_hpc", "run", "configs/digits.yaml",
                        "--out", "runs/slurm-4242", "GOT USR1"]
    assert requeue == ["scontrol", "requeue", "4242"]
    assert "requeued job 4242; it resumes from runs/slurm-4242" in fake.output


def test_exit_124_without_a_signal_also_requeues(fake):
    rc, calls = fake(template("gptfl"), FAKE_MODE="self124")
    assert rc == 0 and calls[-1] == ["scontrol", "requeue", "4242"], fake.output


def test_sigterm_is_forwarded_but_never_requeues(fake):
    # scancel / a real preemption sends TERM: Slurm owns the job's fate then
    rc, calls = fake(template("gptfl"), sig=signal.SIGTERM, FAKE_MODE="wait")
    assert rc == 143 and len(calls) == 1 and calls[0][-1] == "GOT TERM", fake.output


def test_failure_exits_with_the_step_code_and_no_requeue(fake):
    rc, calls = fake(template("gptfl"), FAKE_MODE="fail")
    assert rc == 2 and [c[0] for c in calls] == ["srun"], fake.output


def test_requeue_limits(fake):
    rc, calls = fake(template("gptfl"), FAKE_MODE="self124", SLURM_RESTART_COUNT="20")
    assert rc == 124 and [c[0] for c in calls] == ["srun"]
    assert "after 20 restarts (GPTFL_MAX_RESTARTS): giving up" in fake.output
    rc, calls = fake(template("gptfl"), FAKE_MODE="self124", GPTFL_REQUEUE="0")
    assert rc == 124 and [c[0] for c in calls] == ["srun"]


def test_restarted_job_resumes_and_env_overrides_apply(fake):
    rc, calls = fake(template("gptfl"), SLURM_RESTART_COUNT="1", GPTFL_COMMAND="federate",
                     CONFIG="my configs/x.yaml", OUT="/o", GPTFL_OVERRIDES="fl.rounds=9 run.seed=2",
                     SLURM_MPI_TYPE="pmi2", GPTFL_GPUS_PER_TASK="1", GPTFL_SRUN_ARGS="-K0 -l",
                     GPTFL_PYTHON="apptainer exec img.sif python3")
    assert rc == 0, fake.output
    assert calls == [["srun", "--kill-on-bad-exit=1", "--mpi=pmi2", "--gpus-per-task=1", "-K0",
                      "-l", "apptainer", "exec", "img.sif", "python3", "-m", "mpi4py", "-m",
                      "gptfl_hpc", "federate", "my configs/x.yaml", "fl.rounds=9", "run.seed=2",
                      "--out", "/o", "--resume"]]
    rc, calls = fake(template("gptfl"), GPTFL_SRUN_MPI="default", GPTFL_COMMAND="prepare",
                     SLURM_RESTART_COUNT="1")
    assert calls[0][:3] == ["srun", "--kill-on-bad-exit=1", "python"]
    assert calls[0][-1] != "--resume"  # prepare has no --resume


def test_mpiexec_launcher_and_bad_launcher(fake):
    rc, calls = fake(template("gptfl"), GPTFL_LAUNCH="mpiexec",
                     GPTFL_MPIEXEC="mpiexec --bind-to none")
    assert rc == 0
    assert calls[0][:6] == ["mpiexec", "--bind-to", "none", "-n", "3", "python"]
    rc, calls = fake(template("gptfl"), GPTFL_LAUNCH="ssh")
    assert rc == 2 and calls == []
    assert "error: GPTFL_LAUNCH=ssh; valid: srun, mpiexec" in fake.output


def test_rendered_values_are_quoted(fake, tmp_path):
    weird = str(tmp_path / "we ird" / "o'u\"t$HOME`x`")
    script = render_sbatch(SlurmConfig(), ["federate", "c d.yaml", "run.methods=[gptfl, fedavg]",
                                           "x.y='$(touch pwned)'"], out_dir=weird)
    rc, calls = fake(script)
    assert rc == 0, fake.output
    assert calls[0][-6:] == ["federate", "c d.yaml", "run.methods=[gptfl, fedavg]",
                             "x.y='$(touch pwned)'", "--out", weird]
    assert not (tmp_path / "pwned").exists()


def test_federate_template_takes_the_pretrained_model(fake, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    rc, calls = fake(template("federate"), OUT=str(out))
    assert "fl.init=" not in " ".join(calls[0])
    (out / "pretrained.safetensors").write_bytes(b"")
    rc, calls = fake(template("federate"), OUT=str(out))
    assert f"fl.init={out}/pretrained.safetensors" in calls[0]
    rc, calls = fake(template("federate"), OUT=str(out), GPTFL_INIT="/m.safetensors")
    assert calls[0][calls[0].index("--out") - 1] == "fl.init=/m.safetensors"


def test_synthesize_runs_the_stages_in_order_and_stops_on_failure(fake):
    rc, calls = fake(template("synthesize"), SLURM_NTASKS="1", OUT="/o")
    assert rc == 0
    assert [c[c.index("gptfl_hpc") + 1] for c in calls] == [
        "prepare", "train-generator", "synthesize", "pretrain"]
    rc, calls = fake(template("synthesize"), FAKE_MODE="fail", OUT="/o")
    assert rc == 2 and len(calls) == 1


def test_sweep_maps_the_array_index(fake):
    # 3 methods x 3 seeds x 2 alphas: index 13 -> method 13%3=1, seed 13//3%3=1, alpha 13//9=1
    rc, calls = fake(template("sweep"), SLURM_ARRAY_TASK_ID="13", SLURM_ARRAY_JOB_ID="77")
    assert rc == 0, fake.output
    args = calls[0][calls[0].index("gptfl_hpc") + 1:]
    assert args == ["run", "configs/digits.yaml", "run.methods=[fedavg]", "run.seed=1",
                    "data.alpha=0.5", "--out", "runs/sweep-77/fedavg-seed1-alpha0.5"]
    rc, calls = fake(template("sweep"), SLURM_ARRAY_TASK_ID="18")
    assert rc == 2 and calls == []
    assert "has 18 combinations; submit with sbatch --array=0-17" in fake.output


# ---- CLI ---------------------------------------------------------------------------------------

def test_render_slurm_cli(tmp_path):
    p = run_cli(["render-slurm", "configs/tiny.yaml", "fl.rounds=5", "--command", "federate",
                 "--out", "runs/x", "--nodes", "2", "--time", "30"], timeout=60)
    cfg = load_config("configs/tiny.yaml", ["fl.rounds=5"])
    from gptfl_hpc.config import replace

    want = render_sbatch(replace(cfg.slurm, nodes=2, time="30"),
                         ["federate", "configs/tiny.yaml", "fl.rounds=5"],
                         job_name="gptfl-federate", out_dir="runs/x")
    assert p.stdout == want
    dest = tmp_path / "t.sbatch"
    run_cli(["render-slurm", "configs/tiny.yaml", "--template", "sweep", "--write", dest],
            timeout=60)
    assert dest.read_text() == render_template("sweep", cfg.slurm)
    assert os.access(dest, os.X_OK)
    bad = run_cli(["render-slurm", "configs/tiny.yaml", "--mpi", "openmpi"], timeout=60,
                  check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith(
        "config key slurm.mpi: invalid value 'openmpi'; valid: pmix, pmix_vN, pmi2, "
        "cray_shasta, none, default")


def test_regenerating_templates_is_a_noop(tmp_path):
    subprocess.run([sys.executable, "-m", "gptfl_hpc.launch.slurm", str(tmp_path)], check=True,
                   timeout=60, capture_output=True)
    for name in TEMPLATES:
        assert (tmp_path / f"{name}.sbatch").read_text() == template(name).read_text()



# ---- submit (submitit) without Slurm ----------------------------------------------------------

def test_submit_rejects_bad_arguments_in_one_line(tmp_path):
    from gptfl_hpc.launch import submit

    with pytest.raises(ConfigError, match=r"cluster 'pbs': unknown; valid: slurm, local, debug"):
        submit("configs/tiny.yaml", tmp_path, cluster="pbs")
    with pytest.raises(ConfigError,
                       match=r"command 'scale': not submittable; valid: run, federate"):
        submit("configs/tiny.yaml", tmp_path, command="scale")
    with pytest.raises(ConfigError, match=r"submit option\(s\) gpus: unknown; valid: partition, "):
        submit("configs/tiny.yaml", tmp_path, gpus=2)
    with pytest.raises(ConfigError, match=r"slurm\.nodes: invalid value 0; valid: >= 1"):
        submit("configs/tiny.yaml", tmp_path, nodes=0)


def test_task_command_lines_and_resume(tmp_path, monkeypatch):
    import pickle

    from gptfl_hpc.launch.jobs import GptflTask

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    direct = GptflTask(["federate", "c.yaml", "fl.rounds=2"], "/o")
    assert direct.cmdline() == [sys.executable, "-m", "mpi4py", "-m", "gptfl_hpc", "federate",
                                "c.yaml", "fl.rounds=2", "--out", "/o"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # a requeued job always resumes
    assert direct.cmdline()[-1] == "--resume"
    assert GptflTask(["prepare", "c.yaml"], "/o").cmdline()[-1] == "/o"
    monkeypatch.setenv("GPTFL_MPIEXEC", "mpiexec")
    local = GptflTask(["run", "c.yaml"], "/o", ranks=3, resume=True)
    cmd = local.cmdline()
    assert cmd[cmd.index("-n") + 1] == "3" and cmd[-1] == "--resume"
    # what submitit stores: no process handle, and checkpoint() resumes
    local._proc = subprocess.Popen(["true"])
    clone = pickle.loads(pickle.dumps(local))
    assert clone._proc is None and clone.argv == local.argv and clone.ranks == 3
    assert not clone._exited.is_set()
    resumed = direct.checkpoint().function
    assert resumed.resume and resumed.argv == direct.argv


# ---- a submitit task on Slurm whose app stopped for preemption (exit 124), fake scontrol ------

def slurm_task(tmp_path, monkeypatch, app: str, state: str, restarts: int = 0, rank: int = 1,
               **opts: float):
    """A GptflTask as task `rank` of Slurm job 77 (attempt 0) whose app is `python -c APP`;
    `scontrol show job 77` answers JobState=STATE Restarts=RESTARTS."""
    from gptfl_hpc.launch.jobs import GptflTask

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        f"#!/bin/sh\necho 'JobId=77 JobName=t JobState={state} Reason=None Requeue=1 "
        f"Restarts={restarts} BatchFlag=1'\n")
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_PROCID": str(rank),
                 "SLURM_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(k, v)
    task = GptflTask(["federate", "c.yaml"], str(tmp_path / "o"), **opts)
    monkeypatch.setattr(task, "cmdline", lambda: [sys.executable, "-c", app])
    return task


@pytest.mark.parametrize("state,restarts", [("REQUEUED", 0), ("PENDING", 1), ("CANCELLED", 0),
                                            ("COMPLETING", 0), ("RUNNING", 1)])
def test_stopped_task_leaves_without_a_result_once_the_attempt_is_over(tmp_path, monkeypatch,
                                                                       state, restarts):
    # requeued by rank 0 (REQUEUED, or already PENDING/RUNNING again with Restarts=1),
    # or cancelled: the task exits (SystemExit, so submitit stores no outcome) and never
    # requeues by itself
    task = slurm_task(tmp_path, monkeypatch, "raise SystemExit(124)", state, restarts,
                      exit_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        task()
    assert e.value.code == 124 and time.monotonic() - t0 < 30


def test_stopped_task_reports_failure_when_nothing_ends_the_attempt(tmp_path, monkeypatch):
    from gptfl_hpc.launch.jobs import JobFailed

    task = slurm_task(tmp_path, monkeypatch, "raise SystemExit(124)", "RUNNING", exit_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=r"^gptfl-hpc federate stopped at a boundary \(exit 124\) "
                       r"on rank 1, but job 77 was still RUNNING 2s later: nothing requeued or "
                       r"cancelled it; its progress is saved in .*/o: resubmit with --resume$"):
        task()
    assert 2 <= time.monotonic() - t0 < 20


def test_failed_app_is_reported_at_once(tmp_path, monkeypatch):
    from gptfl_hpc.launch.jobs import JobFailed

    task = slurm_task(tmp_path, monkeypatch, "raise SystemExit(3)", "REQUEUED")
    with pytest.raises(JobFailed, match=r"gptfl-hpc federate exited with code 3 on rank 1"):
        task()


@pytest.mark.parametrize("case", ["preempted", "cancelled", "failed", "limit"])
def test_submitit_job_script_requeues_after_124_unless_cancelled(tmp_path, case):
    """The lines submit() adds to submitit's job script: srun ending with 124 (the app saved at
    a boundary; mpi4py's MPI_Abort(124) ended the step) requeues the job, except after a SIGTERM
    to the batch shell (scancel: the job stays cancelled), another exit code, or the limit."""
    from gptfl_hpc.launch.jobs import _requeue_trap

    calls = tmp_path / "calls"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake / "scontrol").chmod(0o755)
    step_rc = 2 if case == "failed" else 124
    script = tmp_path / "job.sh"  # the step stands in for srun: busy for a moment, then rc
    script.write_text("\n".join(["#!/bin/bash", *_requeue_trap(3),
                                 f"bash -c 'sleep 1; exit {step_rc}'", ""]))
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_RESTART_COUNT="3" if case == "limit" else "1")
    shell = subprocess.Popen(["bash", str(script)], env=env)
    if case == "cancelled":
        time.sleep(0.3)
        shell.send_signal(signal.SIGTERM)  # scancel: the batch shell gets SIGTERM too
    assert shell.wait(timeout=30) == step_rc
    requeued = calls.read_text().splitlines() if calls.exists() else []
    assert requeued == (["requeue 4242"] if case == "preempted" else []), case


def test_checkpoint_stops_the_app_then_resumes(tmp_path, monkeypatch):
    """What submitit does on rank 0 at its preemption signal: its handler (in the main thread,
    while the task waits for its app) calls checkpoint(), which forwards SIGUSR1 to the app and
    returns as soon as the app has stopped, not after stop_timeout."""
    ready = tmp_path / "ready"
    app = ("import signal, sys, time, pathlib\n"
           "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(124))\n"
           f"pathlib.Path({str(ready)!r}).touch()\n"
           "time.sleep(60)\n")
    task = slurm_task(tmp_path, monkeypatch, app, "RUNNING", rank=0, stop_timeout=40)
    seen: dict = {}

    class Requeued(Exception):
        pass

    def handler(signum, frame):  # submitit: checkpoint, requeue, exit
        t = time.monotonic()
        seen["resumed"] = task.checkpoint().function
        seen["seconds"] = time.monotonic() - t
        raise Requeued

    def preempt():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        threading.Thread(target=preempt, daemon=True).start()
        with pytest.raises(Requeued):
            task()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen["seconds"] < 20, seen
    assert seen["resumed"].resume and seen["resumed"].argv == task.argv
    assert seen["resumed"].exit_timeout == task.exit_timeout


def test_submit_debug_cluster_runs_mpiexec_and_returns_the_summary(tmp_path, monkeypatch):
    from helpers import MPI_ENV

    from gptfl_hpc.launch import submit
    from gptfl_hpc.launch.jobs import rank0_result

    for k, v in MPI_ENV.items():
        monkeypatch.setenv(k, v)
    job = submit("configs/tiny.yaml", tmp_path / "o", command="federate", cluster="debug",
                 tasks_per_node=2, overrides=["fl.rounds=1"])
    summary = rank0_result(job)
    assert summary == json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rounds"] == 1


# ---- scale ------------------------------------------------------------------------------------

def fake_federate(calls):
    """A federate stand-in: perfect strong scaling, 10 s of client work per round in total."""
    def run(ranks, overrides, run_dir):
        calls.append((ranks, list(overrides)))
        over = dict(o.split("=", 1) for o in overrides)
        cpr = int(over["fl.clients_per_round"])
        run_dir.mkdir(parents=True)
        wall, lines = 0.0, []
        for rnd in (1, 2, 3):
            t = (30.0 if rnd == 1 else 10.0 * cpr / 4) / (ranks - 1)  # round 1: warm-up
            wall += t
            lines.append(json.dumps({"round": rnd, "num_samples": 100 * cpr, "t_round": t,
                                     "t_client": 0.9 * t, "t_comm": 0.05 * t,
                                     "t_server": 0.01 * t, "t_idle": 0.0,
                                     "wall_seconds": wall}))
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.mark.parametrize("mode", ["strong", "weak"])
def test_scale_with_a_fake_runner(tmp_path, mode):
    import csv

    from gptfl_hpc.launch.scale import run_scaling

    cfg = load_config("configs/tiny.yaml", ["data.num_clients=8"])
    calls = []
    rows = run_scaling(cfg, "configs/tiny.yaml", ["fl.rounds=3"], tmp_path, [2, 3, 5], mode,
                       fake_federate(calls))
    # what each rank count ran with
    k = {"strong": [1, 1, 1], "weak": [1, 2, 4]}[mode]
    assert [c[0] for c in calls] == [2, 3, 5]
    for (r, over), f in zip(calls, k, strict=True):
        assert over[0] == "fl.rounds=3"
        assert f"data.num_clients={8 * f}" in over and f"fl.clients_per_round={4 * f}" in over
        if mode == "strong":
            assert f"data.dir={tmp_path}/data-c8" in over
            assert not any(o.startswith("data.train_fraction") for o in over)
        else:  # the pool grows with the clients: same data per client at every rank count
            assert f"data.dir={tmp_path}/data-r{r}" in over
            assert f"data.train_fraction={f / 4:g}" in over
    # the fake scales perfectly in both modes: speedup == ideal == client ranks ratio
    for r, ideal in zip(rows, (1, 2, 4), strict=True):
        assert r["rounds_timed"] == 2
        assert r["ideal"] == ideal and r["speedup"] == pytest.approx(ideal)
        assert r["efficiency"] == pytest.approx(1.0)
    assert rows[0]["samples_per_s"] == pytest.approx(800 / 20)  # 2 rounds x 400 in 2 x 10 s
    with open(tmp_path / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(t["ranks"]) for t in table] == [2, 3, 5]
    assert float(table[2]["efficiency"]) == pytest.approx(1.0)
    md = (tmp_path / "scaling.md").read_text()
    assert f"# Scaling ({mode})" in md and "| 5 | 4 |" in md
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scale_detects_slowdown(tmp_path):
    from gptfl_hpc.launch.scale import run_scaling

    def flat(ranks, overrides, run_dir):  # no speedup at all: same round time at any R
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"round": r, "num_samples": 400, "t_round": 1.0, "t_client": 1.0,
                        "t_comm": 0.0, "t_server": 0.0, "wall_seconds": float(r)}) + "\n"
            for r in (1, 2, 3)))

    cfg = load_config("configs/tiny.yaml", [])
    rows = run_scaling(cfg, "c", [], tmp_path, [2, 5], "strong", flat)
    assert rows[1]["speedup"] == pytest.approx(1.0) and rows[1]["efficiency"] == pytest.approx(0.25)
    assert rows[1]["t_idle"] != rows[1]["t_idle"]  # nan: the engine did not report it


@pytest.mark.parametrize("ranks,nodes,match", [
    ("1,2", 1, r"--ranks '1,2': invalid; valid: comma-separated integers >= 2"),
    ("two", 1, r"--ranks 'two': invalid"),
    ("2,3", 2, r"--ranks 3: not divisible by --nodes 2; valid: multiples of 2"),
])
def test_scale_rank_errors(ranks, nodes, match):
    from gptfl_hpc.launch.scale import parse_ranks

    with pytest.raises(ConfigError, match=match):
        parse_ranks(ranks, nodes)


def test_scale_strong_needs_a_client_per_rank(tmp_path):
    from gptfl_hpc.launch.scale import plan

    cfg = load_config("configs/tiny.yaml", [])
    with pytest.raises(ConfigError, match=r"--ranks 8: 7 client ranks but data.num_clients=6; "
                                          r"valid: ranks <= num_clients \+ 1"):
        plan(cfg, [2, 8], "strong", tmp_path)
    assert plan(cfg, [2, 8], "weak", tmp_path)[1].num_clients == 42


@pytest.mark.slow
def test_scale_cli_real_local_run(tmp_path):
    p = run_cli(["scale", "configs/tiny.yaml", "fl.rounds=3", "--ranks", "2,3", "--out", tmp_path],
                timeout=400)
    rows = (tmp_path / "scaling.csv").read_text().splitlines()
    assert rows[0].startswith("ranks,client_ranks") and [r.split(",")[0] for r in rows[1:]] == [
        "2", "3"]
    for r in (2, 3):
        assert len((tmp_path / f"r{r}" / "metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    assert "scaling report" in p.stderr


def test_scale_takes_the_users_data_dir_and_keys_the_plan_also_sets(tmp_path):
    from gptfl_hpc.launch.scale import merge_overrides

    # the plan sets data.dir and the per-count sizes; the user's own values of those keys give
    # way (the plan was computed from them), everything else is kept, in order
    assert merge_overrides(["data.dir=/d", "fl.rounds=3", "data.num_clients = 9"],
                           ["data.num_clients=6", "data.dir=/d"]) == \
        ["fl.rounds=3", "data.num_clients=6", "data.dir=/d"]
    data = tmp_path / "data"
    run_cli(["prepare", "configs/tiny.yaml", "--out", data], timeout=120)
    run_cli(["scale", "configs/tiny.yaml", f"data.dir={data}", "fl.rounds=2", "--ranks", "2",
             "--mode", "strong", "--out", tmp_path / "s"], timeout=300)
    assert len((tmp_path / "s" / "r2" / "metrics.jsonl").read_text().splitlines()) == 2


def test_failed_job_reports_the_apps_one_line_error(tmp_path, monkeypatch):
    from helpers import MPI_ENV

    from gptfl_hpc.launch import submit
    from gptfl_hpc.launch.jobs import JobFailed, rank0_result

    for k, v in MPI_ENV.items():
        monkeypatch.setenv(k, v)
    job = submit("configs/tiny.yaml", tmp_path / "o", command="federate", cluster="local",
                 tasks_per_node=3, overrides=["data.num_clients=1", "fl.clients_per_round=1"])
    with pytest.raises(JobFailed, match=r"failed: gptfl-hpc federate: error: 2 client ranks but "
                                        r"only 1 clients .*exited with code 2 on rank 0"):
        rank0_result(job)


def test_job_error_comes_from_any_rank_when_rank_0_was_killed_first(tmp_path):
    """srun --kill-on-bad-exit can SIGTERM rank 0 before it prints its own refusal when another
    rank refuses first (a loaded node): the reported error is then that rank's one-line error,
    named; rank 0's own error wins when it has one; none found is None."""
    import types

    from gptfl_hpc.launch.jobs import _app_error

    line = "[gptfl r{r}] gptfl-hpc federate: error: MPI world size 1 != SLURM_NTASKS 3: ..."
    (tmp_path / "27_0_log.err").write_text("slurmstepd: error: *** STEP 27.0 CANCELLED ***\n")
    (tmp_path / "27_2_log.err").write_text(line.format(r=2) + "\n")
    (tmp_path / "270_1_log.err").write_text("gptfl-hpc federate: error: another job's\n")
    job = types.SimpleNamespace(job_id="27",
                                paths=types.SimpleNamespace(stderr=tmp_path / "27_0_log.err"))
    assert _app_error(job) == ("gptfl-hpc federate: error: MPI world size 1 != SLURM_NTASKS 3: "
                               "... [rank 2]")
    (tmp_path / "27_0_log.err").write_text(line.format(r=0) + "\n")
    assert _app_error(job) == "gptfl-hpc federate: error: MPI world size 1 != SLURM_NTASKS 3: ..."
    for f in tmp_path.glob("27_*"):
        f.write_text("nothing\n")
    assert _app_error(job) is None
