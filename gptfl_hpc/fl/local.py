"""The local-fine-tuning-only control (`run.methods: [local_only]`): no federation at all.

Every client fine-tunes the init model (GPT-FL's pretrained model in `run`) on its own data only,
with the FL client procedure of every round in turn: for r = 1 .. fl.rounds it runs
:func:`gptfl_hpc.fl.client.train_client` for round r (fl.local_epochs epochs, the client lr of
round r, the same per-(client, round) randomness as in FL) on its own model, never averaging.
That is the budget of a client that took part in every FL round: fl.rounds x fl.local_epochs
epochs over its data (FL clients train only when sampled, on average rounds x
clients_per_round / num_clients times). FedProx's proximal term does not apply (there is no
global model).

Where things run: clients are pinned to the client ranks (the static placement) and fine-tune in
parallel; a client's shard is opened only by the rank that owns it. The server reads its test
split and broadcasts it to the client ranks once: it is the server's benchmark data, the same
set every FL method is scored on, not client data. Each client rank scores its clients' models
on it, and only the per-client test metrics travel back: one small float64 buffer with one row
per client, summed by the existing Allreduce (each row is written by exactly one rank). No
weights and no client data cross MPI. The server then reports the mean, standard deviation
(over clients, ddof=0), minimum and maximum of the clients' test accuracy and macro-F1.

The server sees each client's test score here, which FL never reveals: this is a control
experiment for the paper's comparison, not a deployment mode. The stage has no internal
checkpoint; a stop request is honoured when it ends (it is short next to FL).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptfl_hpc import faults, signals
from gptfl_hpc.errors import CommError
from gptfl_hpc.fsio import write_json

log = logging.getLogger(__name__)

COLUMNS = ("done", "num_samples", "test_accuracy", "test_macro_f1", "test_loss", "train_loss")


def spread(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max())}


def _broadcast_test(comm: Any, manifest: Any, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The server's test split on every rank (rank 0 reads it; one Bcast per array)."""
    if comm.rank == 0:
        x, y = manifest.read_test(data_dir)
        x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
        meta = {"x": [list(x.shape), x.dtype.str], "y": [list(y.shape), y.dtype.str]}
    else:
        meta = None
    meta = comm.bcast_json(meta)
    if comm.rank != 0:
        x = np.empty(meta["x"][0], dtype=np.dtype(meta["x"][1]))
        y = np.empty(meta["y"][0], dtype=np.dtype(meta["y"][1]))
    comm.bcast_(x)
    comm.bcast_(y)
    return x, y


def local_only(fl: Any, model_cfg: Any, run_cfg: Any, *, manifest: Any, data_dir: str | Path,
               out_dir: str | Path, init: str = "random", fingerprint: str = "",
               comm: Any = None) -> dict | None:
    """Fine-tune every client's model on its own data; the summary on rank 0 (else None).

    Longer than 80 lines on purpose: one straight pass (placement, each owned client from the
    init, evaluation, the gather of per-client accuracies to rank 0, the summary) that reads
    top to bottom; splitting it would only pass the same ten locals around."""
    from gptfl_hpc.data.shards import set_access_rank
    from gptfl_hpc.fl.client import train_client
    from gptfl_hpc.fl.engine import fl_device, load_init, threads_for
    from gptfl_hpc.fl.params import FlatModel
    from gptfl_hpc.fl.schedule import place_clients
    from gptfl_hpc.numerics import set_threads, training_kernels
    from gptfl_hpc.parallel.comm import get_comm
    from gptfl_hpc.seeding import derive
    from gptfl_hpc.train.evaluate import evaluate
    from gptfl_hpc.train.models import build_model
    from gptfl_hpc.train.transforms import make_transform

    t0 = time.perf_counter()
    comm = comm or get_comm()
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    signals.install()
    set_access_rank(comm.rank)
    faults.point("local_only", comm.rank)
    sizes = [c.num_samples for c in manifest.clients]
    workers = list(range(1, comm.size)) if comm.size > 1 else [0]
    if len(workers) > len(sizes):
        raise CommError(f"{len(workers)} client ranks but only {len(sizes)} clients in "
                        f"{data_dir}: launch at most {len(sizes) + 1} ranks")
    owner = place_clients(sizes, workers)
    mine = sorted(c for c, w in owner.items() if w == comm.rank)
    x_test, y_test = _broadcast_test(comm, manifest, data_dir)
    set_threads(threads_for(run_cfg, comm, "client"))
    dev = fl_device(run_cfg, comm)
    local_fl = dataclasses.replace(fl, algorithm="fedavg")  # no global model: no FedProx term
    in_shape = tuple(manifest.input_shape)
    train_tf = make_transform(manifest.kind, manifest.norm_mean, manifest.norm_std, in_shape,
                              fl.augment)
    eval_tf = make_transform(manifest.kind, manifest.norm_mean, manifest.norm_std, in_shape,
                             False)
    model_shape = tuple(train_tf.output_shape)
    rows = np.zeros((len(sizes), len(COLUMNS)), dtype=np.float64)
    with training_kernels(run_cfg.cpu_kernels, dev.type):
        xt, yt = torch.from_numpy(x_test).to(dev), torch.from_numpy(y_test).to(dev)
        for cid in mine:
            faults.point("client", comm.rank)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive(run_cfg.seed, "model-init"))
                flat = FlatModel(build_model(model_cfg, model_shape, manifest.num_classes))
            if init != "random":
                load_init(flat, init)
            if dev.type != "cpu":
                flat = FlatModel(flat.model.to(dev))  # the flat buffer on the device
            x, y = manifest.read_client(data_dir, cid)
            xd, yd = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
            loss = float("nan")
            for rnd in range(1, fl.rounds + 1):
                loss = train_client(flat.model, flat.params, flat.flat[:flat.num_params], xd, yd,
                                    train_tf, local_fl, seed=run_cfg.seed, client_id=cid,
                                    round_=rnd)
            m = evaluate(flat.model, xt, yt, eval_tf, batch_size=fl.eval_batch_size, device=dev,
                         num_classes=manifest.num_classes)
            rows[cid] = [1.0, len(y), m["accuracy"], m["macro_f1"], m["loss"], loss]
            log.debug("local_only: client %d: test accuracy %.4f", cid, m["accuracy"])
    # only the per-client metrics travel: each row is written by the one rank that owns it
    comm.allreduce_sum_(rows.reshape(-1))
    if comm.rank != 0:
        comm.barrier()
        return None
    if not np.all(rows[:, 0] == 1.0):
        raise RuntimeError("local_only: some clients were not trained exactly once")
    clients = [{"client": c, **{k: (int(v) if k == "num_samples" else float(v))
                                for k, v in zip(COLUMNS[1:], rows[c, 1:])}}
               for c in range(len(sizes))]
    summary = {
        "method": "local_only", "init": init, "fingerprint": fingerprint,
        "epochs_per_client": fl.rounds * fl.local_epochs, "rounds": fl.rounds,
        "local_epochs": fl.local_epochs, "num_clients": len(sizes), "world_size": comm.size,
        "test_accuracy": spread([c["test_accuracy"] for c in clients]),
        "test_macro_f1": spread([c["test_macro_f1"] for c in clients]),
        "final_accuracy": float(np.mean([c["test_accuracy"] for c in clients])),
        "clients": clients, "wall_seconds": time.perf_counter() - t0,
    }
    write_json(out_dir / "summary.json", summary)
    a = summary["test_accuracy"]
    log.info("local_only: %d clients, %d epochs each: test accuracy mean %.2f%% (std %.2f, min "
             "%.2f%%, max %.2f%%), %.1fs", len(sizes), summary["epochs_per_client"],
             100 * a["mean"], 100 * a["std"], 100 * a["min"], 100 * a["max"],
             summary["wall_seconds"])
    comm.barrier()
    return summary
