"""Where one FL client's time goes, phase by phase, next to a bare torch loop (CPU).

    python benchmarks/profile_fl_client.py --data WORKDIR/cifar/data     # bench_fl_round's data
    python benchmarks/profile_fl_client.py                              # random pixels, no reads

The attribution behind docs/benchmarks.md's "where the gap to pfl-research lies". For pfl's
CIFAR-10 shape (50 images of 32x32x3 per client, batch 10, one local epoch, SGD lr 0.1,
simple_cnn) it times, in one process and interleaved over --repeats passes of --clients
clients:

* ``bare``: the loop every simulator runs (pfl-research's included): the model reset from the
  global weights, a new SGD optimiser, the images as float tensors made once per client,
  forward / cross-entropy / backward / step per minibatch. No RNG streams, no bookkeeping.
* ``train``: our ``train_client`` on the same data (the global-weights copy included): the
  per-(client, round) generator and dropout stream, the transform applied once per client.
* ``book``: what the engine does with each trained model: the update (trained - global), its
  peak (finiteness and range), the exact int64 encoding added to the round buffer, and the
  squared norm (the gradient-diversity statistic).
* ``read``: ``ClientData.get`` of a client not in the cache: the HDF5 shard read and its
  checksum check (only with --data).
* ``concurrent`` (invariant kernels, more than one thread): the engine's
  ``run.concurrent_clients`` path, one client per thread, training and bookkeeping on the
  workers: wall time per client.

Each under ``run.cpu_kernels`` fast and invariant (the default), at --threads threads. Prints
milliseconds per client (median over the repeats) and the implied seconds per round of
--per-round clients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="a prepared data dir of the CIFAR shape "
                   "(bench_fl_round.py --workdir W: W/cifar/data); default random pixels")
    p.add_argument("--clients", type=int, default=20, help="clients per pass")
    p.add_argument("--repeats", type=int, default=5, help="interleaved passes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: cores)")
    p.add_argument("--per-round", type=int, default=50, help="clients per round (implied s)")
    p.add_argument("--kernels", default="fast,invariant")
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    import numpy as np
    import torch

    from gptfl_hpc.numerics import set_threads
    from gptfl_hpc.train.transforms import make_transform

    threads = args.threads or (os.cpu_count() or 1)
    set_threads(threads)
    fl = SimpleNamespace(client_lr_schedule="constant", client_lr=0.1, rounds=1,
                         body_lr_scale=1.0, client_optimizer="sgd", client_momentum=0.0,
                         client_weight_decay=0.0, batch_size=10, algorithm="fedavg",
                         prox_mu=0.0, local_epochs=1)
    data_obj = manifest = None
    if args.data:
        from gptfl_hpc.data.manifest import Manifest
        from gptfl_hpc.fl.engine import ClientData

        manifest = Manifest.load(args.data)
        mean, std = manifest.norm_mean, manifest.norm_std
        need = args.clients * (args.repeats + 1)
        if manifest.num_clients < need:
            raise SystemExit(f"--data {args.data}: {manifest.num_clients} clients, this "
                             f"profile reads {need} distinct ones; lower --clients/--repeats")
        data_obj = ClientData(manifest, Path(args.data), torch.device("cpu"), 1 << 62)
        clients = [data_obj.get(c) for c in range(args.clients)]
    else:
        rng = np.random.default_rng(0)
        mean, std = [0.5] * 3, [0.25] * 3
        clients = [(torch.from_numpy(rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)),
                    torch.from_numpy(rng.integers(0, 10, 50))) for _ in range(args.clients)]
    tf = make_transform("image", mean, std, (32, 32, 3), False)
    times: dict[tuple[str, str], list[float]] = {}

    def timed(key: tuple[str, str], fn) -> None:
        t = time.perf_counter()
        fn()
        times.setdefault(key, []).append((time.perf_counter() - t) / args.clients * 1e3)

    for kernels in args.kernels.split(","):
        _profile_mode(kernels, clients, tf, fl, args, timed, data_obj, manifest)

    cpu = _cpu_model()
    print(f"\nFL client phases, ms per client (median of {args.repeats}; {args.clients} "
          f"clients a pass), {threads} threads, torch {torch.__version__}, {cpu}, "
          f"{os.cpu_count()} cores; data: {args.data or 'random pixels (no read timed)'}\n")
    print("| kernels | bare loop | train_client | bookkeeping | shard read | ours total | "
          "ours / bare | implied s/round (ours; bare) |")
    print("|---|---|---|---|---|---|---|---|")
    for kernels in args.kernels.split(","):
        med = {ph: statistics.median(v) for (k, ph), v in times.items() if k == kernels}
        ours = med["train"] + med["book"] + med.get("read", 0.0)
        print(f"| {kernels} | {med['bare']:.2f} | {med['train']:.2f} | {med['book']:.2f} | "
              f"{med['read']:.2f} | " if "read" in med else
              f"| {kernels} | {med['bare']:.2f} | {med['train']:.2f} | {med['book']:.2f} | - | ",
              end="")
        print(f"{ours:.2f} | {ours / med['bare']:.2f}x | "
              f"{ours * args.per_round / 1e3:.3f}; {med['bare'] * args.per_round / 1e3:.3f} |")
    conc = {k: statistics.median(v) for (k, ph), v in times.items() if ph == "concurrent"}
    for kernels, ms in conc.items():
        read = statistics.median(times.get((kernels, "read"), [0.0]))
        print(f"\n{kernels}, run.concurrent_clients ({threads} clients at once, one thread "
              f"each, bookkeeping on the workers): {ms:.2f} ms of wall time per client, "
              f"{ms + read:.2f} with the shard read; implied "
              f"{(ms + read) * args.per_round / 1e3:.3f} s/round")
    return 0


def _profile_mode(kernels: str, clients: list, tf: Any, fl: Any, args: argparse.Namespace,
                  timed: Any, data_obj: Any, manifest: Any) -> None:
    """Time the four phases under one kernel mode (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from gptfl_hpc.fl.aggregate import RoundBuffer, peak_abs, sq_norm
    from gptfl_hpc.fl.client import train_client
    from gptfl_hpc.fl.params import FlatModel
    from gptfl_hpc.numerics import training_kernels
    from gptfl_hpc.train.models import build_model

    model_cfg = SimpleNamespace(name="simple_cnn", width=0, depth=0)
    with training_kernels(kernels):
        torch.manual_seed(0)
        work = FlatModel(build_model(model_cfg, (32, 32, 3), 10))
        global_flat = work.flat.clone()
        buf = RoundBuffer(work.numel, 1, "exact")
        update = buf.scratch("update", work.numel, torch.float32)
        host64 = buf.scratch("f64", work.numel, torch.float64)
        floats = [tf(x) for x, _ in clients]

        def bare() -> None:
            m = work.model
            for (_, y), xf in zip(clients, floats):
                work.flat.copy_(global_flat)
                m.train()
                opt = torch.optim.SGD(m.parameters(), lr=0.1)
                perm = torch.randperm(len(y))
                for s in range(0, len(y), 10):
                    i = perm[s:s + 10]
                    loss = F.cross_entropy(m(xf[i]), y[i])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

        def train() -> None:
            for cid, (x, y) in enumerate(clients):
                work.flat.copy_(global_flat)
                train_client(work.model, work.params, global_flat[:work.num_params], x, y,
                             tf, fl, seed=0, client_id=cid, round_=1)

        def book() -> None:
            for _ in clients:
                torch.sub(work.flat, global_flat, out=update)
                peak = peak_abs(update)
                assert buf.fits(peak, 0.02)
                buf.add_update(update, 0.02)
                sq_norm(update[:work.num_params], host64)

        def read(todo: list[int]) -> None:
            from gptfl_hpc.fl.engine import ClientData

            fresh = ClientData(manifest, Path(args.data), torch.device("cpu"), 1 << 62)
            for c in todo:
                fresh.get(c)

        conc = None
        if kernels == "invariant" and torch.get_num_threads() > 1:
            from gptfl_hpc.fl.concurrent import ConcurrentClients

            conc = ConcurrentClients(
                lambda: FlatModel(build_model(model_cfg, (32, 32, 3), 10)),
                torch.get_num_threads())

        def concurrent() -> None:
            """The engine's concurrent path: train + bookkeeping on each worker."""
            def job(slot, cid, x, y) -> float:
                st = slot.state
                if "acc" not in st:
                    st["acc"] = RoundBuffer(work.numel, 1, "exact")
                    st["u"] = st["acc"].scratch("update", work.numel, torch.float32)
                slot.model.flat.copy_(global_flat)
                loss = train_client(slot.model.model, slot.model.params,
                                    global_flat[:work.num_params], x, y, tf, fl, seed=0,
                                    client_id=cid, round_=1, own_dropout_stream=True)
                torch.sub(slot.model.flat, global_flat, out=st["u"])
                assert st["acc"].fits(peak_abs(st["u"]), 0.02)
                st["acc"].add_update(st["u"], 0.02)
                sq_norm(st["u"][:work.num_params],
                        st["acc"].scratch("f64", work.numel, torch.float64))
                return loss

            assert conc is not None
            for _ in conc.train(list(range(len(clients))), lambda c: clients[c], job):
                pass

        bare()
        train()  # warm-up
        if conc is not None:
            concurrent()
        ids = list(range(args.clients * (args.repeats + 1)))
        for r in range(args.repeats):
            timed((kernels, "bare"), bare)
            timed((kernels, "train"), train)
            timed((kernels, "book"), book)
            if conc is not None:
                timed((kernels, "concurrent"), concurrent)
            if data_obj is not None:  # clients this process has not read yet
                todo = ids[(r + 1) * args.clients:(r + 2) * args.clients]
                timed((kernels, "read"), lambda todo=todo: read(todo))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
