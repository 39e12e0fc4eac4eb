"""A > 2 GiB float32 buffer through allreduce_sum_ and bcast_ (one call each; 2^29+2^20 elems)."""

import numpy as np

from gptfl_hpc.parallel.comm import get_comm

c = get_comm()
n = 2**29 + 2**20  # 2.004 GiB of float32: past the 2 GiB limit of byte-counted pickled messages
buf = np.full(n, c.rank + 1, dtype=np.float32)
c.allreduce_sum_(buf)
want = c.size * (c.size + 1) / 2
assert buf[0] == want and buf[-1] == want and buf[n // 2] == want
buf[:] = c.rank
c.bcast_(buf, root=0)
assert buf[-1] == 0 and buf[0] == 0
print(f"big-ok rank {c.rank} {buf.nbytes / 2**30:.3f} GiB", flush=True)
