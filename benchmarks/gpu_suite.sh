#!/usr/bin/env bash
# benchmarks/gpu_suite.sh - one-go, time-boxed check of gptfl-hpc's GPU paths (and the 16-core CPU
# numbers that 2-core machines cannot make) on a lent GPU machine; prints ONE summary at the end.
#
#   bash benchmarks/gpu_suite.sh                       # on the GPU machine, ~7.5 min
#   SUITE_CPU_DRYRUN=1 bash benchmarks/gpu_suite.sh    # plumbing on a CPU-only machine (CI), ~2 min
#
# What it runs, most valuable first; every step is time-boxed (`timeout`), a failing step is
# recorded and the suite goes on; a step that would not fit the remaining budget is skipped:
#   0  env       versions, GPU, MPI library, host memory, a 2-rank MPI probe; nvidia-smi sampled
#   A  smoke     a tiny random SD pipeline (tests/tiny_sd.py) through `gptfl-hpc synthesize` on
#                cuda in fp16 (and fp32, to measure the fp16 error), guidance [0.5,3] so both the
#                no-CFG group and the per-row guidance run; black/constant-image counts. The
#                shipped embedded digits generator: synthesis on cuda vs cpu (img/s, pixel diff).
#   C  pretrain  `gptfl-hpc pretrain` throughput: resnet18 on 32x32 at global batch 1024 and 128
#                (data path auto), 224x224 at 256 with the set on the device and streamed
#                (pretrain.data_path=stream: pinned prefetch, one host copy); then
#                benchmarks/bench_pretrain.py: our step vs the data-on-GPU ceiling (ratio >= 0.8).
#   E  fl-gpu    `federate` on cuda vs cpu (digits, 3 ranks), resnet18 on cuda from the pretrained
#                weights (the GPT-FL path), and `run` (all stages, 3 ranks) with run.store, twice:
#                the second run must reuse the stored server stages; the first logs the GPU
#                memory that pretraining gave back before FL.
#   F  probes    blocking H2D copy = stream sync; FL per-client host overhead (resnet18); SD-VAE
#                decode memory per image; per-sample CUDA Philox checksums (across GPU models).
#   B  bench     benchmarks/bench_synthesis.py --quick --compile off (eager).
#   D  cpu16     benchmarks/bench_exchange.py --ranks 2,4,8,16 and `gptfl-hpc scale
#                configs/scaling.yaml --ranks 2,4,8,16 --mode weak` (run.device=cpu, one core per
#                rank, as the 2-core table in docs/slurm.md).
#   X  optional  only with budget left: the GPU federate again (bitwise reproducible?),
#                gen.compile=true on the tiny SD (recompiles, graph breaks), 2 server ranks on 1
#                GPU (must be refused up front with one line), benchmarks/bench_fl_round.py
#                --no-pfl at 2,4,8 ranks, bench_synthesis's compiled cases.
#
# The device tool (the lent machine: 1 GPU, 16 cores, no network, Python 3.12 with torch,
# accelerate, transformers, h5py, mpi4py and Open MPI 4.1, but no diffusers or submitit):
#   * once, here, in the checkout (.whl/ is git-ignored, so it must be carried):
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl diffusers==0.42.1 submitit==1.5.4
#   * ONE run:  command "bash benchmarks/gpu_suite.sh", carry [".whl"], timeout_s 510.
#     The suite stops starting steps after SUITE_BUDGET (450 s) and needs ~20 s for its summary,
#     so it ends inside the timeout; of the 15 device minutes (~1.5 min start) that leaves ~5 min
#     for one rerun of selected steps: SUITE_ONLY="c-*,e-run*" bash benchmarks/gpu_suite.sh
#     (on the same warm machine it keeps the prepared data; on a fresh one it prepares again).
#   * results: $OUT/summary.md, $OUT/gpu-suite-logs.tar.gz, $OUT/bench_pretrain.json,
#     $OUT/scaling.md, $OUT/scaling.png (the tool returns at most 8 files). The summary also goes
#     to stdout last, so the tool's output tail holds it.
#
# Knobs: SUITE_BUDGET (s, default 450; 160 in the dry run), SUITE_RES (work dir, default
#        /tmp/gpu-suite), SUITE_ONLY (comma-separated step-name globs; keeps SUITE_RES),
#        PY (default python3), MPIEXEC, GPTFL_REPO (default: the current directory),
#        SUITE_CPU_DRYRUN=1 (CPU-only plumbing run: small sizes, run.device=cpu, the steps that
#        only repeat another step's code path on CPU are skipped and listed).
# Exit status: 0 when every step that ran passed, 1 otherwise (the summary says which), 2 usage.
set -uo pipefail

REPO=${GPTFL_REPO:-$PWD}
[ -f "$REPO/gptfl_hpc/__init__.py" ] || { echo "run me from the gptfl-hpc checkout (or set GPTFL_REPO)" >&2; exit 2; }
cd "$REPO"
export REPO
export PY=${PY:-python3}
export RES=${SUITE_RES:-/tmp/gpu-suite}
export LOG=$RES/logs
export DRY=${SUITE_CPU_DRYRUN:-0}
ONLY=${SUITE_ONLY:-}
if [ "$DRY" = 1 ]; then BUDGET=${SUITE_BUDGET:-160}; else BUDGET=${SUITE_BUDGET:-450}; fi
T0=$(date +%s)
if [ -e "$RES" ] && [ ! -f "$RES/.gpu-suite" ]; then echo "$RES exists and is not a gpu-suite folder" >&2; exit 2; fi
if [ -z "$ONLY" ]; then rm -rf "$RES"; fi
mkdir -p "$LOG"; touch "$RES/.gpu-suite"
export DEV=cuda
[ "$DRY" = 1 ] && DEV=cpu

# ---- environment --------------------------------------------------------------------------
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1                       # Open MPI 4.x
export PRTE_MCA_rmaps_default_mapping_policy=${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}  # 5.x
export PRTE_MCA_hwloc_default_binding_policy=${PRTE_MCA_hwloc_default_binding_policy:-none}
if [ "$DRY" != 1 ]; then
  # the lent VM's memory grows on demand, so MemAvailable starts far below its 128 GiB: tell
  # pretraining's host-memory plan what the node really offers (gptfl_hpc/train/pretrain.py)
  export GPTFL_HOST_MEMORY_GIB=${GPTFL_HOST_MEMORY_GIB:-100}
fi
if ! "$PY" -c "import diffusers, submitit" >/dev/null 2>&1; then
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$REPO"/.whl/*.whl > "$LOG/pip.log" 2>&1 || echo "wheel install failed (see logs/pip.log)"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "WARNING: diffusers/submitit missing and no .whl/ carried: synthesis/scale steps will fail"
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
PYDIR=$(dirname "$(command -v "$PY")")
MPIEXEC=${MPIEXEC:-$(ls "$PYDIR/mpiexec" 2>/dev/null || command -v mpiexec || command -v mpirun || echo mpiexec)}
if [ -x "$MPIEXEC" ] && [ "$(command -v mpiexec)" != "$MPIEXEC" ]; then  # bench_exchange.py calls "mpiexec"
  mkdir -p "$RES/bin" && ln -sf "$MPIEXEC" "$RES/bin/mpiexec" && export PATH=$RES/bin:$PATH
fi
export MPIEXEC GPTFL_MPIEXEC=$MPIEXEC   # GPTFL_MPIEXEC: what `scale` launches
GP="$PY -m gptfl_hpc"                  # gptfl-hpc without installing the package
MP="$MPIEXEC --oversubscribe"          # Open MPI; remove the flag for MPICH
export GP MP

say() { echo "[suite $(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
[ -f "$LOG/steps.tsv" ] || printf 'step\trc\tseconds\tstart_epoch\tend_epoch\tnote\tcpu_seconds\n' > "$LOG/steps.tsv"
FAILED=0

selected() {  # selected NAME: is the step in SUITE_ONLY (empty: all)?
  [ -z "$ONLY" ] && return 0
  local pat; local IFS=,
  for pat in $ONLY; do
    # shellcheck disable=SC2053  # a glob on purpose
    [[ $1 == $pat ]] && return 0
  done
  return 1
}
note_skip() { printf '%s\tskip\t0\t%s\t%s\t%s\t\n' "$1" "$(date +%s)" "$(date +%s)" "$2" >> "$LOG/steps.tsv"; say "SKIP $1 ($2)"; }

# step NAME CAP MIN CMD...: run CMD (a command or an exported function) with a time cap; skip it
# when less than MIN seconds of the budget are left. rc 124 = hit its cap. Its --out folder
# ($RES/NAME) is removed first: a stage refuses another request's output, and a partial one
# needs --resume; every run here is a fresh one.
step() {
  local name=$1 cap=$2 min=$3; shift 3
  selected "$name" || return 0
  local l; l=$(left)
  if (( l < min )); then note_skip "$name" "budget: ${l}s left, needs ${min}s"; return 0; fi
  (( cap > l )) && cap=$l
  rm -rf "${RES:?}/$name"
  say "== $name (cap ${cap}s)"
  local t0 t1 rc cpu TIMEFORMAT='%U %S'; t0=$(date +%s.%N)
  # bash -c: CMD may be an exported shell function; timeout signals the whole process group;
  # `time` adds up the CPU seconds of everything the step ran (its processes, MPI ranks too)
  { time timeout -k 15 "$cap" bash -c '"$@"' bash "$@" > "$LOG/$name.log" 2>&1; } 2> "$LOG/.cpu"; rc=$?
  t1=$(date +%s.%N)
  cpu=$(awk '{printf "%.1f", $1 + $2}' "$LOG/.cpu" 2>/dev/null)
  printf '%s\t%s\t%s\t%s\t%s\t\t%s\n' "$name" "$rc" "$(awk "BEGIN{printf \"%.1f\", $t1-$t0}")" "$t0" "$t1" "$cpu" >> "$LOG/steps.tsv"
  [ $rc -eq 0 ] || { FAILED=1; say "   $name: rc=$rc (124 = cap hit)"; }
  grep -av '^\s*$' "$LOG/$name.log" | tail -n 2 | tr -d '\000' | cut -c1-200 | sed 's/^/    /'
}
# gpu_step NAME ...: a step that only repeats another step's code path on CPU (skipped in the dry run)
gpu_step() {
  if [ "$DEV" != cuda ]; then selected "$1" && note_skip "$1" "dry run: its code path runs in another step on CPU"; return 0; fi
  step "$@"
}

# ---- helper script (data makers, checks, probes, summary) ------------------------------------
cat > "$RES/suite_helpers.py" <<'PYEOF'
"""gpu_suite helpers: data makers, synthetic-set checks, GPU probes, summary."""
import argparse, json, os, re, statistics, sys, time
from pathlib import Path

import numpy as np


def _class_images(n, hw, seed, k=10):
    """uint8 (n, hw, hw, 3): class colour + uniform noise (+-30): trivially separable classes."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % k).astype(np.int64)
    rng.shuffle(y)
    colors = np.random.default_rng(1234).integers(40, 216, size=(k, 3)).astype(np.int16)
    x = np.empty((n, hw, hw, 3), np.uint8)
    rows = max(1, (1 << 26) // (hw * hw * 3))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        noise = rng.integers(0, 61, size=(e - s, hw, hw, 3), dtype=np.int16) - 30
        x[s:e] = np.clip(colors[y[s:e]][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return x, y


def make_arrays(a):
    x, y = _class_images(a.n, a.hw, 1)
    tx, ty = _class_images(a.test, a.hw, 2)
    np.savez(a.out, images=x, labels=y, images_test=tx, labels_test=ty)
    print(f"{a.out}: {x.shape} + test {tx.shape}")


def make_synth(a):
    import h5py
    x, y = _class_images(a.n, a.hw, 3)
    with h5py.File(a.out, "w") as f:
        rows = max(1, (1 << 20) // (a.hw * a.hw * 3))
        f.create_dataset("images", data=x, chunks=(min(rows, a.n), a.hw, a.hw, 3))
        f.create_dataset("labels", data=y)
    print(f"{a.out}: {x.shape} ({x.nbytes / 2**30:.2f} GiB); 150k at this size: "
          f"{150000 * a.hw * a.hw * 3 / 2**30:.1f} GiB")


def _progress_rate(log):
    """Last 'synthesis ... X img/s' rate of a gptfl-hpc synthesize log (generation only)."""
    try:
        rates = re.findall(r"synthesis \d+/\d+ \(\d+%\)\s+([\d.]+) img/s", Path(log).read_text())
        return float(rates[-1]) if rates else None
    except OSError:
        return None


def check_synth(a):
    import h5py
    res = {"file": a.file}
    with h5py.File(a.file, "r") as f:
        x = f["images"][()]
        for k in ("dtype", "device_type", "wall_s", "num_processes", "micro_batch", "steps"):
            if k in f.attrs:
                v = f.attrs[k]
                res[k] = v.item() if hasattr(v, "item") else (v.decode() if isinstance(v, bytes) else v)
    flat = x.reshape(len(x), -1)
    res.update(n=len(x), shape=list(x.shape[1:]), black_images=int((flat.max(1) == 0).sum()),
               constant_images=int((flat.max(1) == flat.min(1)).sum()),
               mean=round(float(x.mean()), 2), std=round(float(x.std()), 2),
               gen_img_s=_progress_rate(a.log) if a.log else None)
    if a.compare and Path(a.compare).is_file():
        with h5py.File(a.compare, "r") as f:
            y = f["images"][()]
        d = np.abs(x.astype(np.int16) - y.astype(np.int16))
        res.update(compare_to=a.compare, mean_abs_diff=round(float(d.mean()), 3), max_diff=int(d.max()),
                   identical_pixels=round(float((d == 0).mean()), 4),
                   identical_images=int((d.reshape(len(d), -1).max(1) == 0).sum()))
    print(json.dumps(res))
    with open(a.out, "w") as fh:
        json.dump(res, fh)


def compare_weights(a):
    """max |a - b| over the tensors of two safetensors files (GPU run-to-run determinism)."""
    from safetensors.numpy import load_file
    x, y = load_file(a.a), load_file(a.b)
    diffs = {k: float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)))) for k in x if k in y}
    res = {"a": a.a, "b": a.b, "tensors": len(diffs), "max_abs_diff": max(diffs.values()) if diffs else None,
           "bitwise_equal": all(v == 0 for v in diffs.values())}
    print(json.dumps(res))
    with open(a.out, "w") as fh:
        json.dump(res, fh)


def probes(a):
    import torch
    res = {}
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def save():
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)

    # 1. a blocking .to(device) of a small CPU tensor waits for all queued GPU work
    if cuda:
        m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

        def queue(k=20):
            for _ in range(k):
                m @ m
        queue(3); sync()
        t = time.perf_counter(); queue(); sync(); gpu_ms = (time.perf_counter() - t) * 1e3
        small = torch.randint(0, 9, (128,))
        queue(); t = time.perf_counter(); small.to(dev); blk = (time.perf_counter() - t) * 1e3; sync()
        pinned = small.pin_memory()
        queue(); t = time.perf_counter(); pinned.to(dev, non_blocking=True); nb = (time.perf_counter() - t) * 1e3; sync()
        res["h2d_after_queued_work"] = {"queued_gpu_ms": round(gpu_ms, 2), "blocking_to_ms": round(blk, 2),
                                        "pinned_non_blocking_ms": round(nb, 3)}
        del m
        save()

    # 2. FL per-client host work of the engine for a resnet18-sized flat buffer vs accumulating
    #    on the device and copying once per round
    from gptfl_hpc.fl.params import host_buffer
    numel = 11_181_642 + 9_600
    glob_d = torch.randn(numel, device=dev)
    work = glob_d + 1e-3 * torch.randn_like(glob_d)
    acc = host_buffer(numel + 16)
    host_glob = host_buffer(numel)
    out = {"numel": numel, "torch_threads": torch.get_num_threads()}
    for threads in sorted({torch.get_num_threads(), 2}):
        torch.set_num_threads(threads)
        for _ in range(2):
            sync(); t = time.perf_counter()
            update = (work - glob_d).cpu()
            ok = bool(torch.isfinite(update).all())
            acc[:numel].add_(update, alpha=37.0)
            sq = float(update[:numel].pow(2).sum())
            t_host = (time.perf_counter() - t) * 1e3
        out[f"engine_per_client_ms_threads{threads}"] = round(t_host, 2)
    acc_d = torch.zeros(numel + 16, device=dev)
    for _ in range(2):
        sync(); t = time.perf_counter()
        d = work - glob_d
        acc_d[:numel].add_(d, alpha=37.0)
        sq_d = torch.linalg.vector_norm(d).pow(2)
        sync(); t_dev = (time.perf_counter() - t) * 1e3
    sync(); t = time.perf_counter(); acc_d.cpu(); t_d2h = (time.perf_counter() - t) * 1e3
    t = time.perf_counter(); host_glob.to(dev); sync(); t_h2d = (time.perf_counter() - t) * 1e3
    out.update(device_accumulate_per_client_ms=round(t_dev, 3), one_d2h_per_round_ms=round(t_d2h, 2),
               global_h2d_per_round_ms=round(t_h2d, 2), check=ok and sq > 0 and float(sq_d) > 0)
    res["fl_per_client_overhead_resnet18"] = out
    del glob_d, work, acc_d
    save()

    if not cuda:
        print(json.dumps(res)); return
    torch.set_num_threads(os.cpu_count() or 1)

    # 3. SD-2.1/DiT VAE decode memory per image (fp16, random weights): DiT decodes a whole
    #    micro-batch in one call; SD decodes a pipeline batch
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(act_fn="silu", block_out_channels=[128, 256, 512, 512],
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        norm_num_groups=32, sample_size=768).to(dev, torch.float16).eval()
    dec = []
    for lat, b in ((32, 16), (64, 8), (96, 4)):
        torch.cuda.empty_cache(); sync()
        base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        z = torch.randn(b, 4, lat, lat, device=dev, dtype=torch.float16)
        with torch.inference_mode():
            img = vae.decode(z).sample
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        dec.append({"px": lat * 8, "batch": b, "peak_gib": round(peak, 2), "gib_per_image": round(peak / b, 3),
                    "projected_gib_batch256": round(peak / b * 256, 1), "projected_gib_batch16": round(peak / b * 16, 1),
                    "nonfinite": int((~torch.isfinite(img)).sum())})
        del z, img
    res["vae_decode_fp16"] = dec
    del vae
    save()

    # 4. per-sample CUDA Philox latents (diffusers randn_tensor with a generator list): checksums to
    #    compare across GPU models (grid size depends on the SM count above ~SMs*2048 elements)
    props = torch.cuda.get_device_properties(0)
    ph = {"gpu": props.name, "sms": props.multi_processor_count}
    for shape in ((4, 32, 32), (4, 96, 96), (4, 128, 128), (16, 256, 256)):
        sums = []
        for s in range(3):
            gen = torch.Generator(device="cuda").manual_seed(1000 + s)
            v = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32)
            sums.append(round(float(v.double().sum()), 6))
        ph["x".join(map(str, shape))] = sums
    res["philox_checksums"] = ph
    save()
    print(json.dumps(res))


def check_reuse(a):
    """The second `run` on the same run.store: its server stages must be reused, not redone."""
    txt = Path(a.log).read_text(errors="replace")
    reused = sorted(set(re.findall(r"== stage (\w+): complete for this request in \S+ \(reused\)", txt)))
    res = {"reused": reused, "ok": {"synthesize", "pretrain"} <= set(reused)}
    print(json.dumps(res))
    with open(a.out, "w") as fh:
        json.dump(res, fh)
    sys.exit(0 if res["ok"] else 1)


# ---- summary ---------------------------------------------------------------------------------

def _read_json(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


def _text(p):
    try:
        return Path(p).read_text(errors="replace")
    except OSError:
        return ""


def _metrics(run_dir):
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return None
    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    timed = rows[1:] if len(rows) > 1 else rows
    acc = [r.get("test_accuracy") for r in rows if r.get("test_accuracy") is not None]
    return {"rounds": len(rows), "t_client": round(statistics.mean(r["t_client"] for r in timed), 3),
            "t_round": round(statistics.mean(r["t_round"] for r in timed), 3),
            "t_comm": round(statistics.mean(r["t_comm"] for r in timed), 4),
            "final_acc": round(acc[-1], 4) if acc else None}


def _nvsmi(log_dir):
    """[(epoch, util %, mem MiB)] from the nvidia-smi sampler."""
    from datetime import datetime
    out = []
    p = Path(log_dir) / "nvsmi.csv"
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        parts = [s.strip() for s in line.split(",")]
        try:
            ts = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((ts, float(parts[1]), float(parts[2])))
        except (ValueError, IndexError):
            continue
    return out


def _pretrain_key(info):
    h = info["history"]
    data = info.get("data_path") or {}
    paths = ",".join(sorted({p.get("path", "?") for p in data.get("per_process", [])})) or "?"
    return (f"img/s by epoch {[round(e['images_per_second']) for e in h]}, test acc "
            f"{info['test_accuracy']:.3f}, {info['mixed_precision']}, {info['num_processes']} proc, "
            f"data path {paths}, set {data.get('set_bytes', 0) / 2**30:.2f} GiB")


def key(res, log, name):
    j = _read_json(log / f"{name}.json")
    if name.startswith("a-") and j:
        s = (f"{j['n']} imgs {j.get('dtype')} on {j.get('device_type')}, gen {j.get('gen_img_s')} img/s, "
             f"black {j['black_images']}, constant {j['constant_images']}")
        if "mean_abs_diff" in j:
            s += (f"; vs {Path(j['compare_to']).parent.name}: mean|d| {j['mean_abs_diff']}, max {j['max_diff']}, "
                  f"identical px {100 * j['identical_pixels']:.1f}%")
        return s
    if name == "c-bench":
        b = _read_json(log / "bench_pretrain.json")
        if b:
            return "; ".join(f"b{r['batch']} {r['path']}: {r['ours_img_s']:.0f}/{r['ceiling_img_s']:.0f} img/s "
                             f"= {r['ratio']:.2f} of the ceiling" for r in b["rows"])
    if name.startswith("c-"):
        info = _read_json(res / name / "pretrained.json")
        if info:
            return _pretrain_key(info)
    if name == "e-run-store":
        rel = re.findall(r"GPU memory released on \S+: .*? free", _text(log / f"{name}.log"))
        m = _metrics(res / name / "gptfl")
        s = f"gptfl final acc {m['final_acc']}" if m else "no gptfl metrics"
        return s + ("; pretraining " + rel[-1] if rel else "; no GPU release line")
    if name == "e-run-reuse":
        j = _read_json(log / "e-run-reuse.json")
        if j:
            return f"stages reused from run.store: {', '.join(j['reused']) or 'none'}"
    if name.startswith("e-"):
        m = _metrics(res / name)
        if m:
            return (f"{m['rounds']} rounds, t_client {m['t_client']} s, t_round {m['t_round']} s, "
                    f"t_comm {m['t_comm']} s, final acc {m['final_acc']}")
    if name == "d-weak":
        p = res / name / "scaling.csv"
        if p.is_file():
            rows = [r.split(",") for r in p.read_text().splitlines()]
            h = rows[0]
            return "; ".join(f"R={r[h.index('ranks')]} eff {float(r[h.index('efficiency')]):.2f} "
                             f"t_round {float(r[h.index('t_round')]):.3f}" for r in rows[1:])
    if name == "d-exchange":
        j = _read_json(log / "bench_exchange.json")
        if j:
            return "; ".join(f"R={x['ranks']} gptfl {x['gptfl']:.4f}s ({x['gptfl'] / x['raw']:.2f}x raw) "
                             f"easyfl/gptfl {x['easyfl'] / x['gptfl']:.1f}x" for x in j)
    if name.startswith("b-"):
        got = re.findall(r"# (\w+)\s+(\d+)px\s+(\d+) steps batch\s+(\d+):\s+([\d.]+) img/s", _text(log / f"{name}.log"))
        return "; ".join(f"{m} {px}/{st}/b{b} {float(r):.2f}" for m, px, st, b, r in got)
    if name == "x-fl-rerun":
        j = _read_json(log / "x-fl-rerun.json")
        if j:
            return f"rerun of e-fl-digits-cuda: bitwise equal {j['bitwise_equal']}, max |d| {j['max_abs_diff']:.3g}"
    if name == "x-2servers-1gpu":
        t = _text(log / f"{name}.log")
        hit = re.findall(r"error: (config key run.server_processes: .*)", t)
        return ("refused up front: " + hit[-1][:140]) if hit else "ran (no GPU to share)"
    if name == "x-compile":
        txt = _text(log / f"{name}.log")
        return (f"recompile lines {len(re.findall('Recompiling function', txt))}, graph-break lines "
                f"{len(re.findall('Graph break', txt))}, recompile_limit hit {'recompile_limit' in txt}")
    if name == "x-fl-round":
        b = _read_json(log / "bench_fl_round.json") or {}
        return "; ".join(f"{r['system']} {r['procs']} procs {r['s_per_round']} s/round"
                         for r in b.get("summary", []) if r.get("s_per_round") is not None)
    if name == "f-probes":
        j = _read_json(log / "probes.json") or {}
        parts = []
        h = j.get("h2d_after_queued_work")
        if h:
            parts.append(f"blocking .to(cuda) {h['blocking_to_ms']} ms after {h['queued_gpu_ms']} ms queued "
                         f"(pinned non_blocking {h['pinned_non_blocking_ms']} ms)")
        fo = j.get("fl_per_client_overhead_resnet18")
        if fo:
            parts.append("FL per client host ms " + ", ".join(f"{k.split('_')[-1]} {v}" for k, v in fo.items()
                                                               if k.startswith("engine_")) +
                         f" vs device {fo['device_accumulate_per_client_ms']}")
        for d in j.get("vae_decode_fp16", []):
            parts.append(f"VAE {d['px']}px {d['gib_per_image']} GiB/img (x256 {d['projected_gib_batch256']} GiB)")
        return "; ".join(parts)
    errs = [x for x in _text(log / f"{name}.log").splitlines() if "error" in x.lower()]
    return errs[-1][:160] if errs else ""


def summarize(a):
    res, log = Path(a.res), Path(a.res) / "logs"
    L = []
    env = _read_json(log / "env.json") or {}
    L.append(f"# gptfl-hpc GPU suite ({time.strftime('%Y-%m-%d %H:%M')}){' - CPU DRY RUN' if a.dry else ''}")
    L.append(f"{env.get('gpu', 'no GPU')} ({env.get('sm', '?')} SMs, {env.get('mem_gib', '?')} GiB, cc "
             f"{env.get('capability')}, bf16 {env.get('bf16')}), {env.get('cpus')} CPUs, host "
             f"MemAvailable {env.get('mem_available_gib')} GiB; torch {env.get('torch')} "
             f"(CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}), diffusers "
             f"{env.get('diffusers')}, accelerate {env.get('accelerate')}, transformers {env.get('transformers')}")
    mpi = [x for x in _text(log / "mpi-probe.log").replace("\x00", "").strip().splitlines() if x]
    L.append("MPI: " + (mpi[-1][:160] if mpi else "no probe"))
    L.append("")
    steps = {}
    for line in _text(log / "steps.tsv").splitlines()[1:]:
        f = line.split("\t")
        steps[f[0]] = dict(name=f[0], rc=f[1], s=f[2], t0=float(f[3] or 0), t1=float(f[4] or 0),
                           note=f[5] if len(f) > 5 else "", cpu=f[6] if len(f) > 6 else "")
        # (a rerun's line replaces the earlier one)
    smi = _nvsmi(log)

    def gpu_of(st):
        w = [(u, m) for ts, u, m in smi if st["t0"] <= ts <= st["t1"]]
        if not w:
            return ""
        return f"GPU util avg {statistics.mean(u for u, _ in w):.0f}% max mem {max(m for _, m in w) / 1024:.1f} GiB"

    L.append("| step | rc | s (cpu s) | result | GPU |")
    L.append("|---|---|---|---|---|")
    failed = []
    for st in steps.values():
        try:
            k = key(res, log, st["name"]) if st["rc"] != "skip" else st["note"]
        except Exception as e:  # noqa: BLE001 - a summary never fails the suite
            k = f"(summary error: {type(e).__name__}: {e})"
        if st["rc"] not in ("0", "skip"):
            failed.append(st["name"])
            errs = [x for x in _text(log / f"{st['name']}.log").splitlines()
                    if re.search(r"error|Error|Traceback|Killed|timed out|not found", x)]
            k = (k + " | " if k else "") + (errs[-1][:160] if errs else "no error line")
        cpu = f" ({st['cpu']})" if st["cpu"] else ""
        L.append(f"| {st['name']} | {st['rc']} | {st['s']}{cpu} | {k} | {gpu_of(st)} |")
    j = _read_json(log / "probes.json") or {}
    if j.get("philox_checksums"):
        L += ["", "Philox per-sample checksums (compare across GPU models): " + json.dumps(j["philox_checksums"])]
    L += ["", f"failed steps: {', '.join(failed) if failed else 'none'}",
          f"logs: {log}  (rc 124 = the step hit its cap; 'skip' = budget, selection or dry run)"]
    text = "\n".join(L) + "\n"
    (res / "summary.md").write_text(text)
    print(text)


def env_info(a):
    import platform
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0))}
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(("MemTotal:", "MemAvailable:")):
                k = "mem_total_gib" if line.startswith("MemTotal") else "mem_available_gib"
                info[k] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpus=torch.cuda.device_count(), sm=p.multi_processor_count,
                    capability=list(torch.cuda.get_device_capability(0)), mem_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
        try:
            info["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            info["bf16"] = torch.cuda.is_bf16_supported()
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:  # noqa: BLE001
            info["nccl"] = f"? ({type(e).__name__})"
    from importlib.metadata import PackageNotFoundError, version  # no import of the packages
    for mod, dist in (("diffusers", "diffusers"), ("transformers", "transformers"),
                      ("accelerate", "accelerate"), ("huggingface_hub", "huggingface_hub"),
                      ("safetensors", "safetensors"), ("mpi4py", "mpi4py"), ("h5py", "h5py"),
                      ("numpy", "numpy"), ("sklearn", "scikit-learn"), ("submitit", "submitit"),
                      ("PIL", "pillow"), ("matplotlib", "matplotlib")):
        try:
            info[mod] = version(dist)
        except PackageNotFoundError:
            info[mod] = "MISSING"
    Path(a.out).write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-arrays"); p.add_argument("out"); p.add_argument("--n", type=int, default=4000)
    p.add_argument("--test", type=int, default=1000); p.add_argument("--hw", type=int, default=32)
    p = sub.add_parser("make-synth"); p.add_argument("out"); p.add_argument("--n", type=int, default=100000)
    p.add_argument("--hw", type=int, default=32)
    p = sub.add_parser("check-synth"); p.add_argument("file"); p.add_argument("--out", required=True)
    p.add_argument("--compare"); p.add_argument("--log")
    p = sub.add_parser("probes"); p.add_argument("--out", required=True); p.add_argument("--device", default="cuda")
    p = sub.add_parser("compare-weights"); p.add_argument("a"); p.add_argument("b"); p.add_argument("--out", required=True)
    p = sub.add_parser("check-reuse"); p.add_argument("log"); p.add_argument("--out", required=True)
    p = sub.add_parser("env-info"); p.add_argument("--out", required=True)
    p = sub.add_parser("summarize"); p.add_argument("res"); p.add_argument("--dry", action="store_true")
    a = ap.parse_args()
    {"make-arrays": make_arrays, "make-synth": make_synth, "check-synth": check_synth,
     "probes": probes, "compare-weights": compare_weights, "check-reuse": check_reuse,
     "env-info": env_info, "summarize": summarize}[a.cmd](a)


if __name__ == "__main__":
    main()
PYEOF
export H="$PY $RES/suite_helpers.py"

# ---- sizes (the CPU dry run only checks the plumbing) ---------------------------------------------
# the dry run: a few samples per step, short sampling and one epoch; generation in blocks of
# 8/16 (on CPU a block is 64 samples by default, padded); the 224-px set is the 32-px one
if [ "$DRY" = 1 ]; then
  N_EMB=16; N_TINY=8; N_ARR=128; N_TEST=64; N32=128; B_BIG=64; B_SMALL=32; B224=64; EPOCHS=1
  TINY_GEN="gen.batch_size=8 gen.micro_batch=8"; EMB_GEN="gen.steps=4 gen.batch_size=16 gen.micro_batch=16"
  RANKS=2,3; EX_RANKS=2; REPS=1; SMALL_FL="fl.rounds=1 fl.clients_per_round=2"; SMALL_SCALE="fl.rounds=2 fl.local_epochs=1"
  BENCH_PRE="--device cpu --tiny"; FL_ROUNDS=2; RUN_METHODS="run.methods=[gptfl]"; RUN_RANKS=2
  BIG_CFG=$RES/arr32.yaml; BIG_SYN=$RES/syn32.h5
else
  N_EMB=4096; N_TINY=200; N_ARR=4000; N_TEST=1000; N32=100000; N224=10000; HW_BIG=224; B_BIG=1024; B_SMALL=128; B224=256
  EPOCHS=2; TINY_GEN="gen.batch_size=64"; EMB_GEN=""
  RANKS=2,4,8,16; EX_RANKS=$RANKS; REPS=5; SMALL_FL=""; SMALL_SCALE="fl.rounds=6"
  BENCH_PRE="--batch 128,1024 --n 32768 --epochs 2"; FL_ROUNDS=5; RUN_RANKS=3
  RUN_METHODS="run.methods=[gptfl,fedavg,synthetic_only]"
  BIG_CFG=$RES/arrbig.yaml; BIG_SYN=$RES/synbig.h5
fi
export N_EMB N_TINY N_ARR N_TEST N32 N224 HW_BIG B_BIG B_SMALL B224 EPOCHS TINY_GEN EMB_GEN FL_ROUNDS RUN_METHODS \
  BENCH_PRE RUN_RANKS

# ---- step bodies (functions, so that `timeout` can run them) ------------------------------------
env_info() {
  $H env-info --out "$LOG/env.json"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$MPIEXEC" --version 2>&1 | head -2
  nproc; grep -m1 "model name" /proc/cpuinfo; free -g | head -2; df -h /tmp /dev/shm | tail -2
}
mpi_probe() {  # 2 ranks: which MPI, binding, one 47 MB Allreduce
  $MP -n 2 "$PY" -m mpi4py -c "
from mpi4py import MPI; import numpy as np, os, time
c = MPI.COMM_WORLD; b = np.ones(11_700_000, np.float32); c.Allreduce(MPI.IN_PLACE, b)
t = time.perf_counter(); c.Allreduce(MPI.IN_PLACE, b); dt = time.perf_counter() - t
if c.rank == 0: print('ok', b[0] == 4.0, 'allreduce 47MB %.4fs' % dt, 'affinity', len(os.sched_getaffinity(0)), MPI.Get_library_version().strip(chr(0)).splitlines()[0])"
}
prep_data() {
  $GP prepare configs/digits.yaml --out "$RES/data-digits" &&
  $H make-arrays "$RES/arr32.npz" --n "$N_ARR" --test "$N_TEST" --hw 32 &&
  cat > "$RES/arr32.yaml" <<EOF
run: {seed: 0}
data: {source: arrays, root: $RES/arr32.npz, dir: $RES/data-arr32, num_clients: 8, partition: iid}
model: {name: resnet18}
fl: {rounds: 3, clients_per_round: 8, batch_size: 64, client_lr: 0.05, eval_every: 1, checkpoint_every: 100}
pretrain: {epochs: 2, batch_size: $B_BIG, lr: 0.002}
EOF
  $GP prepare "$RES/arr32.yaml" --out "$RES/data-arr32" &&
  $H make-synth "$RES/syn32.h5" --n "$N32" --hw 32 &&
  if [ "$DRY" != 1 ]; then
    $H make-arrays "$RES/arrbig.npz" --n 400 --test 200 --hw "$HW_BIG" &&
    sed -e "s#arr32.npz#arrbig.npz#; s#data-arr32#data-arrbig#" "$RES/arr32.yaml" > "$RES/arrbig.yaml" &&
    $GP prepare "$RES/arrbig.yaml" --out "$RES/data-arrbig" &&
    $H make-synth "$RES/synbig.h5" --n "$N224" --hw "$HW_BIG"
  fi &&
  "$PY" -c "import sys; sys.path.insert(0, 'tests'); from tiny_sd import build_tiny_sd; print(build_tiny_sd('$RES/tiny-sd', size=32))" &&
  touch "$RES/.prep-done"
}
# A: tiny SD (random weights) through the real CLI; guidance [0.5,3]: some rows without CFG, the
# rest per-row guidance (RowGuidance); 200 samples = 3 full blocks of 64 + a padded tail block
synth_tiny() {  # synth_tiny NAME EXTRA_OVERRIDES...
  local name=$1; shift
  $GP synthesize configs/digits.yaml data.dir="$RES/data-digits" gen.generator="$RES/tiny-sd" \
    gen.count="$N_TINY" gen.steps=4 "gen.guidance=[0.5,3]" $TINY_GEN run.device="$DEV" "$@" --out "$RES/$name" 2>&1
  local rc=$?
  [ -f "$RES/$name/synthetic.h5" ] && $H check-synth "$RES/$name/synthetic.h5" --out "$LOG/$name.json" \
    --log "$LOG/$name.log" ${CMP:+--compare "$CMP"}
  grep -c "did not apply the per-row\|per-row guidance not supported" "$LOG/$name.log" | sed 's/^/row-guidance fallback warnings: /'
  return $rc
}
synth_emb() {  # synth_emb NAME DEVICE
  $GP synthesize configs/digits.yaml data.dir="$RES/data-digits" \
    gen.generator="$REPO/gptfl_hpc/assets/digits-generator" gen.count="$N_EMB" $EMB_GEN run.device="$2" \
    --out "$RES/$1" 2>&1
  local rc=$?
  [ -f "$RES/$1/synthetic.h5" ] && $H check-synth "$RES/$1/synthetic.h5" --out "$LOG/$1.json" --log "$LOG/$1.log" ${CMP:+--compare "$CMP"}
  return $rc
}
pretrain_run() {  # pretrain_run NAME CONFIG SYNTHETIC OVERRIDES...
  local name=$1 cfg=$2 syn=$3; shift 3
  GPTFL_LOG_LEVEL=INFO $GP pretrain "$cfg" --synthetic "$syn" run.device="$DEV" "$@" --out "$RES/$name" 2>&1
}
bench_pretrain() {
  # shellcheck disable=SC2086  # word splitting of the option list on purpose
  "$PY" benchmarks/bench_pretrain.py $BENCH_PRE --json "$LOG/bench_pretrain.json"
}
fl_run() {  # fl_run NAME RANKS CONFIG OVERRIDES...
  local name=$1 n=$2 cfg=$3; shift 3
  $MP -n "$n" "$PY" -m mpi4py -m gptfl_hpc federate "$cfg" "$@" --out "$RES/$name" 2>&1
}
run_store() {  # run_store NAME [METHODS]: the whole pipeline on 3 ranks (2 in the dry run; the
  # shipped digits generator: no generator training), the server stages in the store $RES/store
  $MP -n "$RUN_RANKS" "$PY" -m mpi4py -m gptfl_hpc run configs/tiny.yaml run.store="$RES/store" \
    gen.generator="$REPO/gptfl_hpc/assets/digits-generator" gen.count=128 "${2:-$RUN_METHODS}" \
    run.device="$DEV" --out "$RES/$1" 2>&1
}
run_reuse() {  # the same request again into a new --out (only the synthetic-only method, which
  # needs no FL): run.methods changes no stage's request, so the stored stages are reused
  run_store e-run-reuse "run.methods=[synthetic_only]" > "$LOG/e-run-reuse.run.log" 2>&1; local rc=$?
  cat "$LOG/e-run-reuse.run.log"
  $H check-reuse "$LOG/e-run-reuse.run.log" --out "$LOG/e-run-reuse.json" && return $rc
}
fl_rerun() {  # the same GPU federate again: are GPU runs bitwise reproducible?
  fl_run x-fl-rerun 3 configs/digits.yaml data.dir="$RES/data-digits" fl.rounds="$FL_ROUNDS" run.device="$DEV" &&
  $H compare-weights "$RES/e-fl-digits-cuda/final.safetensors" "$RES/x-fl-rerun/final.safetensors" --out "$LOG/x-fl-rerun.json"
}
two_servers() {  # 2 server ranks on 1 GPU must be refused up front (one line); on CPU they run
  env GPTFL_LOG_LEVEL=INFO $MP -n 2 "$PY" -m mpi4py -m gptfl_hpc synthesize configs/digits.yaml \
    data.dir="$RES/data-digits" gen.generator="$REPO/gptfl_hpc/assets/digits-generator" gen.count=512 \
    run.server_processes=2 run.device="$DEV" --out "$RES/x-2servers-1gpu" 2>&1; local rc=$?
  if [ "$DEV" = cuda ]; then  # (the step writes this function's output to its log)
    [ $rc -ne 0 ] && grep -q "would share GPU" "$LOG/x-2servers-1gpu.log" && return 0
    return 1
  fi
  return $rc
}
export -f env_info mpi_probe prep_data synth_tiny synth_emb pretrain_run bench_pretrain fl_run run_store \
  run_reuse fl_rerun two_servers

# ---- run -------------------------------------------------------------------------------------
say "gptfl-hpc GPU suite in $REPO -> $RES (budget ${BUDGET}s, device $DEV${ONLY:+, only $ONLY})"
SMI_PID=
if [ "$DEV" = cuda ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv,noheader,nounits \
    -lms 500 >> "$LOG/nvsmi.csv" 2>/dev/null & SMI_PID=$!
fi
trap '[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null' EXIT

step env 40 0 env_info
step mpi-probe 40 0 mpi_probe
if [ -n "$ONLY" ] && [ -f "$RES/.prep-done" ]; then say "prep: kept from the earlier run"; else
  ONLY_SAVED=$ONLY; ONLY=; step prep 150 40 prep_data; ONLY=$ONLY_SAVED; fi
# A: smoke
step a-tinysd-fp16 90 40 synth_tiny a-tinysd-fp16
CMP=$RES/a-tinysd-fp16/synthetic.h5 gpu_step a-tinysd-fp32 90 40 synth_tiny a-tinysd-fp32 gen.dtype=fp32
step a-emb-cpu 90 40 synth_emb a-emb-cpu cpu
CMP=$RES/a-emb-cpu/synthetic.h5 gpu_step a-emb-cuda 90 30 synth_emb a-emb-cuda "$DEV"
# C: pretraining throughput (pretrained.json: img/s per epoch, data path); step vs ceiling
step c-pre32-b1024 120 40 pretrain_run c-pre32-b1024 "$RES/arr32.yaml" "$RES/syn32.h5" pretrain.batch_size="$B_BIG" pretrain.epochs="$EPOCHS"
gpu_step c-pre32-b128 90 40 pretrain_run c-pre32-b128 "$RES/arr32.yaml" "$RES/syn32.h5" pretrain.batch_size="$B_SMALL" pretrain.epochs=1
gpu_step c-pre224-device 120 45 pretrain_run c-pre224-device "$BIG_CFG" "$BIG_SYN" pretrain.batch_size="$B224" pretrain.epochs=1 pretrain.data_path=device
step c-pre224-stream 120 45 pretrain_run c-pre224-stream "$BIG_CFG" "$BIG_SYN" pretrain.batch_size="$B224" pretrain.epochs=1 pretrain.data_path=stream
step c-bench 150 60 bench_pretrain
# E: FL on the GPU (3 ranks share the one GPU) vs the CPU; resnet18 from the pretrained weights;
# the whole pipeline with a shared stage store, twice
step e-fl-digits-cuda 90 40 fl_run e-fl-digits-cuda 3 configs/digits.yaml data.dir="$RES/data-digits" fl.rounds="$FL_ROUNDS" run.device="$DEV"
gpu_step e-fl-digits-cpu 90 40 fl_run e-fl-digits-cpu 3 configs/digits.yaml data.dir="$RES/data-digits" fl.rounds="$FL_ROUNDS" run.device=cpu
INIT=$RES/c-pre32-b1024/pretrained.safetensors; [ -f "$INIT" ] && INIT="fl.init=$INIT" || INIT="fl.init=random"
gpu_step e-fl-r18-cuda 120 45 fl_run e-fl-r18-cuda 3 "$RES/arr32.yaml" "$INIT" run.device="$DEV" $SMALL_FL
rm -rf "$RES/store"
step e-run-store 150 60 run_store e-run-store
step e-run-reuse 90 30 run_reuse
# F: probes
step f-probes 90 40 $H probes --out "$LOG/probes.json" --device "$DEV"
# B: synthesis benchmark (eager; the compiled cases are optional below)
if [ "$DEV" = cuda ]; then
  step b-synth-eager 130 100 "$PY" benchmarks/bench_synthesis.py --quick --compile off --time-budget 90 --json "$LOG/bench_synthesis.json"
else
  step b-synth-eager 150 60 "$PY" benchmarks/bench_synthesis.py --device cpu --tiny --compile off --repeats 1 --json "$LOG/bench_synthesis.json"
fi
# D: 16-core CPU numbers (no GPU involved: run.device=cpu)
step d-exchange 120 60 "$PY" benchmarks/bench_exchange.py --ranks "$EX_RANKS" --reps "$REPS" --timeout 120 --json "$LOG/bench_exchange.json"
step d-weak 150 60 $GP scale configs/scaling.yaml --out "$RES/d-weak" --ranks "$RANKS" --mode weak --timeout 90 run.device=cpu run.threads=1 $SMALL_SCALE
# X: optional, only with budget left
gpu_step x-fl-rerun 60 30 fl_rerun
[ "$DEV" = cuda ] && TORCH_LOGS=recompiles,graph_breaks CMP=$RES/a-tinysd-fp16/synthetic.h5 \
  step x-compile 150 120 synth_tiny x-compile gen.compile=true
gpu_step x-2servers-1gpu 90 60 two_servers
gpu_step x-fl-round 240 200 "$PY" benchmarks/bench_fl_round.py --no-pfl --shapes cifar --procs 2,4,8 \
  --rounds 5 --warmup 2 --workdir "$RES/x-fl-round" --json "$LOG/bench_fl_round.json"
gpu_step b-synth-compiled 300 240 "$PY" benchmarks/bench_synthesis.py --quick --compile on \
  --time-budget 200 --compile-reserve 150 --json "$LOG/bench_synthesis_compiled.json"

# ---- summary -----------------------------------------------------------------------------------
[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null; SMI_PID=
DRYFLAG=; [ "$DRY" = 1 ] && DRYFLAG=--dry
$H summarize "$RES" $DRYFLAG > "$LOG/summary.out" 2>&1 || { echo "summary failed"; FAILED=1; }
tar czf "$RES/gpu-suite-logs.tar.gz" -C "$RES" logs summary.md 2>/dev/null
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$RES/summary.md" "$RES/gpu-suite-logs.tar.gz" "$OUT/" 2>/dev/null
  for f in "$LOG/bench_pretrain.json" "$RES"/d-weak/scaling.md "$RES"/d-weak/scaling.png; do [ -f "$f" ] && cp "$f" "$OUT/"; done
fi
say "done in $(( $(date +%s) - T0 ))s"
cat "$LOG/summary.out"
exit $FAILED
