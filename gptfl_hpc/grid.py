"""``gptfl-hpc grid``: the paper's experiment grid, methods x seeds x alphas x volumes x
clients-per-round, as one `run` per cell, locally (one after another under mpiexec) or as ONE
Slurm array job.

Each cell is ``gptfl-hpc run CONFIG [overrides] <cell overrides> --out DIR/cells/<cell>`` with
``run.store=DIR/store`` (or ``--store``): the server stages (prepare, generator, synthesize,
pretrain) live in the store under their request fingerprints (gptfl_hpc/pipeline.py), so cells
whose requests match share one synthetic set and one pretrained model (GPT-FL and
synthetic-only at the same seed and volume; every clients-per-round value), and cells whose
requests differ never do (another seed, alpha or volume). Concurrent cells (a Slurm array) wait
for each other on the store's directory locks instead of racing.

Methods (``--methods``; each cell runs exactly one):

=============  ===========================================================================
gptfl          FL from the synthetic-pretrained model with the config's fl.algorithm
fedavg         FL from random init with the config's fl.algorithm (the paper's FedAvg)
gptfl_fedopt   GPT-FL with FedOpt: fl.algorithm=fedadam, fl.server_lr=--fedopt-server-lr
fedopt         FedOpt from random init: the same server optimiser
synthetic_only the pretrained model alone (no FL): its test accuracy
centralised    reference upper bound, not FL: the model trained on the pooled private data of
               every client by rank 0 alone (gptfl_hpc/train/centralised.py); opt-in
=============  ===========================================================================

``--alphas`` takes Dirichlet concentrations and ``iid`` (e.g. ``0.05,0.1,0.5,iid``): an iid cell
runs with data.partition=iid (its name says ``iid`` where others say ``alpha0.1``; collect shows
it as the column ``iid``).

An axis only multiplies the methods it affects: the synthetic volume (gen.volume) those that use
the synthetic set, clients per round (fl.clients_per_round) those that run FL. An axis left out
keeps the config's value. ``DIR/grid.json`` lists every cell with its overrides; ``gptfl-hpc
collect DIR`` (gptfl_hpc/collect.py) turns the finished cells into the paper's tables.

Layers: this module sits beside ``launch`` and ``collect`` and imports neither; the CLI hands it
the batch-script pieces of gptfl_hpc/launch/slurm.py (so the preemption logic of the array job
is the templates' own) and the collect function.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from gptfl_hpc.errors import ConfigError, GptflError
from gptfl_hpc.parallel.env import mpiexec_command

log = logging.getLogger(__name__)

GRID_FORMAT = 1
# grid method -> (run.methods value, extra overrides; "{fedopt_lr}" is filled in)
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gptfl": ("gptfl", ()),
    "fedavg": ("fedavg", ()),
    "gptfl_fedopt": ("gptfl", ("fl.algorithm=fedadam", "fl.server_lr={fedopt_lr}")),
    "fedopt": ("fedavg", ("fl.algorithm=fedadam", "fl.server_lr={fedopt_lr}")),
    "synthetic_only": ("synthetic_only", ()),
    "centralised": ("centralised", ()),
}
USES_SYNTHETIC = ("gptfl", "gptfl_fedopt", "synthetic_only")
RUNS_FL = ("gptfl", "fedavg", "gptfl_fedopt", "fedopt")
CELL_STATUS = "cell.json"
"""cells/<cell>/cell.json: the exit code of the cell's run (collect.CELL_STATUS reads it)."""
CELL_LOG = "cell.log"
"""cells/<cell>/cell.log: a local cell's output (collect.CELL_LOG)."""


@dataclass(frozen=True)
class Cell:
    name: str
    method: str
    seed: int
    alpha: float | str | None
    """The Dirichlet alpha, "iid" (data.partition=iid), or None (the config's partition is not
    dirichlet)."""
    volume: float | None
    """None: the method does not use the synthetic set."""
    clients_per_round: int | None
    """None: the method runs no FL."""
    overrides: list[str] = field(default_factory=list)
    """The cell's own overrides (after the grid's common ones)."""


def _num(x: float) -> str:
    return f"{x:g}"


def _parse_list(text: str | None, kind: type, key: str) -> list | None:
    if text is None:
        return None
    try:
        items = [kind(t.strip()) for t in str(text).split(",") if t.strip()]
    except ValueError:
        items = []
    if not items or len(set(items)) != len(items):
        raise ConfigError(f"--{key} {text!r}: invalid; valid: distinct comma-separated "
                          f"{'integers' if kind is int else 'numbers'}, e.g. 0,1,2")
    return items


def _parse_alphas(text: str | None) -> list | None:
    """--alphas: distinct Dirichlet concentrations and/or ``iid``."""
    if text is None:
        return None
    items: list = []
    for t in (t.strip() for t in str(text).split(",")):
        if not t:
            continue
        if t.lower() == "iid":
            items.append("iid")
            continue
        try:
            items.append(float(t))
        except ValueError:
            items = []
            break
    if not items or len(set(items)) != len(items):
        raise ConfigError(f"--alphas {text!r}: invalid; valid: distinct comma-separated numbers "
                          "and/or iid, e.g. 0.05,0.1,0.5,iid")
    return items


def _axis(values: list | None) -> list:
    """The values of an axis; [None] (the config's value, no override) when not given."""
    return list(values) if values is not None else [None]


def expand(cfg: Any, *, methods: list[str], seeds: list[int] | None,
           alphas: list[float | str] | None, volumes: list[float] | None,
           clients_per_round: list[int] | None, store: str, fedopt_lr: float) -> list[Cell]:
    """The grid's cells (validated as configs by the caller). An axis given as None keeps the
    config's value and adds no override."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods {','.join(methods)}: unknown {', '.join(bad) or 'none'}; "
                          f"valid: {', '.join(METHODS)}")
    if alphas is not None and cfg.data.partition != "dirichlet":
        raise ConfigError(f"--alphas: data.partition is {cfg.data.partition}; valid: only with "
                          "data.partition=dirichlet")
    if volumes is not None and cfg.gen.count is not None:
        raise ConfigError("--volumes: gen.count is set and overrides gen.volume; valid: "
                          "gen.count=null")
    if cfg.data.dir and (len(seeds or []) > 1 or len(alphas or []) > 1):
        raise ConfigError(f"config key data.dir: {cfg.data.dir} would hold every cell's data, but "
                          "cells with other seeds or alphas need other data; valid: null (the "
                          "grid's store keeps one prepared set per request)")
    cells = []
    for method in methods:
        run_method, extra = METHODS[method]
        syn, fl = method in USES_SYNTHETIC, method in RUNS_FL
        for seed in _axis(seeds):
            for alpha in _axis(alphas):
                for vol in _axis(volumes if syn else None):
                    for k in _axis(clients_per_round if fl else None):
                        s = cfg.run.seed if seed is None else seed
                        a = cfg.data.alpha if alpha is None else alpha
                        iid = alpha == "iid"
                        v = (cfg.gen.volume if vol is None else vol) if syn else None
                        c = (cfg.fl.clients_per_round if k is None else k) if fl else None
                        over = [f"run.methods=[{run_method}]"]
                        over += [e.format(fedopt_lr=fedopt_lr) for e in extra]
                        over += [f"run.seed={seed}"] if seed is not None else []
                        over += (["data.partition=iid"] if iid else
                                 [f"data.alpha={alpha!r}"] if alpha is not None else [])
                        over += [f"gen.volume={vol!r}"] if vol is not None else []
                        over += [f"fl.clients_per_round={k}"] if k is not None else []
                        over += [f"run.store={store}"] if store else []
                        name = [method, f"seed{s}"]
                        if cfg.data.partition == "dirichlet":
                            name.append("iid" if iid else f"alpha{_num(a)}")
                        name += [f"vol{_num(v)}"] if v is not None else []
                        name += [f"cpr{c}"] if c is not None else []
                        cells.append(Cell("-".join(name), method, int(s),
                                          a if cfg.data.partition == "dirichlet" else None,
                                          v, c, over))
    return cells


def plan(config: str, overrides: list[str], out: str | Path, args: argparse.Namespace
         ) -> dict:
    """grid.json's content: the cells with their overrides, each checked as a config."""
    from gptfl_hpc.config import load_config

    cfg = load_config(config, overrides)
    taken = [o.split("=", 1)[0].strip() for o in overrides]
    for key, opt in (("run.methods", "--methods"), ("run.store", "--store")):
        if key in taken:
            raise ConfigError(f"override {key}: set by the grid; valid: use {opt}")
    out = Path(out).resolve()
    store = str(Path(args.store).resolve()) if args.store else (
        "" if cfg.run.store else str(out / "store"))
    methods = [m.strip() for m in (args.methods or ",".join(
        m for m in cfg.run.methods)).split(",") if m.strip()]
    cells = expand(cfg, methods=methods, seeds=_parse_list(args.seeds, int, "seeds"),
                   alphas=_parse_alphas(args.alphas),
                   volumes=_parse_list(args.volumes, float, "volumes"),
                   clients_per_round=_parse_list(args.clients_per_round, int,
                                                 "clients-per-round"),
                   store=store, fedopt_lr=args.fedopt_server_lr)
    for c in cells:  # every cell is a valid config before anything runs
        try:
            load_config(config, [*overrides, *c.overrides])
        except ConfigError as e:
            raise ConfigError(f"grid cell {c.name}: {e}") from None
    return {"format": GRID_FORMAT, "config": str(Path(config).resolve()),
            "overrides": list(overrides), "store": store or cfg.run.store,
            "dataset": cfg.data.source, "model": cfg.model.name, "rounds": cfg.fl.rounds,
            "target_accuracy": cfg.fl.target_accuracy,
            "reference": {"volume": cfg.gen.volume, "clients_per_round":
                          cfg.fl.clients_per_round, "alpha": cfg.data.alpha},
            "fedopt_server_lr": args.fedopt_server_lr,
            "cells": [asdict(c) for c in cells]}


def write_plan(out: Path, grid: dict) -> None:
    """DIR/grid.json; a DIR that holds another grid is refused (cells would mix)."""
    from gptfl_hpc.fsio import write_json

    path = out / "grid.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        from gptfl_hpc.provenance import effective_overrides

        # overrides that cannot change a result (run.threads, ...) may differ in a rerun
        keys = [k for k in ("config", "overrides", "store", "cells")
                if (effective_overrides(old.get(k) or []) != effective_overrides(grid[k])
                    if k == "overrides" else old.get(k) != grid[k])]
        if keys:
            raise GptflError(f"{path}: holds another grid (differs in {', '.join(keys)}); use "
                             "a new --out (pass --store to share its synthetic sets and "
                             "pretrained models)")
    write_json(path, grid)


def cell_argv(grid: dict, cell: dict, out: Path, resume: bool = False) -> list[str]:
    return ["run", grid["config"], *grid["overrides"], *cell["overrides"], "--out",
            str(out / "cells" / cell["name"]), *(["--resume"] if resume else [])]


# ------------------------------------------------------------------------------ local


def run_local(grid: dict, out: Path, ranks: int, timeout: float | None,
              resume: bool = False) -> dict[str, int]:
    """Every cell in turn under ``mpiexec -n RANKS``; a failed cell does not stop the others.
    Returns {cell: exit code}; each cell's log is cells/<cell>/cell.log. `resume`: each cell
    runs with --resume (continue what a killed grid left: its cells and the store's stages;
    finished stages are reused either way)."""
    from gptfl_hpc.fsio import write_json
    from gptfl_hpc.parallel.env import without_launcher

    codes = {}
    cells = grid["cells"]
    env = {**without_launcher(os.environ), "PYTHONUNBUFFERED": "1"}
    for i, cell in enumerate(cells, 1):
        cdir = out / "cells" / cell["name"]
        cdir.mkdir(parents=True, exist_ok=True)
        cmd = [*mpiexec_command(ranks), sys.executable, "-m", "mpi4py", "-m", "gptfl_hpc",
               *cell_argv(grid, cell, out, resume)]
        t0 = time.monotonic()
        log.info("grid cell %d/%d %s: %s", i, len(cells), cell["name"], shlex.join(cmd))
        with open(cdir / CELL_LOG, "ab") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                    env=env).returncode
            except subprocess.TimeoutExpired:
                rc = 124
                f.write(f"\n[gptfl-grid] timed out after {timeout}s\n".encode())
        seconds = round(time.monotonic() - t0, 1)
        write_json(cdir / CELL_STATUS, {"rc": rc, "seconds": seconds, "where": "local",
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        codes[cell["name"]] = rc
        if rc == 0:
            log.info("grid cell %s done in %.0fs", cell["name"], seconds)
        else:
            log.warning("grid cell %s FAILED (exit %d) after %.0fs; see %s", cell["name"], rc,
                        seconds, cdir / CELL_LOG)
    return codes


# ------------------------------------------------------------------------------ Slurm


def render_array(grid: dict, out: Path, slurm: Any, scripts: ModuleType,
                 job_name: str = "gptfl-grid", max_parallel: int = 0) -> str:
    """One batch script whose array task i runs cell i, assembled by `scripts`
    (gptfl_hpc.launch.slurm) like the templates in slurm/: the same runner, so a preempted task
    is requeued and resumes with --resume."""
    Var, _q = scripts.Var, scripts._q
    n = len(grid["cells"])
    array = f"0-{n - 1}" + (f"%{max_parallel}" if max_parallel else "")
    variables = [
        Var("CONFIG", _q(grid["config"]), "YAML config"),
        Var("GPTFL_GRID_DIR", _q(str(out)), "the grid's directory (cells/<cell>/ per task)"),
        Var("GPTFL_OVERRIDES", "''", "more dotted overrides for every cell, space separated"),
        *scripts.common_vars(slurm),
    ]
    body = ['i=${SLURM_ARRAY_TASK_ID:-}', 'case "$i" in']
    for i, cell in enumerate(grid["cells"]):
        over = " ".join(_q(o) for o in [*grid["overrides"], *cell["overrides"]])
        body.append(f"  {i}) CELL={_q(cell['name'])}; OVERRIDES=({over}) ;;")
    body += [f'  *) log "error: SLURM_ARRAY_TASK_ID=${{i:-unset}}: the grid has {n} cells; '
             f'submit with sbatch --array={array}"; exit 2 ;;',
             "esac",
             'OUT=$GPTFL_GRID_DIR/cells/$CELL',
             'read -r -a extra <<< "$GPTFL_OVERRIDES"',
             'OVERRIDES+=(${extra[@]+"${extra[@]}"})',
             'mkdir -p "$OUT"',
             "gptfl run",
             "rc=$?",
             'printf \'{"rc": %d, "where": "slurm", "job": "%s", "restarts": %d, "finished": '
             '"%s"}\\n\' "$rc" "${SLURM_ARRAY_JOB_ID:-}_${i}" "${SLURM_RESTART_COUNT:-0}" '
             f'"$(date "+%F %T")" > "$OUT/.{CELL_STATUS}.tmp" && mv "$OUT/.{CELL_STATUS}.tmp" '
             f'"$OUT/{CELL_STATUS}"',
             'finish "$rc"']
    usage = [f"sbatch {out / 'grid.sbatch'}      # {n} cells, --array={array}",
             f"gptfl-hpc collect {out}             # the tables, once the tasks are done"]
    return scripts._assemble(
        f"GPT-FL experiment grid: {n} cells of `gptfl-hpc run`, one per array task", usage,
        scripts.sbatch_directives(slurm, job_name, array=array), variables, slurm.setup, body)


def submit_array(script: Path, out: Path) -> str:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--output={out / 'logs'}/%x-%A_%a.out", str(script)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise GptflError(f"sbatch: cannot run it ({e}); valid: a machine with Slurm's sbatch on "
                         "PATH, or --cluster local") from None
    if p.returncode != 0:
        raise GptflError(f"sbatch {script}: failed ({' '.join(p.stderr.split())[:300]})")
    return p.stdout.strip().split(";")[0]


def wait_array(job_id: str, timeout: float | None) -> None:
    """Until no task of the array is pending, running or requeued (squeue lists none)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    empty = 0
    while True:
        p = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], capture_output=True,
                           text=True, timeout=60)
        empty = empty + 1 if p.returncode == 0 and not p.stdout.strip() else 0
        if empty >= 2:  # two empty reads in a row: a requeue passes through the queue
            return
        if deadline is not None and time.monotonic() > deadline:
            raise GptflError(f"grid job {job_id}: still running after {timeout:.0f}s; its cells "
                             "keep running: `gptfl-hpc collect` once they are done")
        time.sleep(2.0)


# ------------------------------------------------------------------------------ CLI


def add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, of {', '.join(METHODS)} (default: run.methods)")
    p.add_argument("--seeds", default=None, help="run.seed values, e.g. 0,1,2")
    p.add_argument("--alphas", default=None,
                   help="data.alpha values and/or iid (data.partition=iid), e.g. 0.1,0.5,iid")
    p.add_argument("--volumes", default=None, help="gen.volume values, e.g. 1,2,3")
    p.add_argument("--clients-per-round", default=None,
                   help="fl.clients_per_round values, e.g. 2,5,10")
    p.add_argument("--fedopt-server-lr", type=float, default=0.01,
                   help="fl.server_lr of the fedopt methods (FedAdam; default 0.01)")
    p.add_argument("--store", default=None,
                   help="shared stage store (default OUT/store; another grid's to reuse it)")
    p.add_argument("--cluster", choices=("local", "slurm"), default="local",
                   help="local: each cell in turn under mpiexec; slurm: one array job")
    p.add_argument("--ranks", type=int, default=None,
                   help="local: MPI ranks per cell (default slurm.nodes x tasks_per_node)")
    p.add_argument("--timeout", type=float, default=None,
                   help="local: seconds per cell; slurm with --wait: for the whole array")
    p.add_argument("--max-parallel", type=int, default=0,
                   help="slurm: at most this many array tasks at once (--array=...%%N)")
    p.add_argument("--wait", action="store_true",
                   help="slurm: wait for the array, then collect")
    p.add_argument("--resume", action="store_true",
                   help="local: run every cell with --resume, continuing the partial stages a "
                        "killed grid left (a Slurm array task resumes by itself when requeued)")
    p.add_argument("--dry-run", action="store_true",
                   help="write grid.json (and grid.sbatch) and list the cells; run nothing")


def run_grid_command(args: argparse.Namespace, cfg: Any, *, scripts: ModuleType,
                     collect: Callable[[Path], dict]) -> int:
    """`gptfl-hpc grid` (the CLI validated CONFIG and the overrides as `cfg` and passes the
    batch-script pieces and the collect function). Exit 0 when every cell finished."""
    out = Path(args.out).resolve()
    grid = plan(args.config, list(args.overrides), out, args)
    write_plan(out, grid)
    n = len(grid["cells"])
    log.info("grid %s: %d cells (%s); store %s", out, n,
             ", ".join(sorted({c["method"] for c in grid["cells"]})), grid["store"])
    if args.cluster == "slurm":
        from gptfl_hpc.fsio import write_text

        script = out / "grid.sbatch"  # each task's shape: the config's slurm section
        write_text(script, render_array(grid, out, cfg.slurm, scripts,
                                        max_parallel=args.max_parallel))
        script.chmod(0o755)
    if args.dry_run:
        sys.stdout.write("\n".join(c["name"] for c in grid["cells"]) + "\n")
        return 0
    if args.cluster == "slurm":
        job = submit_array(out / "grid.sbatch", out)
        log.info("submitted the grid as Slurm array job %s (%d tasks; logs in %s)", job, n,
                 out / "logs")
        sys.stdout.write(f"{job}\n")
        sys.stdout.flush()
        if not args.wait:
            return 0
        wait_array(job, args.timeout)
        return 0 if collect(out)["ok"] == n else 1
    ranks = args.ranks or cfg.slurm.nodes * cfg.slurm.tasks_per_node
    codes = run_local(grid, out, ranks, args.timeout, resume=args.resume)
    result = collect(out)
    failed = [k for k, rc in codes.items() if rc != 0]
    if failed:
        log.warning("%d of %d cells failed: %s", len(failed), n, ", ".join(failed[:5]))
    return 0 if result["ok"] == n else 1
