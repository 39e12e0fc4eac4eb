"""Submit gptfl-hpc commands through submitit: Slurm, local processes, or in-process (debug).

On Slurm each task of the job is one MPI rank (``srun --mpi=TYPE``; rank 0 is the server). The
submitted callable does not run the app in its own process: each task starts
``python -m mpi4py -m gptfl_hpc COMMAND ...`` as a child that inherits the task's Slurm/PMIx
environment, so the child joins the step's MPI world exactly as under the batch templates. This
keeps mpi4py's abort-on-error (an exception on one rank ends them all), lets the app own its
signal handlers, and keeps MPI out of submitit's own process.

With ``cluster="local"``/``"debug"`` the job is one process that runs ``mpiexec -n RANKS``.

Preemption and cancellation on Slurm:

* submitit's signal (USR2, ``signal_seconds`` before the time limit, or at a preemption when
  Slurm sends user signals) reaches every process of the step. The app stops at its next round
  boundary, saves, and exits 124. Rank 0's submitit handler calls ``GptflTask.checkpoint()``,
  which waits for that and hands submitit a copy of the callable with ``resume=True`` to
  requeue. ``python -m mpi4py`` turns the app's exit 124 into MPI_Abort(124), which can end the
  whole step (the submitit tasks included) first; the job script then requeues the job itself
  when the step ended with 124. Either way the requeued job passes ``--resume``.
* SIGTERM (``scancel``, a preemption without the user signal) also makes the app save and exit
  124, but then the job's fate is Slurm's: it cancels the job, or requeues it itself. Neither the
  tasks nor the job script requeue after a SIGTERM: a cancelled job stays cancelled.

A task whose app exited 124 and that is still alive waits, with a deadline, until
``scontrol show job`` shows the attempt over, and leaves without a result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import submitit

from gptfl_hpc.errors import ConfigError, GptflError, Preempted
from gptfl_hpc.launch.slurm import RESUMABLE, RUNNABLE, time_minutes
from gptfl_hpc.parallel.env import mpiexec_command

log = logging.getLogger(__name__)

CLUSTERS = ("slurm", "local", "debug")
RESULT_FILES = {"federate": "summary.json", "run": "report.json"}
# launcher variables a local mpiexec must not inherit (e.g. when called inside an allocation)
_LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_COMM_WORLD", "OMPI_MCA_orte_",
                      "PRTE_MCA_ess")


class JobFailed(GptflError):
    """A submitted gptfl-hpc job ended without its result."""


def local_env() -> dict[str, str]:
    """This process's environment without any launcher/allocation variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}


class GptflTask(submitit.helpers.Checkpointable):
    """The submitted callable: run ``gptfl-hpc ARGV --out OUT`` as one MPI rank per task.

    ranks=None: direct launch, this Slurm task is one rank of the step's MPI world.
    ranks=N: this single process runs ``mpiexec -n N`` (local/debug clusters).
    Returns the parsed result file (summary.json / report.json) on rank 0, None elsewhere.

    stop_timeout: how long :meth:`checkpoint` waits for the ranks to stop at a boundary.
    exit_timeout: how long a task whose app stopped for preemption (exit 124) waits for Slurm to
    end this attempt (a requeue or a cancel) before it reports the job failed.
    """

    def __init__(self, argv: list[str], out: str, ranks: int | None = None,
                 resume: bool = False, stop_timeout: float = 60.0,
                 exit_timeout: float = 120.0) -> None:
        self.argv = list(argv)
        self.out = str(out)
        self.ranks = ranks
        self.resume = resume
        self.stop_timeout = stop_timeout
        self.exit_timeout = exit_timeout
        self._proc: subprocess.Popen | None = None
        self._exited = threading.Event()

    def __getstate__(self) -> dict:  # never pickle the running child or its reaper's event
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_exited")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("exit_timeout", 120.0)  # pickled before the field existed
        self._proc = None
        self._exited = threading.Event()

    @property
    def command(self) -> str:
        return self.argv[0]

    def cmdline(self) -> list[str]:
        args = [*self.argv, "--out", self.out]
        restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        if (self.resume or restarted) and self.command in RESUMABLE:
            args.append("--resume")
        app = [sys.executable, "-m", "mpi4py", "-m", "gptfl_hpc", *args]
        return app if self.ranks is None else [*mpiexec_command(self.ranks), *app]

    def __call__(self) -> dict | None:
        cmd = self.cmdline()
        on_slurm = self.ranks is None and "SLURM_JOB_ID" in os.environ
        env = dict(os.environ) if self.ranks is None else local_env()
        env["PYTHONUNBUFFERED"] = "1"
        rank = int(os.environ.get("SLURM_PROCID", "0")) if self.ranks is None else 0
        if rank == 0:
            log.info("running: %s", shlex.join(cmd))
        proc = self._proc = subprocess.Popen(cmd, env=env)
        self._exited.clear()
        # One thread reaps the child and this (main) thread only waits for that: submitit's
        # signal handler runs checkpoint() in this thread, between two waits, so it must never
        # find the child half-reaped by an interrupted poll().
        threading.Thread(target=self._reap, args=(proc,), name="gptfl-reap", daemon=True).start()
        while not self._exited.wait(1.0):
            pass
        rc = proc.returncode
        self._proc = None
        if rc == 0:
            return self._result() if rank == 0 else None
        if rc == Preempted.exit_code and on_slurm:
            self._await_end_of_attempt(rank)
        raise JobFailed(f"gptfl-hpc {self.command} exited with code {rc} on rank {rank}; "
                        "see the job's stderr log")

    def _reap(self, proc: subprocess.Popen) -> None:
        proc.wait()
        self._exited.set()

    def _result(self) -> dict | None:
        name = RESULT_FILES.get(self.command)
        if name is None:
            return None
        path = Path(self.out) / name
        if not path.is_file():
            raise JobFailed(f"gptfl-hpc {self.command} exited 0 but wrote no {path}")
        return json.loads(path.read_text())

    def _await_end_of_attempt(self, rank: int) -> None:
        """The app stopped at a boundary and saved (exit 124): wait until Slurm ends this attempt.

        What ends it is not this task's decision. After submitit's preemption signal, rank 0's
        submitit handler (it runs in this thread, so it may still come during the waits below)
        or the job script (when the step ended with 124) requeues the job; after SIGTERM alone
        (scancel, a Slurm preemption) Slurm cancels or requeues it. Once ``scontrol show job``
        shows this attempt over, the task leaves with SystemExit: submitit stores no outcome for
        it, so a requeued job's tasks find nothing stale. Raises JobFailed if nothing ended the
        attempt within ``exit_timeout`` seconds.
        """
        job_id = os.environ["SLURM_JOB_ID"]
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if rank == 0:
            log.warning("gptfl-hpc stopped at a boundary (exit 124): waiting up to %.0fs for "
                        "Slurm to requeue or end job %s", self.exit_timeout, job_id)
        deadline = time.monotonic() + self.exit_timeout
        state = "unknown"
        while time.monotonic() < deadline:
            state, restarts = slurm_job_state(job_id)
            if state not in _ATTEMPT_RUNNING or restarts > attempt:
                log.warning("job %s is %s after %d restart(s): this attempt is over; exiting",
                            job_id, state, restarts)
                raise SystemExit(Preempted.exit_code)
            time.sleep(1.0)
        raise JobFailed(f"gptfl-hpc {self.command} stopped at a boundary (exit 124) on rank "
                        f"{rank}, but job {job_id} was still {state} {self.exit_timeout:.0f}s "
                        f"later: nothing requeued or cancelled it; its progress is saved in "
                        f"{self.out}: resubmit with --resume")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on rank 0 at its preemption/timeout signal (in its handler)."""
        proc = self._proc
        if proc is not None and not self._exited.is_set():
            log.warning("preemption signal: waiting up to %.0fs for the ranks to stop at a "
                        "round boundary", self.stop_timeout)
            proc.send_signal(signal.SIGUSR1)  # idempotent if Slurm already signalled it
            if not self._exited.wait(self.stop_timeout):
                log.warning("the ranks did not stop within %.0fs; requeueing anyway (the "
                            "requeued job resumes from the newest complete checkpoint)",
                            self.stop_timeout)
        resumed = GptflTask(self.argv, self.out, self.ranks, resume=True,
                            stop_timeout=self.stop_timeout, exit_timeout=self.exit_timeout)
        return submitit.helpers.DelayedSubmission(resumed)


# job states (scontrol show job) in which the current attempt still runs; any other state
# (COMPLETING, CANCELLED, REQUEUED, PENDING, PREEMPTED, ...) means it is over
_ATTEMPT_RUNNING = ("RUNNING", "SUSPENDED", "unknown")


def slurm_job_state(job_id: str) -> tuple[str, int]:
    """(JobState, Restarts) of a Slurm job from ``scontrol show job``, or ("unknown", 0) when
    that fails (the controller briefly busy)."""
    try:
        p = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown", 0
    info = dict(re.findall(r"(\w+)=(\S*)", p.stdout))
    restarts = info.get("Restarts", "")
    return info.get("JobState") or "unknown", int(restarts) if restarts.isdigit() else 0


def _requeue_trap(max_restarts: int) -> list[str]:
    """Job-script lines: requeue the job when its step ended with 124, unless it was cancelled.

    The app exits 124 once it has saved at a boundary, and ``python -m mpi4py`` turns that exit
    into MPI_Abort(124), which ends the whole step, the submitit tasks included, often before
    rank 0's checkpoint() has requeued: so the job script requeues (srun returns 124). Not when
    the batch shell got SIGTERM itself: that is ``scancel`` (the job must stay cancelled) or a
    Slurm preemption (Slurm requeues or cancels the job itself).
    """
    return ["trap 'gptfl_term=1' TERM",
            "trap 'rc=$?; if [ $rc -eq 124 ] && [ -z \"${gptfl_term:-}\" ] && "
            f"[ \"${{SLURM_RESTART_COUNT:-0}}\" -lt {max_restarts} ]; then "
            "scontrol requeue \"$SLURM_JOB_ID\"; fi' EXIT"]


def submit(config: Any, out: str | os.PathLike, command: str = "run", cluster: str = "slurm",
           *, overrides: list[str] | tuple = (), folder: str | os.PathLike | None = None,
           job_name: str | None = None, **opts: Any) -> submitit.Job:
    """Submit ``gptfl-hpc COMMAND CONFIG [overrides] --out OUT`` and return the submitit Job.

    ``config`` is a YAML path or a :class:`gptfl_hpc.config.Config` (written to
    OUT/submitted-config.yaml). ``opts`` override fields of the config's ``slurm`` section
    (nodes, tasks_per_node, gpus_per_node, partition, time, mpi, ...). Rank 0's result is
    ``job.results()[0]`` (multi-task) or ``job.result()`` (one task).
    """
    from gptfl_hpc.config import Config, SlurmConfig, dump_yaml, load_config, replace
    from gptfl_hpc.fsio import write_text

    if cluster not in CLUSTERS:
        raise ConfigError(f"cluster {cluster!r}: unknown; valid: {', '.join(CLUSTERS)}")
    if command not in RUNNABLE:
        raise ConfigError(f"command {command!r}: not submittable; valid: {', '.join(RUNNABLE)}")
    out = Path(out).resolve()
    if isinstance(config, Config):
        if overrides:
            raise ConfigError("submit overrides: only with a config path; valid: apply them to "
                              "the Config object (dataclasses.replace) or pass its YAML path")
        cfg = config
        config_path = out / "submitted-config.yaml"
        write_text(config_path, dump_yaml(config))
        argv = [command, str(config_path)]
    else:
        cfg = load_config(config, list(overrides))
        argv = [command, str(Path(config).resolve()), *overrides]
    valid = [f for f in SlurmConfig.__dataclass_fields__]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ConfigError(f"submit option(s) {', '.join(unknown)}: unknown; valid: "
                          + ", ".join(valid))
    slurm = replace(cfg.slurm, **opts) if opts else cfg.slurm
    return submit_task(argv, out, slurm, cluster, folder=folder, job_name=job_name)


def submit_task(argv: list[str], out: Path, slurm, cluster: str, *,
                folder: str | os.PathLike | None = None,
                job_name: str | None = None) -> submitit.Job:
    """Submit a prepared argv with an explicit SlurmConfig (used by the CLI and by scale)."""
    folder = Path(folder) if folder else Path(out) / "submitit"
    ranks = slurm.nodes * slurm.tasks_per_node
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster,
                                     slurm_max_num_timeout=slurm.max_restarts)
    params: dict[str, Any] = {"name": job_name or f"gptfl-{argv[0]}",
                              "timeout_min": time_minutes(slurm.time)}
    if cluster == "slurm":
        srun = ["--kill-on-bad-exit=1"]
        if slurm.mpi != "default":
            srun.append(f"--mpi={slurm.mpi}")
        params.update(nodes=slurm.nodes, tasks_per_node=slurm.tasks_per_node,
                      cpus_per_task=slurm.cpus_per_task,
                      slurm_srun_args=srun, slurm_signal_delay_s=slurm.signal_seconds,
                      slurm_setup=[*slurm.setup,
                                   *(_requeue_trap(slurm.max_restarts) if slurm.requeue
                                     else [])])
        extra: dict[str, Any] = {"requeue": True} if slurm.requeue else {}
        for opt in slurm.extra:
            key, _, value = opt[2:].partition("=")
            extra[key] = value if value else True
        if extra:
            params["slurm_additional_parameters"] = extra
        for key in ("partition", "account", "qos", "mem"):
            if getattr(slurm, key):
                params[f"slurm_{key}"] = getattr(slurm, key)
        if slurm.gpus_per_node:
            params["gpus_per_node"] = slurm.gpus_per_node
        if slurm.gpus_per_task:
            params["slurm_gpus_per_task"] = slurm.gpus_per_task
        task = GptflTask(argv, str(out), ranks=None,
                         stop_timeout=max(5.0, slurm.signal_seconds - 15.0))
    else:
        task = GptflTask(argv, str(out), ranks=ranks)
    executor.update_parameters(**params)
    job = executor.submit(task)
    log.info("submitted %s as %s job %s (%d ranks, logs in %s)", shlex.join(argv), cluster,
             job.job_id, ranks, folder)
    return job


def _app_error(job: submitit.Job) -> str | None:
    """The app's own one-line error from the job's task logs: rank 0's, else the first other
    task's that has one. srun --kill-on-bad-exit may SIGTERM rank 0 before it prints its error
    when another rank fails first (an every-rank refusal on a loaded node), so rank 0's log
    alone can hold only the signal."""
    first = Path(job.paths.stderr)
    pat = re.compile(rf"{re.escape(str(job.job_id))}_(\d+)_log\.err")
    found = {int(m.group(1)): p for p in first.parent.glob(f"{job.job_id}_*_log.err")
             if (m := pat.fullmatch(p.name))}
    for k in sorted(found, key=lambda t: (t != 0, t)):  # rank 0 first
        try:
            log_text = found[k].read_text(errors="replace")
        except OSError:
            continue
        app = [ln.split("] ", 1)[-1] for ln in log_text.splitlines()
               if re.search(r"gptfl-hpc [\w-]+: error: ", ln)]
        if app:
            return app[-1] if k == 0 else f"{app[-1]} [rank {k}]"
    return None


def rank0_result(job: submitit.Job) -> dict | None:
    """Wait for the job and return rank 0's result (raises JobFailed on failure).

    The error names the app's own one-line error (from the task's stderr log) when there is one,
    else the exception submitit reports, else submitit's summary (e.g. "state: CANCELLED").
    """
    try:
        results = job.results()
    except Exception as e:  # submitit raises FailedJobError / UncompletedJobError
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip(" -")]
        raised = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception|JobFailed): ", ln)]
        why = raised[-1] if raised else (lines or [type(e).__name__])[0]
        app = _app_error(job)
        if app:
            why = f"{app} ({why})"
        raise JobFailed(f"job {job.job_id} failed: {why}; state {job.state}; logs: "
                        f"{job.paths.stderr}") from None
    return results[0]
