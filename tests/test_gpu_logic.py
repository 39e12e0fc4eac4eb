"""GPU decisions that can be checked without a GPU (mocked device queries): the precision a
GPU gets, and that no cuDNN autotuning setting leaks from one stage into the next."""

from __future__ import annotations

import pytest
import torch

from gptfl_hpc.errors import ConfigError
from gptfl_hpc.numerics import training_kernels
from gptfl_hpc.train.pretrain import _resolve_precision


@pytest.mark.parametrize("has_bf16,want", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_follows_the_gpu(monkeypatch, has_bf16, want):
    # Ampere and later: bf16; V100/T4 (no bf16): fp16 with loss scaling; CPU: none
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: has_bf16)
    assert _resolve_precision("auto", use_cuda=True) == want
    assert _resolve_precision("auto", use_cuda=False) == "no"


def test_explicit_precision_the_device_cannot_do_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=r"^config key pretrain\.mixed_precision: this GPU has "
                                          r"no bf16 support; valid: auto, no, fp16$"):
        _resolve_precision("bf16", use_cuda=True)
    with pytest.raises(ConfigError, match=r"'fp16' needs a GPU; valid on CPU: auto, no, bf16"):
        _resolve_precision("fp16", use_cuda=False)
    assert _resolve_precision("fp16", use_cuda=True) == "fp16"


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_cudnn_benchmark_does_not_leak_out_of_a_stage(device_type):
    """Pretraining turns cudnn.benchmark on inside its kernels context; FL (the next stage, on
    the same GPUs) must start with the setting it had before."""
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with training_kernels("invariant", device_type):
            assert torch.backends.cudnn.benchmark is False  # no autotuning unless asked
            torch.backends.cudnn.benchmark = True  # what the pretraining stage does
        assert torch.backends.cudnn.benchmark is False
        torch.backends.cudnn.benchmark = True
        with training_kernels("fast", device_type):
            assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
