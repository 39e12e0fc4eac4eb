"""Slurm batch scripts, rendered by pure functions from the ``slurm`` config section.

One renderer makes both the shipped, environment-parameterised templates in ``slurm/`` and the
concrete scripts of ``gptfl-hpc render-slurm``, so the preemption logic exists exactly once:

* ``#SBATCH --signal=B:USR1@N``: only the batch shell gets the warning. It runs the job step in
  the background (so its trap can fire), forwards the signal to the step (``srun`` and Open MPI's
  ``mpiexec`` both pass SIGUSR1 on to every rank), and then knows *why* the step ended.
* The ranks stop together at a round boundary, the server checkpoints, and the app exits 124
  (:class:`gptfl_hpc.errors.Preempted`). The shell then runs ``scontrol requeue`` and the job
  restarts with ``SLURM_RESTART_COUNT > 0``, which adds ``--resume`` to the command.
* ``--open-mode=append`` keeps the log of every attempt in one file.

``tests/test_slurm_render.py`` checks the output against golden files in ``tests/data`` and checks
that the files in ``slurm/`` equal :func:`render_template` (regenerate them with
``python -m gptfl_hpc.launch.slurm``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gptfl_hpc.errors import ConfigError

TEMPLATES = ("gptfl", "synthesize", "federate", "sweep")
# commands a batch script may run (the launch commands themselves are not among them)
RUNNABLE = ("run", "federate", "prepare", "train-generator", "synthesize", "pretrain")
RESUMABLE = ("run", "federate", "pretrain", "synthesize")
DEFAULT_CONFIG = "configs/digits.yaml"
_SAFE_DIRECTIVE = re.compile(r"[A-Za-z0-9_.:@%+,=/\-\[\]]+")


@dataclass(frozen=True)
class Var:
    """One environment variable of a script: NAME=${NAME:-default}."""

    name: str
    default: str
    """A shell word: a quoted literal or an expansion such as runs/slurm-${SLURM_JOB_ID}."""
    doc: str


def time_minutes(time: str) -> int:
    """Slurm time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes (rounded up, >= 1)."""
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    seconds = ((int(days or 0) * 24 + h) * 60 + m) * 60 + s
    return max(1, -(-seconds // 60))


def sbatch_directives(slurm, job_name: str, *, array: str | None = None,
                      ntasks: int | None = None) -> list[str]:
    """The #SBATCH lines for a config's slurm section (pure)."""
    _check_word("job_name", job_name)
    lines = [f"--job-name={job_name}", f"--nodes={slurm.nodes}"]
    lines.append(f"--ntasks={ntasks}" if ntasks else f"--ntasks-per-node={slurm.tasks_per_node}")
    lines += [f"--cpus-per-task={slurm.cpus_per_task}", f"--time={slurm.time}"]
    for key in ("partition", "account", "qos", "mem"):
        value = getattr(slurm, key)
        if value:
            _check_word(f"slurm.{key}", value)
            lines.append(f"--{key}={value}")
    if slurm.gpus_per_node:
        lines.append(f"--gpus-per-node={slurm.gpus_per_node}")
    if array:
        _check_word("array", array)
        lines.append(f"--array={array}")
    lines.append(f"--signal=B:USR1@{slurm.signal_seconds}")
    lines.append("--requeue" if slurm.requeue else "--no-requeue")
    lines.append("--open-mode=append")
    lines.append(f"--output=slurm-%x-{'%A_%a' if array else '%j'}.out")
    lines += list(slurm.extra)
    return ["#SBATCH " + x for x in lines]


def _check_word(key: str, value: str) -> None:
    if not _SAFE_DIRECTIVE.fullmatch(value):
        raise ConfigError(f"{key}: invalid value {value!r} for an #SBATCH line; valid: letters, "
                          "digits and _ . : @ % + , = / - [ ] (no spaces or quotes)")


def _q(value: str) -> str:
    return shlex.quote(str(value))


def common_vars(slurm) -> list[Var]:
    """Variables every script understands (defaults from the slurm section)."""
    return [
        Var("GPTFL_PYTHON", _q(slurm.python), "Python that has gptfl-hpc installed (may be a "
            "command with words, e.g. a container exec)"),
        Var("GPTFL_LAUNCH", _q(slurm.launcher), "srun: one rank per Slurm task (direct launch); "
            "mpiexec: the MPI library's launcher inside the allocation"),
        Var("GPTFL_SRUN_MPI", "${SLURM_MPI_TYPE:-" + _q(slurm.mpi) + "}",
            "srun --mpi type (default $SLURM_MPI_TYPE, else slurm.mpi); must match the MPI "
            "that mpi4py loads (Open MPI: pmix, MPICH: pmi2); 'default' passes no --mpi"),
        Var("GPTFL_SRUN_ARGS", "''", "more srun options (word-split)"),
        Var("GPTFL_MPIEXEC", "mpiexec", "launcher command when GPTFL_LAUNCH=mpiexec"),
        Var("GPTFL_GPUS_PER_TASK", _q(slurm.gpus_per_task or ""),
            "srun --gpus-per-task (empty: no per-task binding; each rank picks a GPU by its "
            "node-local rank)"),
        Var("GPTFL_REQUEUE", "1" if slurm.requeue else "0",
            "1: on the warning signal (or exit code 124) requeue the job, which resumes"),
        Var("GPTFL_MAX_RESTARTS", str(slurm.max_restarts),
            "stop requeueing once SLURM_RESTART_COUNT reaches this"),
        Var("GPTFL_WORKDIR", "${SLURM_SUBMIT_DIR:-$PWD}", "directory the job runs in (relative "
            "CONFIG and OUT paths start here)"),
        Var("HF_HUB_OFFLINE", "1", "compute nodes are offline: load models from local "
            "directories only"),
    ]


# The shell functions shared by every script. Kept in one place; tests run them with fake
# srun/scontrol (tests/test_slurm_render.py) and on a real Slurm (tests/test_slurm_live.py).
RUNNER = r'''
log() { echo "[gptfl-sbatch $(date +%H:%M:%S)] $*" >&2; }
child='' caught=''
forward() {  # the batch shell got Slurm's warning: pass it on to the running job step
  caught=$1
  log "caught SIG$1: asking the ranks to stop at the next round boundary"
  [ -n "$child" ] && kill -s "$1" "$child" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
run_step() {  # run a command in the background (so traps fire) and return its exit code
  log "run: $*"
  "$@" &
  child=$!
  while kill -0 "$child" 2>/dev/null; do wait "$child"; done  # a trapped signal ends wait early
  wait "$child"
  local rc=$?
  child=''
  return $rc
}
gptfl() {  # gptfl COMMAND [OVERRIDE...]: all ranks run python -m mpi4py -m gptfl_hpc COMMAND
  local cmd=$1 launcher py args extra
  shift
  args=("$cmd" "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@" --out "$OUT")
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    case $cmd in run|federate|pretrain|synthesize) args+=(--resume) ;; esac
  fi
  read -r -a py <<< "$GPTFL_PYTHON"
  case $GPTFL_LAUNCH in
    srun)
      launcher=(srun --kill-on-bad-exit=1)
      [ "$GPTFL_SRUN_MPI" = default ] || launcher+=("--mpi=$GPTFL_SRUN_MPI")
      [ -z "$GPTFL_GPUS_PER_TASK" ] || launcher+=("--gpus-per-task=$GPTFL_GPUS_PER_TASK")
      read -r -a extra <<< "$GPTFL_SRUN_ARGS"
      launcher+=(${extra[@]+"${extra[@]}"}) ;;
    mpiexec)
      read -r -a launcher <<< "$GPTFL_MPIEXEC"
      launcher+=(-n "${SLURM_NTASKS:-1}") ;;
    *) log "error: GPTFL_LAUNCH=$GPTFL_LAUNCH; valid: srun, mpiexec"; return 2 ;;
  esac
  run_step "${launcher[@]}" "${py[@]}" -m mpi4py -m gptfl_hpc "${args[@]}"
}
finish() {  # finish RC: requeue when preempted (the run resumes), else exit RC
  local rc=$1
  if [ "$rc" -ne 0 ] && [ "$caught" != TERM ] && { [ "$rc" -eq 124 ] || [ -n "$caught" ]; }; then
    if [ "$GPTFL_REQUEUE" != 1 ]; then
      log "preempted (exit $rc); GPTFL_REQUEUE=$GPTFL_REQUEUE: not requeueing"
    elif [ "${SLURM_RESTART_COUNT:-0}" -ge "$GPTFL_MAX_RESTARTS" ]; then
      log "preempted (exit $rc) after $GPTFL_MAX_RESTARTS restarts (GPTFL_MAX_RESTARTS): giving up"
    elif scontrol requeue "$SLURM_JOB_ID"; then
      log "preempted (exit $rc): requeued job $SLURM_JOB_ID; it resumes from $OUT"
      exit 0
    fi
  fi
  log "exit $rc"
  exit "$rc"
}
'''.strip("\n")


def _assemble(title: str, usage: list[str], directives: list[str], variables: list[Var],
              setup: Sequence[str], body: list[str]) -> str:
    width = max(len(v.name) for v in variables)
    out = ["#!/bin/bash", f"# {title}", "#"]
    out += [f"#   {u}" if u else "#" for u in usage]
    out += ["#", "# Generated by gptfl_hpc.launch.slurm (edit the renderer, not this file)."]
    out += directives
    out += ["#", "# Environment (export before sbatch, or sbatch --export=ALL,NAME=value):"]
    for v in variables:
        out.append(f"#   {v.name.ljust(width)}  {v.doc}")
    out += ["", "set -uo pipefail"]
    for v in variables:
        out.append(f"{v.name}=${{{v.name}:-{v.default}}}")
    out += ["export HF_HUB_OFFLINE PYTHONUNBUFFERED=1",
            'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}',
            'cd "$GPTFL_WORKDIR" || exit 1']
    if setup:
        # `module` (Lmod, environment-modules) and some activate scripts break under set -u
        out += ["", "# setup (slurm.setup)", "set +u", *setup, "set -u"]
    out += ["", RUNNER, "", *body, ""]
    return "\n".join(out)


def render_sbatch(slurm, command: Sequence[str], job_name: str = "gptfl",
                  out_dir: str | None = None, *, title: str | None = None,
                  usage: Sequence[str] = (), init_var: bool = False) -> str:
    """A batch script that runs ``gptfl-hpc COMMAND CONFIG [overrides] --out OUT`` under MPI.

    ``command`` is ``[COMMAND, CONFIG, *overrides]``. Every value becomes the default of an
    environment variable (GPTFL_COMMAND, CONFIG, OUT, ...), so one script can still be varied at
    submission. ``out_dir=None`` uses ``runs/slurm-$SLURM_JOB_ID`` (stable across a requeue).
    ``init_var`` adds GPTFL_INIT (fl.init, default $OUT/pretrained.safetensors when present).
    """
    if len(command) < 2 or command[0] not in RUNNABLE:
        raise ConfigError(f"command {list(command)!r}: expected [COMMAND, CONFIG, overrides...] "
                          f"with COMMAND one of {', '.join(RUNNABLE)}")
    name, config, *overrides = command
    out_default = _q(out_dir) if out_dir is not None else "runs/slurm-${SLURM_JOB_ID}"
    variables = [
        Var("GPTFL_COMMAND", _q(name), f"gptfl-hpc command: {', '.join(RUNNABLE)}"),
        Var("CONFIG", _q(config), "YAML config"),
        Var("OUT", out_default, "output directory; keep it fixed across a requeue so the run "
            "resumes from its checkpoints"),
        Var("GPTFL_OVERRIDES", "''", "more dotted overrides, space separated (fl.rounds=50 ...)"),
    ]
    body = ['read -r -a OVERRIDES <<< "$GPTFL_OVERRIDES"']
    if overrides:
        body.append(f"OVERRIDES=({' '.join(_q(o) for o in overrides)} "
                    '${OVERRIDES[@]+"${OVERRIDES[@]}"})')
    launch = 'gptfl "$GPTFL_COMMAND"'
    if init_var:
        variables.append(Var("GPTFL_INIT", "''", "fl.init, the pretrained .safetensors (empty: "
                             "$OUT/pretrained.safetensors if it exists, else the config's)"))
        body += ['if [ -z "$GPTFL_INIT" ] && [ -f "$OUT/pretrained.safetensors" ]; then',
                 "  GPTFL_INIT=$OUT/pretrained.safetensors",
                 "fi"]
        launch += ' ${GPTFL_INIT:+"fl.init=$GPTFL_INIT"}'
    body += [launch, "finish $?"]
    title = title or f"gptfl-hpc {name} on Slurm: one MPI rank per task (rank 0 = server)"
    usage = list(usage) or [f"sbatch {job_name}.sbatch"]
    return _assemble(title, usage, sbatch_directives(slurm, job_name),
                     variables + common_vars(slurm), slurm.setup, body)


def render_template(name: str, slurm=None) -> str:
    """The shipped template slurm/NAME.sbatch (defaults run the embedded digits demo)."""
    from gptfl_hpc.config import SlurmConfig

    slurm = slurm or SlurmConfig()
    if name == "gptfl":
        return render_sbatch(slurm, ["run", DEFAULT_CONFIG], "gptfl", title=(
            "GPT-FL on Slurm: `gptfl-hpc COMMAND CONFIG --out OUT` with one MPI rank per task "
            "(rank 0 = server)"), usage=[
            "sbatch slurm/gptfl.sbatch                  # the embedded digits demo (run)",
            "GPTFL_COMMAND=federate CONFIG=configs/tiny.yaml sbatch slurm/gptfl.sbatch",
            "sbatch -N 2 --ntasks-per-node=8 -p gpu --gpus-per-node=8 "
            "--export=ALL,GPTFL_GPUS_PER_TASK=1 slurm/gptfl.sbatch",
            "",
            "Preemption: SIGUSR1 120 s before the limit -> the ranks stop at a round boundary,",
            "the server checkpoints, exit 124 -> scontrol requeue -> the job resumes (--resume).",
        ])
    if name == "federate":
        return render_sbatch(slurm, ["federate", DEFAULT_CONFIG], "federate", init_var=True,
                             title=("GPT-FL stage 2: federated fine-tuning from the pretrained "
                                    "model (MPI, one rank per task)"), usage=[
            "export OUT=runs/demo                        # shared with synthesize.sbatch",
            "jid=$(sbatch --parsable slurm/synthesize.sbatch)",
            "sbatch --dependency=afterok:$jid slurm/federate.sbatch",
        ])
    if name == "synthesize":
        return _render_stages(slurm)
    if name == "sweep":
        return _render_sweep(slurm)
    raise ConfigError(f"template {name!r}: unknown; valid: {', '.join(TEMPLATES)}")


def _render_stages(slurm) -> str:
    """synthesize.sbatch: the server-side stages, in one small allocation (1 task, 1 GPU)."""
    from gptfl_hpc.config import replace

    one = replace(slurm, nodes=1, tasks_per_node=1, gpus_per_task=0)
    variables = [
        Var("CONFIG", _q(DEFAULT_CONFIG), "YAML config"),
        Var("OUT", "runs/slurm-${SLURM_JOB_ID}", "output directory; set it (export OUT=...) "
            "to share it with the federate.sbatch job that follows"),
        Var("GPTFL_STAGES", "'prepare train-generator synthesize pretrain'",
            "stages to run in order (drop train-generator for a diffusers generator)"),
        Var("GPTFL_OVERRIDES", "''", "more dotted overrides, space separated"),
        *common_vars(one),
    ]
    body = [
        'read -r -a OVERRIDES <<< "$GPTFL_OVERRIDES"',
        "for stage in $GPTFL_STAGES; do  # each stage skips itself when its output is complete",
        '  gptfl "$stage" || finish $?',
        "done",
        "finish 0",
    ]
    usage = [
        "export OUT=runs/demo",
        "jid=$(sbatch --parsable slurm/synthesize.sbatch)       # add --gpus=1 on a GPU cluster",
        "sbatch --dependency=afterok:$jid slurm/federate.sbatch  # starts only if this succeeded",
    ]
    return _assemble("GPT-FL stage 1 (server side): prepare data, train the generator, "
                     "synthesize, pretrain", usage, sbatch_directives(one, "synthesize", ntasks=1),
                     variables, slurm.setup, body)


def _render_sweep(slurm) -> str:
    """sweep.sbatch: an array job, one `run` per (method, seed, alpha)."""
    variables = [
        Var("CONFIG", _q(DEFAULT_CONFIG), "YAML config"),
        Var("GPTFL_METHODS", "'gptfl fedavg synthetic_only'", "methods (run.methods), space "
            "separated"),
        Var("GPTFL_SEEDS", "'0 1 2'", "seeds (run.seed)"),
        Var("GPTFL_ALPHAS", "'0.1 0.5'", "Dirichlet alphas (data.alpha)"),
        Var("GPTFL_SWEEP_DIR", "runs/sweep-${SLURM_ARRAY_JOB_ID:-0}",
            "each array task writes DIR/METHOD-seedS-alphaA"),
        Var("GPTFL_OVERRIDES", "''", "more dotted overrides for every task, space separated"),
        *common_vars(slurm),
    ]
    body = [
        'read -r -a methods <<< "$GPTFL_METHODS"',
        'read -r -a seeds <<< "$GPTFL_SEEDS"',
        'read -r -a alphas <<< "$GPTFL_ALPHAS"',
        "nm=${#methods[@]} ns=${#seeds[@]} na=${#alphas[@]}",
        "n=$((nm * ns * na))",
        "i=${SLURM_ARRAY_TASK_ID:-}",
        'if ! [[ "$i" =~ ^[0-9]+$ ]] || [ "$i" -ge "$n" ]; then',
        '  log "error: SLURM_ARRAY_TASK_ID=${i:-unset}: GPTFL_METHODS x GPTFL_SEEDS x '
        'GPTFL_ALPHAS has $n combinations; submit with sbatch --array=0-$((n - 1))"',
        "  exit 2",
        "fi",
        "method=${methods[i % nm]} seed=${seeds[i / nm % ns]} alpha=${alphas[i / (nm * ns)]}",
        "OUT=$GPTFL_SWEEP_DIR/$method-seed$seed-alpha$alpha",
        'read -r -a OVERRIDES <<< "$GPTFL_OVERRIDES"',
        'OVERRIDES=("run.methods=[$method]" "run.seed=$seed" "data.alpha=$alpha" '
        '${OVERRIDES[@]+"${OVERRIDES[@]}"})',
        "gptfl run",
        "finish $?",
    ]
    usage = [
        "sbatch slurm/sweep.sbatch         # 3 methods x 3 seeds x 2 alphas = --array=0-17",
        "GPTFL_SEEDS='0 1' sbatch --array=0-11 slurm/sweep.sbatch",
        "Task i runs method i % M, seed i / M % S, alpha i / (M * S).",
    ]
    return _assemble("GPT-FL sweep: an array job over methods x seeds x Dirichlet alpha",
                     usage, sbatch_directives(slurm, "sweep", array="0-17"), variables,
                     slurm.setup, body)


def write_templates(directory: str | Path) -> list[Path]:
    """Write slurm/*.sbatch from the renderer (atomic writes); return the paths."""
    from gptfl_hpc.fsio import write_text

    paths = []
    for name in TEMPLATES:
        path = Path(directory) / f"{name}.sbatch"
        write_text(path, render_template(name))
        path.chmod(0o755)
        paths.append(path)
    return paths


if __name__ == "__main__":  # python -m gptfl_hpc.launch.slurm [DIR]: regenerate the templates
    import sys

    for p in write_templates(sys.argv[1] if len(sys.argv) > 1 else "slurm"):
        print(p)
