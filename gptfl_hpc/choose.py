"""``gptfl-hpc choose GRID [GRID ...]``: pick a fine-tuning regime on the clients' validation
rows, never on the test set.

Each GRID is the output of one ``gptfl-hpc grid`` run of the same config and cells (seeds x
alphas), differing only in ``fl.*`` overrides (the regime), and run with the same
``fl.client_val_fraction > 0``: every cell's clients then hold out the same rows (they depend on
run.seed, the partition and the fraction only), and the FL engine scores the global model on them
by federated evaluation (fl/clientval.py).

The rule, stated and applied mechanically. The first grid is the current default. The score of
a cell is the ``client_val_accuracy`` of its last evaluated FL round (the model FL ends with;
with ``fl.select=client_val`` the score would be biased upward by the choice itself, so such
grids are refused); a regime's score is the mean over its cells. A candidate replaces the
default only if it beats it significantly on the clients' rows: a one-sided paired t-test over
the cells (paired by seed and alpha) below ``level`` / (number of candidates) (Bonferroni, so
that trying many regimes does not let noise through). Among the default and the candidates that
pass, the highest score is chosen (ties: the grid listed first). Test accuracy is reported
beside it and takes no part in the choice. Every grid must have finished every cell
of the same (seed, alpha) set; anything else is refused with a one-line error, since a choice
made on different cells or different validation rows would not be what it claims.

Writes ``--out`` (choice.md and choice.json) when given, and prints the table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from gptfl_hpc.collect import REPORT_ROW, mean_std, read_cell, read_grid
from gptfl_hpc.errors import ConfigError, DataError
from gptfl_hpc.fsio import write_json, write_text
from gptfl_hpc.log import read_jsonl

log = logging.getLogger(__name__)

VAL_KEY = "client_val_accuracy"


def _overrides(grid: dict) -> list[str]:
    return [str(o) for o in grid.get("overrides", [])]


def _split(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the regime: fl.* overrides other than the validation fraction, everything else but the
    keys that cannot change a result (provenance.NO_EFFECT: run.threads, run.store, ...))."""
    from gptfl_hpc.provenance import effective_overrides

    overrides = effective_overrides(overrides)
    regime = [o for o in overrides if o.startswith("fl.")
              and not o.startswith("fl.client_val_fraction=")]
    rest = sorted(o for o in overrides if o not in regime
                  and not o.startswith("fl.client_val_fraction="))  # checked on its own
    return regime, rest


def read_regime(out: Path, method: str) -> dict[str, Any]:
    """One grid's cells of `method`: (seed, alpha) -> last-round client-val and test accuracy."""
    grid = read_grid(out)
    regime, rest = _split(_overrides(grid))
    row = REPORT_ROW.get(method, method)
    cells: dict[tuple, dict] = {}
    for cell in grid["cells"]:
        if cell["method"] != method:
            continue
        rec = read_cell(out, cell, float(grid.get("target_accuracy", 0.9)))
        key = (cell["seed"], cell["alpha"])
        if rec["status"] != "ok":
            raise DataError(f"{out}: cell {cell['name']} is {rec['status']}"
                            f"{': ' + rec['error'] if rec['error'] else ''}; valid: grids whose "
                            "cells all finished (rerun the grid)")
        metrics = read_jsonl(out / "cells" / cell["name"] / row / "metrics.jsonl")
        vals = [m for m in metrics if m.get(VAL_KEY) is not None]
        if not vals:
            raise DataError(f"{out}: cell {cell['name']} has no {VAL_KEY} in its metrics; "
                            "valid: grids run with fl.client_val_fraction > 0")
        summary = json.loads((out / "cells" / cell["name"] / row / "summary.json").read_text())
        if (summary.get("selection") or {}).get("rule", "last") != "last":
            raise ConfigError(f"{out}: cell {cell['name']} chose its returned model on "
                              "validation rows (fl.select); valid: grids run with "
                              "fl.select=last, scored by the rule of `gptfl-hpc choose`")
        cells[key] = {"val": float(vals[-1][VAL_KEY]), "val_round": int(vals[-1]["round"]),
                      "test": float(summary["final_accuracy"]),
                      "fraction": summary.get("client_val_fraction")}
    if not cells:
        raise DataError(f"{out}: no {method} cells; valid: a grid with --methods {method}")
    return {"dir": str(out), "config": grid.get("config"), "regime": regime, "rest": rest,
            "cells": cells, "label": " ".join(regime) or "(the config's settings)"}


def choose(dirs: list[Path], method: str = "gptfl", level: float = 0.05) -> dict[str, Any]:
    """Apply the rule of the module docstring; return the table rows and the choice."""
    from gptfl_hpc.collect import paired_test

    if not 0 < level < 1:
        raise ConfigError(f"choose --level: invalid value {level!r}; valid: 0 < level < 1")
    if len(dirs) < 2:
        raise ConfigError("choose: give at least two grid directories (the regimes to compare)")
    try:
        import scipy.stats  # noqa: F401  (the rule's paired t-test)
    except ImportError:
        raise ConfigError("choose: the rule's paired t-test needs scipy, which is not "
                          "installed; valid: pip install scipy") from None
    regimes = [read_regime(Path(d), method) for d in dirs]
    base = regimes[0]
    for r in regimes[1:]:
        if (r["config"], r["rest"]) != (base["config"], base["rest"]):
            raise ConfigError(f"{r['dir']}: not the same config and non-regime overrides as "
                              f"{base['dir']} ({r['config']} {r['rest']} vs {base['config']} "
                              f"{base['rest']}); valid: grids that differ in fl.* only")
        if set(r["cells"]) != set(base["cells"]):
            raise DataError(f"{r['dir']}: cells {sorted(r['cells'])} differ from {base['dir']}'s "
                            f"{sorted(base['cells'])}; valid: the same --seeds and --alphas")
    fractions = {c["fraction"] for r in regimes for c in r["cells"].values()}
    if len(fractions) != 1 or not next(iter(fractions)):
        raise ConfigError(f"choose: fl.client_val_fraction differs between the grids or is 0 "
                          f"({sorted(map(str, fractions))}); valid: one fraction > 0 for all")
    keys = sorted(base["cells"], key=lambda k: (str(k[1]), k[0]))
    corrected = level / (len(regimes) - 1)
    rows = []
    for i, r in enumerate(regimes):
        val = [r["cells"][k]["val"] for k in keys]
        test = [r["cells"][k]["test"] for k in keys]
        vm, vs = mean_std(val)
        tm, ts = mean_std(test)
        row = {"regime": r["label"], "dir": r["dir"], "cells": len(keys), "val_mean": vm,
               "val_std": vs, "test_mean": tm, "test_std": ts,
               "val": val, "test": test}
        if i:
            b_val = [base["cells"][k]["val"] for k in keys]
            b_test = [base["cells"][k]["test"] for k in keys]
            row["val_diff"] = mean_std([a - b for a, b in zip(val, b_val)])[0]
            row["test_diff"] = mean_std([a - b for a, b in zip(test, b_test)])[0]
            row["val_p"] = paired_test(val, b_val)[0]
            row["significant"] = row["val_p"] is not None and row["val_p"] < corrected
        rows.append(row)
    eligible = [0] + [i for i in range(1, len(rows)) if rows[i]["significant"]]
    best = max(eligible, key=lambda i: (rows[i]["val_mean"], -i))
    return {"method": method, "rule": "the first grid (the default) unless a candidate's "
            "last-round client-val accuracy is above it by a one-sided paired t-test over the "
            f"cells at p < {level:g} / {len(rows) - 1} (Bonferroni); among those, the highest "
            "mean; the test accuracy is not used", "level": level, "corrected_level": corrected,
            "client_val_fraction": next(iter(fractions)),
            "cells": [list(k) for k in keys], "rows": rows, "chosen": best,
            "chosen_regime": rows[best]["regime"]}


def markdown(result: dict[str, Any]) -> str:
    def pct(m: float | None, s: float | None) -> str:
        return "-" if m is None else f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if s else "")

    def diff(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:+.2f}"

    lines = [f"Rule: {result['rule']}. Client validation: fl.client_val_fraction "
             f"{result['client_val_fraction']:g} of every client's rows, scored by the clients; "
             f"{len(result['cells'])} cells (seed, alpha) per regime: "
             + ", ".join(f"({s}, {a})" for s, a in result["cells"]) + ".", "",
             "| regime | client-val acc % | vs first (paired) | p (one-sided) | test acc % "
             "| test vs first |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rows"]):
        mark = " **(chosen)**" if i == result["chosen"] else ""
        p = r.get("val_p")
        sig = " (passes)" if r.get("significant") else ""
        lines.append(f"| {r['regime']}{mark} | {pct(r['val_mean'], r['val_std'])} | "
                     f"{diff(r.get('val_diff'))} | {'-' if p is None else f'{p:.3g}'}{sig} | "
                     f"{pct(r['test_mean'], r['test_std'])} | {diff(r.get('test_diff'))} |")
    return "\n".join(lines) + "\n"


def run_choose_command(args: Any) -> int:
    result = choose([Path(d) for d in args.dirs], args.method, args.level)
    text = markdown(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "choice.md", text)
        write_json(out / "choice.json", result)
    sys.stdout.write(text)
    sys.stdout.flush()
    log.info("chosen on the clients' validation rows: %s", result["chosen_regime"])
    return 0
