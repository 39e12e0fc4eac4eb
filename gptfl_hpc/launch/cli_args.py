"""Options and dispatch of the launch commands: ``submit``, ``scale`` and ``render-slurm``.

The job-shape options (--nodes, --tasks-per-node, --time, --mpi, ...) override the config's
``slurm`` section, so ``--nodes 2`` and the override ``slurm.nodes=2`` are the same thing (the
option wins). Values are validated by :class:`gptfl_hpc.config.SlurmConfig`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gptfl_hpc.errors import ConfigError
from gptfl_hpc.launch.slurm import RUNNABLE, TEMPLATES

log = logging.getLogger(__name__)

# option -> SlurmConfig field
SHAPE_OPTIONS = {
    "--nodes": ("nodes", int, "nodes (slurm.nodes)"),
    "--tasks-per-node": ("tasks_per_node", int, "MPI ranks per node (slurm.tasks_per_node)"),
    "--cpus-per-task": ("cpus_per_task", int, "CPUs per rank (slurm.cpus_per_task)"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node (slurm.gpus_per_node)"),
    "--gpus-per-task": ("gpus_per_task", int, "srun --gpus-per-task (slurm.gpus_per_task)"),
    "--partition": ("partition", str, "partition (slurm.partition)"),
    "--account": ("account", str, "account (slurm.account)"),
    "--qos": ("qos", str, "QOS (slurm.qos)"),
    "--time": ("time", str, "time limit, e.g. 02:00:00 (slurm.time)"),
    "--mem": ("mem", str, "memory per node, e.g. 32G (slurm.mem)"),
    "--mpi": ("mpi", str, "srun --mpi type: pmix, pmi2, none, default (slurm.mpi)"),
}


def add_launch_args(p: argparse.ArgumentParser, name: str) -> None:
    """Add the options of `submit`, `scale` or `render-slurm` to its subparser."""
    g = p.add_argument_group("job shape (override the config's slurm section)")
    for opt, (dest, typ, help_) in SHAPE_OPTIONS.items():
        g.add_argument(opt, dest=f"slurm_{dest}", type=typ, default=None, help=help_)
    g.add_argument("--job-name", default=None, help="Slurm job name")
    if name == "submit":
        p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                       help="slurm: one MPI rank per task; local/debug: mpiexec on this machine")
        p.add_argument("--command", dest="job_command", choices=RUNNABLE, default="run",
                       help="gptfl-hpc command the job runs (default run)")
        p.add_argument("--folder", default=None, help="submitit logs (default OUT/submitit)")
        p.add_argument("--wait", action="store_true",
                       help="wait for the job and print rank 0's result (summary) as JSON")
    elif name == "scale":
        p.add_argument("--ranks", default="2,4",
                       help="comma-separated MPI rank counts, each >= 2 (default 2,4)")
        p.add_argument("--mode", choices=("strong", "weak"), default="strong",
                       help="strong: fixed totals; weak: clients and private data proportional to "
                            "client ranks (fixed work per client rank)")
        p.add_argument("--cluster", choices=("local", "slurm"), default="local",
                       help="local: mpiexec -n R here; slurm: one submitit job per rank count")
        p.add_argument("--timeout", type=float, default=3600.0,
                       help="local: seconds allowed per rank count (default 3600)")
    elif name == "render-slurm":
        p.add_argument("--command", dest="job_command", choices=RUNNABLE, default="run",
                       help="gptfl-hpc command the script runs (default run)")
        p.add_argument("--template", choices=TEMPLATES, default=None,
                       help="render a shipped template (slurm/NAME.sbatch) with this config's "
                            "slurm section instead")
        p.add_argument("--launcher", choices=("srun", "mpiexec"), default=None,
                       help="default of GPTFL_LAUNCH (slurm.launcher)")
        p.add_argument("--write", default=None, metavar="PATH",
                       help="write the script to PATH (default: print it)")


def slurm_from_args(cfg_slurm, args: argparse.Namespace):
    """The config's slurm section with the command-line options applied (validated)."""
    from gptfl_hpc.config import replace

    changes = {dest: getattr(args, f"slurm_{dest}") for dest, _, _ in SHAPE_OPTIONS.values()
               if getattr(args, f"slurm_{dest}", None) is not None}
    if getattr(args, "launcher", None):
        changes["launcher"] = args.launcher
    return replace(cfg_slurm, **changes) if changes else cfg_slurm


def run_launch_command(cmd: str, args: argparse.Namespace, cfg) -> int:
    slurm = slurm_from_args(cfg.slurm, args)
    if cmd == "render-slurm":
        return _render(args, slurm)
    if cmd == "submit":
        return _submit(args, slurm)
    if cmd == "scale":
        return _scale(args, cfg, slurm)
    raise ConfigError(f"command {cmd!r}: not a launch command; valid: submit, scale, "
                      "render-slurm")


def _render(args: argparse.Namespace, slurm) -> int:
    from gptfl_hpc.launch.slurm import render_sbatch, render_template

    if args.template:
        script = render_template(args.template, slurm)
    else:
        script = render_sbatch(slurm, [args.job_command, args.config, *args.overrides],
                               job_name=args.job_name or f"gptfl-{args.job_command}",
                               out_dir=args.out)
    if args.write:
        from gptfl_hpc.fsio import write_text

        write_text(args.write, script)
        Path(args.write).chmod(0o755)
        log.info("wrote %s (submit with: sbatch %s)", args.write, args.write)
    else:
        sys.stdout.write(script)
    return 0


def _submit(args: argparse.Namespace, slurm) -> int:
    from gptfl_hpc.launch.jobs import rank0_result, submit_task

    out = Path(args.out).resolve()
    argv = [args.job_command, str(Path(args.config).resolve()), *args.overrides]
    job = submit_task(argv, out, slurm, args.cluster, folder=args.folder,
                      job_name=args.job_name)
    sys.stdout.write(f"{job.job_id}\n")
    sys.stdout.flush()
    if args.wait:
        result = rank0_result(job)
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def _scale(args: argparse.Namespace, cfg, slurm) -> int:
    from gptfl_hpc.launch.scale import local_runner, parse_ranks, run_scaling, slurm_runner

    nodes = slurm.nodes if args.cluster == "slurm" else 1
    ranks = parse_ranks(args.ranks, nodes)
    config = str(Path(args.config).resolve())
    runner = (local_runner(config, args.timeout) if args.cluster == "local"
              else slurm_runner(config, slurm))
    rows = run_scaling(cfg, config, args.overrides, args.out, ranks, args.mode, runner)
    out = Path(args.out)
    log.info("scaling report: %s, %s, %s (%d rank counts)", out / "scaling.md",
             out / "scaling.csv", out / "scaling.png", len(rows))
    return 0
