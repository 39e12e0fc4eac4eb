"""Benchmark: one FL round's model exchange for a ResNet-18-sized model, side by side.

    python benchmarks/bench_exchange.py --ranks 2,4,8,16 [--reps 10] [--json out.json]

For each rank count it launches ``mpiexec -n R python -m mpi4py benchmarks/bench_exchange.py
--worker`` and measures, in the same MPI job and on the same buffers:

- ``gptfl``: gptfl-hpc's exchange with its default ``fl.sync=replicated``: ONE in-place
  ``Allreduce`` of the flat buffer that the model's parameters are views of (+ the statistics
  slots), through ``gptfl_hpc.parallel.comm`` (sleepy wait for peers, then the collective);
- ``gptfl_bcast``: the ``fl.sync=bcast`` variant (Allreduce, server step on rank 0, Bcast);
- ``raw``: ``Allreduce(IN_PLACE)`` of a preallocated float32 buffer of the same size: the floor;
- ``flat``: copy the tensors into a contiguous buffer, Allreduce, copy back (docs/benchmarks.md);
- ``easyfl``: the reference simulator's pattern: rank 0 sends the pickled state_dict to each
  client rank in turn, each sends a pickled dict back, rank 0 sums per key;
- ``scaffold`` / ``scaffold_exact``: SCAFFOLD's round exchange, the engine's RoundBuffer with
  the control-variate part (one more vector the size of the parameters) packed and reduced
  through ``gptfl_hpc.parallel.comm`` in one Allreduce, float32 and the default exact int64
  encoding, against ``raw2x`` / ``raw2x_i64``: a raw ``Allreduce(IN_PLACE)`` of a preallocated
  buffer of the same doubled size and dtype (the target: <= 1.1x).

Each timing is the max over ranks of one exchange, median over --reps repetitions after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def worker(reps: int) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from gptfl_hpc.config import ModelConfig
    from gptfl_hpc.fl.aggregate import N_STATS, RoundBuffer
    from gptfl_hpc.fl.params import FlatModel, host_buffer
    from gptfl_hpc.parallel.comm import get_comm
    from gptfl_hpc.train.models import build_model

    torch.set_num_threads(1)
    comm = get_comm()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    torch.manual_seed(0)
    # torchvision resnet18 architecture with 1000 classes: 11,689,512 parameters (46.8 MB)
    model = build_model(ModelConfig(name="resnet18"), (32, 32, 3), 1000)
    plain = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    flat_model = FlatModel(model)
    n = flat_model.numel
    acc = host_buffer(n + N_STATS + size)  # the engine's buffer: delta + statistics slots
    acc_np = acc.numpy()
    raw = np.zeros(n, dtype=np.float32)
    copybuf = np.zeros(n, dtype=np.float32)
    # SCAFFOLD: [model | control variates (the parameters) | statistics] in one buffer
    n_params = flat_model.num_params
    sc32 = RoundBuffer(n, size, "float32", extra=n_params)
    sc64 = RoundBuffer(n, size, "exact", extra=n_params)
    raw2 = np.zeros(n + n_params, dtype=np.float32)
    raw2_64 = np.zeros(n + n_params, dtype=np.int64)

    def scaffold():
        comm.allreduce_sum_(sc32.pack(rank, 0.0))

    def scaffold_exact():
        comm.allreduce_sum_(sc64.pack(rank, 0.0))

    def raw2x():
        world.Allreduce(MPI.IN_PLACE, raw2, op=MPI.SUM)

    def raw2x_i64():
        world.Allreduce(MPI.IN_PLACE, raw2_64, op=MPI.SUM)

    def gptfl():
        comm.allreduce_sum_(acc_np)

    def gptfl_bcast():
        comm.allreduce_sum_(acc_np)
        if rank == 0:
            flat_model.flat.add_(acc[:n], alpha=1.0)
        comm.bcast_(flat_model.numpy())

    def raw_allreduce():
        world.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)

    def flat_copy():
        off = 0
        for t in plain.values():
            copybuf[off:off + t.numel()] = t.numpy().reshape(-1)
            off += t.numel()
        world.Allreduce(MPI.IN_PLACE, copybuf, op=MPI.SUM)
        off = 0
        for t in plain.values():
            t.numpy().reshape(-1)[:] = copybuf[off:off + t.numel()]
            off += t.numel()

    def easyfl():
        if rank == 0:
            total = None
            for r in range(1, size):
                world.send(plain, dest=r, tag=1)
            for r in range(1, size):
                got = world.recv(source=r, tag=2)
                if total is None:
                    total = {k: v.clone() for k, v in got.items()}
                else:
                    for k in total:
                        total[k] += got[k]
        else:
            got = world.recv(source=0, tag=1)
            world.send(got, dest=0, tag=2)

    methods = [("raw", raw_allreduce), ("gptfl", gptfl), ("gptfl_bcast", gptfl_bcast),
               ("flat", flat_copy), ("easyfl", easyfl), ("raw2x", raw2x),
               ("scaffold", scaffold), ("raw2x_i64", raw2x_i64),
               ("scaffold_exact", scaffold_exact)]
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    for i in range(reps + 2):  # interleaved, so drifting machine load hits every method alike
        for name, fn in methods:
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            dt = np.array([time.perf_counter() - t0])
            world.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)
            if i >= 2:
                times[name].append(float(dt[0]))
    results = {name: float(np.median(v)) for name, v in times.items()}
    if rank == 0:
        print("RESULT " + json.dumps({"ranks": size, "numel": n, "mb": n * 4 / 1e6,
                                      "scaffold_numel": int(sc32.host.size), **results}),
              flush=True)


def driver(args: argparse.Namespace) -> None:
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    env.setdefault("PRTE_MCA_hwloc_default_binding_policy", "none")
    env.setdefault("OMP_NUM_THREADS", "1")
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    if not Path(mpiexec).exists():
        mpiexec = "mpiexec"
    rows = []
    for r in [int(x) for x in args.ranks.split(",")]:
        cmd = [mpiexec, "-n", str(r), sys.executable, "-m", "mpi4py", __file__, "--worker",
               "--reps", str(args.reps)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            sys.exit(f"ranks {r}: failed (rc {p.returncode})\n{p.stderr[-2000:]}")
        rows.append(json.loads(line[0][7:]))
        print(f"ranks {r}: done", file=sys.stderr, flush=True)
    cores = os.cpu_count()
    print(f"\nModel exchange per round, ResNet-18-sized ({rows[0]['numel']:,} float32 = "
          f"{rows[0]['mb']:.1f} MB), {platform.node()} ({cores} cores), median of {args.reps}\n")
    print("| ranks | raw s | gptfl s | gptfl/raw | gptfl+Bcast s | flat (copy) s | easyfl s | "
          "easyfl/gptfl | flat/raw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['ranks']} | {x['raw']:.4f} | {x['gptfl']:.4f} | {x['gptfl'] / x['raw']:.2f}x "
              f"| {x['gptfl_bcast']:.4f} | {x['flat']:.4f} | {x['easyfl']:.4f} | "
              f"{x['easyfl'] / x['gptfl']:.1f}x | {x['flat'] / x['raw']:.2f}x |")
    x = rows[0]
    print(f"\nSCAFFOLD's round exchange: one Allreduce of model + control variates + statistics "
          f"({x['scaffold_numel']:,} elements: {x['scaffold_numel'] * 4 / 1e6:.1f} MB float32, "
          f"{x['scaffold_numel'] * 8 / 1e6:.1f} MB exact int64), vs a raw Allreduce of the same "
          "size and dtype (target <= 1.10x)\n")
    print("| ranks | raw 2x f32 s | scaffold f32 s | ratio | raw 2x i64 s | scaffold exact s | "
          "ratio |")
    print("|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['ranks']} | {x['raw2x']:.4f} | {x['scaffold']:.4f} | "
              f"{x['scaffold'] / x['raw2x']:.2f}x | {x['raw2x_i64']:.4f} | "
              f"{x['scaffold_exact']:.4f} | {x['scaffold_exact'] / x['raw2x_i64']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,4,8,16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.reps)
    else:
        driver(args)


if __name__ == "__main__":
    main()
