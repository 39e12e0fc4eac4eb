"""Command line: ``gptfl-hpc <command> CONFIG [key=value ...] [--out DIR]``.

Every MPI entry point runs as ``python -m mpi4py -m gptfl_hpc ...`` so that an uncaught exception
on any rank aborts the whole job. A :class:`GptflError` becomes one line on stderr and a non-zero
exit on every rank (MPI_Abort when the world has more than one rank).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gptfl_hpc.errors import GptflError

log = logging.getLogger("gptfl_hpc")

COMMANDS = {
    "check-config": "validate a config (and overrides) without running anything",
    "prepare": "partition the dataset into per-client HDF5 shards + test set + manifest",
    "train-generator": "train the embedded class-conditional diffusion model on the public split",
    "synthesize": "generate the labelled synthetic set (HDF5) with a diffusers generator",
    "pretrain": "train the downstream model on the synthetic set (accelerate)",
    "federate": "federated training over MPI (rank 0 server, ranks 1..N-1 clients)",
    "run": "the whole GPT-FL pipeline plus baselines, report.md and accuracy.png",
    "submit": "submit a command to Slurm (or run locally) through submitit",
    "scale": "scaling experiment over rank counts (local mpiexec or Slurm)",
    "render-slurm": "print a Slurm batch script rendered from the config",
    "grid": "the experiment grid (methods x seeds x alphas x volumes x clients per round), "
            "locally or as one Slurm array job",
    "collect": "a finished grid's tables: tables.md, tables.csv, diversity.png",
    "choose": "pick a fine-tuning regime among finished grids on the clients' validation rows "
              "(never the test set)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptfl-hpc", description="GPT-FL on HPC clusters.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_ in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        if name == "collect":  # a grid directory, no config
            s.add_argument("dir", help="the grid's directory (grid --out)")
            s.add_argument("--target", type=float, default=None, help="target accuracy for "
                           "'rounds to target' (default: the grid's fl.target_accuracy)")
            continue
        if name == "choose":  # grid directories, no config
            s.add_argument("dirs", nargs="+", help="grid directories, one per regime (the "
                           "current default first: ties go to it)")
            s.add_argument("--method", default="gptfl", help="the grid method whose cells are "
                           "compared (default gptfl)")
            s.add_argument("--level", type=float, default=0.05, help="significance level of "
                           "'a candidate beats the first grid', Bonferroni-divided by the "
                           "number of candidates (default 0.05)")
            s.add_argument("--out", default=None, help="write choice.md and choice.json here")
            continue
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fl.rounds=50")
        if name != "check-config":
            s.add_argument("--out", required=name not in ("render-slurm",), default=None,
                           help="output directory")
        if name in ("federate", "run", "pretrain", "synthesize"):
            s.add_argument("--resume", action="store_true",
                           help="continue from the newest complete checkpoint in --out")
        if name == "synthesize":
            s.add_argument("--generator", default=None, help="generator directory (overrides "
                           "gen.generator; default <out>/generator for 'embedded')")
        if name == "pretrain":
            s.add_argument("--synthetic", default=None,
                           help="synthetic HDF5 (default <out>/synthetic.h5)")
        if name in ("submit", "scale", "render-slurm"):
            from gptfl_hpc.launch.cli_args import add_launch_args

            add_launch_args(s, name)
        if name == "grid":
            from gptfl_hpc.grid import add_grid_args

            add_grid_args(s)
    return p


def main(argv: list[str] | None = None) -> int:
    from gptfl_hpc.fsio import quiet_hdf5_io_echoes
    from gptfl_hpc.log import init_logging
    from gptfl_hpc.numerics import set_process_env

    set_process_env()  # before torch is imported (MKL reads it when it loads)
    quiet_hdf5_io_echoes()
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may also come after options: `federate CFG --out D fl.rounds=5`
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(getattr(args, "overrides", [])) + rest
    rank = _rank_from_env()
    init_logging(rank)
    try:
        if args.command in ("collect", "choose"):
            if args.overrides:
                parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")
            if args.command == "choose":
                from gptfl_hpc.choose import run_choose_command

                return run_choose_command(args)
            from gptfl_hpc.collect import run_collect_command

            return run_collect_command(args)
        from gptfl_hpc.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "check-config":
            from gptfl_hpc.config import dump_yaml

            sys.stdout.write(dump_yaml(cfg))
            log.info("config %s is valid", args.config)
            return 0
        return _dispatch(args, cfg) or 0
    except GptflError as e:
        return _fail(args.command, rank, str(e), e.exit_code)
    except OSError as e:  # the file system: a full disk, a read-only or missing path, ...
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(args.command, rank, f"{where}{e.strerror or e}", 2)
    except RuntimeError as e:  # HDF5's failed write on close (a full disk): one line
        from gptfl_hpc.fsio import io_failure

        reason = io_failure(e)
        if reason is None:
            raise
        return _fail(args.command, rank, f"writing an HDF5 file: {reason}", 2)
    except MemoryError:
        return _fail(args.command, rank, "out of memory (MemoryError); lower the sizes in the "
                     "config (batch sizes, gen.count, data) or use a node with more memory", 2)
    except KeyboardInterrupt:
        _abort_world(130)
        return 130


def _fail(command: str, rank: int, message: str, code: int) -> int:
    """One line on stderr, then end every rank (MPI_Abort) with `code`."""
    text = " ".join(message.split())
    sys.stderr.write(f"[gptfl r{rank}] gptfl-hpc {command}: error: {text}\n")
    sys.stderr.flush()
    _abort_world(code)
    return code


def _dispatch(args: argparse.Namespace, cfg) -> int | None:
    cmd = args.command
    if cmd in ("submit", "scale", "render-slurm"):
        from gptfl_hpc.launch.cli_args import run_launch_command

        return run_launch_command(cmd, args, cfg)
    if cmd == "grid":
        from gptfl_hpc.collect import collect
        from gptfl_hpc.grid import run_grid_command
        from gptfl_hpc.launch import slurm as scripts

        return run_grid_command(args, cfg, scripts=scripts, collect=collect)
    import dataclasses

    from gptfl_hpc import pipeline as pl
    from gptfl_hpc import signals
    from gptfl_hpc.errors import Preempted
    from gptfl_hpc.parallel.comm import get_comm, on_root

    # on every rank from the start: a rank idle during the server phase (clients wait while
    # rank 0 synthesises) must not die of Slurm's USR1/TERM; it keeps the stop request for its
    # next safe boundary, as the busy ranks do
    signals.install()
    out = Path(args.out)
    comm = get_comm()
    on_root(comm, lambda: pl.lock(out))  # one command per --out at a time
    resume = bool(getattr(args, "resume", False))
    if cmd == "prepare":  # --out is the data directory itself
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(out)))
    data = pl.stage_prepare(cfg, out, comm)
    if cmd == "train-generator":
        pl.stage_generator(cfg, out, comm, data, resume)
    elif cmd in ("synthesize", "pretrain"):
        syn = None
        if cmd == "pretrain" and args.synthetic:
            syn = pl.Output(Path(args.synthetic), _input_digest(args.synthetic), {})
        else:
            gen = (pl.Output(Path(args.generator), _input_digest(args.generator), {})
                   if cmd == "synthesize" and args.generator
                   else pl.stage_generator(cfg, out, comm, data, resume))
            syn = pl.stage_synthesize(cfg, out, comm, data, gen, resume)
        if cmd == "pretrain":
            pl.stage_pretrain(cfg, out, comm, data, syn, resume)
    elif cmd == "federate":
        pl.stage_federate(cfg, out, comm, data, cfg.fl.init, resume)
    elif cmd == "run":
        pl.run_pipeline(cfg, out, resume, comm, data)
    if signals.stop_requested():  # never exit 0 after swallowing a stop request
        raise Preempted(f"stop requested ({signals.reason()}) while `{cmd}` finished; its "
                        "outputs are complete")
    return 0


def _input_digest(path: str) -> str:
    from gptfl_hpc import provenance
    from gptfl_hpc.errors import DataError

    if not Path(path).exists():
        raise DataError(f"{path}: not found")
    return provenance.digest(path)


def _rank_from_env() -> int:
    from gptfl_hpc.parallel.env import rank_from_env

    return rank_from_env()


def _abort_world(code: int) -> None:
    """End every rank within seconds: MPI_Abort when MPI is live with more than one rank."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        if mpi.COMM_WORLD.Get_size() > 1:
            logging.shutdown()
            mpi.COMM_WORLD.Abort(code)
