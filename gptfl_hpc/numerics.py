"""CPU numerics: the same bits at any thread count, hence at any rank count and placement.

How many torch threads a rank gets depends on the placement (ranks per node, CPU binding, the
server's cores going to the client ranks). On CPU some kernels sum in an order that depends on
the thread count, so without care a run on 1 node and on 2 nodes trains different weights
(measured on an AMD EPYC with AVX-512: 9e-4 apart after 3 FedAvg rounds). With
``run.cpu_kernels: invariant`` (the default) training uses kernels whose results do not depend
on the thread count:

* oneDNN (mkldnn) convolutions compute their weight gradient by splitting the batch over the
  threads and reducing the partial sums in a thread-count-dependent order. The registry models'
  convolutions (train/invconv.py) therefore run their forward pass and input gradient on oneDNN
  with every thread (each output element is one thread's fixed-order sum) and their weight and
  bias gradients as a fixed-order sum over fixed batch chunks (at most 16 samples; a function
  of the batch size alone), each chunk's on oneDNN with one thread (the chunks run concurrently
  on one-thread worker threads). Their forward pass without autograd (evaluation) runs on
  oneDNN with every thread as well. oneDNN stays switched off for everything else, and
  NNPACK too; other convolutions (and the vmapped client trainer) use the native convolution
  (im2col + GEMM), as every convolution did before train/invconv.py (1.5x slower at 1 thread).
* MKL's own GEMM threading is switched off on the training thread (``mkl_set_num_threads_local
  (1)``): MKL splits small GEMMs (e.g. a 7x128 @ 128x10 classifier on a short last batch) over
  its threads in a thread-count-dependent way. The convolutions still use every thread (ATen
  parallelises the native convolution over the batch, one sequential GEMM per sample), and MKL
  runs in conditional-numerical-reproducibility mode (``MKL_CBWR=AUTO,STRICT``), so its results
  do not depend on memory alignment either. MKL reads that variable when it loads, so the CLI
  sets it before torch is imported (:func:`set_process_env`); a library user sets it in the
  environment (``tests/conftest.py`` does).
* The project's own code never reduces a large tensor with torch on the training path
  (FedProx's proximal gradient is applied elementwise; update norms use numpy).
* Two torch kernels that stay thread-dependent are avoided in the models themselves
  (train/models.py): BatchNorm on 1x1 feature maps (the ResNets' last stage at 32 px; a
  BatchNorm2d subclass computes that case with plain tensor ops) and GroupNorm's backward with
  exactly 4 channels per group (audio_cnn uses groups of 8). tests/test_models.py checks every
  registry model at 1 and 2 threads.

Where it applies: FL client training and server pretraining (the thread counts of FL ranks
depend on the placement). The embedded generator's training runs on rank 0 alone, so its thread
count does not depend on the rank count; it uses the fast kernels (the invariant ones cost 2.4x
on its UNet). ``fast`` restores oneDNN/NNPACK everywhere: then FL results depend on the threads
per rank, and so on the rank count. Cost of invariant kernels with the native convolution
(2026-12-01, AMD EPYC, 1 thread, batch 32, one SGD step, median of 5 interleaved runs):
digits_cnn 10.2 vs 6.2 ms (1.66x), convnet 270 vs 160 ms (1.68x), resnet20 393 vs 174 ms
(2.25x); with train/invconv.py (2026-12-02, simple_cnn, batch 10): 12.8 ms against fast's 13.4
at 1 thread, 8.4 against 6.7 at 2 (the native convolution: 19.1 and 9.6). Per FL client of
pfl's CIFAR shape at 2 threads (benchmarks/profile_fl_client.py, docs/benchmarks.md) the
invariant kernels cost about 1.4x fast's training time: the one-thread weight gradient of a
batch of 10 (one chunk) and the one-thread GEMMs of the linear layers. A client rank with more
than one thread therefore trains that many clients at once, one thread each
(``run.concurrent_clients``, fl/concurrent.py): the same bits, and faster than ``fast``.
What stays CPU-dependent either way: ATen and MKL pick AVX2 or AVX-512 code paths by CPU, so an
Intel and an AMD machine (or two CPU generations) may differ in the last bits. Inference
(synthesis, evaluation) keeps oneDNN: forward convolutions are thread-invariant
(tests/test_models.py compares evaluation logits at 1 and 2 threads). GPUs: no bitwise
promise (cuDNN picks algorithms at run time).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MKL_ENV = ("MKL_CBWR", "AUTO,STRICT")
KERNELS = ("invariant", "fast")


def set_process_env() -> None:
    """Call before torch is imported: MKL's strict reproducibility mode (kept if set already)."""
    os.environ.setdefault(*MKL_ENV)


def mkl_strict() -> bool:
    return "STRICT" in os.environ.get(MKL_ENV[0], "").upper()


_MKL: dict[str, Any] = {}


def _mkl_local() -> Any:
    """MKL's thread-local thread-count setter of this torch build, or None."""
    if "fn" not in _MKL:
        import ctypes

        import torch

        fn = None
        if torch.backends.mkl.is_available():
            lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
            for name in (str(lib), "libmkl_rt.so", "libmkl_rt.so.2"):
                try:
                    fn = ctypes.CDLL(name).mkl_set_num_threads_local
                    break
                except (OSError, AttributeError):
                    continue
        _MKL["fn"] = fn
    return _MKL["fn"]


def pin_gemm_threads(enabled: bool) -> bool:
    """MKL GEMMs single-threaded on this thread (enabled) or back to the global setting.

    Returns False when this torch build exposes no MKL thread control (then GEMM invariance
    rests on the BLAS library: OpenBLAS splits rows/columns, not the reduction)."""
    import ctypes

    fn = _mkl_local()
    if fn is None:
        return False
    fn(ctypes.byref(ctypes.c_int(1 if enabled else 0)))  # Fortran-style: by reference
    return True


_ACTIVE = {"invariant": False}


def invariant_active() -> bool:
    """Whether training runs under the invariant CPU kernels right now (train/invconv.py)."""
    return _ACTIVE["invariant"]


def set_threads(n: int) -> None:
    """torch.set_num_threads, keeping MKL's GEMMs pinned under invariant kernels (torch resets
    MKL's thread-local setting whenever the thread count changes)."""
    import torch

    torch.set_num_threads(int(n))
    if _ACTIVE["invariant"]:
        _pin_now()


def _pin_now() -> bool:
    """Pin MKL after torch's lazy per-thread initialisation has run: the first
    at::get_num_threads() after torch.set_num_threads() re-applies torch's count to MKL."""
    import torch

    torch.get_num_threads()
    return pin_gemm_threads(True)


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
             torch.backends.cudnn.benchmark, _ACTIVE["invariant"])
    invariant = mode == "invariant" and device_type == "cpu"
    if invariant and not mkl_strict() and torch.backends.mkl.is_available():
        log.warning("MKL_CBWR is not set to a STRICT mode in this process's environment: GEMM "
                    "results may depend on memory alignment (set MKL_CBWR=AUTO,STRICT before "
                    "starting Python; the gptfl-hpc command does this itself)")
    try:
        torch.backends.mkldnn.enabled = not invariant  # type: ignore[assignment]
        torch.backends.nnpack.set_flags(not invariant)
        torch.backends.cudnn.benchmark = False
        _ACTIVE["invariant"] = invariant
        if invariant and not _pin_now() and not _MKL.get("warned"):
            _MKL["warned"] = True
            log.info("no MKL thread control in this torch build; CPU GEMM invariance across "
                     "thread counts relies on its BLAS library")
        yield
    finally:
        torch.backends.mkldnn.enabled = saved[0]
        torch.backends.nnpack.set_flags(bool(saved[1]))
        torch.backends.cudnn.benchmark = saved[2]
        _ACTIVE["invariant"] = saved[3]
        if invariant:
            pin_gemm_threads(saved[3])
