"""Faster thread-invariant CPU convolutions for training (``run.cpu_kernels: invariant``).

Of a convolution's three products only the weight (and bias) gradient sums over the batch and
the spatial positions, and oneDNN splits that sum over the threads, so its bits depend on the
thread count. The forward pass and the input gradient assign each output element to one thread
and sum its (channels x kernel) terms in a fixed order. So the invariant mode does not need to
give up oneDNN altogether, as it used to (the native im2col + GEMM convolution, 1.5-2.3x slower
on CPU): here the forward pass and the input gradient run on oneDNN with every thread. The
weight and bias gradients are a fixed-order sum over fixed batch chunks of at most
:data:`WGRAD_CHUNK` samples (:func:`batch_chunks`, a function of the batch size alone), each
chunk's on oneDNN with one thread, which no thread count can reorder; with more than one thread
the chunks run concurrently on worker threads that each keep one intra-op thread. Evaluation
(no autograd) runs the same oneDNN forward.

Measured (2026-12-02, the 2-core AMD EPYC VM, idle; simple_cnn, batch 10, one SGD step):
native 19.1 ms at 1 thread / 9.6 ms at 2; oneDNN (``fast``, thread-dependent) 13.4 / 6.7;
version 2 (one chunk, one thread) 12.8 / 8.4, bitwise the same at 1 and 2 threads. Version 3
(the same day, the 2-core Intel Xeon VM, AVX-512): batch 10 is one chunk (unchanged); batch 64
at 2 threads 62.6 ms a step against 66.5 unchunked (4 chunks on 2 workers; at 1 thread 91 vs
89, noise-level); evaluation of 1000 images at 2 threads 322 ms against 632 with the native
forward (fast: 332). A batch of at most 16 keeps version 2's bits. tests/test_models.py trains
every registry model with a convolution at 1 and 2 threads (batches of 4 to 40, so one to
three chunks) and compares the bits of the weights and of evaluation logits; what was not
measurable here is a many-core node (oneDNN could pick another forward algorithm for another
thread count: the forward and input-gradient kernels it uses partition outputs, not
reductions).

:func:`adopt` gives a model's ``nn.Conv1d`` / ``nn.Conv2d`` layers (zero padding, numeric
padding) this behaviour by switching their class to a subclass; the parameters, state_dict keys
and isinstance checks stay as they were. The subclass takes the path only under invariant
training kernels on CPU float32, outside torch.func transforms (the vmapped client trainer
keeps the native convolution); everywhere else it is ``nn.Conv*d``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _active(x: torch.Tensor, w: torch.Tensor) -> bool:
    from gptfl_hpc.numerics import invariant_active

    if not (invariant_active() and torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and (x.requires_grad or w.requires_grad)):
        return False
    functorch = torch._C._functorch
    return not (functorch.is_functorch_wrapped_tensor(x)
                or functorch.is_functorch_wrapped_tensor(w))


def _forward_only(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Invariant kernels, CPU float32, nothing to differentiate (evaluation, no_grad): the
    forward pass runs on oneDNN with every thread, as in training (each output element is one
    thread's sum), instead of the native im2col + single-thread GEMM (3x slower measured)."""
    from gptfl_hpc.numerics import invariant_active

    if not (invariant_active() and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32):
        return False
    functorch = torch._C._functorch
    return not (functorch.is_functorch_wrapped_tensor(x)
                or functorch.is_functorch_wrapped_tensor(w))


class _OneDNN:
    """oneDNN on for the block (the invariant mode switches it off for everything else)."""

    def __enter__(self) -> None:
        self.saved = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = True  # type: ignore[assignment]

    def __exit__(self, *exc: Any) -> None:
        torch.backends.mkldnn.enabled = self.saved  # type: ignore[assignment]


class _OneThread:
    """One intra-op thread for the block (MKL re-pinned as numerics.set_threads does)."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        if self.n != 1:
            from gptfl_hpc.numerics import set_threads

            set_threads(1)

    def __exit__(self, *exc: Any) -> None:
        if self.n != 1:
            from gptfl_hpc.numerics import set_threads

            set_threads(self.n)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                stride: list[int], padding: list[int], dilation: list[int],
                groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, groups, b is not None)
        with _OneDNN():
            return torch.ops.aten.convolution(x, w, b, stride, padding, dilation, False,
                                              [0] * len(stride), groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        args = (grad, x, w, [w.shape[0]] if has_bias else None, stride, padding, dilation,
                False, [0] * len(stride), groups)
        gx = gw = gb = None
        with _OneDNN():
            if need_x:  # each input element is one thread's sum: every thread may work
                gx = torch.ops.aten.convolution_backward(*args, [True, False, False])[0]
            if need_w or (has_bias and need_b):  # sums over the batch: see _weight_grad
                gw, gb = _weight_grad(args, bool(need_w), bool(has_bias and need_b))
        return gx, gw, gb, None, None, None, None


WGRAD_CHUNK = 16
"""Target samples per weight-gradient chunk (the chunking depends on the batch size only)."""


def batch_chunks(b: int) -> list[tuple[int, int]]:
    """[start, end) of ceil(b / WGRAD_CHUNK) nearly equal consecutive chunks of a batch of `b`:
    a function of `b` alone, never of the thread count."""
    k = max(1, -(-b // WGRAD_CHUNK))
    base, extra = divmod(b, k)
    out, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def _weight_grad(args: tuple, need_w: bool, need_b: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weight and bias gradients as a fixed-order sum over fixed batch chunks
    (:func:`batch_chunks`), each chunk's on oneDNN with one thread: the bits depend on the
    batch size only. With more than one thread the chunks run concurrently on worker threads
    that each keep one intra-op thread (:class:`_Workers`); with one, one after another."""
    grad, x = args[0], args[1]
    parts = batch_chunks(int(x.shape[0]))
    mask = [False, need_w, need_b]

    def one(span: tuple[int, int]) -> tuple:
        s, e = span
        return torch.ops.aten.convolution_backward(grad[s:e], x[s:e], *args[2:], mask)[1:]

    threads = torch.get_num_threads()
    if threads == 1 or len(parts) == 1:
        with _OneThread():
            results = [one(p) for p in parts]
    else:
        results = _WORKERS.map(one, parts, threads)
    gw, gb = results[0]
    for w, b in results[1:]:  # in chunk order: a fixed summation order
        gw = gw + w if need_w else None
        gb = gb + b if need_b else None
    return gw, gb


class _Threads:
    """`n` intra-op threads on this thread for the block (MKL re-pinned as
    numerics.set_threads does under invariant kernels)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        if self.n != self.saved:
            from gptfl_hpc.numerics import set_threads

            set_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        if self.n != self.saved:
            from gptfl_hpc.numerics import set_threads

            set_threads(self.saved)


class _Workers:
    """A thread pool whose threads each run torch with ONE intra-op thread (oneDNN and MKL on
    that thread: sequential, so their reductions have one order). torch's thread count is
    per OS thread under OpenMP; the pool's threads set theirs once, and the caller's own count
    is restored after (torch.set_num_threads also sets the default of threads started later).
    Rebuilt when the wanted size changes or after a fork."""

    def __init__(self) -> None:
        self.pool: Any = None
        self.size = 0
        self.pid = 0

    def submit(self, threads: int, fn: Any, *args: Any) -> Any:
        """A future of fn(*args) on a pool of `threads` one-thread workers."""
        import os

        if self.pool is None or self.size != threads or self.pid != os.getpid():
            self._start(threads)
        return self.pool.submit(fn, *args)

    def map(self, fn: Any, items: list, threads: int) -> list:
        return [f.result() for f in [self.submit(threads, fn, it) for it in items]]

    def _start(self, threads: int) -> None:
        import os
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from gptfl_hpc.numerics import set_threads

        if self.pool is not None and self.pid == os.getpid():
            self.pool.shutdown(wait=True)
        ready = threading.Barrier(threads + 1)

        def init() -> None:
            torch.set_num_threads(1)
            torch.get_num_threads()  # torch's lazy per-thread setup, then MKL pinned to 1
            ready.wait()

        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gptfl-wgrad",
                                       initializer=init)
        for _ in range(threads):  # start every worker now, so the restore below is the last word
            self.pool.submit(lambda: None)
        ready.wait()
        set_threads(threads)
        self.size, self.pid = threads, os.getpid()


_WORKERS = _Workers()


class _Invariant:
    """The shared `_conv_forward` of the invariant subclasses (mixed in before nn.Conv*d)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if _active(input, weight):
            return _Conv.apply(input, weight, bias, list(self.stride), list(self.padding),
                               list(self.dilation), self.groups)
        if _forward_only(input, weight):  # evaluation: the training forward, no autograd
            with _OneDNN():
                return torch.ops.aten.convolution(input, weight, bias, list(self.stride),
                                                  list(self.padding), list(self.dilation),
                                                  False, [0] * len(self.stride), self.groups)
        return super()._conv_forward(input, weight, bias)  # type: ignore[misc]


class InvariantConv1d(_Invariant, nn.Conv1d):
    pass


class InvariantConv2d(_Invariant, nn.Conv2d):
    pass


_SWAP = {nn.Conv1d: InvariantConv1d, nn.Conv2d: InvariantConv2d}


def adopt(model: nn.Module) -> int:
    """Switch the model's plain Conv1d/Conv2d layers (zero, numeric padding) to the invariant
    subclasses in place; returns how many were switched."""
    n = 0
    for m in model.modules():
        cls = _SWAP.get(type(m))
        if cls is not None and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m.__class__ = cls
            n += 1
    return n
