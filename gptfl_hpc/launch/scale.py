"""`gptfl-hpc scale`: federate at several rank counts and report speedup and efficiency.

Rank 0 is the server; the R-1 other ranks train clients, so "ideal" scaling is proportional to
the number of CLIENT ranks, (R-1)/(R0-1) relative to the smallest rank count R0.

* strong: the config's totals are kept (data.num_clients, fl.clients_per_round), so every rank
  count trains the same sampled clients on the same shards each round;
* weak: totals grow with the client ranks: num_clients and clients_per_round are the config's
  values times k = (R-1)/(R0-1), i.e. fixed clients per client rank. The private pool grows
  with them (data.train_fraction = k / k_max, a nested class-stratified subset; the whole pool
  at the largest R), so every client holds the same amount of data at every R and the work per
  client rank stays fixed, which is what weak scaling measures. Without that, a fixed dataset
  split among more clients would shrink each client and the work per rank with it.

Both modes use one definition: throughput = client samples trained per second (num_samples
over the server's wall-clock time between round ends, round 1 excluded as warm-up when there
are more), speedup = throughput / throughput at R0, efficiency = speedup / ideal. In strong mode
every round trains the same samples at every R, so this speedup is the ratio of round times.

The runner is injected: :func:`local_runner` (``mpiexec -n R``), :func:`slurm_runner` (a submitit
job per rank count), or a fake in tests.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gptfl_hpc.errors import ConfigError, DataError, GptflError
from gptfl_hpc.fsio import atomic_path, write_text

log = logging.getLogger(__name__)

MODES = ("strong", "weak")
# runner(ranks, overrides, run_dir) -> None; must leave run_dir/metrics.jsonl behind
Runner = Callable[[int, list[str], Path], None]
COLUMNS = ("ranks", "client_ranks", "num_clients", "clients_per_round", "samples_per_client",
           "rounds_timed", "t_wall", "t_round", "t_client", "t_comm", "t_server", "t_idle",
           "samples_per_s", "speedup", "ideal", "efficiency")


def parse_ranks(text: str | Sequence[int], nodes: int = 1) -> list[int]:
    """'2,4,8' -> [2, 4, 8]; every count >= 2 (a server and a client) and divisible by nodes."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ranks = sorted({int(str(x).strip()) for x in items if str(x).strip()})
    except ValueError:
        ranks = []
    if not ranks or ranks[0] < 2:
        raise ConfigError(f"--ranks {text!r}: invalid; valid: comma-separated integers >= 2 "
                          "(rank 0 is the server), e.g. 2,4,8,16")
    bad = [r for r in ranks if r % nodes]
    if bad:
        raise ConfigError(f"--ranks {bad[0]}: not divisible by --nodes {nodes}; valid: "
                          f"multiples of {nodes}")
    return ranks


@dataclass(frozen=True)
class Point:
    ranks: int
    num_clients: int
    clients_per_round: int
    overrides: tuple[str, ...]


def plan(cfg, ranks: Sequence[int], mode: str, data_root: Path) -> list[Point]:
    """The overrides of each rank count (pure). Runs with equal num_clients share one data dir."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: unknown; valid: {', '.join(MODES)}")
    base = min(ranks) - 1
    k_max = (max(ranks) - 1) / base
    points = []
    for r in ranks:
        k = (r - 1) / base if mode == "weak" else 1.0
        nc = max(1, round(cfg.data.num_clients * k))
        cpr = max(1, round(cfg.fl.clients_per_round * k))
        if r - 1 > nc:
            raise ConfigError(f"--ranks {r}: {r - 1} client ranks but data.num_clients={nc}; "
                              f"valid: ranks <= num_clients + 1 (raise data.num_clients or use "
                              "--mode weak)")
        if mode == "strong":
            data_dir = cfg.data.dir or str(data_root / f"data-c{nc}")
            over = (f"data.num_clients={nc}", f"fl.clients_per_round={cpr}",
                    f"data.dir={data_dir}")
        else:  # its own partition per rank count: more clients over a larger share of the pool
            frac = cfg.data.train_fraction * k / k_max
            over = (f"data.num_clients={nc}", f"fl.clients_per_round={cpr}",
                    f"data.train_fraction={frac:.6g}", f"data.dir={data_root / f'data-r{r}'}")
        points.append(Point(r, nc, cpr, over))
    return points


def merge_overrides(user: Sequence[str], planned: Sequence[str]) -> list[str]:
    """The user's overrides, then the plan's; a key the plan sets replaces the user's (the plan
    was computed from the config with the user's overrides applied, e.g. data.dir)."""
    keys = {o.split("=", 1)[0].strip() for o in planned}
    return [o for o in user if o.split("=", 1)[0].strip() not in keys] + list(planned)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"scale: {path} missing; the federate run wrote no metrics")
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not rows:
        raise DataError(f"scale: {path} has no rounds")
    return rows


def summarize(point: Point, rows: list[dict]) -> dict:
    """Means over the timed rounds (round 1 is warm-up when there are more).

    Throughput uses the server's wall clock between round ends (``wall_seconds``), which covers
    everything a round costs (training, communication, the server step and evaluation, and any
    overlap between them); the t_* columns are the engine's per-round breakdown.
    """
    timed = rows[1:] if len(rows) > 1 else rows

    def mean(key: str) -> float:
        vals = [float(r[key]) for r in timed if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    walls = [r.get("wall_seconds") for r in rows]
    if len(rows) > 1 and None not in walls:
        elapsed = float(walls[-1]) - float(walls[0])
    else:
        elapsed = sum(float(r["t_round"]) for r in timed)
    samples = sum(int(r["num_samples"]) for r in timed)
    trained = sum(int(r.get("clients_ok", point.clients_per_round)) for r in timed)
    return {"ranks": point.ranks, "client_ranks": point.ranks - 1,
            "num_clients": point.num_clients, "clients_per_round": point.clients_per_round,
            "samples_per_client": samples / trained if trained else float("nan"),
            "rounds_timed": len(timed), "t_wall": elapsed / len(timed),
            "t_round": mean("t_round"), "t_client": mean("t_client"),
            "t_comm": mean("t_comm"), "t_server": mean("t_server"), "t_idle": mean("t_idle"),
            "samples_per_s": samples / elapsed if elapsed > 0 else float("nan")}


def add_efficiency(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        r["ideal"] = r["client_ranks"] / base["client_ranks"]
        r["efficiency"] = r["speedup"] / r["ideal"]
    return rows


def run_scaling(cfg, config: str, overrides: Sequence[str], out: str | Path,
                ranks: Sequence[int], mode: str, runner: Runner) -> list[dict]:
    """Run federate at each rank count (in order, one at a time) and write the reports."""
    out = Path(out)
    rows = []
    for p in plan(cfg, ranks, mode, out):
        run_dir = out / f"r{p.ranks}"
        t0 = time.perf_counter()
        log.info("scale %s: %d ranks, %d clients, %d per round -> %s", mode, p.ranks,
                 p.num_clients, p.clients_per_round, run_dir)
        runner(p.ranks, merge_overrides(overrides, p.overrides), run_dir)
        rows.append(summarize(p, read_metrics(run_dir)))
        log.info("scale: %d ranks done in %.1fs: %.1f samples/s", p.ranks,
                 time.perf_counter() - t0, rows[-1]["samples_per_s"])
    add_efficiency(rows)
    write_reports(rows, out, mode=mode, config=config, overrides=overrides)
    return rows


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_reports(rows: list[dict], out: Path, *, mode: str, config: str,
                  overrides: Sequence[str]) -> None:
    """scaling.csv, scaling.md and scaling.png in `out`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in COLUMNS})
    write_text(out / "scaling.csv", buf.getvalue())
    heads = ["ranks", "client ranks", "clients", "per round", "samples/client", "rounds",
             "wall/round s", "t_round s", "t_client s", "t_comm s", "t_server s", "t_idle s",
             "samples/s", "speedup", "ideal", "efficiency"]
    lines = [f"# Scaling ({mode}): gptfl-hpc federate {config} {' '.join(overrides)}".rstrip(),
             "",
             f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
             f"({platform.machine()}, Python {platform.python_version()}). Times are means "
             "over the timed rounds (round 1 excluded as warm-up when there are more); "
             "samples/s = client samples trained per second of the server's wall clock "
             "between round ends (training, communication, server step, evaluation); "
             "speedup = samples/s relative to the first row; ideal = client ranks relative to "
             "the first row; efficiency = speedup / ideal.",
             "",
             "| " + " | ".join(heads) + " |",
             "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in COLUMNS) + " |" for r in rows]
    write_text(out / "scaling.md", "\n".join(lines) + "\n")
    _plot(rows, out / "scaling.png", mode)


def _plot(rows: list[dict], path: Path, mode: str) -> None:
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib not installed (pip install gptfl-hpc[report]): no %s", path)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["ranks"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(x, [r["speedup"] for r in rows], "o-", label="measured")
    a.plot(x, [r["ideal"] for r in rows], "k--", label="ideal (client ranks)")
    a.set(xlabel="MPI ranks", ylabel="speedup (samples/s)", title=f"{mode} scaling: speedup")
    b.plot(x, [r["efficiency"] for r in rows], "o-")
    b.axhline(1.0, color="k", ls="--")
    b.set(xlabel="MPI ranks", ylabel="efficiency", title=f"{mode} scaling: efficiency",
          ylim=(0, max(1.1, max(r["efficiency"] for r in rows) * 1.1)))
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.grid(alpha=0.3)
    a.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def local_runner(config: str, timeout: float = 3600) -> Runner:
    """Run each point as ``mpiexec -n R python -m mpi4py -m gptfl_hpc federate ...``."""
    from gptfl_hpc.launch.jobs import local_env, mpiexec_command

    def run(ranks: int, overrides: list[str], run_dir: Path) -> None:
        cmd = [*mpiexec_command(ranks), sys.executable, "-m", "mpi4py", "-m", "gptfl_hpc",
               "federate", config, *overrides, "--out", str(run_dir)]
        log.info("running: %s", " ".join(cmd))
        try:
            p = subprocess.run(cmd, env=local_env(), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GptflError(f"scale: {ranks} ranks ran over --timeout {timeout:.0f}s") from None
        if p.returncode != 0:
            raise GptflError(f"scale: federate with {ranks} ranks exited {p.returncode} "
                             "(its log is above)")
    return run


def slurm_runner(config: str, slurm, cluster: str = "slurm") -> Runner:
    """Run each point as one submitit job of R tasks over slurm.nodes nodes, then wait."""
    from gptfl_hpc.config import replace
    from gptfl_hpc.launch.jobs import rank0_result, submit_task

    def run(ranks: int, overrides: list[str], run_dir: Path) -> None:
        shape = replace(slurm, tasks_per_node=ranks // slurm.nodes)
        job = submit_task(["federate", config, *overrides], run_dir, shape, cluster,
                          job_name=f"gptfl-scale-r{ranks}")
        rank0_result(job)
    return run
