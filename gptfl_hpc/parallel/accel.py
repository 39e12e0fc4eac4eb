"""accelerate's torch.distributed world, bootstrapped from MPI (the only module importing it).

Synthesis and server pretraining both need the same bootstrap, so it lives here once instead of
in each phase (the project rule "accelerate in its own room" is kept: nothing else imports it).

What it gets right:

* **Only the server ranks.** accelerate reads the launcher's variables (``OMPI_COMM_WORLD_SIZE``,
  ``PMI_SIZE``, ...), so on a server phase that uses some ranks of a bigger MPI job it would call
  ``init_process_group(world_size=<all MPI ranks>)`` and wait forever. The variables are hidden
  (parallel/env.py) and the process group is made here from the sub-communicator, before
  accelerate is built (accelerate then uses it).
* **The rendezvous binds where it is used.** Rank 0 opens the store's listening socket itself on
  the rendezvous address only (loopback when every server rank is on one host; otherwise
  ``run.rendezvous``, an address or interface name, else the interface of the default route),
  and passes it to ``TCPStore(master_listen_fd=...)``: no socket listens on every interface,
  and hosts whose ``/etc/hosts`` maps the hostname to 127.0.1.1 still reach it. The address and
  port travel over MPI. gloo/NCCL are pointed at the same interface.
* **The GPU.** ``LOCAL_RANK`` is the index of the CUDA device this process uses (its node-local
  rank modulo the GPUs it sees; 0 under ``srun --gpus-per-task=1``), made current first.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

from gptfl_hpc.parallel.env import clean_launcher_env

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 300


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every configured network interface (Linux ioctl; no dependency)."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            out[name] = socket.inet_ntoa(packed[20:24])
    return out


def default_route_interface() -> str | None:
    """The interface of the IPv4 default route (/proc/net/route), if any."""
    try:
        with open("/proc/net/route", encoding="ascii") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return None


def rendezvous_address(single_host: bool, wanted: str | None) -> tuple[str, str | None]:
    """(address, interface) rank 0 listens on for the server world's rendezvous."""
    from gptfl_hpc.errors import ConfigError

    if single_host and not wanted:
        return "127.0.0.1", "lo"
    addrs = interface_addresses()
    wanted = wanted or os.environ.get("GPTFL_RENDEZVOUS") or None
    if wanted:
        if wanted in addrs:
            return addrs[wanted], wanted
        for name, a in addrs.items():
            if a == wanted:
                return a, name
        raise ConfigError(f"config key run.rendezvous: {wanted!r} is neither an interface nor an "
                          "address of this host; valid: " + ", ".join(
                              f"{n} ({a})" for n, a in sorted(addrs.items())))
    route = default_route_interface()
    if route is not None and route in addrs and not addrs[route].startswith("127."):
        return addrs[route], route
    for name, a in sorted(addrs.items()):
        if not a.startswith("127."):
            return a, name
    raise ConfigError("config key run.rendezvous: no non-loopback network interface on the "
                      "rank-0 host for a multi-host server phase; valid: an interface name or "
                      "address (e.g. ib0) reachable from the other server hosts")


def _listen(address: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, 0))
    s.listen(128)
    return s


def want_cuda(device: str) -> bool:
    import torch

    if device == "cpu":
        return False
    if device == "cuda" and not torch.cuda.is_available():
        from gptfl_hpc.errors import ConfigError

        raise ConfigError("config key run.device: 'cuda' requested but no GPU is visible; "
                          "valid: auto, cpu" + (", cuda" if torch.cuda.is_available() else ""))
    return torch.cuda.is_available()


@contextlib.contextmanager
def accelerator(comm: Any, *, device: str = "auto", mixed_precision: str = "no",
                rendezvous: str | None = None, **kwargs: Any) -> Iterator[Any]:
    """Yield an ``accelerate.Accelerator`` whose processes are exactly the ranks of `comm`.

    `comm` is a gptfl_hpc.parallel.comm communicator (a sub-communicator of the server ranks).
    """
    import torch

    from gptfl_hpc.numerics import set_threads

    use_cuda = want_cuda(device)
    threads = torch.get_num_threads()
    env = {"OMP_NUM_THREADS": str(threads)}  # else accelerate picks a thread count itself
    listener = None
    if comm.size > 1:
        index = comm.local_rank % torch.cuda.device_count() if use_cuda else comm.local_rank
        if use_cuda:
            torch.cuda.set_device(index)
        single_host = len(set(comm.hosts)) == 1
        addr = None
        if comm.rank == 0:
            address, iface = rendezvous_address(single_host, rendezvous)
            listener = _listen(address)
            addr = [address, listener.getsockname()[1], iface]
        addr = comm.bcast_json(addr)
        env.update({"RANK": str(comm.rank), "WORLD_SIZE": str(comm.size),
                    "LOCAL_RANK": str(index), "LOCAL_WORLD_SIZE": str(comm.local_size),
                    "MASTER_ADDR": str(addr[0]), "MASTER_PORT": str(addr[1])})
        if addr[2]:
            for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                env[var] = os.environ.get(var) or str(addr[2])
    try:
        with clean_launcher_env(env):
            import torch.distributed as dist
            from accelerate import Accelerator
            from accelerate.state import AcceleratorState, GradientState, PartialState

            if comm.size > 1:
                store = dist.TCPStore(
                    env["MASTER_ADDR"], int(env["MASTER_PORT"]), comm.size, comm.rank == 0,
                    timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
                    master_listen_fd=listener.detach() if listener is not None else None)
                dist.init_process_group("nccl" if use_cuda else "gloo", store=store,
                                        rank=comm.rank, world_size=comm.size,
                                        timeout=datetime.timedelta(seconds=1800))
            # cpu=True is required on CPU: without it accelerate silently runs every process as
            # a world of one.
            acc = Accelerator(cpu=not use_cuda, mixed_precision=mixed_precision, **kwargs)
            set_threads(threads)
            if acc.num_processes != comm.size:
                raise RuntimeError(f"accelerate formed a world of {acc.num_processes} "
                                   f"processes, expected {comm.size}")
            log.debug("accelerate: %s process %d/%d on %s", acc.distributed_type,
                      acc.process_index, acc.num_processes, acc.device)
            try:
                yield acc
            finally:
                acc.wait_for_everyone()
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
                AcceleratorState._reset_state(True)
                GradientState._reset_state()
                PartialState._reset_state()
    finally:
        if listener is not None:
            listener.close()


def rank_device(device: str, comm: Any) -> Any:
    """The torch device an FL rank computes on: a GPU when `device` allows (its node-local rank
    modulo the GPUs this process sees, made current with ``torch.cuda.set_device``), else CPU."""
    import torch

    if not want_cuda(device):
        return torch.device("cpu")
    index = comm.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def visible_gpus() -> list[str]:
    """Identifiers of the GPUs this process sees (UUIDs when torch exposes them)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = getattr(props, "uuid", None)
        out.append(str(uuid) if uuid is not None else f"{props.name}#{i}")
    return out


def server_count(comm: Any, run_cfg: Any) -> int:
    """How many ranks synthesise and pretrain (the first ones). Decided on rank 0 and broadcast,
    so every rank agrees: ``run.server_processes`` if set, else one per distinct GPU that the
    ranks on rank 0's node can see (gathered per rank, so ``srun --gpus-per-task=1`` — each rank
    sees one GPU — still counts the node's GPUs), at most the ranks on that node; 1 on CPU."""
    key = "_gptfl_server_count"
    cached = getattr(comm, key, None)
    if cached is not None:
        return int(cached)
    want_gpu = want_cuda(run_cfg.device)
    seen = comm.allgather_json([comm.node, visible_gpus() if want_gpu else []])
    if run_cfg.server_processes:
        n = min(int(run_cfg.server_processes), comm.size)
    elif want_gpu:
        node0 = seen[0][0]
        on_node0 = [r for r, (node, _) in enumerate(seen) if node == node0]
        distinct = {g for r in on_node0 for g in seen[r][1]}
        n = max(1, min(len(distinct), len(on_node0)))
    else:
        n = 1
    n = int(comm.bcast_json(n))
    setattr(comm, key, n)
    return n


def server_comm(comm: Any, run_cfg: Any) -> Any:
    """The sub-communicator of the server ranks (None on the others). Collective.

    On GPUs it checks up front that no two server ranks would drive the same GPU (NCCL refuses
    that, but only at the first collective, after all of synthesis): a one-line ConfigError on
    every rank instead.
    """
    from gptfl_hpc.errors import ConfigError

    p = server_count(comm, run_cfg)
    sub = comm.split(0 if comm.rank < p else -1, comm.rank)
    if want_cuda(run_cfg.device):
        mine = None
        if sub is not None:
            gpus = visible_gpus()
            mine = [comm.node, gpus[comm.local_rank % len(gpus)]]
        everyone = comm.allgather_json(mine)
        used: dict[tuple, int] = {}
        for r, key in enumerate(everyone):
            if key is None:
                continue
            if tuple(key) in used:
                if sub is not None:
                    sub.free()
                raise ConfigError(
                    f"config key run.server_processes: server ranks {used[tuple(key)]} and {r} "
                    f"would share GPU {key[1]} on {key[0]} (NCCL needs one GPU per process); "
                    f"valid: at most one server rank per GPU (run.server_processes=0 picks that)")
            used[tuple(key)] = r
    return sub


# ------------------------------------------------------------------------------ GPU memory


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f}"


def release_device_memory(stage: str) -> dict | None:
    """After a server stage: collect what it left (accelerate's wrappers hold reference cycles)
    and give the cached GPU memory back to the driver, so FL on the same GPUs starts clean.
    Call it once the stage's models, optimizers and tensors are out of scope. Logs what is
    still allocated; None when this process never initialised CUDA."""
    import gc

    import torch

    gc.collect()
    if not torch.cuda.is_initialized():
        return None
    dev = torch.cuda.current_device()
    before = torch.cuda.memory_reserved(dev)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    allocated, reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
    (log.warning if allocated > 256 << 20 else log.info)(
        "%s: GPU memory released on cuda:%d: %s GiB still allocated, reserved %s -> %s GiB, "
        "%s of %s GiB free", stage, dev, _gib(allocated), _gib(before), _gib(reserved),
        _gib(free), _gib(total))
    return {"stage": stage, "allocated": allocated, "reserved_before": before,
            "reserved": reserved, "free": free, "total": total}
