"""Model parameters and float buffers as views into ONE flat float32 buffer.

The buffer is what MPI reduces and broadcasts, so a round needs no copy-in/copy-out: ``Bcast``
into :attr:`FlatModel.flat` updates the model's weights directly. Layout::

    [ parameters ... | float buffers (e.g. BatchNorm running mean/var) ... ]

Integer buffers (BatchNorm ``num_batches_tracked``) are *not* in the buffer: averaging a counter
as a float is meaningless (a bug of the reference code). They are kept per model, travel in
checkpoints, and only matter for BatchNorm with momentum=None, which no registry model uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def host_buffer(numel: int) -> torch.Tensor:
    """A zeroed 1-D float32 CPU tensor whose memory numpy allocated.

    numpy backs large arrays with transparent huge pages (madvise) on Linux; torch's CPU
    allocator does not. MPI's shared-memory copies over a 47 MB buffer measured 10-20 % slower
    on torch-allocated memory, so every buffer MPI touches is allocated here.
    """
    return torch.from_numpy(np.zeros(numel, dtype=np.float32))


class FlatModel:
    """Wraps `model` so that its float tensors live in ``self.flat`` (a 1-D float32 tensor)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        float_params = [(n, p) for n, p in model.named_parameters()]
        float_bufs = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.int_buffers = {n: b for n, b in model.named_buffers() if not b.is_floating_point()}
        for name, t in float_params + float_bufs:
            if t.dtype != torch.float32:
                raise TypeError(f"{name}: only float32 tensors can live in the flat buffer")
        self.names = [n for n, _ in float_params + float_bufs]
        self.num_params = sum(p.numel() for _, p in float_params)
        self.numel = self.num_params + sum(b.numel() for _, b in float_bufs)
        device = next(iter(model.parameters())).device
        self.flat = (host_buffer(self.numel) if device.type == "cpu"
                     else torch.zeros(self.numel, dtype=torch.float32, device=device))
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, t in float_params + float_bufs:
            view = self.flat[offset:offset + t.numel()].view_as(t)
            view.copy_(t.detach())
            t.data = view  # the module's tensor now IS a slice of the flat buffer
            self.views[name] = view
            offset += t.numel()
        self.params = [p for _, p in float_params]

    @property
    def param_flat(self) -> torch.Tensor:
        return self.flat[:self.num_params]

    def numpy(self) -> np.ndarray:
        """The same memory as a numpy array (CPU only): the MPI buffer."""
        return self.flat.numpy()

    def check_views(self) -> bool:
        """True while every module tensor still aliases the flat buffer."""
        named: dict[str, torch.Tensor] = dict(self.model.named_parameters())
        named.update(dict(self.model.named_buffers()))
        return all(named[n].data_ptr() == v.data_ptr() for n, v in self.views.items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy values in (keeps the aliasing: load_state_dict copies into existing tensors)."""
        self.model.load_state_dict(state, strict=True)
        assert self.check_views()
