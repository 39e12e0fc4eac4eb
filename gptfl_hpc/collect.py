"""``gptfl-hpc collect DIR``: a finished (or partly finished) grid -> the paper's tables.

Reads DIR/grid.json and, per cell, cells/<cell>/report.json (final and best accuracy),
<method>/metrics.jsonl (accuracy and gradient diversity per round; torn lines tolerated) and
cell.json (the exit code), and writes

    DIR/tables.md      main results, rounds to the target accuracy, the clients-per-round and
                       synthetic-volume ablations, gradient diversity, missing/failed cells
    DIR/tables.csv     one row per (method, alpha, volume, clients per round): mean/std/count
    DIR/cells.csv      one row per cell: status and numbers
    DIR/diversity.png  gradient diversity per round, mean over seeds, one line per method
    DIR/curves.png     test accuracy per round, mean ± sd band over seeds, per alpha: the FL
                       methods as curves, synthetic-only and centralised as horizontal bands

tables.md also answers "Does FL add to synthetic-only?": per alpha, volume and clients per
round, GPT-FL's final minus synthetic-only's paired by seed, with a one-sided paired t-test
(scipy, lazily; said so when missing) and an explicit flag when GPT-FL is NOT significantly
above synthetic-only (p >= 0.05) or there are too few seeds to test. The centralised method
(the pooled-data reference, not FL) has a row in every accuracy table and no rounds.

Every number is a mean over the cells' seeds, shown as ``mean ± std`` (sample standard
deviation, n - 1) in percent; ``(k/n)`` follows when only k of the n seeds finished. Rounds to
the target average the seeds that reached it (``k/n reached``). A cell's status: ok (its
report.json exists), failed (it exited non-zero; the last one-line error of its log is shown),
or missing (not run yet, still running, preempted and not resumed yet, or killed before it
could record an exit code).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptfl_hpc.errors import DataError
from gptfl_hpc.fsio import atomic_path, write_text

log = logging.getLogger(__name__)

LABELS = {"gptfl": "GPT-FL", "gptfl_fedopt": "GPT-FL (FedOpt)", "fedavg": "FedAvg from scratch",
          "fedopt": "FedOpt from scratch", "synthetic_only": "Synthetic only",
          "centralised": "Centralised (pooled data, reference)"}
ORDER = ("fedavg", "fedopt", "synthetic_only", "gptfl", "gptfl_fedopt", "centralised")
REPORT_ROW = {"gptfl": "gptfl", "gptfl_fedopt": "gptfl", "fedavg": "fedavg", "fedopt": "fedavg",
              "synthetic_only": "synthetic_only", "centralised": "centralised"}
NO_FL = ("synthetic_only", "centralised")
"""Methods without FL rounds: one number per cell, no curve, no clients per round."""
SYN = ("gptfl", "gptfl_fedopt", "synthetic_only")
"""Methods that use the synthetic set (a volume)."""
VS_SYNTHETIC = ("vs_synthetic_pairs", "vs_synthetic_diff_mean", "vs_synthetic_diff_std",
                "vs_synthetic_p", "vs_synthetic_verdict")
"""GPT-FL rows of tables.csv: final minus synthetic-only, paired by seed (see fl_adds)."""
GROUP_COLUMNS = ("method", "alpha", "volume", "clients_per_round", "cells", "ok", "final_mean",
                 "final_std", "best_mean", "best_std", "rounds_mean", "rounds_std", "reached",
                 "diversity_mean", *VS_SYNTHETIC)
SIGNIFICANCE = 0.05
"""One-sided level of the paired t-test of "GPT-FL's final is above synthetic-only's"."""
CELL_STATUS = "cell.json"
"""cells/<cell>/cell.json, written by grid (grid.CELL_STATUS): the cell's exit code."""
CELL_LOG = "cell.log"
"""cells/<cell>/cell.log: a local cell's output (grid.CELL_LOG)."""
PREEMPTED = 124
"""Exit code of a run stopped at a safe boundary (errors.Preempted): not a failure."""
CELL_COLUMNS = ("name", "method", "seed", "alpha", "volume", "clients_per_round", "status",
                "final_accuracy", "best_accuracy", "rounds_to_target", "diversity_mean",
                "error")


def read_grid(out: Path) -> dict:
    path = out / "grid.json"
    try:
        grid = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; valid: a directory made by `gptfl-hpc grid`") \
            from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("cells"), list):
        raise DataError(f"{path}: not a grid description (no cells)")
    return grid


def read_cell(out: Path, cell: dict, target: float) -> dict:
    """One cell's status and numbers (see the module docstring)."""
    from gptfl_hpc.log import read_jsonl

    d = out / "cells" / cell["name"]
    rec: dict[str, Any] = {k: cell.get(k) for k in ("name", "method", "seed", "alpha", "volume",
                                                     "clients_per_round")}
    rec.update(status="missing", error="", final_accuracy=None, best_accuracy=None,
               rounds_to_target=None, curve=[], diversity=[], diversity_mean=None)
    row_name = REPORT_ROW.get(cell["method"], cell["method"])
    report = d / "report.json"
    if report.is_file():
        try:
            rows = {r["method"]: r for r in json.loads(report.read_text())["rows"]}
            row = rows[row_name]
        except (OSError, ValueError, KeyError, TypeError) as e:
            rec.update(status="failed", error=f"{report}: unreadable ({type(e).__name__})")
            return rec
        rec.update(status="ok", final_accuracy=row["final_accuracy"],
                   best_accuracy=row["best_accuracy"])
        metrics = read_jsonl(d / row_name / "metrics.jsonl") if row_name not in NO_FL else []
        rec["curve"] = [(m["round"], m["test_accuracy"]) for m in metrics
                        if m.get("test_accuracy") is not None]
        rec["diversity"] = [(m["round"], m["grad_diversity"]) for m in metrics
                            if m.get("grad_diversity") is not None]
        if rec["diversity"]:
            rec["diversity_mean"] = sum(v for _, v in rec["diversity"]) / len(rec["diversity"])
        if row_name == "centralised":  # no rounds: not an FL method
            rec["rounds_to_target"] = None
        elif row_name == "synthetic_only":
            rec["rounds_to_target"] = 0 if row["final_accuracy"] >= target - 1e-12 else None
        else:
            rec["rounds_to_target"] = next((r for r, a in rec["curve"] if a >= target - 1e-12),
                                           None)
        return rec
    status = d / CELL_STATUS
    if status.is_file():
        try:
            rc = int(json.loads(status.read_text())["rc"])
        except (OSError, ValueError, KeyError, TypeError):
            rc = -1
        if rc == PREEMPTED:  # saved at a boundary; the requeued task (or a rerun) resumes
            rec["error"] = "preempted (exit 124): requeued, or rerun the grid to resume it"
            return rec
        why = last_error(d / CELL_LOG) or _slurm_error(out, status)
        if rc == 0:
            why = why or "exited 0 without report.json"
        rec.update(status="failed", error=f"exit {rc}: {why}" if why else f"exit {rc}")
    return rec


def last_error(path: Path) -> str:
    """The last one-line `gptfl-hpc ...: error:` of a log, if any."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    errs = [ln.split("] ", 1)[-1] for ln in lines if ": error: " in ln]
    return errs[-1].strip() if errs else ""


def _slurm_error(out: Path, status: Path) -> str:
    try:
        job = json.loads(status.read_text()).get("job", "")
    except (OSError, ValueError, AttributeError):
        return ""
    logs = sorted((out / "logs").glob(f"*-{job}.out")) if job else []
    return last_error(logs[-1]) if logs else ""


# ------------------------------------------------------------------------------ statistics


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _pct(m: float | None, s: float | None, ok: int, n: int) -> str:
    if m is None:
        return "-"
    text = f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")
    return text + (f" ({ok}/{n})" if ok < n else "")


def group(cells: list[dict]) -> dict[tuple, dict]:
    """(method, alpha, volume, clients_per_round) -> aggregates over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["alpha"], c["volume"], c["clients_per_round"]),
                          []).append(c)
    out = {}
    for key, members in groups.items():
        ok = [c for c in members if c["status"] == "ok"]
        reached = [c["rounds_to_target"] for c in ok if c["rounds_to_target"] is not None]
        fm, fs = mean_std([c["final_accuracy"] for c in ok])
        bm, bs = mean_std([c["best_accuracy"] for c in ok])
        rm, rs = mean_std([float(r) for r in reached])
        dm, _ = mean_std([c["diversity_mean"] for c in ok if c["diversity_mean"] is not None])
        out[key] = {"method": key[0], "alpha": key[1], "volume": key[2],
                    "clients_per_round": key[3], "cells": len(members), "ok": len(ok),
                    "final_mean": fm, "final_std": fs, "best_mean": bm, "best_std": bs,
                    "rounds_mean": rm, "rounds_std": rs, "reached": len(reached),
                    "diversity_mean": dm, "members": members}
    return out


def alpha_key(a: Any) -> tuple:
    """Sort order of the alpha axis: concentrations ascending, then iid, then none."""
    if a is None:
        return (2, 0.0)
    return (1, 0.0) if a == "iid" else (0, float(a))


def alpha_text(a: Any) -> str:
    if a is None:
        return "all"
    return "iid" if a == "iid" else f"alpha {a:g}"


def paired_test(gptfl: Sequence[float], synthetic: Sequence[float]) -> tuple[float | None, str]:
    """One-sided paired t-test of "GPT-FL's final is above synthetic-only's" over the seeds:
    (p, verdict). p is None when it cannot be computed (fewer than 2 pairs, scipy missing, or
    no variation at all: then it is not shown to be above)."""
    if len(gptfl) < 2:
        return None, "too few seeds to test"
    try:
        from scipy import stats
    except ImportError:
        return None, "not tested: scipy is not installed (pip install scipy)"
    import warnings

    with warnings.catch_warnings():  # identical differences: a degenerate t (inf or nan)
        warnings.simplefilter("ignore")
        p = float(stats.ttest_rel(list(gptfl), list(synthetic), alternative="greater").pvalue)
    if math.isnan(p) or p >= SIGNIFICANCE:
        return (None if math.isnan(p) else p,
                f"NOT significantly above synthetic-only (p >= {SIGNIFICANCE:g})")
    return p, f"significantly above synthetic-only (p < {SIGNIFICANCE:g})"


def fl_adds(g: dict[tuple, dict]) -> dict[tuple, dict]:
    """For every GPT-FL group (alpha, volume, clients per round): its final accuracy minus
    synthetic-only's at the same alpha and volume, paired by seed over the seeds where both
    finished; keyed like `g`, with the VS_SYNTHETIC columns (and the paired means)."""
    out = {}
    for key, x in g.items():
        method, alpha, volume, _ = key
        if method not in ("gptfl", "gptfl_fedopt"):
            continue
        syn = g.get(("synthetic_only", alpha, volume, None))
        base = {c["seed"]: c["final_accuracy"] for c in (syn["members"] if syn else [])
                if c["status"] == "ok"}
        pairs = sorted((c["seed"], c["final_accuracy"], base[c["seed"]]) for c in x["members"]
                       if c["status"] == "ok" and c["seed"] in base)
        a, b = [p[1] for p in pairs], [p[2] for p in pairs]
        dm, ds = mean_std([u - v for u, v in zip(a, b)])
        p, verdict = paired_test(a, b) if pairs else (None, "no synthetic-only cells at the "
                                                      "same seeds")
        out[key] = {"vs_synthetic_pairs": len(pairs), "vs_synthetic_diff_mean": dm,
                    "vs_synthetic_diff_std": ds, "vs_synthetic_p": p,
                    "vs_synthetic_verdict": verdict, "gptfl_paired": mean_std(a)[0],
                    "synthetic_paired": mean_std(b)[0]}
    return out


def fl_adds_markdown(adds: dict[tuple, dict]) -> list[str]:
    lines = ["## Does FL add to synthetic-only?", "",
             "GPT-FL's final test accuracy minus synthetic-only's (the pretrained model GPT-FL "
             "starts from) at the same seed, alpha and synthetic volume, paired by seed over the "
             "seeds where both finished: mean ± sd in percentage points. p: one-sided paired "
             "t-test (scipy.stats.ttest_rel, alternative='greater') of \"GPT-FL ends above "
             f"synthetic-only\"; a row is flagged unless p < {SIGNIFICANCE:g}.", ""]
    if not adds or not any(v["vs_synthetic_pairs"] for v in adds.values()):
        return lines + ["No GPT-FL and synthetic-only cells at the same seeds (grid --methods "
                        "gptfl,synthetic_only --seeds 0,1,2).", ""]
    rows = []
    for key in sorted(adds, key=lambda k: (ORDER.index(k[0]), alpha_key(k[1]),
                                           -1 if k[2] is None else k[2],
                                           -1 if k[3] is None else k[3])):
        v = adds[key]
        diff = "-" if v["vs_synthetic_diff_mean"] is None else (
            f"{100 * v['vs_synthetic_diff_mean']:+.1f}" + (
                f" ± {100 * v['vs_synthetic_diff_std']:.1f}"
                if v["vs_synthetic_diff_std"] is not None else ""))
        rows.append([alpha_text(key[1]), "-" if key[2] is None else f"{key[2]:g}x",
                     "-" if key[3] is None else str(key[3]), LABELS.get(key[0], key[0]),
                     _pct(v["gptfl_paired"], None, 1, 1),
                     _pct(v["synthetic_paired"], None, 1, 1), diff,
                     str(v["vs_synthetic_pairs"]),
                     "-" if v["vs_synthetic_p"] is None else f"{v['vs_synthetic_p']:.3g}",
                     v["vs_synthetic_verdict"]])
    return lines + _md(["alpha", "volume", "clients per round", "method", "GPT-FL final",
                        "synthetic-only", "difference (pts)", "paired seeds", "p (one-sided)",
                        "verdict"], rows)


# ------------------------------------------------------------------------------ tables


def _ref(values: list, preferred: Any) -> Any:
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return None
    return preferred if preferred in vals else vals[-1]


def _label(method: str, volume: float | None) -> str:
    return LABELS.get(method, method) + (f" ({volume:g}x)" if volume is not None else "")


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def tables(grid: dict, cells: list[dict], target: float) -> tuple[str, list[dict]]:
    g = group(cells)
    methods = [m for m in ORDER if any(k[0] == m for k in g)] + sorted(
        {k[0] for k in g} - set(ORDER))
    alphas = sorted({k[1] for k in g}, key=alpha_key)
    ref = grid.get("reference", {})
    vol = _ref([k[2] for k in g], ref.get("volume"))
    cpr = _ref([k[3] for k in g], ref.get("clients_per_round"))
    acol = [alpha_text(a) for a in alphas]

    def at(method: str, alpha: Any, volume: Any = "ref", k: Any = "ref") -> dict | None:
        v = (vol if volume == "ref" else volume) if method in SYN else None
        kk = (cpr if k == "ref" else k) if method not in NO_FL else None
        return g.get((method, alpha, v, kk))

    def cell_text(x: dict | None, what: str) -> str:
        if x is None:
            return "-"
        if what == "rounds":
            if x["method"] == "centralised":
                return "n/a (not FL)"
            if not x["reached"]:
                return f"- (0/{x['cells']} reached)" if x["ok"] else "-"
            m, s = x["rounds_mean"], x["rounds_std"]
            return (f"{m:.1f}" + (f" ± {s:.1f}" if s is not None else "")
                    + f" ({x['reached']}/{x['cells']} reached)")
        return _pct(x[f"{what}_mean"], x[f"{what}_std"], x["ok"], x["cells"])

    n_ok = sum(c["status"] == "ok" for c in cells)
    failed = [c for c in cells if c["status"] == "failed"]
    missing = [c for c in cells if c["status"] == "missing"]
    lines = [f"# GPT-FL experiment grid: {grid.get('dataset')}, {grid.get('model')}", "",
             f"{len(cells)} cells: {n_ok} ok, {len(failed)} failed, {len(missing)} missing. "
             f"Test accuracy in %, mean ± std over seeds; {grid.get('rounds')} FL rounds; "
             f"reference synthetic volume {vol if vol is not None else '-'}x and "
             f"{cpr if cpr is not None else '-'} clients per round unless the table varies "
             "them.", ""]
    for what, title in (("final", "Final test accuracy (%)"), ("best", "Best test accuracy (%)"),
                        ("rounds", f"Rounds to {100 * target:g}% test accuracy")):
        lines += [f"## {title}", ""]
        lines += _md(["method", *acol], [[_label(m, vol if m in SYN else None),
                                          *(cell_text(at(m, a), what) for a in alphas)]
                                         for m in methods])
    fl_methods = [m for m in methods if m not in NO_FL]
    cprs = sorted({k[3] for k in g if k[3] is not None})
    lines += ["## Clients per round (final test accuracy, %)", ""]
    if len(cprs) > 1:
        for a, ac in zip(alphas, acol):
            lines += [f"{ac}:", ""]
            lines += _md(["clients per round", *(_label(m, None) for m in fl_methods)],
                         [[str(k), *(cell_text(at(m, a, k=k), "final") for m in fl_methods)]
                          for k in cprs])
    else:
        lines += ["One value in this grid (grid --clients-per-round 2,5,10 varies it).", ""]
    syn_methods = [m for m in methods if m in SYN]
    vols = sorted({k[2] for k in g if k[2] is not None})
    lines += ["## Synthetic volume (final test accuracy, %)", ""]
    if len(vols) > 1 and syn_methods:
        for a, ac in zip(alphas, acol):
            lines += [f"{ac}:", ""]
            lines += _md(["volume", *(_label(m, None) for m in syn_methods)],
                         [[f"{v:g}x", *(cell_text(at(m, a, volume=v), "final")
                                        for m in syn_methods)] for v in vols])
    else:
        lines += ["One value in this grid (grid --volumes 1,2,3 varies it).", ""]
    adds = fl_adds(g)
    lines += fl_adds_markdown(adds)
    lines += ["## Gradient diversity (mean over rounds and seeds)", "",
              "sum_k ||u_k||^2 / ||sum_k u_k||^2 of each round's sample-weighted client updates "
              "(lower: the clients agree more). Plot: diversity.png.", ""]
    lines += _md(["method", *acol], [[_label(m, None), *(
        f"{x['diversity_mean']:.3f}" if (x := at(m, a)) and x["diversity_mean"] is not None
        else "-" for a in alphas)] for m in fl_methods])
    lines += ["## Cells not finished", ""]
    if failed or missing:
        lines += _md(["cell", "status", "why"], [[c["name"], c["status"], c["error"] or (
            "not run yet, running, or killed before recording an exit code")]
            for c in failed + missing])
    else:
        lines += ["None: every cell finished.", ""]
    rows = [{**{k: v for k, v in x.items() if k != "members"}, **adds.get(key, {})}
            for key, x in g.items()]
    rows.sort(key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else 99,
                             alpha_key(r["alpha"]),
                             *(-1 if r[k] is None else r[k]
                               for k in ("volume", "clients_per_round"))))
    return "\n".join(lines), rows


def _csv(rows: list[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return buf.getvalue()


def diversity_plot(grid: dict, cells: list[dict], path: Path) -> bool:
    """Gradient diversity per round, mean over seeds, one line per FL method (at the reference
    volume and clients per round), one panel per alpha. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib not installed (pip install gptfl-hpc[report]): no %s", path)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in cells if c["status"] == "ok" and c["diversity"]]
    ref = grid.get("reference", {})
    vol = _ref([c["volume"] for c in cells], ref.get("volume"))
    cpr = _ref([c["clients_per_round"] for c in cells], ref.get("clients_per_round"))
    alphas = sorted({c["alpha"] for c in cells}, key=alpha_key) or [None]
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.0 * len(alphas), 3.6), dpi=120,
                             squeeze=False)
    for ax, a in zip(axes[0], alphas):
        for m in [m for m in ORDER if m not in NO_FL]:
            members = [c for c in ok if c["method"] == m and c["alpha"] == a
                       and c["clients_per_round"] == cpr
                       and (c["volume"] == vol or c["volume"] is None)]
            if not members:
                continue
            by_round: dict[int, list[float]] = {}
            for c in members:
                for r, v in c["diversity"]:
                    by_round.setdefault(r, []).append(v)
            rounds = sorted(by_round)
            ax.plot(rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds],
                    marker=".", label=f"{LABELS[m]} (n={len(members)})")
        ax.set_title(alpha_text(a) if a is not None else "")
        ax.set_xlabel("FL round")
        ax.set_ylabel("gradient diversity")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _band(values: Sequence[float]) -> tuple[float, float]:
    m, sd = mean_std(values)
    assert m is not None
    return m, sd or 0.0


def bands(grid: dict, cells: list[dict]) -> dict[Any, dict[str, dict]]:
    """What curves.png draws: alpha -> method -> {"n": seeds, "rounds": [(round, mean, sd)]}
    for the FL methods (at the reference volume and clients per round; a round's mean and sd
    are over the seeds that evaluated it) or {"n", "mean", "sd"} of the final accuracy for the
    methods without rounds (synthetic-only at the reference volume, centralised). sd is 0 with
    one seed."""
    ok = [c for c in cells if c["status"] == "ok"]
    ref = grid.get("reference", {})
    vol = _ref([c["volume"] for c in cells], ref.get("volume"))
    cpr = _ref([c["clients_per_round"] for c in cells], ref.get("clients_per_round"))
    out: dict[Any, dict[str, dict]] = {}
    for a in sorted({c["alpha"] for c in cells}, key=alpha_key):
        panel = out.setdefault(a, {})
        for m in ORDER:
            members = [c for c in ok if c["method"] == m and c["alpha"] == a
                       and (c["volume"] == vol or c["volume"] is None)
                       and (c["clients_per_round"] == cpr or m in NO_FL)]
            if not members:
                continue
            if m in NO_FL:
                mean, sd = _band([c["final_accuracy"] for c in members])
                panel[m] = {"n": len(members), "mean": mean, "sd": sd}
                continue
            by_round: dict[int, list[float]] = {}
            for c in members:
                for r, v in c["curve"]:
                    by_round.setdefault(r, []).append(v)
            if by_round:
                panel[m] = {"n": len(members), "rounds": [(r, *_band(by_round[r]))
                                                          for r in sorted(by_round)]}
    return out


def curves_plot(grid: dict, cells: list[dict], path: Path) -> bool:
    """Per-round test accuracy, mean ± sd band over seeds, of every FL method (GPT-FL, FedAvg
    from scratch, ...) at the reference volume and clients per round, one panel per alpha;
    synthetic-only and centralised as horizontal mean lines with a ± sd band (see bands).
    False (and a log line saying why) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib not installed (pip install gptfl-hpc[report]): no %s", path)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = bands(grid, cells) or {None: {}}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), dpi=120,
                             squeeze=False)
    for ax, (a, panel) in zip(axes[0], panels.items()):
        for m, b in panel.items():
            color = f"C{ORDER.index(m)}"
            label = f"{LABELS[m]} (n={b['n']})"
            if "rounds" not in b:
                ax.axhline(100 * b["mean"], color=color, label=label,
                           ls="--" if m == "synthetic_only" else "-.")
                ax.axhspan(100 * (b["mean"] - b["sd"]), 100 * (b["mean"] + b["sd"]),
                           color=color, alpha=0.15, lw=0)
                continue
            rounds = [r for r, _, _ in b["rounds"]]
            ax.plot(rounds, [100 * m_ for _, m_, _ in b["rounds"]], color=color, marker=".",
                    label=label)
            ax.fill_between(rounds, [100 * (m_ - s_) for _, m_, s_ in b["rounds"]],
                            [100 * (m_ + s_) for _, m_, s_ in b["rounds"]], color=color,
                            alpha=0.2, lw=0)
        ax.set_title(alpha_text(a) if a is not None else "")
        ax.set_xlabel("FL round")
        ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def collect(out: str | Path, target: float | None = None) -> dict:
    """Write the tables of the grid in `out`; return {ok, failed, missing, files}."""
    out = Path(out)
    grid = read_grid(out)
    target = float(target if target is not None else grid.get("target_accuracy", 0.9))
    cells = [read_cell(out, c, target) for c in grid["cells"]]
    md, rows = tables(grid, cells, target)
    write_text(out / "tables.md", md)
    write_text(out / "tables.csv", _csv(rows, GROUP_COLUMNS))
    write_text(out / "cells.csv", _csv(cells, CELL_COLUMNS))
    files = [out / "tables.md", out / "tables.csv", out / "cells.csv"]
    if diversity_plot(grid, cells, out / "diversity.png"):
        files.append(out / "diversity.png")
    if curves_plot(grid, cells, out / "curves.png"):
        files.append(out / "curves.png")
    counts = {s: sum(c["status"] == s for c in cells) for s in ("ok", "failed", "missing")}
    log.info("collected %d cells (%d ok, %d failed, %d missing): %s", len(cells),
             counts["ok"], counts["failed"], counts["missing"], ", ".join(map(str, files)))
    return {**counts, "files": [str(f) for f in files]}


def run_collect_command(args: Any) -> int:
    result = collect(Path(args.dir), args.target)
    sys.stdout.write((Path(args.dir) / "tables.md").read_text(encoding="utf-8"))
    sys.stdout.flush()
    return 0 if result["ok"] else 1
