"""Size-agnostic checks of gptfl_hpc.parallel.comm; run under `mpiexec -n N python -m mpi4py`.

Asserts out == f(local, size) for every collective, so it passes at any N (mpi4py demo style).
"""

import socket
import sys

import numpy as np

from gptfl_hpc.parallel.comm import get_comm


def main() -> None:
    c = get_comm()
    r, n = c.rank, c.size
    # in-place allreduce of a float32 buffer, including the chunked path
    buf = np.arange(10_001, dtype=np.float32) * (r + 1)
    c.allreduce_sum_(buf)
    np.testing.assert_array_equal(buf, np.arange(10_001, dtype=np.float32) * (n * (n + 1) / 2))
    # broadcast from the root, in place
    b = np.full(5_003, r, dtype=np.float32)
    c.bcast_(b, root=0)
    assert (b == 0).all()
    # JSON control messages, no pickle
    assert c.bcast_json({"port": 1234, "r": r} if r == 0 else None) == {"port": 1234, "r": 0}
    assert c.allgather_json(f"rank{r}") == [f"rank{i}" for i in range(n)]
    # sub-communicator (e.g. the server ranks of a synthesis phase)
    sub = c.split(0 if r < 2 else -1)
    if r < 2:
        assert sub is not None and sub.size == min(n, 2)
        x = np.ones(3, dtype=np.float32)
        sub.allreduce_sum_(x)
        assert (x == sub.size).all()
        sub.free()
    else:
        assert sub is None
    m = np.array([float(r)])
    c.allreduce_max_(m)
    assert m[0] == n - 1
    c.barrier()
    assert 0 <= c.local_rank < c.local_size <= n
    # mpiexec on one host: every rank is on this node, node-local rank = world rank
    assert (c.node, c.local_rank, c.local_size) == (socket.gethostname(), r, n)
    assert c.hosts == [socket.gethostname()] * n
    assert c.cpu_sharers == n  # the tests' mpiexec binds nothing: all ranks share all CPUs
    print(f"comm-ok rank {r}/{n} is_mpi={c.is_mpi}", flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
