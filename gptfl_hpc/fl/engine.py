"""`gptfl-hpc federate`: the round loop. The only file that assigns roles.

Rank 0 is the server; ranks 1..N-1 are client workers, each owning a fixed set of FL clients
(placed by expected work) whose shards only it opens. With one process, rank 0 plays both roles
and runs the identical algorithm.

Per round (all ranks):
  Step 1. Every rank derives the round's sampled clients from (seed, round) — no message needed.
  Step 2. Each worker trains its sampled clients one after another from the global model and
          accumulates Σ n_k (w_k - w) plus statistics into ONE flat float32 buffer.
  Step 3. One in-place ``Allreduce(SUM)`` of that buffer (the server contributes zeros).
  Step 4. The server divides by Σ n_k, applies the server optimiser and ``Bcast``s the global
          flat buffer, which the model's parameters are views of (no copy).
  Step 5. The server evaluates, writes metrics and checkpoints while workers start the next round.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from gptfl_hpc import signals
from gptfl_hpc.errors import CommError, ConfigError, DataError, ModelError, Preempted
from gptfl_hpc.fl.client import train_client
from gptfl_hpc.fl.fedavg import ServerOptimizer, gradient_diversity
from gptfl_hpc.fl.params import FlatModel, host_buffer
from gptfl_hpc.fl.schedule import imbalance, place_clients, rounds_to_target, sample_clients
from gptfl_hpc.fsio import load_safetensors, save_safetensors, write_json, write_text
from gptfl_hpc.log import JsonlWriter
from gptfl_hpc.seeding import derive

log = logging.getLogger(__name__)

# statistics slots appended to the reduced buffer (after the model delta)
S_WEIGHT, S_SQNORM, S_LOSS, S_OK, S_DROPPED, S_STOP, S_RANKTIME = range(7)


def cores_per_rank(sharers: int) -> int:
    """torch threads of this process: the CPUs it may run on (the node when unbound, or what
    Slurm/MPI bound it to) shared fairly among the `sharers` working processes bound to the same
    CPUs. Without the division, ranks bound per socket (Open MPI's default above 2 ranks) would
    each start a socket's worth of threads."""
    from gptfl_hpc.parallel.comm import cpu_affinity

    return max(1, len(cpu_affinity()) // max(sharers, 1))


def setup_threads(run_cfg, comm) -> None:
    torch.set_num_threads(run_cfg.threads or cores_per_rank(comm.cpu_sharers))


def fl_device(run_cfg, comm) -> torch.device:
    """FL compute device of this rank: its node-local GPU when run.device allows, else CPU.

    The MPI buffers always stay in host memory (no CUDA-aware MPI assumed): a GPU worker copies
    the global weights in once per round and each client's update out once.
    """
    from gptfl_hpc.parallel.accel import want_cuda

    if not want_cuda(run_cfg.device):
        return torch.device("cpu")
    return torch.device("cuda", comm.local_rank % torch.cuda.device_count())


def config_fingerprint(cfg) -> str:
    import hashlib

    from gptfl_hpc.config import to_dict

    relevant = {k: to_dict(getattr(cfg, k)) for k in ("data", "model", "fl")}
    relevant["seed"] = cfg.run.seed
    relevant["fl"].pop("rounds")  # extending a run is a valid resume
    relevant["fl"].pop("checkpoint_every")
    relevant["fl"].pop("keep_checkpoints")
    relevant["fl"].pop("sync")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def ensure_data(cfg, data_dir: Path, comm):
    """Rank 0 prepares the shards if no complete manifest exists; everyone loads the manifest."""
    from gptfl_hpc.data.manifest import Manifest

    if comm.rank == 0 and not (data_dir / "manifest.json").exists():
        from gptfl_hpc.data.prepare import prepare_data

        log.info("no prepared data in %s: preparing it now", data_dir)
        prepare_data(cfg.data, seed=cfg.run.seed, out_dir=data_dir)
    comm.barrier()
    return Manifest.load(data_dir)


def load_init(flat: FlatModel, init: str) -> None:
    state, _ = load_safetensors(init)
    model_state = flat.model.state_dict()
    missing = sorted(set(model_state) - set(state))
    extra = sorted(set(state) - set(model_state))
    bad = [k for k in model_state if k in state and state[k].shape != model_state[k].shape]
    if missing or extra or bad:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape of {bad[0]} is {tuple(state[bad[0]].shape)}, model has "
                       f"{tuple(model_state[bad[0]].shape)}")
        raise ModelError(f"init checkpoint {init} does not fit the model: {detail}")
    flat.load_state_dict({k: v.to(model_state[k].dtype) for k, v in state.items()})


class Checkpoints:
    """out/ckpt/round-NNNNN/{model,server_opt}.safetensors + state.json (written last)."""

    def __init__(self, out_dir: Path, keep: int) -> None:
        self.root = out_dir / "ckpt"
        self.keep = keep

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("round-*") if (p / "state.json").is_file())

    def save(self, round_: int, model_state: dict, opt_state: dict, state: dict) -> Path:
        final = self.root / f"round-{round_:05d}"
        tmp = self.root / f".tmp-round-{round_:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors(model_state, tmp / "model.safetensors")
        save_safetensors(opt_state or {"_": torch.zeros(1)}, tmp / "server_opt.safetensors")
        write_json(tmp / "state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> tuple[dict, dict, dict] | None:
        done = self.complete()
        if not done:
            return None
        d = done[-1]
        model_state, _ = load_safetensors(d / "model.safetensors")
        opt_state, _ = load_safetensors(d / "server_opt.safetensors")
        return model_state, opt_state, json.loads((d / "state.json").read_text())


def federate(cfg, out_dir: str | Path, resume: bool = False) -> dict | None:
    """Run federated training; returns the summary on rank 0 (None on other ranks)."""
    from gptfl_hpc.data.shards import read_shard, set_access_rank
    from gptfl_hpc.parallel.comm import get_comm
    from gptfl_hpc.train.evaluate import evaluate
    from gptfl_hpc.train.models import build_model
    from gptfl_hpc.train.transforms import ImageTransform

    t_start = time.perf_counter()
    comm = get_comm()
    signals.install()
    setup_threads(cfg.run, comm)
    set_access_rank(comm.rank)
    fl, seed = cfg.fl, cfg.run.seed
    out_dir = Path(out_dir)
    data_dir = Path(cfg.data.dir) if cfg.data.dir else out_dir / "data"
    is_server = comm.rank == 0
    workers = list(range(1, comm.size)) if comm.size > 1 else [0]

    # ---- validation before any expensive work ------------------------------------------
    manifest = ensure_data(cfg, data_dir, comm)
    num_clients = len(manifest.clients)
    if fl.clients_per_round > num_clients:
        raise ConfigError(f"config key fl.clients_per_round: {fl.clients_per_round} > "
                          f"{num_clients} clients in {data_dir}; valid: 1..{num_clients}")
    if len(workers) > num_clients:
        raise CommError(f"{len(workers)} client ranks but only {num_clients} clients in "
                        f"{data_dir}: launch at most {num_clients + 1} ranks")
    sizes = [c.num_samples for c in manifest.clients]
    owner = place_clients(sizes, workers)
    mine = sorted(c for c, w in owner.items() if w == comm.rank)
    in_shape = tuple(manifest.input_shape)
    transform = ImageTransform(manifest.norm_mean, manifest.norm_std, in_shape, fl.augment)

    torch.manual_seed(derive(seed, "model-init"))
    global_model = FlatModel(build_model(cfg.model, in_shape, manifest.num_classes))
    if fl.init != "random":
        load_init(global_model, fl.init)

    # ---- data: each worker opens only its own clients' shards; the server only the test set
    dev = fl_device(cfg.run, comm)
    # where every rank runs (one small gather at start-up): logged and kept in summary.json
    placement = comm.allgather_json({"rank": comm.rank, "node": comm.node,
                                     "local_rank": comm.local_rank, "device": str(dev),
                                     "threads": torch.get_num_threads(), "clients": len(mine)})
    client_data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for cid in mine:
        images, labels, _ = read_shard(manifest.client_path(data_dir, cid),
                                       num_classes=manifest.num_classes, input_shape=in_shape)
        client_data[cid] = (torch.from_numpy(images).to(dev), torch.from_numpy(labels).to(dev))
    if is_server:
        test_x, test_y, _ = read_shard(manifest.test_path(data_dir),
                                       num_classes=manifest.num_classes, input_shape=in_shape)
        eval_tf = ImageTransform(manifest.norm_mean, manifest.norm_std, in_shape, False)
        # on a GPU the server evaluates a device copy; on the CPU the global model itself
        eval_model = global_model if dev.type == "cpu" else FlatModel(
            build_model(cfg.model, in_shape, manifest.num_classes).to(dev))
        test_x, test_y = torch.from_numpy(test_x).to(dev), torch.from_numpy(test_y).to(dev)

    # ---- state: fresh or resumed ---------------------------------------------------------
    fingerprint = config_fingerprint(cfg)
    server_opt = ServerOptimizer(fl.algorithm, global_model.numel, lr=fl.server_lr,
                                 momentum=fl.server_momentum, beta1=fl.server_beta1,
                                 beta2=fl.server_beta2, tau=fl.server_tau)
    ckpts = Checkpoints(out_dir, fl.keep_checkpoints)
    start_round, history, wall_before = 1, [], 0.0
    if is_server:
        resumed = ckpts.latest() if resume else None
        if resumed is not None:
            model_state, opt_state, state = resumed
            if state["fingerprint"] != fingerprint:
                raise ConfigError(f"--resume: checkpoint in {ckpts.root} was written with a "
                                  "different data/model/fl config; use a new --out")
            global_model.load_state_dict(model_state)
            if server_opt.state:
                server_opt.load_state_dict(opt_state)
            start_round, history = state["round"] + 1, state["history"]
            wall_before = state["wall_seconds"]
            log.info("resuming from %s (round %d)", ckpts.complete()[-1], state["round"])
        elif resume:
            log.info("--resume: no checkpoint in %s, starting fresh", ckpts.root)
        out_dir.mkdir(parents=True, exist_ok=True)
        from gptfl_hpc.config import dump_yaml

        write_text(out_dir / "config.yaml", dump_yaml(cfg))
        metrics = JsonlWriter(out_dir / "metrics.jsonl",
                              keep_through=start_round - 1 if start_round > 1 else None)
        log.info("federate: %d ranks (%d client workers), %d clients, %d per round, %s, "
                 "model %s (%d params, flat buffer %.1f MB), placement imbalance %.2f",
                 comm.size, len(workers), num_clients, fl.clients_per_round, fl.algorithm,
                 cfg.model.name, global_model.num_params, global_model.numel * 4 / 1e6,
                 imbalance(sizes, owner))
        nodes = sorted({p["node"] for p in placement})
        where = "; ".join(f"r{p['rank']}@{p['node']}/{p['local_rank']} {p['device']} "
                          f"x{p['threads']}" for p in placement)
        log.info("placement (%s): %d node(s) %s; %s", comm.library, len(nodes), ",".join(nodes),
                 where)
    start_round = int(comm.bcast_json(start_round))
    comm.bcast_(global_model.numpy())  # everyone starts from the server's weights

    # ---- buffers --------------------------------------------------------------------------
    n_model = global_model.numel
    n_params = global_model.num_params
    acc = host_buffer(n_model + S_RANKTIME + comm.size)
    acc_np = acc.numpy()
    work_model = (FlatModel(build_model(cfg.model, in_shape, manifest.num_classes).to(dev))
                  if mine else None)
    fault_nan = {int(x) for x in os.environ.get("GPTFL_FAULT_NAN_CLIENT", "").split(",") if x}
    fault_rank = os.environ.get("GPTFL_FAULT_RAISE_RANK")
    replicated = fl.sync == "replicated" and comm.size > 1
    if replicated:  # every rank steps the server optimiser: start from rank 0's state
        for t in server_opt.state.values():
            comm.bcast_(t.numpy())

    summary = None
    for rnd in range(start_round, fl.rounds + 1):
        t0 = time.perf_counter()
        # Step 1: the round's clients, identical on every rank
        sampled = sample_clients(seed, rnd, num_clients, fl.clients_per_round)
        acc.zero_()
        # Step 2: local training of this rank's sampled clients
        todo = [c for c in sampled if owner[c] == comm.rank]
        global_dev = global_model.flat.to(dev) if todo else None  # no copy on the CPU
        for cid in todo:
            if fault_rank is not None and int(fault_rank) == comm.rank:
                raise RuntimeError(f"injected fault on rank {comm.rank} (GPTFL_FAULT_RAISE_RANK)")
            work_model.flat.copy_(global_dev)
            x, y = client_data[cid]
            loss = train_client(work_model.model, work_model.params, global_dev[:n_params], x, y,
                                transform, fl, seed=seed, client_id=cid, round_=rnd)
            update = (work_model.flat - global_dev).cpu()
            if cid in fault_nan:
                update[0] = float("nan")
            n_k = float(len(y))
            if not (bool(torch.isfinite(update).all()) and np.isfinite(loss)):
                log.warning("round %d: client %d sent a non-finite update; dropped", rnd, cid)
                acc[n_model + S_DROPPED] += 1
                continue
            acc[:n_model].add_(update, alpha=n_k)
            acc[n_model + S_WEIGHT] += n_k
            acc[n_model + S_SQNORM] += n_k * n_k * float(update[:n_params].pow(2).sum())
            acc[n_model + S_LOSS] += n_k * loss
            acc[n_model + S_OK] += 1
        t1 = time.perf_counter()
        acc[n_model + S_RANKTIME + comm.rank] = t1 - t0
        if signals.stop_requested() or (is_server and signals.boundary()):
            acc[n_model + S_STOP] = 1.0
        # Step 3: one in-place Allreduce of the single flat buffer
        comm.allreduce_sum_(acc_np)
        t2 = time.perf_counter()
        wait_reduce, xfer_reduce = comm.last_wait, comm.last_xfer
        # Step 4: server step (rank 0, or every rank when replicated), then the weights
        # reach every rank: replicated ranks already hold them; otherwise one Bcast into the
        # flat buffer the parameters are views of (no copy)
        stats = acc[n_model:].tolist()
        weight = stats[S_WEIGHT]
        sum_sq = 0.0
        if replicated or is_server:
            if weight > 0:
                delta = acc[:n_model].div_(weight)
                sum_sq = float((delta[:n_params] * weight).pow(2).sum())
                server_opt.step(global_model.flat, delta)
            elif is_server:
                log.warning("round %d: no usable client update (all dropped); model unchanged",
                            rnd)
        t3 = time.perf_counter()
        resync = replicated and (rnd % fl.checkpoint_every == 0 or rnd == fl.rounds)
        if not replicated or resync:
            comm.bcast_(global_model.numpy())
            t_bcast = comm.last_xfer
        else:
            t_bcast = 0.0
        t4 = time.perf_counter()
        if not is_server:
            if stats[S_STOP] > 0:
                comm.barrier()  # until the server has saved this round's checkpoint
                raise Preempted(f"stopped after round {rnd} ({signals.reason()}); "
                                "the server saved a checkpoint")
            continue
        # Step 5: server-side evaluation, metrics, checkpoints
        rank_times = stats[S_RANKTIME:]
        worker_times = [rank_times[w] for w in workers]
        t_client = max(worker_times)
        record = {
            "round": rnd, "sampled_clients": sampled,
            "num_samples": int(weight), "clients_ok": int(stats[S_OK]),
            "clients_dropped": int(stats[S_DROPPED]),
            "train_loss": stats[S_LOSS] / weight if weight > 0 else None,
            "grad_diversity": gradient_diversity(stats[S_SQNORM], sum_sq) if weight > 0 else None,
            "t_client": t_client,
            "t_comm": xfer_reduce + t_bcast,
            "t_server": t3 - t2,
            "t_server_wait": wait_reduce,
            "t_idle": float(np.mean([t_client - t for t in worker_times])),
            "t_round": t4 - t0,
            "bytes_reduced": int(acc_np.nbytes), "bytes_broadcast": int(global_model.numel * 4),
        }
        if rnd % fl.eval_every == 0 or rnd == fl.rounds:
            te = time.perf_counter()
            if eval_model is not global_model:
                eval_model.flat.copy_(global_model.flat)
            m = evaluate(eval_model.model, test_x, test_y, eval_tf, batch_size=fl.eval_batch_size,
                         device=dev, num_classes=manifest.num_classes)
            record.update(test_accuracy=m["accuracy"], test_macro_f1=m["macro_f1"],
                          test_loss=m["loss"], t_eval=time.perf_counter() - te)
        else:
            record.update(test_accuracy=None, test_macro_f1=None, test_loss=None, t_eval=0.0)
        record["wall_seconds"] = wall_before + time.perf_counter() - t_start
        metrics.write(record)
        history.append([rnd, record["test_accuracy"]])
        _log_round(record, fl.rounds)
        stop = stats[S_STOP] > 0
        if rnd % fl.checkpoint_every == 0 or rnd == fl.rounds or stop:
            ckpts.save(rnd, global_model.state_dict(), server_opt.state_dict(),
                       {"round": rnd, "fingerprint": fingerprint, "history": history,
                        "wall_seconds": record["wall_seconds"], "world_size": comm.size})
        if stop:
            # non-zero exits end in MPI_Abort (python -m mpi4py): release the workers only
            # once the checkpoint is on disk
            comm.barrier()
            raise Preempted(f"stopped after round {rnd} ({signals.reason()}); checkpoint saved "
                            f"in {ckpts.root}; rerun with --resume")
    if is_server:
        summary = _finish(out_dir, global_model, history, fl, cfg, placement, comm.library,
                          wall_before + time.perf_counter() - t_start)
    comm.barrier()
    return summary


def _log_round(r: dict, total: int) -> None:
    acc = "   -  " if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:5.1f}%"
    log.info("round %d/%d acc %s loss %s | %d clients, %d samples | client %.2fs comm %.3fs "
             "server %.3fs eval %.2fs", r["round"], total, acc,
             "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}", r["clients_ok"],
             r["num_samples"], r["t_client"], r["t_comm"], r["t_server"], r["t_eval"])


def _finish(out_dir: Path, model: FlatModel, history: list, fl, cfg, placement: list,
            mpi_library: str, wall: float) -> dict:
    evaluated = [(r, a) for r, a in history if a is not None]
    if not evaluated:
        raise DataError("no evaluated round in the history")
    best_round, best = max(evaluated, key=lambda t: (t[1], -t[0]))
    summary = {
        "final_accuracy": evaluated[-1][1], "final_round": evaluated[-1][0],
        "best_accuracy": best, "best_round": best_round,
        "target_accuracy": fl.target_accuracy,
        "rounds_to_target": rounds_to_target(evaluated, fl.target_accuracy),
        "rounds": fl.rounds, "algorithm": fl.algorithm, "init": fl.init,
        "model": cfg.model.name, "world_size": len(placement), "wall_seconds": wall,
        "nodes": len({p["node"] for p in placement}), "placement": placement,
        "mpi_library": mpi_library,
        "accuracy_by_round": evaluated,
    }
    save_safetensors(model.state_dict(), out_dir / "final.safetensors",
                     metadata={"model": cfg.model.name, "rounds": str(fl.rounds)})
    write_json(out_dir / "summary.json", summary)
    log.info("done: final accuracy %.2f%%, best %.2f%% (round %d), rounds to %.0f%%: %s, %.1fs",
             100 * summary["final_accuracy"], 100 * best, best_round, 100 * fl.target_accuracy,
             summary["rounds_to_target"], wall)
    return summary
