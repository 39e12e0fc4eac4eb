"""accelerate's torch.distributed world, bootstrapped from MPI. The only module importing accelerate.

Synthesis and server pretraining both need the same bootstrap, so it lives here once instead of
in each phase (the project rule "accelerate in its own room" is kept: nothing else imports it).

The trap this avoids: accelerate reads the launcher's variables (``OMPI_COMM_WORLD_SIZE``,
``PMI_SIZE``, ``PMIX_RANK``...), so on a server phase that uses only some ranks of a bigger MPI job
it calls ``init_process_group(world_size=<all MPI ranks>)`` and waits forever for ranks that never
join. We hide those variables, set ``RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/
MASTER_PORT`` from the participating sub-communicator, pick the GPU from the node-local rank,
and restore everything afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_HIDE_PREFIXES = ("OMPI_COMM_WORLD", "OMPI_UNIVERSE", "PMI_", "PMIX_", "MV2_", "MPI_LOCAL",
                  "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                  "SLURM_NPROCS", "SLURM_TASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES",
                  "SLURM_STEP_NUM_NODES", "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE",
                  "ACCELERATE_USE_CPU", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _my_address(single_node: bool) -> str:
    if single_node:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


@contextlib.contextmanager
def clean_launcher_env(extra: dict[str, str] | None = None) -> Iterator[None]:
    """Temporarily hide MPI/Slurm launcher variables (and set `extra`)."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith(_HIDE_PREFIXES):
            del os.environ[k]
    os.environ.update(extra or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def want_cuda(device: str) -> bool:
    import torch

    if device == "cpu":
        return False
    if device == "cuda" and not torch.cuda.is_available():
        from gptfl_hpc.errors import ConfigError

        raise ConfigError("config key run.device: 'cuda' requested but no GPU is visible; "
                          "valid: auto, cpu" + (", cuda" if torch.cuda.is_available() else ""))
    return torch.cuda.is_available()


@contextlib.contextmanager
def accelerator(comm: Any, *, device: str = "auto", mixed_precision: str = "no",
                **kwargs: Any) -> Iterator[Any]:
    """Yield an ``accelerate.Accelerator`` whose processes are exactly the ranks of `comm`.

    `comm` is a gptfl_hpc.parallel.comm communicator (a sub-communicator of the server ranks). The
    master address/port are chosen on comm rank 0 and broadcast through MPI as JSON bytes.
    """
    use_cuda = want_cuda(device)
    if comm.size > 1:
        single_node = len(set(comm.hosts)) == 1  # gathered when the communicator was made
        addr = comm.bcast_json([_my_address(single_node), _free_port()] if comm.rank == 0
                               else None)
        # node-local rank as computed by the comm layer (Slurm node aware), also picks the GPU
        env = {"RANK": str(comm.rank), "WORLD_SIZE": str(comm.size),
               "LOCAL_RANK": str(comm.local_rank), "LOCAL_WORLD_SIZE": str(comm.local_size),
               "MASTER_ADDR": str(addr[0]), "MASTER_PORT": str(addr[1])}
    else:
        env = {}
    if use_cuda and comm.size > 1:
        import torch

        torch.cuda.set_device(int(env["LOCAL_RANK"]) % torch.cuda.device_count())
    with clean_launcher_env(env):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState, PartialState

        # cpu=True is required on CPU: without it accelerate silently runs every process as a
        # world of one (see shared/reference/embedded-default.md).
        acc = Accelerator(cpu=not use_cuda, mixed_precision=mixed_precision, **kwargs)
        if acc.num_processes != comm.size:
            raise RuntimeError(f"accelerate formed a world of {acc.num_processes} processes, "
                               f"expected {comm.size}")
        log.debug("accelerate: %s process %d/%d on %s", acc.distributed_type,
                  acc.process_index, acc.num_processes, acc.device)
        try:
            yield acc
        finally:
            import torch.distributed as dist

            acc.wait_for_everyone()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            PartialState._reset_state()
