"""Faster thread-invariant CPU convolutions for training (``run.cpu_kernels: invariant``).

Of a convolution's three products only the weight (and bias) gradient sums over the batch and
the spatial positions, and oneDNN splits that sum over the threads, so its bits depend on the
thread count. The forward pass and the input gradient assign each output element to one thread
and sum its (channels x kernel) terms in a fixed order. So the invariant mode does not need to
give up oneDNN altogether, as it used to (the native im2col + GEMM convolution, 1.5-2.3x slower
on CPU): here the forward pass and the input gradient run on oneDNN with every thread, and only
the weight and bias gradients run on oneDNN with one thread, which no thread count can reorder.

Measured (2026-12-02, the 2-core AMD EPYC VM, idle; simple_cnn, batch 10, one SGD step):
native 19.1 ms at 1 thread / 9.6 ms at 2; oneDNN (``fast``, thread-dependent) 13.4 / 6.7; this
12.8 / 8.4, bitwise the same at 1 and 2 threads. tests/test_models.py trains every registry
model with a convolution at 1 and 2 threads and compares the bits; what was not measurable here
is a many-core node (oneDNN could pick another forward algorithm for another thread count: the
forward and input-gradient kernels it uses partition outputs, not reductions, and evaluation has
always relied on that).

:func:`adopt` gives a model's ``nn.Conv1d`` / ``nn.Conv2d`` layers (zero padding, numeric
padding) this behaviour by switching their class to a subclass; the parameters, state_dict keys
and isinstance checks stay as they were. The subclass takes the path only under invariant
training kernels on CPU float32 with autograd recording, outside torch.func transforms (the
vmapped client trainer keeps the native convolution); everywhere else it is ``nn.Conv*d``.
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
            if need_w or (has_bias and need_b):  # sums over the batch: one thread
                with _OneThread():
                    _, gw, gb = torch.ops.aten.convolution_backward(
                        *args, [False, bool(need_w), bool(has_bias and need_b)])
        return gx, gw, gb, None, None, None, None


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
