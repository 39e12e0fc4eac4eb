"""`gptfl-hpc federate`: the round loop. The only file that assigns roles.

Rank 0 is the server; ranks 1..N-1 are client workers. With one process, rank 0 plays both
roles and runs the identical algorithm. :func:`federate` is set-up, a short loop and the end of
the run; a round is :meth:`Federation.run_round`, and evaluation, metrics and checkpoints are
hooks the loop calls at the end of each round on the server (pfl-research's ``algorithm.run`` with
callbacks; torchtitan's ``Trainer.train``).

Per round (all ranks; ``fl.sync=replicated``, the default):
  Step 1. Every rank derives the round's sampled clients from (seed, round) and, with balanced
          placement, the same assignment of those clients to the client ranks: no message.
  Step 2. Each client rank trains its clients of the round one after another (or
          fl.vmap_clients at a time, fl/cohort.py) from the global model and adds their
          weighted updates (n_k / N) (w_k - w) plus statistics into ONE flat buffer
          (fl/aggregate.py; exact fixed point by default).
  Step 3. One in-place ``Allreduce(SUM)`` of that buffer (the server contributes zeros).
  Step 4. Every rank applies the same deterministic server optimiser step to the same reduced
          buffer, so the round costs exactly one collective; rank 0 re-broadcasts its weights at
          every checkpoint as a guard against drift. (``fl.sync=bcast``: rank 0 steps and
          ``Bcast``s the weights, one more collective, for heterogeneous nodes.)
  Step 5. The server evaluates, writes metrics and checkpoints while the workers start the next
          round.

SCAFFOLD (fl/scaffold.py) adds its clients' control-variate changes to the same buffer (one
Allreduce of about twice the model's size) and every rank updates the server control variate;
central DP (fl/dp.py) clips each client's update before it is encoded and adds the same noise on
every rank after the reduction. Neither needs one client's vector on the server: every part of
the buffer is a sum over clients, which is what secure aggregation provides.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptfl_hpc import faults, signals
from gptfl_hpc.errors import CommError, ConfigError, DataError, ModelError, Preempted
from gptfl_hpc.fl.aggregate import (
    N_STATS,
    S_DIVERGED,
    S_DROPPED,
    S_LOSS,
    S_OK,
    S_SQNORM,
    S_STOP,
    S_UNCLIPPED,
    S_WEIGHT,
    RoundBuffer,
    peak_abs,
    sq_norm,
)
from gptfl_hpc.fl.checkpoint import CheckpointPolicy, Checkpoints
from gptfl_hpc.fl.client import ControlVariates, train_client
from gptfl_hpc.fl.clientval import KEYS as CLIENT_VAL_KEYS
from gptfl_hpc.fl.clientval import ClientValidation, train_sizes
from gptfl_hpc.fl.cohort import CohortTrainer
from gptfl_hpc.fl.dp import DPState
from gptfl_hpc.fl.fedavg import ServerOptimizer, gradient_diversity
from gptfl_hpc.fl.params import FlatModel
from gptfl_hpc.fl.scaffold import Scaffold
from gptfl_hpc.fl.schedule import (
    assign_round,
    imbalance,
    place_clients,
    rounds_to_target,
    sample_clients,
)
from gptfl_hpc.fsio import load_safetensors, save_safetensors, write_json, write_text
from gptfl_hpc.log import JsonlWriter
from gptfl_hpc.numerics import set_threads
from gptfl_hpc.seeding import derive

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ placement


def threads_for(run_cfg: Any, comm: Any, role: str) -> int:
    """torch threads of this rank: ``run.threads``, else its share of the CPUs it may run on.

    Client ranks share their CPUs with the other *working* ranks bound to the same CPUs: the
    server sleeps in an Ibarrier while clients train, so its cores go to the clients (with one
    client rank on a 2-core node, that rank gets both). The server evaluates with its own fair
    share (the CPUs divided by all ranks on them). With ``run.cpu_kernels=invariant`` the thread
    count changes speed only, never the numbers.
    """
    from gptfl_hpc.parallel.comm import cpu_affinity

    if run_cfg.threads:
        return int(run_cfg.threads)
    cpus = len(cpu_affinity())
    sharers = list(getattr(comm, "sharers", [comm.rank]))
    if role == "client":
        working = [r for r in sharers if r != 0 or comm.size == 1]
        return max(1, cpus // max(1, len(working)))
    return max(1, cpus // max(1, len(sharers)))


def fl_device(run_cfg: Any, comm: Any) -> torch.device:
    """FL compute device of this rank: its node-local GPU when run.device allows, else CPU."""
    from gptfl_hpc.parallel.accel import rank_device

    return rank_device(run_cfg.device, comm)


def load_init(flat: FlatModel, init: str) -> None:
    """Load an init checkpoint into `flat`; it must fit the model and be finite."""
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
    nonfinite = [k for k, v in state.items()
                 if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ModelError(f"init checkpoint {init}: tensor {nonfinite[0]} has NaN/Inf values "
                         f"({len(nonfinite)} tensor(s)); valid: a finite checkpoint")
    flat.load_state_dict({k: v.to(model_state[k].dtype) for k, v in state.items()})


class ClientData:
    """The shards this rank trains on, read read-only when first needed and kept in an LRU
    cache of ``cache_bytes``. Only client ranks ever construct one: the server never opens a
    client shard, and no client data crosses MPI. With ``fl.client_val_fraction`` each client's
    rows are split once into its training part (``get``) and its held-out validation part
    (``get_val``, fl/clientval.py)."""

    def __init__(self, manifest: Any, data_dir: Path, device: torch.device,
                 cache_bytes: int, val_fraction: float = 0.0, seed: int = 0) -> None:
        self.manifest, self.data_dir, self.device = manifest, data_dir, device
        self.cache_bytes = cache_bytes
        self.val_fraction, self.seed = val_fraction, seed
        self._cache: OrderedDict[int, tuple[tuple[torch.Tensor, torch.Tensor],
                                            tuple[torch.Tensor, torch.Tensor] | None]] = \
            OrderedDict()
        self._sizes: dict[int, int] = {}
        self._bytes = 0

    def get(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client `cid`'s training rows (all its rows without a validation split)."""
        return self._load(cid)[0]

    def get_val(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client `cid`'s held-out validation rows."""
        val = self._load(cid)[1]
        if val is None:
            raise DataError(f"client {cid} holds out no validation rows")
        return val

    def _load(self, cid: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                       tuple[torch.Tensor, torch.Tensor] | None]:
        from gptfl_hpc.fl.clientval import split_rows

        if cid in self._cache:
            self._cache.move_to_end(cid)
            return self._cache[cid]
        x, y = self.manifest.read_client(self.data_dir, cid)
        size = x.nbytes + y.nbytes
        train_rows, val_rows = split_rows(len(y), self.val_fraction, self.seed, cid)
        if len(val_rows):
            val = (torch.from_numpy(x[val_rows]).to(self.device),
                   torch.from_numpy(y[val_rows]).to(self.device))
            x, y = x[train_rows], y[train_rows]
        item = ((torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)),
                val if len(val_rows) else None)
        while self._cache and self._bytes + size > self.cache_bytes:
            old, _ = self._cache.popitem(last=False)
            self._bytes -= self._sizes.pop(old)
        if size <= self.cache_bytes:
            self._cache[cid] = item
            self._sizes[cid] = size
            self._bytes += size
        return item


# ------------------------------------------------------------------------------ one round

Trained = tuple[int, float, float, torch.Tensor, ControlVariates | None]
"""A client trained in a round: (client, samples, mean loss, trained flat model, SCAFFOLD's
control variates)."""


@dataclass
class RoundResult:
    round: int
    sampled: list[int]
    stats: np.ndarray
    diversity_denominator: float
    t_client: float
    t_comm: float
    t_server: float
    t_server_wait: float
    t_round: float
    bytes_reduced: int
    t_times: list[float] = field(default_factory=list)
    private: bool = False
    """Central DP: the per-client statistics were not collected (fl/dp.py)."""
    dp: dict[str, Any] = field(default_factory=dict)

    @property
    def stop(self) -> bool:
        return self.stats[S_STOP] > 0


class Federation:
    """Everything a round needs, built once: data, model, buffers, optimiser state."""

    def __init__(self, fl: Any, model_cfg: Any, run_cfg: Any, *, manifest: Any, data_dir: Path,
                 comm: Any, init: str, device: torch.device, dp: Any = None) -> None:
        from gptfl_hpc.config import check_dp_algorithm
        from gptfl_hpc.fl import dp as dpmod
        from gptfl_hpc.parallel.comm import on_root
        from gptfl_hpc.train.models import build_model
        from gptfl_hpc.train.transforms import make_transform

        check_dp_algorithm(dp, fl)
        self.fl, self.run_cfg, self.comm, self.dev = fl, run_cfg, comm, device
        self.seed = run_cfg.seed
        self.manifest, self.data_dir = manifest, data_dir
        self.is_server = comm.rank == 0
        self.workers = list(range(1, comm.size)) if comm.size > 1 else [0]
        # the clients' training rows (fl.client_val_fraction holds some out: fl/clientval.py)
        self.sizes = train_sizes([c.num_samples for c in manifest.clients],
                                 fl.client_val_fraction)
        num_clients = len(self.sizes)
        if fl.clients_per_round > num_clients:
            raise ConfigError(f"config key fl.clients_per_round: {fl.clients_per_round} > "
                              f"{num_clients} clients in {data_dir}; valid: 1..{num_clients}")
        if len(self.workers) > num_clients:
            raise CommError(f"{len(self.workers)} client ranks but only {num_clients} clients in "
                            f"{data_dir}: launch at most {num_clients + 1} ranks")
        self.static_owner = place_clients(self.sizes, self.workers)
        self.placement = fl.placement
        if fl.algorithm == "scaffold" and fl.placement != "static":
            # a client's control variate lives on the rank that owns it: clients never move
            self.placement = "static"
            if self.is_server:
                log.info("fl.algorithm=scaffold: client control variates stay on the client's "
                         "rank, so clients are pinned to ranks (fl.placement static instead of "
                         "%s)", fl.placement)
        in_shape = tuple(manifest.input_shape)
        self.transform = make_transform(manifest.kind, manifest.norm_mean, manifest.norm_std,
                                        in_shape, fl.augment)
        model_shape = tuple(self.transform.output_shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive(self.seed, "model-init"))
            self.global_model = FlatModel(build_model(model_cfg, model_shape,
                                                      manifest.num_classes))
        if init != "random":
            load_init(self.global_model, init)
        self.n_model = self.global_model.numel
        self.n_params = self.global_model.num_params
        is_worker = comm.rank in self.workers
        self.work_model = (FlatModel(build_model(model_cfg, model_shape, manifest.num_classes)
                                     .to(device)) if is_worker else None)
        self.scaffold = (Scaffold(self.n_params, num_clients,
                                  {c for c, w in self.static_owner.items() if w == comm.rank})
                         if fl.algorithm == "scaffold" else None)
        self.dp = None
        if dp is not None and dp.enabled:
            z = float(on_root(comm, lambda: dpmod.resolve_noise_multiplier(dp, fl, num_clients)))
            self.dp = DPState(dp, fl, num_clients, self.seed, z)
        self.buffer = RoundBuffer(self.n_model, comm.size, fl.aggregation,
                                  extra=self.n_params if self.scaffold is not None else 0,
                                  device=device if is_worker else "cpu")
        self.server_opt = ServerOptimizer(
            "fedavg" if fl.algorithm == "scaffold" else fl.algorithm, self.n_model,
            lr=fl.server_lr, momentum=fl.server_momentum, beta1=fl.server_beta1,
            beta2=fl.server_beta2, tau=fl.server_tau)
        self.replicated = fl.sync == "replicated" and comm.size > 1
        cache = fl.client_cache_mb << 20 if self.placement == "balanced" else 1 << 62
        self.data = (ClientData(manifest, data_dir, device, cache, fl.client_val_fraction,
                                self.seed) if is_worker else None)
        if self.data is not None:  # every shard is checked before the first round
            if self.placement == "static":  # a rank's own shards, read (and verified) up front
                for cid in sorted(c for c, w in self.static_owner.items() if w == comm.rank):
                    self.data.get(cid)
            else:  # balanced: the client ranks share a cheap check of all shards
                me = self.workers.index(comm.rank)
                for cid in range(me, num_clients, len(self.workers)):
                    manifest.check_client(data_dir, cid)
        self.fault_nan = faults.nan_clients()
        self.cohort = self._cohort() if fl.vmap_clients and is_worker else None
        self.concurrent = None
        if is_worker and self.cohort is None:
            self.concurrent = self._concurrent(model_cfg, model_shape, manifest)
        self.client_val = ClientValidation(self) if fl.client_val_fraction > 0 else None

    # -------------------------------------------------------------------- state

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Rank 0's part of a checkpoint (the model, the server optimiser, and the algorithm
        state every rank holds alike: SCAFFOLD's c, DP's clip norm)."""
        out = {"model": self.global_model.state_dict(),
               "server_opt": self.server_opt.state_dict() or {"_": torch.zeros(1)}}
        server_state: dict[str, torch.Tensor] = {}
        if self.scaffold is not None:
            server_state["scaffold_c"] = self.scaffold.c.clone()
        if self.dp is not None:
            server_state.update(self.dp.state())
        if server_state:
            out["server_state"] = server_state
        return out

    @property
    def has_rank_state(self) -> bool:
        """Whether client ranks hold state of their own (SCAFFOLD's client control variates)."""
        return self.scaffold is not None

    def rank_state(self) -> dict[str, torch.Tensor]:
        assert self.scaffold is not None
        return self.scaffold.rank_state()

    def load_state(self, d: Path) -> None:
        self.global_model.load_state_dict(Checkpoints.load(d, "model"))
        if self.server_opt.state:
            self.server_opt.load_state_dict(Checkpoints.load(d, "server_opt"))
        if (self.scaffold is not None or self.dp is not None) and \
                Checkpoints.has(d, "server_state"):
            state = Checkpoints.load(d, "server_state")
            if self.scaffold is not None:
                self.scaffold.c.copy_(state["scaffold_c"])
            if self.dp is not None:
                self.dp.load(state)

    def load_rank_state(self, d: Path, state: dict[str, Any]) -> None:
        """A client rank takes its clients' control variates from every rank's saved file."""
        if self.scaffold is not None and self.comm.rank in self.workers:
            n = self.scaffold.load_rank_states(list(Checkpoints.rank_states(d, state)))
            log.debug("loaded %d client control variates from %s", n, d)

    def sync_from_server(self) -> None:
        """Everyone takes rank 0's weights (and, when replicated, its optimiser state) and the
        algorithm state every rank holds alike."""
        self.comm.bcast_(self.global_model.numpy())
        if self.replicated:
            for t in self.server_opt.state.values():
                self.comm.bcast_(t.numpy())
        self._sync_algorithm_state()

    def _sync_algorithm_state(self) -> None:
        if self.scaffold is not None:
            self.comm.bcast_(self.scaffold.c.numpy())
        if self.dp is not None:
            host = self.dp.host_state()
            self.comm.bcast_(host)
            self.dp.set_host_state(host)

    # -------------------------------------------------------------------- a round

    def assignment(self, sampled: list[int]) -> dict[int, int]:
        if self.placement == "balanced":
            return assign_round(sampled, self.sizes, self.fl.local_epochs, self.workers)
        return {c: self.static_owner[c] for c in sampled}

    def run_round(self, rnd: int) -> RoundResult:
        fl, comm, buf = self.fl, self.comm, self.buffer
        t0 = time.perf_counter()
        # Step 1: the round's clients and who trains them, identical on every rank
        sampled = sample_clients(self.seed, rnd, len(self.sizes), fl.clients_per_round)
        owner = self.assignment(sampled)
        total = float(sum(self.sizes[c] for c in sampled))
        buf.zero()
        # Step 2: local training of this rank's clients of the round
        todo = [c for c in sampled if owner[c] == comm.rank]
        if todo:
            self._train(rnd, todo, total)
        t1 = time.perf_counter()
        if signals.stop_requested() or (self.is_server and signals.boundary()):
            buf.add_stat(S_STOP, 1.0)
        # Step 3: one in-place Allreduce of the single flat buffer
        host = buf.pack(comm.rank, t1 - t0)
        comm.allreduce_sum_(host)
        t2 = time.perf_counter()
        wait_reduce, xfer_reduce = comm.last_wait, comm.last_xfer
        vec, stats = buf.unpack()
        # Step 4: server step (rank 0, or every rank when replicated)
        denominator = 0.0
        dp_info: dict[str, Any] = {}
        if self.scaffold is not None:  # every rank: c <- c + sum_k (c_k+ - c_k) / M
            self.scaffold.server_update(vec[self.n_model:self.n_model + self.n_params])
        if self.replicated or self.is_server:
            if self.is_server:
                faults.point("server", comm.rank)
            if self.dp is not None:
                # (sum_k clip(delta_k) + noise) / K: uniform weights, fixed denominator
                delta = self.dp.private_mean(vec[:self.n_model], rnd).float()
                self.server_opt.step(self.global_model.flat, delta)
            elif stats[S_WEIGHT] > 0:
                # the buffer holds sum_k (n_k / N) delta_k; dropped clients are re-weighted out
                delta = (vec[:self.n_model] * (total / stats[S_WEIGHT])).float()
                denominator = sq_norm(vec[:self.n_params])
                self.server_opt.step(self.global_model.flat, delta)
            elif self.is_server:
                log.warning("round %d: no usable client update (all dropped); model unchanged",
                            rnd)
        if self.dp is not None:  # every rank: the clip norm of the next round
            dp_info = {"dp_clip_norm": self.dp.clip_norm}
            dp_info["dp_unclipped_fraction"] = self.dp.update_clip_norm(stats[S_UNCLIPPED], rnd)
        t3 = time.perf_counter()
        policy = CheckpointPolicy(fl.checkpoint_every, fl.rounds)
        t_bcast = 0.0
        if not self.replicated and comm.size > 1 or \
                self.replicated and policy.should_save(rnd, stop=False):
            comm.bcast_(self.global_model.numpy())
            t_bcast = comm.last_xfer
            if self.replicated:  # the same guard for the state every rank updates
                self._sync_algorithm_state()
        rank_times = stats[N_STATS:].tolist()
        worker_times = [rank_times[w] for w in self.workers]
        return RoundResult(
            round=rnd, sampled=sampled, stats=stats, diversity_denominator=denominator,
            t_client=max(worker_times), t_comm=xfer_reduce + t_bcast, t_server=t3 - t2,
            t_server_wait=wait_reduce, t_round=time.perf_counter() - t0,
            bytes_reduced=int(host.nbytes), t_times=worker_times, private=self.dp is not None,
            dp=dp_info)

    def _get(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        faults.point("client", self.comm.rank)
        assert self.data is not None
        return self.data.get(cid)

    def _train_one(self, wm: FlatModel, cid: int, x: torch.Tensor, y: torch.Tensor, rnd: int,
                   global_dev: torch.Tensor) -> float:
        """One client on a concurrent worker (fl/concurrent.py): `wm` from the global model."""
        wm.flat.copy_(global_dev)
        return train_client(wm.model, wm.params, global_dev[:self.n_params], x, y,
                            self.transform, self.fl, seed=self.seed, client_id=cid, round_=rnd,
                            own_dropout_stream=True)

    def _train_concurrent(self, rnd: int, todo: list[int], total: float) -> None:
        """:meth:`_train` for concurrent workers with exact aggregation and no central DP: each
        worker also computes its client's update, checks and encodes it into the slot's own
        int64 accumulator (integer sums: the order cannot matter) and its squared norm, so
        the main thread only adds statistics, in client order, and the slots' sums once. The
        same verdicts, statistics and bits as :meth:`_train`."""
        buf = self.buffer
        global_dev = self.global_model.flat
        assert self.concurrent is not None

        def job(slot: Any, cid: int, x: torch.Tensor, y: torch.Tensor) -> tuple:
            st = slot.state
            if "acc" not in st:
                st["acc"] = RoundBuffer(self.n_model, 1, "exact")
                st["update"] = st["acc"].scratch("update", self.n_model, torch.float32)
            loss = self._train_one(slot.model, cid, x, y, rnd, global_dev)
            update = st["update"]
            torch.sub(slot.model.flat, global_dev, out=update)
            if cid in self.fault_nan:
                update[0] = float("nan")
            peak = peak_abs(update)
            if not (math.isfinite(peak) and np.isfinite(loss)):
                return loss, S_DROPPED, 0.0
            scale = len(y) / total
            if not buf.fits(peak, scale):
                return loss, S_DIVERGED, 0.0
            st["acc"].add_update(update, scale)
            st["used"] = True
            return loss, S_OK, sq_norm(update[:self.n_params],
                                       st["acc"].scratch("f64", self.n_model, torch.float64))

        for slot in self.concurrent.slots:
            if slot.state.get("used"):
                slot.state["acc"].zero()
                slot.state["used"] = False
        for cid, n_k, (loss, verdict, sqn), _ in self.concurrent.train(todo, self._get, job):
            if verdict == S_DROPPED:
                log.warning("round %d: client %d sent a non-finite update; dropped", rnd, cid)
                buf.add_stat(S_DROPPED, 1)
            elif verdict == S_DIVERGED:
                log.warning("round %d: client %d sent an update too large to aggregate "
                            "(diverged); dropped", rnd, cid)
                buf.add_stat(S_DIVERGED, 1)
            else:
                buf.add_stat(S_WEIGHT, n_k)
                buf.add_stat(S_OK, 1)
                buf.add_stat(S_SQNORM, (n_k / total) ** 2 * sqn)
                buf.add_stat(S_LOSS, n_k * loss)
        for slot in self.concurrent.slots:
            if slot.state.get("used"):
                buf.add_vector(slot.state["acc"]._vec)

    def _train(self, rnd: int, todo: list[int], total: float) -> None:
        """Train this rank's clients of the round; add their encoded updates to the buffer."""
        if self.concurrent is not None and len(todo) > 1 and self.buffer.exact and \
                self.dp is None and self.scaffold is None and self.dev.type == "cpu":
            self._train_concurrent(rnd, todo, total)
            return
        buf = self.buffer
        assert self.data is not None
        global_dev = self.global_model.flat.to(self.dev)  # no copy on the CPU
        # the per-client bookkeeping works in buffers kept between clients and rounds: fresh
        # model-sized temporaries (page faults) cost more than the arithmetic on them
        update = buf.scratch("update", self.n_model, torch.float32, self.dev)
        host64 = buf.scratch("f64", self.n_model, torch.float64, "cpu")  # used between calls
        for cid, n_k, loss, trained, control in self._trained(rnd, todo, global_dev):
            torch.sub(trained, global_dev, out=update)
            if cid in self.fault_nan:
                update[0] = float("nan")
            peak = peak_abs(update)  # one pass: finiteness, and the encoder's range check
            if not (math.isfinite(peak) and np.isfinite(loss)):
                log.warning("round %d: client %d sent a non-finite update; dropped", rnd, cid)
                buf.add_stat(S_DROPPED, 1)
                continue
            unclipped = True
            if self.dp is not None:  # clip on the client's rank, before encoding; weight 1
                scale, unclipped = self.dp.clip(sq_norm(update, host64))
            else:
                scale = n_k / total
            ok = buf.fits(peak, scale)
            control_part = None
            if ok and self.scaffold is not None and control is not None:
                new_c, dc = self.scaffold.change(cid, control)
                control_part = buf.encode(dc, 1.0 / len(self.sizes))
                ok = control_part is not None
            if not ok:
                log.warning("round %d: client %d sent an update too large to aggregate "
                            "(diverged); dropped", rnd, cid)
                buf.add_stat(S_DIVERGED, 1)
                continue
            buf.add_update(update, scale)
            if control_part is not None:
                buf.add_vector(control_part, start=self.n_model)
                self.scaffold.commit(cid, new_c)  # type: ignore[union-attr]
            buf.add_stat(S_WEIGHT, n_k)
            buf.add_stat(S_OK, 1)
            if self.dp is not None:
                # the un-noised per-client statistics are not collected under DP (fl/dp.py)
                buf.add_stat(S_UNCLIPPED, float(unclipped))
                continue
            buf.add_stat(S_SQNORM, (n_k / total) ** 2 * sq_norm(update[:self.n_params], host64))
            buf.add_stat(S_LOSS, n_k * loss)

    def _trained(self, rnd: int, todo: list[int], global_dev: torch.Tensor
                 ) -> Iterator[Trained]:
        """(client, samples, mean loss, its trained flat model, SCAFFOLD's control) for each
        client of `todo`, in order: one after another (train_client), or fl.vmap_clients at a
        time (fl/cohort.py). A yielded model is only valid until the next one is asked for."""
        wm, data = self.work_model, self.data
        assert wm is not None and data is not None
        if self.concurrent is not None and len(todo) > 1:
            def job(slot: Any, cid: int, x: torch.Tensor, y: torch.Tensor) -> float:
                return self._train_one(slot.model, cid, x, y, rnd, global_dev)

            for cid, n_k, loss, slot in self.concurrent.train(todo, self._get, job):
                yield cid, n_k, loss, slot.model.flat, None
            return
        step = max(1, self.cohort.size if self.cohort is not None else len(todo))
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            if self.cohort is not None:
                for _ in chunk:
                    faults.point("client", self.comm.rank)
                trained = self._train_chunk(rnd, chunk, global_dev)
                if trained is not None:
                    yield from trained
                    continue
            for cid in chunk:
                faults.point("client", self.comm.rank)
                wm.flat.copy_(global_dev)
                x, y = data.get(cid)
                control = (self.scaffold.begin(cid, self.dev) if self.scaffold is not None
                           else None)
                loss = train_client(wm.model, wm.params, global_dev[:self.n_params], x, y,
                                    self.transform, self.fl, seed=self.seed, client_id=cid,
                                    round_=rnd, control=control)
                yield cid, float(len(y)), loss, wm.flat, control

    def _train_chunk(self, rnd: int, chunk: list[int], global_dev: torch.Tensor
                     ) -> list[Trained] | None:
        """The clients of `chunk` trained together (fl.vmap_clients), or None when the vmapped
        step failed: then the rank trains one client after another from here on."""
        assert self.cohort is not None and self.data is not None
        controls = ([self.scaffold.begin(cid, self.dev) for cid in chunk]
                    if self.scaffold is not None else None)
        data = [self.data.get(cid) for cid in chunk]
        try:
            rows, losses = self.cohort.train(
                global_dev[:self.n_params], data,
                self.transform, seed=self.seed, client_ids=chunk, round_=rnd, controls=controls)
        except (RuntimeError, NotImplementedError) as e:
            if isinstance(e, faults.InjectedFault):
                raise
            log.warning("fl.vmap_clients: the vmapped step failed on rank %d (%s); this rank "
                        "trains its clients one after another from now on", self.comm.rank,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.cohort = None
            return None
        return [(cid, float(len(data[i][1])), loss, row, None if controls is None else controls[i])
                for i, (cid, loss, row) in enumerate(zip(chunk, losses, rows))]

    def _concurrent(self, model_cfg: Any, model_shape: tuple, manifest: Any) -> Any:
        """run.concurrent_clients: the rank's concurrent trainer (fl/concurrent.py), or None."""
        from gptfl_hpc.fl import concurrent
        from gptfl_hpc.train.models import build_model

        k = torch.get_num_threads()
        rc = self.run_cfg
        if not (getattr(rc, "concurrent_clients", False) and k > 1 and self.dev.type == "cpu"
                and rc.cpu_kernels == "invariant" and self.scaffold is None
                and manifest.kind == "image"):
            return None
        assert self.work_model is not None
        reason = concurrent.why_not(self.work_model.model)
        if reason is not None:
            log.info("run.concurrent_clients: rank %d trains its clients one after another: "
                     "the model cannot train concurrently (%s)", self.comm.rank, reason)
            return None
        cap = concurrent.memory_cap(self.n_model)
        if cap < k:
            log.info("run.concurrent_clients: rank %d trains %d clients at a time, not %d: each "
                     "needs about %.0f MB beside its activations, and the slots may take a "
                     "quarter of this node's memory", self.comm.rank, cap, k,
                     concurrent.SLOT_BYTES_PER_PARAM * self.n_model / 1e6)
            if cap < 2:
                return None

        def make() -> FlatModel:
            with torch.random.fork_rng(devices=[]):  # the copies' init is overwritten anyway
                return FlatModel(build_model(model_cfg, model_shape, manifest.num_classes))

        return concurrent.ConcurrentClients(make, min(k, cap))

    def _cohort(self) -> CohortTrainer | None:
        """fl.vmap_clients: the rank's vmapped trainer, or None (one log line says why)."""
        from gptfl_hpc.data.manifest import KIND_DTYPES

        assert self.work_model is not None
        # zero samples of the shards' shape and dtype: the trainer probes the model with them
        example = torch.zeros((3, *self.manifest.input_shape), device=self.dev,
                              dtype=getattr(torch, KIND_DTYPES[self.manifest.kind]))
        cohort = CohortTrainer(self.work_model.model, self.fl, self.transform, example,
                               dp=self.dp is not None)
        if cohort.reason is None and self.n_model != self.n_params:
            cohort.reason = "the model has float buffers"
        if cohort.reason is None:
            return cohort
        if self.comm.rank == self.workers[0]:
            log.info("fl.vmap_clients=%d: clients are trained one after another: %s",
                     self.fl.vmap_clients, cohort.reason)
        return None


# ------------------------------------------------------------------------------ hooks


class Evaluator:
    """Server-side test metrics every ``fl.eval_every`` rounds and at the last round; with a
    synthetic validation split (`val`), its accuracy too (``val_accuracy``)."""

    def __init__(self, fed: Federation, model_cfg: Any, threads: int,
                 val: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        from gptfl_hpc.train.models import build_model
        from gptfl_hpc.train.transforms import make_transform

        m = fed.manifest
        self.fed, self.every, self.last = fed, fed.fl.eval_every, fed.fl.rounds
        self.threads = threads
        in_shape = tuple(m.input_shape)
        x, y = m.read_test(fed.data_dir)
        self.x, self.y = torch.from_numpy(x).to(fed.dev), torch.from_numpy(y).to(fed.dev)
        self.val = None if val is None else (torch.from_numpy(val[0]).to(fed.dev),
                                             torch.from_numpy(val[1]).to(fed.dev))
        self.tf = make_transform(m.kind, m.norm_mean, m.norm_std, in_shape, False)
        # on a GPU the server evaluates a device copy; on the CPU the global model itself
        self.model = fed.global_model if fed.dev.type == "cpu" else FlatModel(
            build_model(model_cfg, tuple(self.tf.output_shape), m.num_classes).to(fed.dev))

    def __call__(self, rnd: int) -> dict[str, Any]:
        from gptfl_hpc.train.evaluate import evaluate

        if rnd % self.every and rnd != self.last:
            return {"test_accuracy": None, "test_macro_f1": None, "test_loss": None,
                    "t_eval": 0.0, **({"val_accuracy": None} if self.val is not None else {})}
        t0 = time.perf_counter()
        if self.model is not self.fed.global_model:
            self.model.flat.copy_(self.fed.global_model.flat)
        saved = torch.get_num_threads()
        set_threads(self.threads)
        try:
            m = evaluate(self.model.model, self.x, self.y, self.tf,
                         batch_size=self.fed.fl.eval_batch_size, device=self.fed.dev,
                         num_classes=self.fed.manifest.num_classes)
            v = None if self.val is None else evaluate(
                self.model.model, self.val[0], self.val[1], self.tf,
                batch_size=self.fed.fl.eval_batch_size, device=self.fed.dev,
                num_classes=self.fed.manifest.num_classes)
        finally:
            set_threads(saved)
        out = {"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"],
               "test_loss": m["loss"]}
        if v is not None:
            out.update(val_accuracy=v["accuracy"], val_loss=v["loss"])
        return out | {"t_eval": time.perf_counter() - t0}


class Selection:
    """``fl.select``: the server keeps the global model of the round with the best validation
    accuracy (ties go to the earlier round) and, with ``fl.patience``, agrees with every rank to
    stop once that many evaluations in a row brought no improvement. Its state goes into every
    checkpoint (bitwise resume).

    synthetic_val: the server's synthetic split. Round 0 (the pretrained model) is measured and
    reported but is not a candidate: it was fit to the synthetic distribution, so on a split of
    that distribution it beats the FL rounds in most cells of the study (README, "Does the FL
    stage add to synthetic-only?") whatever they do on real data; the split chooses among the FL
    rounds. client_val: the clients' held-out rows (federated evaluation, fl/clientval.py). They
    come from the private distribution, so round 0 of a run from a pretrained model is a
    candidate too: when FL does not improve on it there, the pretrained model is returned."""

    FILE = "selection"
    KEYS = {"synthetic_val": "val_accuracy", "client_val": "client_val_accuracy"}

    def __init__(self, rule: str, patience: int, round0: bool) -> None:
        self.rule, self.key, self.round0 = rule, self.KEYS[rule], round0
        self.patience = patience
        self.round: int | None = None
        self.val = -1.0
        self.test: float | None = None
        self.since = 0  # evaluations since the best one
        self.history: list[list] = []  # [round, val accuracy, test accuracy]
        self.weights: dict[str, torch.Tensor] = {}

    def update(self, rnd: int, record: dict, model: FlatModel) -> None:
        v = record.get(self.key)
        if v is None:
            return
        self.history.append([rnd, v, record["test_accuracy"]])
        if rnd == 0 and not self.round0:  # reported, not a candidate (see the class doc)
            return
        if v > self.val:
            self.round, self.val, self.test, self.since = rnd, float(v), \
                record["test_accuracy"], 0
            self.weights = {k: t.detach().to("cpu", copy=True)
                            for k, t in model.state_dict().items()}
        else:
            self.since += 1

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def state(self) -> dict[str, Any]:
        return {"round": self.round, "val": self.val, "test": self.test, "since": self.since,
                "history": self.history}

    def load(self, d: Path, state: dict[str, Any]) -> None:
        self.round, self.val, self.test = state["round"], float(state["val"]), state["test"]
        self.since, self.history = int(state["since"]), [list(h) for h in state["history"]]
        self.weights = Checkpoints.load(d, self.FILE)

    def describe(self, last_round: int, rounds: int) -> dict[str, Any]:
        return {"rule": self.rule, "round": self.round, "val_accuracy": self.val,
                "test_accuracy": self.test, "patience": self.patience,
                "stopped_early": last_round < rounds, "last_round": last_round,
                "val_by_round": self.history}


def round_record(r: RoundResult) -> dict[str, Any]:
    """The metrics.jsonl line of a round (without evaluation and wall clock)."""
    s = r.stats
    weight = s[S_WEIGHT]
    stats_ok = weight > 0 and not r.private  # DP: the per-client statistics are not collected
    return {
        "round": r.round, "sampled_clients": r.sampled, "num_samples": int(round(weight)),
        "clients_ok": int(round(s[S_OK])), "clients_dropped": int(round(s[S_DROPPED])),
        "clients_diverged": int(round(s[S_DIVERGED])),
        "train_loss": s[S_LOSS] / weight if stats_ok else None,
        "grad_diversity": (gradient_diversity(s[S_SQNORM], r.diversity_denominator)
                           if stats_ok else None),
        "t_client": r.t_client, "t_comm": r.t_comm, "t_server": r.t_server,
        "t_server_wait": r.t_server_wait,
        "t_idle": float(np.mean([r.t_client - t for t in r.t_times])),
        "t_idle_max": float(max(r.t_client - t for t in r.t_times)),
        "t_round": r.t_round, "bytes_reduced": r.bytes_reduced, **r.dp,
    }


def _log_round(r: dict, total: int) -> None:
    acc = "   -  " if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:5.1f}%"
    log.info("round %d/%d acc %s loss %s | %d clients, %d samples | client %.2fs idle %.2fs "
             "comm %.3fs server %.3fs eval %.2fs", r["round"], total, acc,
             "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}", r["clients_ok"],
             r["num_samples"], r["t_client"], r["t_idle"], r["t_comm"], r["t_server"],
             r["t_eval"])
    if r.get("client_val_accuracy") is not None:
        log.info("round %d: client validation acc %.2f%% (%d held-out samples of %d clients; "
                 "worst client %.1f%%) %.2fs", r["round"], 100 * r["client_val_accuracy"],
                 r["client_val_samples"], r["client_val_clients"],
                 100 * r["client_val_client_min"], r["t_client_val"])
    if "dp_epsilon" in r:
        log.info("round %d: DP epsilon %s at delta %g (clip norm %.4g)", r["round"],
                 "inf" if r["dp_epsilon"] is None else f"{r['dp_epsilon']:.3f}", r["dp_delta"],
                 r["dp_clip_norm"])


# ------------------------------------------------------------------------------ the run


def federate(fl: Any, model_cfg: Any, run_cfg: Any, *, manifest: Any, data_dir: str | Path,
             out_dir: str | Path, init: str = "random", fingerprint: str = "",
             resume: bool = False, comm: Any = None,
             config_yaml: str | None = None, dp: Any = None,
             val: tuple[np.ndarray, np.ndarray] | None = None) -> dict | None:
    """Run federated training; returns the summary on rank 0 (None on other ranks).

    `fingerprint` identifies the request (gptfl_hpc.provenance); a checkpoint of another
    request is never resumed. Without `resume` a checkpoint of this request is refused with a
    message (rerun with --resume). `dp`: the config's ``dp`` section (central DP when enabled).
    `val`: rank 0's synthetic validation split (samples, labels) when ``fl.select`` is
    synthetic_val and the run starts from the pretrained model (init != 'random'); other ranks
    pass None.

    Longer than 80 lines on purpose: the round loop and its end-of-round hooks (metrics,
    checkpoint policy, stop agreement) read best in one place; the work is in the named parts
    (Federation.run_round, Checkpoints, the evaluator).
    """
    from gptfl_hpc.data.shards import set_access_rank
    from gptfl_hpc.numerics import training_kernels
    from gptfl_hpc.parallel.comm import get_comm

    t_start = time.perf_counter()
    comm = comm or get_comm()
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    signals.install()
    set_access_rank(comm.rank)
    faults.point("federate", comm.rank)
    set_threads(threads_for(run_cfg, comm, "client"))
    dev = fl_device(run_cfg, comm)
    # every rank knows whether the server selects the returned model (and may stop early):
    # on its synthetic split (runs from a pretrained model), or on the clients' held-out rows
    synthetic = fl.select == "synthetic_val" and init != "random"
    selecting = synthetic or fl.select == "client_val"
    if synthetic and comm.rank == 0 and val is None:
        raise ConfigError("config key fl.select: 'synthetic_val' but no synthetic validation "
                          "split was given for this run; valid: 'last', or GPT-FL's run from a "
                          "model pretrained with pretrain.val_fraction > 0")
    with training_kernels(run_cfg.cpu_kernels, dev.type):
        fed = Federation(fl, model_cfg, run_cfg, manifest=manifest, data_dir=data_dir,
                         comm=comm, init=init, device=dev, dp=dp)
        ckpts = Checkpoints(out_dir, fl.keep_checkpoints)
        history: list[list] = []  # [round, test accuracy]
        start_round, wall_before = 1, 0.0
        metrics = evaluator = selection = None
        found: list = [None, []]
        round0: dict[str, Any] = {}  # the init's metrics (with a validation to compare it on)
        if fed.is_server:
            selection = (Selection(fl.select, fl.patience,
                                   round0=fl.select == "client_val" and init != "random")
                         if selecting else None)
            start_round, history, wall_before, found, saved = _resume_state(
                fed, ckpts, fingerprint, resume, selection)
            round0 = dict(saved.get("round0") or {})
            evaluator = Evaluator(fed, model_cfg, threads_for(run_cfg, comm, "server"),
                                  val=val if synthetic else None)
            if selection is not None and start_round > 1 and selection.stop:
                start_round = fl.rounds + 1  # checkpointed as the early stop was decided
            if config_yaml is not None:
                write_text(out_dir / "config.yaml", config_yaml)
            metrics = JsonlWriter(out_dir / "metrics.jsonl",
                                  keep_through=start_round - 1 if start_round > 1 else None)
        placement = _placement(fed, comm, dev)
        start_round, found = comm.bcast_json([start_round, found])
        if fed.has_rank_state and found[0] is not None:  # each client rank reads its own part
            fed.load_rank_state(Path(found[0]), {"files": found[1]})
        fed.sync_from_server()  # everyone starts from the server's weights and state
        if int(start_round) == 1 and (selecting or fed.client_val is not None):
            # round 0, the init before any FL: a collective when the clients validate
            rec0 = fed.client_val(0) if fed.client_val is not None else {}
            if fed.is_server:
                assert evaluator is not None
                rec0 = evaluator(0) | rec0
                round0 = {"round": 0} | {k: v for k, v in rec0.items()
                                         if not k.startswith("t_")}
                if selection is not None:
                    selection.update(0, rec0, fed.global_model)

        policy = CheckpointPolicy(fl.checkpoint_every, fl.rounds)
        for rnd in range(int(start_round), fl.rounds + 1):
            result = fed.run_round(rnd)
            # federated validation on the clients' held-out rows, at the evaluation rounds
            cv = (fed.client_val(rnd) if rnd % fl.eval_every == 0 or rnd == fl.rounds
                  else dict.fromkeys(CLIENT_VAL_KEYS)) if fed.client_val is not None else {}
            save = policy.should_save(rnd, result.stop)
            rank_files: list[str] = []
            if save and fed.has_rank_state:
                # every client rank writes its own part into the checkpoint being written;
                # rank 0 commits it after the barrier (fl/checkpoint.py)
                if comm.rank in fed.workers:
                    ckpts.save_rank(rnd, comm.rank, fed.rank_state())
                rank_files = [Checkpoints.rank_file(w) for w in fed.workers]
            if fed.is_server:
                assert evaluator is not None and metrics is not None
                record = round_record(result) | evaluator(rnd) | cv
                if fed.dp is not None:
                    eps = fed.dp.epsilon(rnd)
                    record.update(dp_epsilon=eps if math.isfinite(eps) else None,
                                  dp_delta=fed.dp.dp.delta, dp_noise_multiplier=fed.dp.z)
                record["wall_seconds"] = wall_before + time.perf_counter() - t_start
                metrics.write(record)
                history.append([rnd, record["test_accuracy"]])
                _log_round(record, fl.rounds)
                if selection is not None:
                    selection.update(rnd, record, fed.global_model)
            if rank_files:
                comm.barrier()
            if fed.is_server and save:
                tensors, extra = fed.state_tensors(), {"round0": round0} if round0 else {}
                if selection is not None:
                    tensors[Selection.FILE] = selection.weights
                    extra["selection"] = selection.state()
                ckpts.save(rnd, tensors,
                           {"round": rnd, "fingerprint": fingerprint, "history": history,
                            "wall_seconds": record["wall_seconds"], "world_size": comm.size,
                            **extra},
                           rank_files=rank_files)
            # fl.patience: the server's verdict, one small broadcast per round
            if selecting and fl.patience > 0 and comm.bcast_json(
                    selection.stop if selection is not None else None):
                if fed.is_server:
                    assert selection is not None
                    log.info("early stop after round %d: %d evaluation(s) without a better "
                             "%s accuracy than round %s's %.4f (fl.patience %d)", rnd,
                             selection.since, fl.select, selection.round, selection.val,
                             fl.patience)
                break
            if result.stop:
                # non-zero exits end in MPI_Abort (python -m mpi4py): release the ranks only
                # once the server's checkpoint is on disk
                comm.barrier()
                raise Preempted(f"stopped after round {rnd} ({signals.reason()}); checkpoint "
                                f"saved in {ckpts.root}; rerun with --resume")
        summary = None
        if fed.is_server:
            summary = _finish(out_dir, fed, history, fl, model_cfg, placement, comm.library,
                              init, wall_before + time.perf_counter() - t_start, fingerprint,
                              selection, round0)
        comm.barrier()
    return summary


def _resume_state(fed: Federation, ckpts: Checkpoints, fingerprint: str,
                  resume: bool, selection: Selection | None = None
                  ) -> tuple[int, list, float, list, dict]:
    """(first round, metric history, wall seconds so far, [checkpoint dir, its files], the
    checkpoint's state record ({} when starting afresh))."""
    from gptfl_hpc.provenance import StaleOutputError

    found = ckpts.latest()
    if found is None:
        if resume:
            log.info("--resume: no checkpoint in %s, starting at round 1", ckpts.root)
        return 1, [], 0.0, [None, []], {}
    d, state = found
    if state.get("fingerprint") != fingerprint:
        raise StaleOutputError(f"{ckpts.root} holds checkpoints of another request; use a new "
                               "--out, or rerun with the settings that made them")
    if not resume:
        raise StaleOutputError(f"{ckpts.root} holds a partial run of this request (round "
                               f"{state['round']}); rerun with --resume to continue it, or use "
                               "a new --out")
    fed.load_state(d)
    if selection is not None:
        selection.load(d, state["selection"])
    log.info("resuming from %s (round %d)", d, state["round"])
    return int(state["round"]) + 1, list(state.get("history", [])), \
        float(state.get("wall_seconds", 0.0)), [str(d), list(state.get("files", []))], state


def _placement(fed: Federation, comm: Any, dev: torch.device) -> list[dict]:
    """Where every rank runs (one small gather at start-up): logged and kept in summary.json."""
    fl = fed.fl
    mine = (sum(1 for w in fed.static_owner.values() if w == comm.rank)
            if fed.placement == "static" else None)
    placement = comm.allgather_json({"rank": comm.rank, "node": comm.node,
                                     "local_rank": comm.local_rank, "device": str(dev),
                                     "threads": torch.get_num_threads(), "clients": mine,
                                     "concurrent_clients": (fed.concurrent.k if fed.concurrent
                                                            is not None else 1)})
    if fed.is_server:
        log.info("federate: %d ranks (%d client workers), %d clients, %d per round, %s, "
                 "placement %s%s, aggregation %s, model %d params (buffer %.1f MB)",
                 comm.size, len(fed.workers), len(fed.sizes), fl.clients_per_round,
                 fl.algorithm + (" + central DP" if fed.dp is not None else ""), fed.placement,
                 f" (imbalance {imbalance(fed.sizes, fed.static_owner):.2f})"
                 if fed.placement == "static" else "", fl.aggregation, fed.n_params,
                 fed.buffer.host.nbytes / 1e6)
        nodes = sorted({p["node"] for p in placement})
        where = "; ".join(f"r{p['rank']}@{p['node']}/{p['local_rank']} {p['device']} "
                          f"x{p['threads']}"
                          + (f" ({p['concurrent_clients']} clients at once)"
                             if p["concurrent_clients"] > 1 else "") for p in placement)
        log.info("placement (%s): %d node(s) %s; %s", comm.library, len(nodes), ",".join(nodes),
                 where)
    return placement


def _finish(out_dir: Path, fed: Federation, history: list, fl: Any, model_cfg: Any,
            placement: list, mpi_library: str, init: str, wall: float,
            fingerprint: str, selection: Selection | None = None,
            round0: dict | None = None) -> dict:
    evaluated = [(r, a) for r, a in history if a is not None]
    if not evaluated:
        raise DataError("no evaluated round in the history")
    best_round, best = max(evaluated, key=lambda t: (t[1], -t[0]))
    summary = {
        "final_accuracy": evaluated[-1][1], "final_round": evaluated[-1][0],
        "best_accuracy": best, "best_round": best_round,
        "target_accuracy": fl.target_accuracy,
        "rounds_to_target": rounds_to_target(evaluated, fl.target_accuracy),
        "rounds": fl.rounds, "algorithm": fl.algorithm, "init": init,
        "model": model_cfg.name, "world_size": len(placement), "wall_seconds": wall,
        "nodes": len({p["node"] for p in placement}), "placement": placement,
        "mpi_library": mpi_library, "aggregation": fl.aggregation,
        "client_placement": fed.placement,
        "accuracy_by_round": evaluated, "fingerprint": fingerprint,
        "dp": fed.dp.describe(fl.rounds) if fed.dp is not None else None,
        "rounds_run": history[-1][0] if history else 0,
        "selection": {"rule": "last"} if selection is None else
        selection.describe(history[-1][0], fl.rounds),
        # the returned model's test accuracy (the last round's, or the selected round's)
        "selected_accuracy": evaluated[-1][1] if selection is None else selection.test,
        # the init's metrics before FL, measured when there is a validation to compare on
        "round0": round0 or None,
        "client_val_fraction": fl.client_val_fraction,
    }
    weights = fed.global_model.state_dict() if selection is None else selection.weights
    save_safetensors(weights, out_dir / "final.safetensors",
                     metadata={"model": model_cfg.name, "rounds": str(fl.rounds),
                               "fingerprint": fingerprint,
                               "round": str(summary["rounds_run"] if selection is None
                                            else selection.round)})
    write_json(out_dir / "summary.json", summary)
    log.info("done: final accuracy %.2f%%, best %.2f%% (round %d), rounds to %.0f%%: %s, %.1fs",
             100 * summary["final_accuracy"], 100 * best, best_round, 100 * fl.target_accuracy,
             summary["rounds_to_target"], wall)
    if selection is not None:
        log.info("selected by fl.select=%s: round %s (validation acc %.4f, test acc %.4f); "
                 "final.safetensors holds it", selection.rule, selection.round, selection.val,
                 selection.test)
    return summary


def read_summary(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))
