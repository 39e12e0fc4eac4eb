"""CPU numerics: the same bits at any thread count, hence at any rank count and placement.

How many torch threads a rank gets depends on the placement (ranks per node, CPU binding, the
server's cores going to the client ranks). On CPU some kernels sum in an order that depends on
the thread count, so without care a run on 1 node and on 2 nodes trains different weights
(measured on an AMD EPYC with AVX-512: 9e-4 apart after 3 FedAvg rounds). With
``run.cpu_kernels: invariant`` (the default) training uses kernels whose results do not depend
on the thread count:

* oneDNN (mkldnn) convolutions are switched off: their weight gradient splits the batch over the
  threads and reduces the partial sums in a thread-count-dependent order. NNPACK likewise. The
  native convolution (im2col + GEMM) is used instead.
* MKL runs in strict conditional-numerical-reproducibility mode (``MKL_CBWR=AUTO,STRICT``),
  whose GEMMs give the same bits at any thread count. MKL reads the variable when it loads, so
  the CLI sets it before torch is imported (:func:`set_process_env`); a library user sets it in
  the environment (``tests/conftest.py`` does).
* The project's own code never reduces a large tensor with torch on the training path
  (FedProx's proximal gradient is applied elementwise; update norms use numpy).

Measured cost on 2 cores: none for the small CNNs (digits_cnn, simple_cnn: the native path is as
fast or faster at these sizes), about 1.7-2.9x slower steps for the ResNets. ``fast`` restores
oneDNN/NNPACK: then results depend on the threads per rank, and so on the rank count (stated in
the README). What stays CPU-dependent either way: ATen and MKL pick AVX2 or AVX-512 code paths by
CPU, so an Intel and an AMD machine (or two CPU generations) may differ in the last bits.
Inference (synthesis, evaluation) keeps oneDNN: forward convolutions are thread-invariant.
GPUs: no bitwise promise (cuDNN picks algorithms at run time); see the README.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

MKL_ENV = ("MKL_CBWR", "AUTO,STRICT")
KERNELS = ("invariant", "fast")


def set_process_env() -> None:
    """Call before torch is imported: MKL's strict reproducibility mode (kept if set already)."""
    os.environ.setdefault(*MKL_ENV)


def mkl_strict() -> bool:
    return "STRICT" in os.environ.get(MKL_ENV[0], "").upper()


@contextlib.contextmanager
def training_kernels(mode: str, device_type: str = "cpu") -> Iterator[None]:
    """Training kernels for `mode` ('invariant' or 'fast') on `device_type`, restored after.

    On CUDA it turns cudnn.benchmark off inside (the pretraining stage turns it on for itself),
    so no autotuning setting leaks from one stage into the next.
    """
    import torch

    if mode not in KERNELS:
        raise ValueError(f"cpu kernels {mode!r}; valid: {', '.join(KERNELS)}")
    saved = (torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled(),
             torch.backends.cudnn.benchmark)
    invariant = mode == "invariant" and device_type == "cpu"
    if invariant and not mkl_strict():
        log.warning("MKL_CBWR is not set to a STRICT mode in this process's environment: GEMM "
                    "results may depend on the thread count (set MKL_CBWR=AUTO,STRICT before "
                    "starting Python; the gptfl-hpc command does this itself)")
    try:
        torch.backends.mkldnn.enabled = not invariant
        torch.backends.nnpack.set_flags(not invariant)
        torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.backends.mkldnn.enabled = saved[0]
        torch.backends.nnpack.set_flags(bool(saved[1]))
        torch.backends.cudnn.benchmark = saved[2]
