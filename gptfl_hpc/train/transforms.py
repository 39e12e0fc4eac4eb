"""The one input pipeline used by BOTH server pretraining and FL client training.

The reference code normalised synthetic pretraining with ImageNet statistics and FL fine-tuning
with CIFAR statistics (+ Cutout); here both phases call :class:`ImageTransform` built from the
dataset manifest, so the pretrained model sees exactly the input distribution FL feeds it.

Batched and device-agnostic: uint8 NHWC in, normalised float NCHW out, augmentation drawn from an
explicit ``torch.Generator`` (deterministic, independent of batch composition order).
Audio datasets (int16 waveforms) use :class:`gptfl_hpc.train.audio.AudioTransform`, which keeps
the same call contract; :func:`make_transform` picks the one for a dataset kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gptfl_hpc.errors import DataError

KINDS = ("image", "audio")


class ImageTransform:
    """uint8 (B,H,W,C) -> float32 (B,C,H,W), normalised; optional random shift (+ flip).

    Augmentation: random translation by up to ``pad`` pixels (zero padding, i.e. a random crop of
    the padded image); horizontal flips only for natural images (H >= 32), never for digits.
    ``output_shape`` is the model's input (H, W, C), here the input shape itself.
    """

    def __init__(self, mean: list[float], std: list[float], input_shape: list[int] | tuple,
                 augment: bool) -> None:
        h, w, c = (int(s) for s in input_shape)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if self.mean.numel() not in (1, c):
            raise ValueError(f"normalisation mean has {self.mean.numel()} values for {c} channels")
        self.augment = augment
        self.output_shape = (h, w, c)
        """(H, W, C) of what the model sees (the same as the input for images)."""
        self.pad = 4 if h >= 32 else 1
        self.flip = h >= 32
        self.rowwise = True
        """Without augmentation each output row depends on its input row only, elementwise:
        transforming a batch equals transforming its rows one by one, bit for bit."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if self.augment:
            x = self._augment(x, generator)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std

    def _augment(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.pad
        # offsets drawn on the CPU generator (device independent), then moved
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        flip = (torch.rand(b, generator=g) < 0.5).to(x.device) if self.flip else None
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B,H,1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B,1,W)
        bidx = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)
        if flip is not None:
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out.contiguous()


def make_transform(kind: str, mean: Sequence[float] | None, std: Sequence[float] | None,
                   input_shape: Sequence[int], augment: bool) -> Any:
    """The dataset's transform: :class:`ImageTransform` for kind "image" (uint8 (H, W, C)),
    :class:`gptfl_hpc.train.audio.AudioTransform` for kind "audio" (int16 (L,) at 16 kHz).

    Both are called as ``transform(batch, generator)`` and expose ``augment`` and
    ``output_shape`` (the model's (H, W, C), for ``build_model``).
    """
    if kind == "image":
        return ImageTransform(list(mean or []), list(std or []), input_shape, augment)
    if kind == "audio":
        from gptfl_hpc.train.audio import AudioTransform

        return AudioTransform(mean, std, input_shape, augment)
    raise DataError(f"dataset kind {kind!r} has no input transform; valid: {', '.join(KINDS)}")
