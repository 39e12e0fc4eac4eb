"""benchmarks/bench_fl_round.py: its own plumbing on a tiny shape, without pfl (not in CI).

One benchmark run (~35 s on 2 quiet cores: 2 tiny prepares, 4 tiny federate runs) checks that the
JSON holds what the benchmark claims and that its numbers are the ones the engine wrote; the rest
are cheap checks of a failing run, the pairing and the argument errors.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, env

SCRIPT = REPO / "benchmarks" / "bench_fl_round.py"

RUN_FIELDS = {"shape", "system", "procs", "training_procs", "repeat", "ok", "command",
              "threads_per_proc", "laps", "s_per_round", "mean_s", "min_s", "max_s",
              "first_round_s", "startup_s", "eval_s", "total_s", "accuracy", "error", "log",
              "load_before", "load_after"}
ROW_FIELDS = {"shape", "system", "procs", "training_procs", "runs", "ok_runs",
              "threads_per_proc", "s_per_round", "mean_s", "min_s", "max_s", "s_per_round_runs",
              "first_round_s", "startup_s", "eval_s", "accuracy", "load"}
OURS_ROW_FIELDS = {"pfl_workers", "pfl_s_per_round", "ratio", "ratio_best", "target",
                   "meets_target",
                   "comparable"}


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_fl_round", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_fl_round"] = mod  # dataclasses resolve annotations through it
    spec.loader.exec_module(mod)
    return mod


def _bench(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=REPO)


def _jsonl(path: Path) -> list[dict]:
    return sorted((json.loads(x) for x in path.read_text().splitlines()),
                  key=lambda r: r["round"])


def test_tiny_run_json_matches_engine_outputs(tmp_path):
    """Both shapes; ours under mpiexec -n 2 and, through the variant slot (the one the vmapped
    mode uses), as one plain process with an extra override."""
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    p = _bench(["--tiny", "--no-pfl", "--shapes", "cifar,digits", "--procs", "2",
                "--ours-extra-overrides", "fl.sync=bcast", "--ours-extra-label", "vmapped",
                "--ours-extra-procs", "1", "--workdir", str(work), "--json", str(out)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bench_fl_round" and doc["version"] == 1
    assert doc["pfl"] == {"available": False}
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["torch"]
    assert doc["targets"] == {"cifar": 0.8, "digits": 0.5}
    assert doc["settings"]["procs"] == [2] and doc["settings"]["pfl_workers"] == []
    assert doc["settings"]["ours_extra_overrides"] == ["fl.sync=bcast"]
    assert set(doc["shapes"]) == {"cifar", "digits"}
    cifar = doc["shapes"]["cifar"]
    assert (cifar["clients"], cifar["per_client"], cifar["clients_per_round"],
            cifar["batch_size"], cifar["rounds"], cifar["warmup"]) == (8, 10, 4, 5, 3, 2)
    assert isinstance(cifar["model_matches_pfl"], bool)
    assert doc["shapes"]["digits"]["clients"] == 20 and doc["shapes"]["digits"]["rounds"] == 3

    runs = doc["runs"]
    for r in runs:
        assert RUN_FIELDS <= set(r), RUN_FIELDS - set(r)
    assert sorted((r["shape"], r["system"], r["procs"], r["ok"]) for r in runs) == [
        ("cifar", "ours", 2, True), ("cifar", "ours:vmapped", 1, True),
        ("digits", "ours", 2, True), ("digits", "ours:vmapped", 1, True)]
    for r in runs:
        warmup = doc["shapes"][r["shape"]]["warmup"]
        assert r["training_procs"] == 1 and r["error"] is None
        assert len(r["laps"]) == 3 and all(x > 0 for x in r["laps"])
        # the laps are the engine's own numbers: metrics.jsonl of that run
        recs = _jsonl(Path(r["log"]).parent / "metrics.jsonl")
        assert r["laps"][0] == pytest.approx(recs[0]["t_round"])
        for i in (1, 2):
            want = recs[i]["wall_seconds"] - recs[i - 1]["wall_seconds"] - recs[i]["t_eval"]
            assert r["laps"][i] == pytest.approx(want)
        assert recs[0]["test_accuracy"] is None and recs[2]["test_accuracy"] is not None
        assert r["eval_s"] == pytest.approx(recs[2]["t_eval"]) and r["eval_s"] > 0
        assert r["s_per_round"] == pytest.approx(statistics.median(r["laps"][warmup:]))
        assert r["first_round_s"] == r["laps"][0]
        assert r["startup_s"] > 0
        assert r["startup_s"] + sum(r["laps"]) + r["eval_s"] == pytest.approx(r["total_s"])
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["threads_per_proc"] and all(t >= 1 for t in r["threads_per_proc"])
        assert len(r["load_before"]) == len(r["load_after"]) == 3
        assert ("mpiexec" in r["command"]) == (r["procs"] == 2)
        assert ("fl.sync=bcast" in r["command"]) == (r["system"] == "ours:vmapped")

    rows = doc["summary"]
    assert len(rows) == 4
    for row in rows:
        assert ROW_FIELDS | OURS_ROW_FIELDS <= set(row), (ROW_FIELDS | OURS_ROW_FIELDS) - set(row)
        assert row["pfl_s_per_round"] is None and row["ratio"] is None
        assert row["target"] == doc["targets"][row["shape"]]
        assert row["ok_runs"] == row["runs"] == 1 and row["s_per_round"] > 0
        run = next(r for r in runs if (r["shape"], r["system"], r["procs"]) ==
                   (row["shape"], row["system"], row["procs"]))
        assert row["s_per_round"] == run["s_per_round"]
        assert row["threads_per_proc"] == run["threads_per_proc"]
    assert "| ours | 2 | 1 |" in p.stdout and "| ours:vmapped | 1 | 1 |" in p.stdout


def test_a_failing_run_is_reported_not_raised(tmp_path):
    """A federate run that exits non-zero (here: a config key the engine does not know) becomes
    ok=False with the CLI's one-line error."""
    bench = _load_bench()
    shape = bench.Shape("digits", "d", REPO / "configs" / "tiny.yaml", [], rounds=2, warmup=1,
                        pfl_spec={})
    args = bench.parse_args(["--no-pfl", "--timeout", "120"])
    r = bench.run_ours(shape, 1, 0, "ours:vmapped", ["fl.no_such_key=1"], tmp_path, args)
    assert not r.ok and r.laps == [] and r.s_per_round is None
    assert "rc 2" in r.error and "config key fl.no_such_key: unknown key" in r.error
    row = bench.summarise([r], [shape])[0]
    assert (row["runs"], row["ok_runs"], row["s_per_round"], row["ratio"]) == (1, 0, None, None)


def test_ratio_pairs_ours_with_pfl_at_the_same_training_processes():
    bench = _load_bench()
    shape = bench.Shape("cifar", "d", Path("c.yaml"), [], rounds=4, warmup=2, pfl_spec={},
                        info={"model_matches_pfl": True})

    def res(system, procs, laps, ok=True):
        r = bench.RunResult("cifar", system, procs, max(1, procs - 1) if system != "pfl"
                            else procs, 0, ok=ok, laps=laps)
        bench._lap_stats(r, shape.warmup)
        return r

    results = [res("ours", 1, [9.0, 9.0, 2.0, 4.0]), res("ours", 3, [9.0, 9.0, 1.0, 1.0]),
               res("ours", 2, [9.0, 9.0, 3.0, 3.0]), res("pfl", 1, [9.0, 9.0, 5.0, 5.0]),
               res("pfl", 2, [9.0, 9.0, 1.0, 1.5]), res("pfl", 2, [9.0, 9.0, 1.0, 1.5]),
               res("pfl", 2, [], ok=False)]
    rows = {(r["system"], r["procs"]): r for r in bench.summarise(results, [shape])}
    one, three, two = rows["ours", 1], rows["ours", 3], rows["ours", 2]
    assert one["s_per_round"] == 3.0 and one["pfl_workers"] == 1
    assert one["ratio"] == pytest.approx(0.6) and one["meets_target"] is True
    assert one["ratio_best"] == pytest.approx(2.0 / 5.0)
    assert two["pfl_workers"] == 1 and two["ratio"] == pytest.approx(0.6)
    # 3 processes = server + 2 client ranks, paired with 2 pfl workers (pooled laps, 2 ok runs)
    assert three["pfl_workers"] == 2 and rows["pfl", 2]["ok_runs"] == 2
    assert rows["pfl", 2]["runs"] == 3 and rows["pfl", 2]["s_per_round"] == 1.25
    assert three["ratio"] == pytest.approx(0.8) and three["meets_target"] is True
    assert three["ratio_best"] == pytest.approx(1.0)
    assert rows["pfl", 1]["s_per_round"] == 5.0 and "ratio" not in rows["pfl", 1]


@pytest.mark.parametrize("args, needle", [
    (["--shapes", "mnist"], "--shapes 'mnist': unknown shape; valid: cifar, digits"),
    (["--procs", "0,2"], "--procs '0,2': expected comma-separated integers >= 1"),
    (["--rounds", "1"], "valid: >= 2"),
    (["--no-pfl", "--ours-model", "vgg"], "--ours-model 'vgg': unknown model; valid: auto,"),
    (["--pfl-python", "/nonexistent/python"], "--setup-pfl /tmp/pfl-venv"),
])
def test_usage_errors_are_one_line(args, needle):
    p = _bench(["--tiny", *args], timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_fl_round: error: ")
    assert needle in lines[0]


def test_client_profile_prints_a_measured_row_per_kernel_mode():
    """benchmarks/profile_fl_client.py (the per-phase attribution in docs/benchmarks.md) runs
    on random pixels and prints one row of positive timings per kernel mode, and at 2 threads
    the concurrent-clients line."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_fl_client.py"),
                        "--clients", "2", "--repeats", "1", "--threads", "2"],
                       capture_output=True, text=True, timeout=240, cwd=REPO,
                       env=env(OMP_NUM_THREADS="2"))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith(("| fast", "| invariant"))]
    assert [r.split("|")[1].strip() for r in rows] == ["fast", "invariant"]
    for r in rows:
        cells = [c.strip() for c in r.split("|")[2:-1]]
        bare, train, book = (float(c) for c in cells[:3])
        assert cells[3] == "-" and min(bare, train, book) > 0
    line = [ln for ln in p.stdout.splitlines() if "run.concurrent_clients (2 clients" in ln]
    assert len(line) == 1 and float(line[0].split(": ")[1].split(" ms")[0]) > 0
