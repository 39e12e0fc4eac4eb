"""The communication layer: the only module that imports mpi4py.

Everything crosses MPI as a buffer (uppercase mpi4py methods); nothing is pickled. Small control
messages (a port number, a list of client ids) travel as JSON bytes in a buffer.

``get_comm()`` returns an :class:`MPIComm` when the process was started by an MPI launcher (or
mpi4py is already initialised, as under ``python -m mpi4py``), otherwise a :class:`LocalComm`
for one process. Both expose the same small interface, so algorithm code never sees MPI.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from gptfl_hpc.errors import CommError

log = logging.getLogger(__name__)

# One collective call per chunk of at most this many elements. 2**30 float32 = 4 GiB, so any
# model below 4 GiB goes in exactly one call; larger buffers (over the 2 GiB that breaks
# byte-count pickled messages) are split and still work. Tests lower it to exercise chunking.
MAX_ELEMENTS = int(os.environ.get("GPTFL_MPI_MAX_ELEMENTS", 2**30))
WAIT_MODE = os.environ.get("GPTFL_MPI_WAIT", "sleep")
SPIN_SECONDS = 1e-3


def node_key() -> list[str]:
    """Which node this process runs on: [hostname, Slurm node name or ''].

    The Slurm node name tells emulated nodes on one host apart (and is what srun's
    SLURM_LOCALID counts within); the hostname keeps processes on different hosts apart even
    when a launcher forwarded one node's environment to another (Hydra over ssh).
    """
    return [socket.gethostname(), os.environ.get("SLURMD_NODENAME", "")]


def cpu_affinity() -> list[int]:
    """The CPUs this process may run on (all of them when nothing bound it)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def local_placement(keys: list, rank: int) -> tuple[str, int, int]:
    """(node name, node-local rank, ranks on the node) of `rank` from every rank's node_key().

    The node-local rank (its order among the ranks on its node) picks the rank's GPU; it does
    not rely on MPI_COMM_TYPE_SHARED, which groups ranks by host and so sees emulated Slurm
    nodes on one host as one node.
    """
    mine = keys[rank]
    return (mine[1] or mine[0], sum(1 for k in keys[:rank] if k == mine), keys.count(mine))


class Comm(Protocol):
    """What FL, synthesis and pretraining code may use of a communicator (pfl-research's
    ``DistributedContext`` idea): buffer collectives in place, small JSON messages, sub-groups.
    :class:`LocalComm` (one process) and :class:`MPIComm` both satisfy it; algorithm code is
    written against this and never imports MPI."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cpu_sharers: int
    sharers: list[int]
    library: str
    is_mpi: bool
    last_wait: float
    last_xfer: float

    @property
    def node(self) -> str: ...

    @property
    def hosts(self) -> list[str]: ...

    def barrier(self) -> None: ...

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray: ...

    def allreduce_sum_(self, buf: np.ndarray) -> np.ndarray: ...

    def allreduce_max_(self, buf: np.ndarray) -> np.ndarray: ...

    def bcast_json(self, obj: Any, root: int = 0) -> Any: ...

    def allgather_json(self, obj: Any) -> list: ...

    def split(self, color: int, key: int = 0) -> Comm | None: ...

    def host_array(self, shape: tuple[int, ...], dtype: Any) -> HostArray: ...

    def free(self) -> None: ...


class HostArray:
    """One numpy array per host, shared by the ranks of that host (made by ``host_array``).

    Large read-only data that every rank needs (pretraining's synthetic set) is held once per
    host instead of once per rank: on a host with several ranks the array lives in an MPI
    shared-memory window (``MPI_Win_allocate_shared`` over ``MPI_COMM_TYPE_SHARED``; Open MPI
    and MPICH back it with /dev/shm); a rank alone on its host gets private memory. Only the
    communicator's rank 0 writes it, then :meth:`bcast_from_root` copies it to the other hosts'
    copies (one message per host, not per rank) and returns once every rank sees it. ``free()``
    is collective; the array must not be used after it.
    """

    def __init__(self, array: np.ndarray, *, host_rank: int = 0, host_size: int = 1,
                 hosts: int = 1, shared: bool = False, bcast: Any = None,
                 free: Any = None) -> None:
        self.array = array
        self.host_rank = host_rank
        """This rank's index among the ranks of its host (0 = the one that receives)."""
        self.host_size = host_size
        """Ranks on this host that share the array."""
        self.hosts = hosts
        """Copies in the whole communicator (one per host)."""
        self.shared = shared
        """True when the array is an MPI shared-memory window (several ranks on the host)."""
        self._bcast, self._free = bcast, free

    def bcast_from_root(self) -> np.ndarray:
        """Copy rank 0's contents to every host's copy; every rank returns once it sees them."""
        if self._bcast is not None:
            self._bcast()
        return self.array

    def free(self) -> None:
        """Release the memory (collective over the communicator that made it)."""
        self.array = np.empty(0, self.array.dtype)
        if self._free is not None:
            self._free()
            self._free = None


class LocalComm:
    """A world of one process: collectives are no-ops."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    library = "none (one process, no MPI)"
    cpu_sharers = 1
    sharers = [0]
    is_mpi = False
    last_wait = 0.0
    last_xfer = 0.0

    @property
    def node(self) -> str:
        return local_placement([node_key()], 0)[0]

    @property
    def hosts(self) -> list[str]:
        return [socket.gethostname()]

    def barrier(self) -> None:
        pass

    def wait_for_peers(self) -> None:
        pass

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        return buf

    def allreduce_sum_(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allreduce_max_(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def bcast_json(self, obj: Any, root: int = 0) -> Any:
        return json.loads(json.dumps(obj))

    def allgather_json(self, obj: Any) -> list:
        return [json.loads(json.dumps(obj))]

    def split(self, color: int, key: int = 0) -> LocalComm | None:
        return self if color >= 0 else None

    def host_array(self, shape: tuple[int, ...], dtype: Any) -> HostArray:
        """A private array (one process: nothing to share)."""
        return HostArray(np.empty(shape, dtype))

    def abort(self, code: int = 1) -> None:
        sys.exit(code)

    def free(self) -> None:
        pass


class MPIComm:
    """mpi4py communicator wrapper; buffer collectives only."""

    is_mpi = True
    last_wait = 0.0
    """Seconds the last allreduce_sum_/bcast_ waited for peers to arrive (load imbalance)."""
    last_xfer = 0.0
    """Seconds the last allreduce_sum_/bcast_ spent in the collective itself (communication)."""

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        keys = self.allgather_json([node_key(), cpu_affinity()])
        self.hosts = [k[0][0] for k in keys]  # every rank's hostname
        self.node, self.local_rank, self.local_size = local_placement(
            [k[0] for k in keys], self.rank)
        # ranks of this node bound to exactly this rank's CPUs (all of the node's ranks when
        # unbound, 1 under per-task binding, the ranks of a socket under socket binding)
        self.sharers = [r for r, k in enumerate(keys) if k == keys[self.rank]]
        self.cpu_sharers = len(self.sharers)
        # "Open MPI v5.0.11", "MPICH Version: 5.0.2": which MPI mpi4py loaded
        self.library = " ".join(MPI.Get_library_version().splitlines()[0].split(",")[0].split())

    def barrier(self) -> None:
        """Barrier that sleeps while waiting (see wait_for_peers)."""
        self.wait_for_peers()

    def wait_for_peers(self) -> None:
        """Return once every rank has arrived, sleeping instead of spinning meanwhile.

        MPI implementations busy-poll inside blocking collectives. A rank waiting for the others
        (the server during client training, clients during evaluation, everyone during a
        server-only phase) would steal a core from the ranks doing the work, which is ruinous
        when ranks share cores. An Ibarrier polled with short sleeps costs ~no CPU; the large
        collective that follows then runs at full speed with everyone present.
        GPTFL_MPI_WAIT=spin turns this off.
        """
        if WAIT_MODE == "spin" or self.size == 1:
            self.comm.Barrier()
            return
        req = self.comm.Ibarrier()
        spin_until = time.perf_counter() + SPIN_SECONDS  # peers usually arrive together:
        while not req.Test():                              # a short spin avoids a wake-up
            if time.perf_counter() > spin_until:
                break
        else:
            return
        delay = 5e-5
        while not req.Test():
            time.sleep(delay)
            delay = min(delay * 2, 2e-3)

    def _chunks(self, buf: np.ndarray) -> Iterator[np.ndarray]:
        flat = buf.reshape(-1)
        for start in range(0, max(flat.size, 1), MAX_ELEMENTS):
            yield flat[start:start + MAX_ELEMENTS]

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """In-place broadcast of a contiguous numpy buffer from `root`."""
        assert buf.flags.c_contiguous
        t0 = time.perf_counter()
        self.wait_for_peers()
        t1 = time.perf_counter()
        for part in self._chunks(buf):
            self.comm.Bcast(part, root=root)
        self.last_wait, self.last_xfer = t1 - t0, time.perf_counter() - t1
        return buf

    def allreduce_sum_(self, buf: np.ndarray) -> np.ndarray:
        """In-place sum over all ranks (MPI.IN_PLACE); one call below MAX_ELEMENTS."""
        assert buf.flags.c_contiguous
        t0 = time.perf_counter()
        self.wait_for_peers()
        t1 = time.perf_counter()
        for part in self._chunks(buf):
            self.comm.Allreduce(self._MPI.IN_PLACE, part, op=self._MPI.SUM)
        self.last_wait, self.last_xfer = t1 - t0, time.perf_counter() - t1
        return buf

    def allreduce_max_(self, buf: np.ndarray) -> np.ndarray:
        assert buf.flags.c_contiguous
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX)
        return buf

    def bcast_json(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a small JSON-able object as bytes in a buffer (never pickled)."""
        data = json.dumps(obj).encode() if self.rank == root else b""
        n = np.array([len(data)], dtype=np.int64)
        self.comm.Bcast(n, root=root)
        payload = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else \
            np.empty(int(n[0]), dtype=np.uint8)
        self.comm.Bcast(payload, root=root)
        return json.loads(payload.tobytes().decode())

    def allgather_json(self, obj: Any) -> list:
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        counts = np.zeros(self.size, dtype=np.int64)
        counts[self.rank] = data.size
        self.comm.Allreduce(self._MPI.IN_PLACE, counts, op=self._MPI.SUM)
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.comm.Allgatherv(data, [recv, counts.tolist(), displs.tolist(), self._MPI.BYTE])
        return [json.loads(recv[d:d + c].tobytes().decode()) for d, c in zip(displs, counts)]

    def split(self, color: int, key: int = 0) -> MPIComm | None:
        """Sub-communicator of the ranks passing the same color; color < 0 -> None."""
        MPI = self._MPI
        sub = self.comm.Split(color if color >= 0 else MPI.UNDEFINED, key)
        return MPIComm(sub) if sub != MPI.COMM_NULL else None

    def host_array(self, shape: tuple[int, ...], dtype: Any) -> HostArray:
        """An uninitialised array shared by the ranks of each host (collective; see HostArray).

        The ranks of a host are those of ``MPI_COMM_TYPE_SHARED`` (one OS instance: emulated
        Slurm nodes on one host share it too, which is what shared memory needs). The ranks
        numbered first on each host form the leaders' communicator that copies rank 0's data
        to the other hosts.
        """
        MPI = self._MPI
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        host = MPIComm(self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank))
        raw = self.comm.Split(0 if host.rank == 0 else MPI.UNDEFINED, self.rank)
        leaders = MPIComm(raw) if raw != MPI.COMM_NULL else None
        hosts = int(self.allreduce_sum_(np.array([int(host.rank == 0)], np.int64))[0])
        win = None
        if host.size > 1 and nbytes > 0:
            win = MPI.Win.Allocate_shared(nbytes if host.rank == 0 else 0, 1, comm=host.comm)
            buf, _ = win.Shared_query(0)
            array = np.frombuffer(buf, np.uint8, count=nbytes).view(dt).reshape(shape)
        else:
            array = np.empty(shape, dt)

        def bcast() -> None:
            if leaders is not None and leaders.size > 1:
                leaders.bcast_(array.reshape(-1))
            host.barrier()  # the other ranks of the host read the window from here on

        def free() -> None:
            host.barrier()  # nobody frees the window while a rank of its host still reads it
            if win is not None:
                win.Free()
            if leaders is not None:
                leaders.free()
            host.free()

        return HostArray(array, host_rank=host.rank, host_size=host.size, hosts=hosts,
                         shared=win is not None, bcast=bcast, free=free)

    def abort(self, code: int = 1) -> None:
        logging.shutdown()
        sys.stderr.flush()
        self.comm.Abort(code)

    def free(self) -> None:
        if self.comm not in (self._MPI.COMM_WORLD, self._MPI.COMM_SELF):
            self.comm.Free()


def launched_by_mpi() -> bool:
    from gptfl_hpc.parallel.env import launched_by_mpi as by_launcher

    return by_launcher() or "mpi4py.MPI" in sys.modules


_WORLD: LocalComm | MPIComm | None = None


def get_comm() -> LocalComm | MPIComm:
    """The world communicator (cached). MPI only when launched by an MPI launcher."""
    global _WORLD
    if _WORLD is None:
        _WORLD = MPIComm() if launched_by_mpi() else LocalComm()
        check_slurm_world(_WORLD.size)
    return _WORLD


def check_slurm_world(size: int) -> None:
    """Refuse to run when the MPI world does not match the Slurm step.

    ``srun`` without (or with the wrong) ``--mpi`` type starts N independent singletons that
    would each run the whole job. Set GPTFL_ALLOW_NTASKS_MISMATCH=1 to run deliberately with
    fewer ranks than tasks (e.g. one process inside a multi-task allocation).
    """
    ntasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_STEP_NUM_TASKS")
    if not ntasks or not ntasks.isdigit() or os.environ.get("GPTFL_ALLOW_NTASKS_MISMATCH") == "1":
        return
    if int(ntasks) != size:
        raise CommError(
            f"MPI world size {size} != SLURM_NTASKS {ntasks}: the ranks do not form one MPI "
            "world (srun needs --mpi=pmix|pmi2 matching your MPI, or use mpiexec); set "
            "GPTFL_ALLOW_NTASKS_MISMATCH=1 to override")


def on_root(comm: Any, fn: Any) -> Any:
    """Run ``fn()`` on rank 0 of `comm` and broadcast its JSON-able result. A GptflError raised
    there is re-raised on every rank (same class, same one-line message), so no rank is left
    waiting in a collective and every rank exits with the same error."""
    import gptfl_hpc.errors as errors

    payload: Any = None
    if comm.rank == 0:
        try:
            payload = {"ok": fn()}
        except errors.GptflError as e:
            payload = {"error": str(e), "type": type(e).__name__}
    if comm.size > 1:
        comm.barrier()  # the other ranks sleep (not spin in Bcast) while rank 0 works
        payload = comm.bcast_json(payload)
    if "error" in payload:
        raise getattr(errors, payload["type"], errors.GptflError)(payload["error"])
    return payload["ok"]
