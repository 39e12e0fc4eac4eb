"""Several of a rank's clients trained at once, each on one CPU thread (``run.concurrent_clients``).

With ``run.cpu_kernels: invariant`` a client's update has the same bits at any thread count
(numerics.py). So a rank with T > 1 threads may train T clients at a time, each on a worker
thread that keeps ONE intra-op thread, instead of one client after another on T threads: the
same updates, bit for bit, added to the round buffer in the same order (tests/test_concurrent.py
compares the final weights and every metric with the sequential path). It pays because small
models at small batches scale poorly over threads, and because the parts of the invariant kernels
that must run on one thread (a convolution's weight gradient, MKL's GEMMs) no longer leave the
other threads idle: pfl's CIFAR shape at 2 threads, per client, 52.6 ms one after another
against about 32 ms two at a time (docs/benchmarks.md).

What makes the threads independent:

* torch's thread count is per OS thread under OpenMP: each worker sets its own to 1 once (MKL
  pinned to one thread with it); the rank's main thread keeps its count for the bookkeeping.
* dropout: the models' ``nn.Dropout`` layers draw from torch's global generator, which threads
  share. The worker models' dropout layers are :class:`StreamDropout`, which draws the same
  mask (``empty_like(x).bernoulli_(1 - p)``, as ATen's dropout does) from a generator of the
  training thread, seeded as train_client seeds the global one: the same masks.
* oneDNN's on/off switch is process-wide, and the invariant convolutions switch it on around
  their own calls; while clients train concurrently it stays on for the whole rank, which only
  the invariant convolutions consult (every convolution of the model must be one: else the
  rank trains one client after another and logs why).
* the data is read, and fault points are passed, on the main thread; each worker has its own
  model copy, and a copy is reused only after the main thread has added its update.

Where it applies: CPU, invariant kernels, image data, a rank with more than one thread and more
than one client in a round, no SCAFFOLD (its control variates live on the main thread), no
``fl.vmap_clients``. Cost: one model copy, its update buffers (about 48 bytes per parameter)
and one client's activations per thread; a rank runs at most as many slots as fit in a quarter
of the node's memory (logged when that is fewer than its threads).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_TLS = threading.local()


@contextlib.contextmanager
def dropout_stream(generator: torch.Generator) -> Iterator[None]:
    """:class:`StreamDropout` layers draw from `generator` on this thread inside the block."""
    saved = getattr(_TLS, "generator", None)
    _TLS.generator = generator
    try:
        yield
    finally:
        _TLS.generator = saved


class StreamDropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from the calling thread's :func:`dropout_stream`
    generator (outside one: plain ``nn.Dropout``). ATen's CPU dropout, step for step."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        g = getattr(_TLS, "generator", None)
        if g is None or not self.training or self.p == 0 or input.numel() == 0:
            return F.dropout(input, self.p, self.training, self.inplace)
        if self.p == 1:
            zero = torch.zeros((), dtype=input.dtype, device=input.device)
            return input.mul_(zero) if self.inplace else input * zero
        noise = torch.empty_like(input).bernoulli_(1 - self.p, generator=g)
        noise.div_(1 - self.p)
        return input.mul_(noise) if self.inplace else input * noise


def why_not(model: nn.Module) -> str | None:
    """Why `model` cannot train concurrently (None: it can)."""
    from gptfl_hpc.train.invconv import InvariantConv1d, InvariantConv2d

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and \
                not isinstance(m, (InvariantConv1d, InvariantConv2d)):
            return f"its layer {name} ({type(m).__name__}) is not an invariant convolution"
        if isinstance(m, nn.modules.dropout._DropoutNd) and type(m) not in (nn.Dropout,
                                                                           StreamDropout):
            return f"its layer {name} ({type(m).__name__}) draws from the global generator"
        if isinstance(m, nn.RReLU):
            return f"its layer {name} (RReLU) draws from the global generator"
    return None


def adopt(model: nn.Module) -> int:
    """Switch the model's plain nn.Dropout layers to :class:`StreamDropout` (in place)."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Dropout:
            m.__class__ = StreamDropout
            n += 1
    return n


SLOT_BYTES_PER_PARAM = 48
"""A slot's memory per model float (model, gradient, optimiser state, the update in float32,
its float64 and int64 encodings, the slot's int64 accumulator), without activations."""


def memory_cap(numel: int, share: float = 0.25) -> int:
    """How many slots of a `numel`-float model fit in `share` of this node's memory."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 30
    return max(1, int(total * share // max(1, SLOT_BYTES_PER_PARAM * numel)))


class Slot:
    """One worker's model copy and whatever per-slot state the caller keeps on it (a slot
    trains one client at a time)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.state: dict[str, Any] = {}


class ConcurrentClients:
    """A rank's pool of `k` one-thread workers, each slot with its own copy of the model."""

    def __init__(self, make_model: Callable[[], Any], k: int) -> None:
        from gptfl_hpc.train.invconv import _Workers

        self.k = k
        self.slots = [Slot(make_model()) for _ in range(k)]
        for slot in self.slots:
            adopt(slot.model.model)
        self.pool = _Workers()

    def train(self, todo: list[int], get: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
              job: Callable[..., Any]) -> Iterator[tuple[int, float, Any, Slot]]:
        """(client, samples, job's result, its slot) for each client of `todo`, in order;
        ``job(slot, cid, x, y)`` trains one client on a worker. A slot is given its next
        client only after the caller has asked for the next result."""
        from gptfl_hpc.train.invconv import _Threads

        pending: dict[int, Any] = {}
        sizes: dict[int, int] = {}
        ready: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def read(i: int) -> None:
            if i < len(todo) and i not in ready:
                ready[i] = get(todo[i])  # reads (and fault points) stay on this thread

        def submit(i: int) -> None:
            read(i)
            x, y = ready.pop(i)
            sizes[i] = len(y)
            pending[i] = self.pool.submit(self.k, job, self.slots[i % self.k], todo[i], x, y)
            read(i + self.k)  # the slot's next client, read while the workers train

        self.pool.submit(self.k, lambda: None).result()  # started before the main thread's
        # count changes below (starting the pool restores it)
        # the main thread's work on one thread too: the workers hold the cores
        with torch.backends.mkldnn.flags(enabled=True), _Threads(1):
            try:
                for i in range(min(self.k, len(todo))):
                    submit(i)
                for i in range(len(todo)):
                    result = pending.pop(i).result()
                    yield todo[i], float(sizes.pop(i)), result, self.slots[i % self.k]
                    if i + self.k < len(todo):
                        submit(i + self.k)
            finally:
                for f in pending.values():  # an error: let the others finish before leaving
                    f.cancel() or f.exception()
