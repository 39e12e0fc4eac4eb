"""report.md, report.json, accuracy.png and samples.png for `gptfl-hpc run` (rank 0 only)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from gptfl_hpc.fsio import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

LABELS = {"gptfl": "GPT-FL (FL from synthetic-pretrained model)",
          "fedavg": "FedAvg from random init", "synthetic_only": "synthetic only (no FL)",
          "local_only": "local fine-tuning only (mean over clients)",
          "centralised": "centralised on pooled private data (reference, not FL)"}
NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM", "fedadam": "FedAdam",
         "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad", "scaffold": "SCAFFOLD",
         "dp_fedavg": "DP-FedAvg"}


def label(name: str) -> str:
    """Legend text of a row: the fixed labels, or 'X from scratch' / 'X from GPT-FL init'."""
    if name in LABELS:
        return LABELS[name]
    algo, _, kind = name.rpartition("-")
    return f"{NAMES.get(algo, algo)} from {'GPT-FL init' if kind == 'gptfl' else 'scratch'}"


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    from gptfl_hpc.log import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [(r["round"], r["test_accuracy"]) for r in rows
            if r.get("test_accuracy") is not None]


def _first_round_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((r for r, a in curve if a >= target - 1e-12), None)


def _at_round(curve: list[tuple[int, float]], rnd: int) -> float | None:
    vals = [a for r, a in curve if r <= rnd]
    return vals[-1] if vals else None


def accuracy_plot(curves: dict, synthetic_only: float | None, path: Path,
                  local_only: float | None = None, centralised: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(curves) > 4  # run.algorithms: one colour per algorithm, dashed from scratch
    fig, ax = plt.subplots(figsize=(9.0, 4.5) if many else (6.4, 4.0), dpi=120)
    bases = list(dict.fromkeys(n.rpartition("-")[0] or n for n in curves))
    for name, curve in curves.items():
        color = f"C{bases.index(name.rpartition('-')[0] or name) % 10}" if many else None
        ax.plot([r for r, _ in curve], [100 * a for _, a in curve], marker=".", label=label(name),
                ls="--" if name.endswith("-scratch") else "-", color=color)
    if synthetic_only is not None:
        ax.axhline(100 * synthetic_only, color="gray", ls="--", label=LABELS["synthetic_only"])
    if local_only is not None:
        ax.axhline(100 * local_only, color="gray", ls=":", label=LABELS["local_only"])
    if centralised is not None:
        ax.axhline(100 * centralised, color="black", ls="-.", label=LABELS["centralised"])
    ax.set_xlabel("FL round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend(loc="center right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def synthetic_quality(out: Path, synthetic: Path, manifest, data_dir: Path) -> dict:
    from gptfl_hpc.data.shards import read_arrays
    from gptfl_hpc.gen.quality import class_counts, memorisation_report, sample_grid

    if manifest.kind == "audio":  # class balance only: no image grid, no pixel-space check
        labels = read_arrays(synthetic, ["labels"])["labels"]
        return {"num_samples": int(len(labels)),
                "class_counts": class_counts(labels, manifest.num_classes)}
    syn = read_arrays(synthetic, ["images", "labels"])
    sample_grid(syn["images"], syn["labels"], manifest.label_names, out / "samples.png")
    q = {"num_samples": int(len(syn["labels"])),
         "class_counts": class_counts(syn["labels"], manifest.num_classes)}
    if manifest.public is not None:
        public, _ = manifest.read_public(data_dir)
        test, _ = manifest.read_test(data_dir)
        q["memorisation"] = memorisation_report(syn["images"], public, test)
    return q


def write_report(cfg, out: Path, manifest, data_dir: Path, runs: dict[str, Path],
                 pre: dict | None, stages: dict[str, dict], synthetic: Path | None = None,
                 local_only: dict | None = None, algorithms: list[str] | None = None,
                 centralised: dict | None = None) -> dict:
    """`runs`: method -> its FL output directory (gptfl/fedavg, or X-gptfl/X-scratch for each
    X of `algorithms`); `pre`: pretrained.json; `synthetic`: the synthetic set; `stages`:
    stage -> {"seconds": ...} (the time each stage took when it ran, from its completion
    record); `local_only`: the local-only control's summary.json; `centralised`: the
    centralised reference's summary.json (gptfl_hpc/train/centralised.py)."""
    sec = {k: v["seconds"] for k, v in stages.items()}
    server_time = sum(sec.get(k, 0.0) for k in ("generator", "synthesize", "pretrain"))
    results = {name: json.loads((d / "summary.json").read_text()) for name, d in runs.items()}
    curves = {name: _curve(d) for name, d in runs.items()}
    rows = []
    fedavg_final = results["fedavg"]["final_accuracy"] if "fedavg" in results else None
    for name, summary in results.items():
        curve = curves[name]
        # the reference of "rounds to ...'s final": FedAvg from scratch, or X from scratch
        ref = fedavg_final
        if name.endswith(("-gptfl", "-scratch")):
            scratch = results.get(name.rpartition("-")[0] + "-scratch")
            ref = scratch["final_accuracy"] if scratch else None
        wall = summary["wall_seconds"] + (server_time if name == "gptfl" or
                                          name.endswith("-gptfl") else 0.0)
        sel = summary.get("selection") or {"rule": "last"}
        rows.append({
            # the returned model's accuracy: the last round's, or (fl.select) the round chosen
            # on the server's synthetic validation split or the clients' held-out rows
            "method": name, "final_accuracy": summary.get("selected_accuracy",
                                                          summary["final_accuracy"]),
            "best_accuracy": summary["best_accuracy"],
            **({"last_round_accuracy": summary["final_accuracy"],
                "selected_round": sel["round"], "rounds_run": summary.get("rounds_run"),
                "selected_by": sel["rule"]}
               if sel["rule"] != "last" else {}),
            "accuracy_round_10": _at_round(curve, 10),
            "rounds_to_target": summary["rounds_to_target"],
            "rounds_to_fedavg_final": (_first_round_reaching(curve, ref)
                                       if ref is not None else None),
            "wall_seconds": wall,
            **({"dp": summary["dp"]} if summary.get("dp") else {})})
    syn_acc = None
    if pre is not None and "synthetic_only" in cfg.run.methods:
        syn_acc = pre["test_accuracy"]
        rows.append({"method": "synthetic_only", "final_accuracy": syn_acc,
                     "best_accuracy": syn_acc, "accuracy_round_10": None,
                     "rounds_to_target": 0 if syn_acc >= cfg.fl.target_accuracy else None,
                     "rounds_to_fedavg_final": None, "wall_seconds": server_time})
    if local_only is not None:
        a = local_only["test_accuracy"]
        rows.append({"method": "local_only", "final_accuracy": a["mean"],
                     "best_accuracy": a["mean"], "accuracy_round_10": None,
                     "rounds_to_target": None, "rounds_to_fedavg_final": None,
                     "wall_seconds": local_only["wall_seconds"] + server_time,
                     "accuracy_std": a["std"], "accuracy_min": a["min"], "accuracy_max": a["max"]})
    if centralised is not None:
        c = centralised["final_accuracy"]
        rows.append({"method": "centralised", "final_accuracy": c,
                     "best_accuracy": centralised["best_accuracy"], "accuracy_round_10": None,
                     "rounds_to_target": None, "rounds_to_fedavg_final": None,
                     "wall_seconds": centralised["wall_seconds"],
                     "epochs": centralised["epochs"],
                     "curve": [[h["epoch"], h["test_accuracy"]] for h in centralised["curve"]]})
    accuracy_plot(curves, syn_acc, out / "accuracy.png",
                  local_only["test_accuracy"]["mean"] if local_only is not None else None,
                  centralised["final_accuracy"] if centralised is not None else None)
    quality = (synthetic_quality(out, synthetic, manifest, data_dir)
               if pre is not None and synthetic is not None else None)
    report = {"rows": rows, "target_accuracy": cfg.fl.target_accuracy, "stages": stages,
              "synthetic": quality, "pretrain": pre, "rounds": cfg.fl.rounds,
              "clients": len(manifest.clients), "clients_per_round": cfg.fl.clients_per_round,
              "algorithms": algorithm_table(rows, algorithms or []),
              "local_only": ({k: local_only[k] for k in ("test_accuracy", "test_macro_f1",
                                                         "epochs_per_client", "num_clients")}
                             if local_only is not None else None)}
    write_json(out / "report.json", report)
    md = render_markdown(cfg, manifest, report)
    write_text(out / "report.md", md)
    sys.stdout.write(table(report) + "\n")
    if report["algorithms"]:
        sys.stdout.write("\n" + algorithms_markdown(report) + "\n")
    sys.stdout.flush()
    return report


def algorithm_table(rows: list[dict], algorithms: list[str]) -> list[dict]:
    """One entry per algorithm X: X from scratch vs X from the GPT-FL init."""
    from gptfl_hpc.config import RunConfig

    by = {r["method"]: r for r in rows}
    out = []
    for entry in algorithms:
        name = RunConfig.parse_algorithm(entry)[0]
        s, g = by.get(f"{name}-scratch"), by.get(f"{name}-gptfl")
        dp = (g or s or {}).get("dp")
        out.append({
            "algorithm": name, "entry": entry,
            "scratch_final": s["final_accuracy"] if s else None,
            "gptfl_final": g["final_accuracy"] if g else None,
            "gain": (g["final_accuracy"] - s["final_accuracy"]) if s and g else None,
            "scratch_round_10": s["accuracy_round_10"] if s else None,
            "gptfl_round_10": g["accuracy_round_10"] if g else None,
            "gptfl_rounds_to_scratch_final": g["rounds_to_fedavg_final"] if g else None,
            "epsilon": dp["epsilon"] if dp else None, "delta": dp["delta"] if dp else None})
    return out


def _eps(x: float) -> str:
    return f"{x:.2f}" if x < 1000 else f"{x:.3g}"


def algorithms_markdown(report: dict) -> str:
    lines = ["| algorithm | from scratch: final | from GPT-FL init: final | gain | scratch @ "
             "round 10 | GPT-FL @ round 10 | GPT-FL rounds to scratch's final | epsilon (delta) |",
             "|---|---|---|---|---|---|---|---|"]
    for a in report["algorithms"]:
        gain = "-" if a["gain"] is None else f"{100 * a['gain']:+.1f} pts"
        eps = ("-" if a["delta"] is None else
               f"{'inf' if a['epsilon'] is None else _eps(a['epsilon'])} "
               f"({a['delta']:g})")
        lines.append(f"| {NAMES.get(a['algorithm'], a['algorithm'])} | "
                     f"{_pct(a['scratch_final'])} | {_pct(a['gptfl_final'])} | {gain} | "
                     f"{_pct(a['scratch_round_10'])} | {_pct(a['gptfl_round_10'])} | "
                     f"{a['gptfl_rounds_to_scratch_final'] or '-'} | {eps} |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(report: dict) -> str:
    t = report["target_accuracy"]
    ref = "the same algorithm's final from scratch" if report.get("algorithms") else \
        "FedAvg's final"
    lines = [f"| method | final acc | best acc | acc @ round 10 | rounds to {100 * t:.0f}% | "
             f"rounds to {ref} | wall s |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {_pct(r['final_accuracy'])} | {_pct(r['best_accuracy'])} "
                     f"| {_pct(r['accuracy_round_10'])} | {r['rounds_to_target'] or '-'} | "
                     f"{r['rounds_to_fedavg_final'] or '-'} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def render_markdown(cfg, manifest, report: dict) -> str:
    d = cfg.data
    parts = [
        "# GPT-FL run report", "",
        f"Dataset {manifest.dataset}: {len(manifest.clients)} clients "
        f"({d.partition}{f', alpha {d.alpha}' if d.partition == 'dirichlet' else ''}), "
        f"{report['clients_per_round']} per round, {report['rounds']} rounds, model "
        f"{cfg.model.name}, {cfg.fl.algorithm} (client {cfg.fl.client_optimizer} lr "
        f"{cfg.fl.client_lr}"
        f"{'' if cfg.fl.body_lr_scale == 1.0 else f' (x{cfg.fl.body_lr_scale:g} below the head)'}"
        f", {cfg.fl.local_epochs} local epoch(s), batch {cfg.fl.batch_size}). "
        "Every method sees the same client sampling sequence.", "",
        table(report), "", "![accuracy](accuracy.png)", "",
        "Wall time of GPT-FL includes the server stages (generator, synthesis, pretraining).", ""]
    chosen = [r for r in report["rows"] if "selected_round" in r]
    if chosen:
        where = {"synthetic_val": "the FL round with the best accuracy on the server's "
                                  "synthetic validation split",
                 "client_val": "the round with the best accuracy on the clients' held-out rows, "
                               "scored by the clients (round 0: the init)"}
        parts += [
            "Model selection (fl.select): " + "; ".join(
                f"{r['method']} returns round {r['selected_round']}'s model "
                f"({where[r['selected_by']]}; its last round {r['rounds_run']} reached "
                f"{_pct(r['last_round_accuracy'])})"
                for r in chosen) + ". Its final acc is that model's.", ""]
    central = next((r for r in report["rows"] if r["method"] == "centralised"), None)
    if central:
        parts += [
            "The centralised row is a reference upper bound, not an FL method: one process "
            f"trained {cfg.model.name} from random init on the pooled private data of every "
            f"client for {central['epochs']} epochs (pretrain.* settings; best test accuracy "
            f"{_pct(central['best_accuracy'])}); no federation could run it.", ""]
    if report.get("algorithms"):
        parts += [
            "## GPT-FL combined with each FL algorithm", "",
            "Each algorithm X runs twice on the same client sequence: from random init "
            "(scratch) and from GPT-FL's synthetic-pretrained model. GPT-FL changes only the "
            "initialisation. \"Rounds to ...\" compares each GPT-FL run with the same "
            "algorithm from scratch. Epsilon: client-level (epsilon, delta)-DP after the last "
            "round (gptfl_hpc/fl/dp.py); the GPT-FL init is made from public and synthetic data "
            "only, so it costs no privacy.", "",
            algorithms_markdown(report), ""]
    lo = report.get("local_only")
    if lo:
        a, f = lo["test_accuracy"], lo["test_macro_f1"]
        parts += [
            "## Local fine-tuning only (no federation)", "",
            f"Each of the {lo['num_clients']} clients fine-tunes the GPT-FL init on its own data "
            f"for {lo['epochs_per_client']} epochs (fl.rounds x fl.local_epochs) and is scored "
            "on the test set:", "",
            "| metric | mean | std | min | max |", "|---|---|---|---|---|",
            f"| test accuracy | {_pct(a['mean'])} | {100 * a['std']:.1f} | {_pct(a['min'])} | "
            f"{_pct(a['max'])} |",
            f"| test macro-F1 | {_pct(f['mean'])} | {100 * f['std']:.1f} | {_pct(f['min'])} | "
            f"{_pct(f['max'])} |", ""]
    parts += [
        "## Stages", "", "| stage | seconds | note |", "|---|---|---|"]
    for name, s in report["stages"].items():
        parts.append(f"| {name} | {s['seconds']:.1f} | |")
    q = report["synthetic"]
    if q:
        parts += ["", "## Synthetic data quality", "",
                  f"{q['num_samples']} synthetic samples; per class: "
                  + ", ".join(f"{n}={c}" for n, c in zip(manifest.label_names, q["class_counts"])),
                  "", *(["![samples](samples.png)", ""] if manifest.kind != "audio" else []),
                  f"Synthetic-only model (trained on synthetic data only) on the real test set: "
                  f"accuracy {_pct(report['pretrain']['test_accuracy'])}.", ""]
        m = q.get("memorisation")
        if m:
            parts += [
                "Memorisation check (L2 nearest-neighbour distance to the generator's public "
                "training images, pixels in [0,1]):", "",
                "| data | median NN distance to public split |", "|---|---|",
                f"| synthetic samples | {m['synthetic_to_public_median']:.3f} |",
                f"| real held-out test images (reference) | {m['heldout_to_public_median']:.3f} |",
                "",
                f"Ratio {m['median_ratio']:.2f} (near 1: new samples; well below 1: copies). "
                f"{100 * m['share_below_threshold']:.1f}% of synthetic samples are closer to a "
                f"public image than 95% of real held-out images are (about 5% expected for a "
                f"generator that does not copy); exact copies: {m['exact_copies']}.", ""]
    return "\n".join(parts) + "\n"


def check_demo_targets(report: dict) -> dict:
    """The README's demo targets, evaluated on a report (used by tests and the closing note)."""
    rows = {r["method"]: r for r in report["rows"]}
    g, f, s = rows.get("gptfl"), rows.get("fedavg"), rows.get("synthetic_only")
    out = {}
    if g and f:
        out["gptfl_minus_fedavg_at_round_10"] = (g["accuracy_round_10"] or np.nan) - (
            f["accuracy_round_10"] or np.nan)
        out["gptfl_rounds_to_fedavg_final"] = g["rounds_to_fedavg_final"]
    if g and s:
        out["gptfl_minus_synthetic_only"] = g["final_accuracy"] - s["final_accuracy"]
    return out
