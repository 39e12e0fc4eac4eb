"""The experiment grid (gptfl_hpc/grid.py) and its tables (gptfl_hpc/collect.py): cell expansion
and validation, the Slurm array script (run by bash with a fake srun), collect on a fabricated
grid (statistics, ablations, failed/missing cells), a real grid end to end on the tiny config
(local: the store makes cells share a synthetic set per volume), and the same as a live Slurm
array job (marked slurm)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, env, run_cli

from gptfl_hpc import collect as col
from gptfl_hpc import grid as gr
from gptfl_hpc.config import load_config
from gptfl_hpc.errors import ConfigError, GptflError
from gptfl_hpc.launch import slurm as scripts

TINY = str(REPO / "configs" / "tiny.yaml")
FAST = ["gen.train.steps=4", "gen.steps=2", "fl.rounds=2", "pretrain.epochs=1"]


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    gr.add_grid_args(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


# ------------------------------------------------------------------------------ expansion


def test_cells_multiply_only_the_axes_a_method_uses(tmp_path: Path) -> None:
    g = gr.plan(TINY, [], tmp_path, _args(methods="gptfl,fedavg,synthetic_only,fedopt,"
                                          "centralised", seeds="0,1,2", alphas="0.1,0.5",
                                          volumes="1,2,3", clients_per_round="2,4"))
    cells = g["cells"]
    count = {m: sum(c["method"] == m for c in cells) for m in gr.METHODS}
    # centralised uses neither the synthetic set nor FL rounds: seeds x alphas only
    assert count == {"gptfl": 3 * 2 * 3 * 2, "fedavg": 3 * 2 * 2, "gptfl_fedopt": 0,
                     "fedopt": 3 * 2 * 2, "synthetic_only": 3 * 2 * 3, "centralised": 3 * 2}
    assert len({c["name"] for c in cells}) == len(cells)
    by = {c["name"]: c for c in cells}
    c = by["gptfl-seed1-alpha0.5-vol2-cpr4"]
    assert c["overrides"] == ["run.methods=[gptfl]", "run.seed=1", "data.alpha=0.5",
                              "gen.volume=2.0", "fl.clients_per_round=4",
                              f"run.store={tmp_path.resolve() / 'store'}"]
    assert by["fedavg-seed0-alpha0.1-cpr2"]["volume"] is None
    assert by["synthetic_only-seed2-alpha0.1-vol3"]["clients_per_round"] is None
    assert by["centralised-seed2-alpha0.5"]["overrides"] == [
        "run.methods=[centralised]", "run.seed=2", "data.alpha=0.5",
        f"run.store={tmp_path.resolve() / 'store'}"]
    assert (by["centralised-seed2-alpha0.5"]["volume"],
            by["centralised-seed2-alpha0.5"]["clients_per_round"]) == (None, None)
    assert "fl.algorithm=fedadam" in by["fedopt-seed0-alpha0.1-cpr2"]["overrides"]
    assert "fl.server_lr=0.01" in by["fedopt-seed0-alpha0.1-cpr2"]["overrides"]
    # axes left out keep the config's values, without an override
    g = gr.plan(TINY, ["fl.rounds=5"], tmp_path, _args(methods="gptfl"))
    (only,) = g["cells"]
    assert only["name"] == "gptfl-seed0-alpha0.5-vol0.3-cpr4"
    assert only["overrides"] == ["run.methods=[gptfl]",
                                 f"run.store={tmp_path.resolve() / 'store'}"]
    assert g["reference"] == {"volume": 0.3, "clients_per_round": 4, "alpha": 0.5}


def test_iid_is_a_value_of_the_alpha_axis(tmp_path: Path) -> None:
    g = gr.plan(TINY, [], tmp_path, _args(methods="gptfl,synthetic_only", seeds="0,1",
                                          alphas="0.05,IID,0.5"))
    by = {c["name"]: c for c in g["cells"]}
    assert sorted(by) == sorted(f"{m}-seed{s}-{a}-vol0.3{'-cpr4' if m == 'gptfl' else ''}"
                                for m in ("gptfl", "synthetic_only") for s in (0, 1)
                                for a in ("alpha0.05", "iid", "alpha0.5"))
    iid = by["gptfl-seed1-iid-vol0.3-cpr4"]
    assert iid["alpha"] == "iid"
    assert "data.partition=iid" in iid["overrides"]
    assert not any(o.startswith("data.alpha=") for o in iid["overrides"])
    cfg = load_config(TINY, iid["overrides"])
    assert cfg.data.partition == "iid"
    other = by["gptfl-seed1-alpha0.05-vol0.3-cpr4"]
    assert other["alpha"] == 0.05 and "data.alpha=0.05" in other["overrides"]
    assert load_config(TINY, other["overrides"]).data.partition == "dirichlet"


@pytest.mark.parametrize("overrides,kw,match", [
    ([], {"alphas": "0.1,x"}, r"--alphas '0.1,x': invalid; valid: distinct comma-separated "
                              r"numbers and/or iid"),
    ([], {"alphas": "iid,0.1,iid"}, r"--alphas 'iid,0.1,iid': invalid"),
    ([], {"alphas": "0.1,-1"}, r"grid cell gptfl-seed0-alpha-1-vol0.3-cpr4: config key "
                               r"data.alpha"),
    ([], {"methods": "gptfl,fedsgd"}, r"--methods gptfl,fedsgd: unknown fedsgd; valid: gptfl"),
    (["data.partition=iid"], {"alphas": "0.1"}, r"--alphas: data.partition is iid"),
    (["gen.count=100"], {"volumes": "1,2"}, r"--volumes: gen.count is set"),
    (["data.dir=/tmp/x"], {"seeds": "0,1"}, r"data.dir: /tmp/x would hold every cell's data"),
    (["run.methods=[gptfl]"], {}, r"override run.methods: set by the grid; valid: use --methods"),
    ([], {"clients_per_round": "2,9"},
     r"grid cell gptfl-seed0-alpha0.5-vol0.3-cpr9: config key fl.clients_per_round"),
    ([], {"seeds": "0,0"}, r"--seeds '0,0': invalid; valid: distinct"),
    ([], {"volumes": "1,x"}, r"--volumes '1,x': invalid"),
])
def test_grid_errors_before_anything_runs(tmp_path, overrides, kw, match) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        gr.plan(TINY, overrides, tmp_path, _args(**{"methods": "gptfl,fedavg", **kw}))
    assert "\n" not in str(e.value)


def test_a_directory_holds_one_grid(tmp_path: Path) -> None:
    a = gr.plan(TINY, [], tmp_path, _args(methods="gptfl", seeds="0,1"))
    gr.write_plan(tmp_path, a)
    gr.write_plan(tmp_path, a)  # the same grid again: fine (a rerun resumes it)
    b = gr.plan(TINY, [], tmp_path, _args(methods="gptfl", seeds="0,1,2"))
    with pytest.raises(GptflError, match=r"grid.json: holds another grid \(differs in cells\)"):
        gr.write_plan(tmp_path, b)
    # a rerun may change what cannot change a result (threads), not what can (the lr)
    gr.write_plan(tmp_path, gr.plan(TINY, ["run.threads=1"], tmp_path,
                                    _args(methods="gptfl", seeds="0,1")))
    c = gr.plan(TINY, ["fl.client_lr=0.01"], tmp_path, _args(methods="gptfl", seeds="0,1"))
    with pytest.raises(GptflError, match=r"differs in overrides"):
        gr.write_plan(tmp_path, c)


def test_cell_file_names_agree_between_grid_and_collect() -> None:
    assert (gr.CELL_STATUS, gr.CELL_LOG) == (col.CELL_STATUS, col.CELL_LOG)


# ------------------------------------------------------------------------------ the array script


def test_array_script_runs_its_cell_and_records_the_exit_code(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["slurm.tasks_per_node=2"])
    g = gr.plan(TINY, ["fl.rounds=3"], tmp_path, _args(methods="gptfl,fedavg", seeds="0,1"))
    script = gr.render_array(g, tmp_path, cfg.slurm, scripts, max_parallel=2)
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --ntasks-per-node=2" in script
    assert "#SBATCH --signal=B:USR1@120" in script and "finish \"$rc\"" in script
    path = tmp_path / "grid.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], timeout=30).returncode == 0
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text("#!/bin/bash\nprintf '%s\\n' \"$@\" > \"$FAKE_ARGS\"\n"
                               "exit ${FAKE_RC:-0}\n")
    (bin_ / "srun").chmod(0o755)

    def task(i: int, rc: int = 0, **extra: str) -> tuple[int, list[str], str]:
        e = {**env(), "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(i),
             "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "78", "FAKE_ARGS": str(tmp_path / "a"),
             "FAKE_RC": str(rc), "GPTFL_REQUEUE": "0", **extra}
        p = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=e,
                           timeout=60, cwd=tmp_path)
        args = (tmp_path / "a").read_text().splitlines() if (tmp_path / "a").exists() else []
        return p.returncode, args, p.stderr

    rc, args, _ = task(3)
    cell = g["cells"][3]
    assert rc == 0 and cell["name"] == "fedavg-seed1-alpha0.5-cpr4"
    i = args.index("gptfl_hpc")
    assert args[i + 1:] == ["run", g["config"], "fl.rounds=3", *cell["overrides"], "--out",
                            str(tmp_path / "cells" / cell["name"])]
    status = json.loads((tmp_path / "cells" / cell["name"] / "cell.json").read_text())
    assert status["rc"] == 0 and status["job"] == "77_3"
    rc, _, _ = task(0, rc=2)
    assert rc == 2
    assert json.loads((tmp_path / "cells" / g["cells"][0]["name"] / "cell.json").read_text()
                      )["rc"] == 2
    rc, args, _ = task(1, SLURM_RESTART_COUNT="1", GPTFL_OVERRIDES="fl.eval_every=2")
    assert rc == 0 and args[-1] == "--resume" and "fl.eval_every=2" in args
    (tmp_path / "a").unlink()
    rc, args, err = task(4)
    assert rc == 2 and not args and "the grid has 4 cells" in err


# ------------------------------------------------------------------------------ collect


def _acc(method: str, seed: int, vol, cpr) -> float:
    base = {"fedavg": 0.40, "gptfl": 0.70, "synthetic_only": 0.55}[method]
    return round(base + 0.02 * seed + (0.03 * vol if vol else 0) + (0.005 * cpr if cpr else 0),
                 6)


def _fabricate(tmp_path: Path) -> tuple[dict, dict]:
    """A finished grid: 3 seeds x 2 volumes x 2 clients-per-round, with one failed, one
    preempted, one missing cell and a torn metrics line."""
    g = gr.plan(TINY, [], tmp_path, _args(methods="fedavg,gptfl,synthetic_only",
                                          seeds="0,1,2", alphas="0.1", volumes="1,2",
                                          clients_per_round="2,5"))
    gr.write_plan(tmp_path, g)
    special = {"gptfl-seed2-alpha0.1-vol2-cpr5": "failed",
               "fedavg-seed1-alpha0.1-cpr2": "missing",
               "synthetic_only-seed0-alpha0.1-vol1": "preempted"}
    for c in g["cells"]:
        d = tmp_path / "cells" / c["name"]
        d.mkdir(parents=True)
        kind = special.get(c["name"])
        if kind == "failed":
            (d / "cell.json").write_text('{"rc": 2}')
            (d / "cell.log").write_text("[gptfl r0] 10:00:00 INFO x: y\n[gptfl r0] gptfl-hpc "
                                        "run: error: shard clients/c.h5: checksum mismatch\n")
            continue
        if kind == "missing":
            continue
        if kind == "preempted":
            (d / "cell.json").write_text('{"rc": 124}')
            continue
        row = "synthetic_only" if c["method"] == "synthetic_only" else c["method"]
        final = _acc(c["method"], c["seed"], c["volume"], c["clients_per_round"])
        (d / "report.json").write_text(json.dumps({"rows": [
            {"method": row, "final_accuracy": final, "best_accuracy": final}]}))
        (d / "cell.json").write_text('{"rc": 0}')
        if row != "synthetic_only":
            (d / row).mkdir()
            lines = [json.dumps({"round": r, "test_accuracy": final * r / 5,
                                 "grad_diversity": 2.0 if row == "fedavg" else 1.5})
                     for r in range(1, 6)]
            torn = '\n{"round": 6, "te' if c["name"] == "gptfl-seed0-alpha0.1-vol2-cpr5" else ""
            (d / row / "metrics.jsonl").write_text("\n".join(lines) + torn)
    return g, special


def _ms(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def test_collect_tables_from_a_fabricated_grid(tmp_path: Path) -> None:
    g, special = _fabricate(tmp_path)
    result = col.collect(tmp_path, target=0.5)
    assert (result["ok"], result["failed"], result["missing"]) == (len(g["cells"]) - 3, 1, 2)
    md = (tmp_path / "tables.md").read_text()
    # the main table at the reference volume (2x: tiny's 0.3 is not in the grid) and clients
    # per round (5): GPT-FL lost seed 2 to the failure
    gptfl = [_acc("gptfl", s, 2, 5) for s in (0, 1)]
    assert f"| GPT-FL (2x) | {_ms(gptfl)} (2/3) |" in md
    fedavg = [_acc("fedavg", s, None, 5) for s in (0, 1, 2)]
    assert f"| FedAvg from scratch | {_ms(fedavg)} |" in md
    syn = [_acc("synthetic_only", s, 2, None) for s in (0, 1, 2)]
    assert f"| Synthetic only (2x) | {_ms(syn)} |" in md
    # rounds to 50 %: accuracy grows linearly to its final value at round 5 (FedAvg's stays
    # below 50 %)
    rounds = [math.ceil(0.5 * 5 / a - 1e-9) for a in gptfl]
    rs = f"{statistics.mean(rounds):.1f} ± {statistics.stdev(rounds):.1f}"
    assert f"| GPT-FL (2x) | {rs} (2/3 reached) |" in md
    assert "| FedAvg from scratch | - (0/3 reached) |" in md
    assert "| Synthetic only (2x) | 0.0 ± 0.0 (3/3 reached) |" in md
    # clients-per-round ablation (FedAvg lost seed 1 at 2 clients) and volume ablation
    cpr2 = [_acc("fedavg", s, None, 2) for s in (0, 2)]
    assert f"| 2 | {_ms(cpr2)} (2/3) | {_ms([_acc('gptfl', s, 2, 2) for s in (0, 1, 2)])} |" \
        in md
    v1 = ([_acc("synthetic_only", s, 1, None) for s in (1, 2)],
          [_acc("gptfl", s, 1, 5) for s in (0, 1, 2)])
    assert f"| 1x | {_ms(v1[0])} (2/3) | {_ms(v1[1])} |" in md
    assert "| FedAvg from scratch | 2.000 |" in md and "| GPT-FL | 1.500 |" in md
    # what did not finish, and why
    assert "| gptfl-seed2-alpha0.1-vol2-cpr5 | failed | exit 2: gptfl-hpc run: error: shard " \
           "clients/c.h5: checksum mismatch |" in md
    assert "| fedavg-seed1-alpha0.1-cpr2 | missing | not run yet" in md
    assert "| synthetic_only-seed0-alpha0.1-vol1 | missing | preempted (exit 124)" in md
    rows = list(csv.DictReader(open(tmp_path / "tables.csv")))
    r = next(x for x in rows if x["method"] == "gptfl" and x["volume"] == "2.0"
             and x["clients_per_round"] == "5")
    assert (r["cells"], r["ok"]) == ("3", "2")
    assert float(r["final_mean"]) == pytest.approx(statistics.mean(gptfl))
    cells = {x["name"]: x for x in csv.DictReader(open(tmp_path / "cells.csv"))}
    assert {n: cells[n]["status"] for n in special} == {
        "gptfl-seed2-alpha0.1-vol2-cpr5": "failed", "fedavg-seed1-alpha0.1-cpr2": "missing",
        "synthetic_only-seed0-alpha0.1-vol1": "missing"}
    assert (tmp_path / "diversity.png").stat().st_size > 1000
    # the command: prints the tables; a directory without a grid is a one-line error
    p = run_cli(["collect", tmp_path, "--target", "0.5"], timeout=120)
    assert f"| GPT-FL (2x) | {_ms(gptfl)} (2/3) |" in p.stdout
    p = run_cli(["collect", tmp_path / "cells"], check=False, timeout=60)
    assert p.returncode == 2 and "grid.json: not found" in p.stderr


# ------------------------------------------------------------------------------ end to end


def _reused(log: str, stage: str) -> bool:
    return f"== stage {stage}: complete for this request" in log


@pytest.mark.timeout(600)
def test_local_grid_shares_one_synthetic_set_per_volume(tmp_path: Path) -> None:
    """gptfl and synthetic_only at 2 volumes: 4 cells, ONE prepare, one generator and one
    synthetic set + pretrained model per volume, shared by the two methods."""
    out = tmp_path / "grid"
    t0 = time.monotonic()
    p = run_cli(["grid", TINY, *FAST, "--out", out, "--methods", "gptfl,synthetic_only",
                 "--volumes", "0.1,0.2", "--ranks", "1"], timeout=540)
    seconds = time.monotonic() - t0
    stores = sorted(d.name.split("-")[0] for d in (out / "store").iterdir())
    assert stores == ["generator", "prepare", "pretrain", "pretrain", "synthesize",
                      "synthesize"], stores
    logs = {c.name: (c / "cell.log").read_text() for c in (out / "cells").iterdir()}
    assert len(logs) == 4
    ran = sum(not _reused(t, "synthesize") and "== stage synthesize" in t for t in logs.values())
    assert ran == 2, "one synthesis per volume, not per cell"
    for v in ("0.1", "0.2"):
        assert _reused(logs[f"synthetic_only-seed0-alpha0.5-vol{v}"], "pretrain")
    md = (out / "tables.md").read_text()
    assert "4 cells: 4 ok, 0 failed, 0 missing" in md and "| 0.1x |" in md
    assert "| GPT-FL (0.2x) |" in md and (out / "diversity.png").is_file()
    assert "collected 4 cells (4 ok" in p.stderr
    print(f"local grid, 4 cells: {seconds:.0f}s")


def _slurm_unusable() -> str | None:
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH: bring up a test Slurm with scripts/slurm-up.sh"
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    return None if "UP" in p.stdout else "scontrol ping: controller not UP"


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_slurm_array_grid(tmp_path: Path) -> None:
    """The same kind of grid as ONE Slurm array job: 2 methods x 2 seeds, concurrent tasks
    that share the store (the later ones wait on its directory locks)."""
    why = _slurm_unusable()
    if why:
        pytest.skip(why)
    out = tmp_path / "grid"
    e = env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "gptfl_hpc", "grid", TINY, *FAST, "slurm.tasks_per_node=2",
           "slurm.time=00:15:00", "--out", str(out), "--methods", "gptfl,fedavg", "--seeds", "0,1",
           "--cluster", "slurm", "--wait", "--timeout", "780"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=REPO, timeout=840)
    job = p.stdout.strip().splitlines()[0] if p.stdout.strip() else ""
    try:
        logs = "\n".join(f.read_text()[-1500:] for f in sorted((out / "logs").glob("*.out")))
        assert p.returncode == 0, p.stderr[-3000:] + logs
        md = (out / "tables.md").read_text()
        assert "4 cells: 4 ok, 0 failed, 0 missing" in md, md
        stores = sorted(d.name.split("-")[0] for d in (out / "store").iterdir())
        assert stores.count("prepare") == 2 and stores.count("synthesize") == 2, stores
        for c in json.loads((out / "grid.json").read_text())["cells"]:
            status = json.loads((out / "cells" / c["name"] / "cell.json").read_text())
            assert status["rc"] == 0 and status["where"] == "slurm", status
        print(f"slurm array grid, 4 cells: {time.monotonic() - t0:.0f}s (job {job})")
    finally:
        if job.isdigit():
            subprocess.run(["scancel", job], timeout=30)


# ------------------------------------------------------------------------------ paper configs


# the image configs; the audio ones (esc50-audioldm, speech_commands-speecht5) use other
# reference settings and are checked in tests/test_speech_run.py
AUDIO_PAPER = ("esc50-audioldm", "speech_commands-speecht5")
PAPER = sorted(p for p in (REPO / "configs" / "paper").glob("*.yaml")
               if p.stem not in AUDIO_PAPER)


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_configs_are_valid_and_use_the_reference_settings(path: Path) -> None:
    cfg = load_config(path)
    dataset, model = path.stem.split("-")
    assert (cfg.data.source, cfg.model.name) == (dataset, model)
    assert (cfg.data.partition, cfg.data.alpha, cfg.fl.clients_per_round) == ("dirichlet", 0.1,
                                                                              10)
    assert (cfg.fl.local_epochs, cfg.fl.batch_size, cfg.fl.client_optimizer,
            cfg.fl.client_lr) == (1, 32, "sgd", 0.1)
    assert cfg.data.num_clients == (20 if dataset == "covid19" else 100)
    assert cfg.gen.guidance == [1.0, 5.0] and cfg.gen.kind == "text2image"
    assert cfg.data.image_size == (0 if dataset.startswith("cifar") else 224)
    if dataset == "flowers102":
        assert len(cfg.data.label_names) == len(set(cfg.data.label_names)) == 102
    # the paper's grid for it: 3 seeds; volumes only where synthetic data is used
    g = gr.plan(str(path), [], REPO / "runs" / "x", _args(
        methods="gptfl,fedavg,gptfl_fedopt,fedopt,synthetic_only", seeds="0,1,2",
        volumes="1,2,3"))
    assert len(g["cells"]) == 3 * (3 + 1 + 3 + 1 + 3)


def test_paper_config_list() -> None:
    assert [p.stem for p in PAPER] == [
        "cifar10-convnet", "cifar10-resnet18", "cifar10-resnet20", "cifar10-vgg19",
        "cifar100-convnet", "cifar100-resnet50", "cifar100-vgg19", "covid19-resnet18",
        "eurosat-resnet18", "flowers102-convnet", "flowers102-resnet18", "food101-resnet18"]


# ------------------------------------------------------------------------------ three-way


SYN_ACC = {s: 0.60 + 0.01 * s for s in (0, 1, 2)}
GAIN = {0.1: (0.05, 0.07, 0.04), 0.5: (0.03, None, None), "iid": (0.01, -0.02, 0.005)}
"""GPT-FL's final minus synthetic-only's per seed (None: that GPT-FL cell failed)."""


def _three_way_acc(method: str, seed: int, alpha) -> float:
    if method == "synthetic_only":
        return round(SYN_ACC[seed], 6)
    if method == "gptfl":
        return round(SYN_ACC[seed] + GAIN[alpha][seed], 6)
    return round({"fedavg": 0.40 + 0.03 * seed, "centralised": 0.90 + 0.01 * seed}[method], 6)


def _fabricate_three_way(tmp_path: Path) -> dict:
    g = gr.plan(TINY, [], tmp_path, _args(methods="fedavg,gptfl,synthetic_only,centralised",
                                          seeds="0,1,2", alphas="0.1,0.5,iid"))
    gr.write_plan(tmp_path, g)
    for c in g["cells"]:
        d = tmp_path / "cells" / c["name"]
        d.mkdir(parents=True)
        if c["method"] == "gptfl" and GAIN[c["alpha"]][c["seed"]] is None:
            (d / "cell.json").write_text('{"rc": 1}')
            continue
        final = _three_way_acc(c["method"], c["seed"], c["alpha"])
        (d / "report.json").write_text(json.dumps({"rows": [
            {"method": c["method"], "final_accuracy": final, "best_accuracy": final}]}))
        (d / "cell.json").write_text('{"rc": 0}')
        if c["method"] in ("gptfl", "fedavg"):
            start = SYN_ACC[c["seed"]] if c["method"] == "gptfl" else 0.1
            (d / c["method"]).mkdir()
            (d / c["method"] / "metrics.jsonl").write_text("\n".join(
                json.dumps({"round": r, "test_accuracy": start + (final - start) * r / 4})
                for r in range(1, 5)))
    return g


def test_collect_says_whether_fl_adds_to_synthetic_only(tmp_path: Path) -> None:
    from scipy import stats

    g = _fabricate_three_way(tmp_path)
    result = col.collect(tmp_path, target=0.5)
    assert result["failed"] == 2 and str(tmp_path / "curves.png") in result["files"]
    md = (tmp_path / "tables.md").read_text()
    assert "| method | alpha 0.1 | alpha 0.5 | iid |" in md
    central = _ms([_three_way_acc("centralised", s, None) for s in (0, 1, 2)])
    assert f"| Centralised (pooled data, reference) | {central} | {central} | {central} |" in md
    assert "| Centralised (pooled data, reference) | n/a (not FL) | n/a (not FL) |" in md
    section = md.split("## Does FL add to synthetic-only?")[1].split("\n## ")[0]
    rows = {}
    for alpha, text in ((0.1, "alpha 0.1"), ("iid", "iid")):
        d = [100 * v for v in GAIN[alpha]]  # independent of collect: t by hand, then its tail
        t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
        p = float(stats.t.sf(t, len(d) - 1))
        gm = statistics.mean(_three_way_acc("gptfl", s, alpha) for s in (0, 1, 2))
        sm = statistics.mean(SYN_ACC[s] for s in (0, 1, 2))
        verdict = ("significantly above synthetic-only (p < 0.05)" if p < 0.05 else
                   "NOT significantly above synthetic-only (p >= 0.05)")
        rows[alpha] = (p, verdict)
        assert (f"| {text} | 0.3x | 4 | GPT-FL | {100 * gm:.1f} | {100 * sm:.1f} | "
                f"{statistics.mean(d):+.1f} ± {statistics.stdev(d):.1f} | 3 | {p:.3g} | "
                f"{verdict} |") in section, section
    assert rows[0.1][0] < 0.05 < rows["iid"][0]  # the fabricated gains: one clear, one not
    assert ("| alpha 0.5 | 0.3x | 4 | GPT-FL | 63.0 | 60.0 | +3.0 | 1 | - | too few seeds to "
            "test |") in section
    csv_rows = {(r["method"], r["alpha"]): r for r in csv.DictReader(open(tmp_path /
                                                                          "tables.csv"))}
    r = csv_rows[("gptfl", "iid")]
    assert r["vs_synthetic_pairs"] == "3"
    assert float(r["vs_synthetic_p"]) == pytest.approx(rows["iid"][0])
    assert float(r["vs_synthetic_diff_mean"]) == pytest.approx(statistics.mean(GAIN["iid"]))
    assert r["vs_synthetic_verdict"].startswith("NOT significantly above synthetic-only")
    assert csv_rows[("gptfl", "0.5")]["vs_synthetic_verdict"] == "too few seeds to test"
    assert csv_rows[("fedavg", "0.1")]["vs_synthetic_verdict"] == ""
    # the bands plot: per round mean ± sd over seeds; flat bands for the methods w/o rounds
    cells = [col.read_cell(tmp_path, c, 0.5) for c in g["cells"]]
    b = col.bands(g, cells)
    assert list(b) == [0.1, 0.5, "iid"]
    gptfl = b[0.1]["gptfl"]
    assert gptfl["n"] == 3 and [r for r, _, _ in gptfl["rounds"]] == [1, 2, 3, 4]
    at2 = [SYN_ACC[s] + (_three_way_acc("gptfl", s, 0.1) - SYN_ACC[s]) * 2 / 4
           for s in (0, 1, 2)]
    assert gptfl["rounds"][1][1:] == pytest.approx((statistics.mean(at2),
                                                    statistics.stdev(at2)))
    assert b[0.5]["gptfl"]["n"] == 1 and b[0.5]["gptfl"]["rounds"][0][2] == 0.0
    syn = b["iid"]["synthetic_only"]
    assert (syn["n"], syn["mean"], syn["sd"]) == (3, pytest.approx(statistics.mean(
        SYN_ACC.values())), pytest.approx(statistics.stdev(SYN_ACC.values())))
    assert b["iid"]["centralised"]["n"] == 3 and "rounds" not in b["iid"]["centralised"]
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_without_scipy_or_matplotlib_collect_says_so(tmp_path: Path, monkeypatch,
                                                     caplog) -> None:
    g = _fabricate_three_way(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("WARNING", logger="gptfl_hpc.collect"):
        result = col.collect(tmp_path, target=0.5)
    assert not any(f.endswith(".png") for f in result["files"])
    assert not (tmp_path / "curves.png").exists()
    assert "matplotlib not installed" in caplog.text and "curves.png" in caplog.text
    md = (tmp_path / "tables.md").read_text()
    assert "| 3 | - | not tested: scipy is not installed (pip install scipy) |" in md
    assert "too few seeds to test" in md  # one pair needs no scipy to be refused
    assert len(g["cells"]) == result["ok"] + result["failed"]


@pytest.mark.timeout(600)
def test_local_grid_runs_the_centralised_reference_at_an_alpha_and_iid(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    run_cli(["grid", TINY, *FAST, "--out", out, "--methods", "centralised", "--alphas",
             "0.5,iid", "--ranks", "2"], timeout=540)
    cells = {c.name: c for c in (out / "cells").iterdir()}
    assert sorted(cells) == ["centralised-seed0-alpha0.5", "centralised-seed0-iid"]
    finals = {}
    for name, d in cells.items():
        s = json.loads((d / "centralised" / "summary.json").read_text())
        finals[name] = s["final_accuracy"]
        assert len(s["curve"]) == 1 and s["best_accuracy"] == s["final_accuracy"]
        log = (d / "cell.log").read_text()
        assert "== stage centralised" in log and "== stage synthesize" not in log
    manifests = {json.loads(m.read_text())["partition"]
                 for m in (out / "store").glob("prepare-*/manifest.json")}
    assert manifests == {"dirichlet", "iid"}
    md = (out / "tables.md").read_text()
    assert "| method | alpha 0.5 | iid |" in md
    assert (f"| Centralised (pooled data, reference) | "
            f"{100 * finals['centralised-seed0-alpha0.5']:.1f} | "
            f"{100 * finals['centralised-seed0-iid']:.1f} |") in md
    assert (out / "curves.png").is_file()


def test_resume_reaches_every_local_cell(tmp_path: Path, monkeypatch) -> None:
    """`grid --resume` runs each cell with --resume (a killed grid's partial stages in the
    store are refused without it); without it the cells run as before."""
    grid = {"config": TINY, "overrides": ["fl.rounds=2"],
            "cells": [{"name": "gptfl-seed0", "overrides": ["run.seed=0"]}]}
    assert gr.cell_argv(grid, grid["cells"][0], tmp_path)[-1] != "--resume"
    assert gr.cell_argv(grid, grid["cells"][0], tmp_path, resume=True)[-3:] == [
        "--out", str(tmp_path / "cells" / "gptfl-seed0"), "--resume"]
    seen: list[list[str]] = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gr.subprocess, "run", fake_run)
    monkeypatch.setattr(gr, "mpiexec_command", lambda n: ["mpiexec", "-n", str(n)])
    assert gr.run_local(grid, tmp_path, 3, None, resume=True) == {"gptfl-seed0": 0}
    assert seen[0][:3] == ["mpiexec", "-n", "3"] and seen[0][-1] == "--resume"
    p = argparse.ArgumentParser()
    gr.add_grid_args(p)
    assert p.parse_args(["--resume"]).resume
    assert not p.parse_args([]).resume
