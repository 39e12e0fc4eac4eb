"""Shared test utilities: run the CLI in-process-free, under mpiexec, always with a hard timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
_VENV_MPIEXEC = Path(PY).with_name("mpiexec")
MPIEXEC = str(_VENV_MPIEXEC) if _VENV_MPIEXEC.exists() else "mpiexec"

# Open MPI 5 as root, more ranks than cores, no binding (CI has 2 cores); harmless for MPICH.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "PRTE_MCA_hwloc_default_binding_policy": "none",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


def env(**extra: str) -> dict:
    from gptfl_hpc.parallel.env import without_launcher

    e = without_launcher(os.environ)  # never inherit a Slurm allocation's view of the world
    e.update(MPI_ENV)
    e.update(extra)
    return e


def run_cli(args: list[str], n: int | None = None, timeout: float = 300, check: bool = True,
            extra_env: dict | None = None, cwd: str | Path | None = None
            ) -> subprocess.CompletedProcess:
    """Run `gptfl-hpc ARGS` as one plain process (n=None) or under `mpiexec -n N`."""
    base = [PY, "-m", "mpi4py", "-m", "gptfl_hpc", *map(str, args)]
    cmd = base if n is None else [MPIEXEC, "-n", str(n), *base]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=env(**(extra_env or {})), cwd=cwd or REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n"
                             f"{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def run_py(code_or_args: list[str], n: int | None = None, timeout: float = 120,
           extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m mpi4py ARGS` (a script or -c code) under mpiexec -n N with a timeout."""
    base = [PY, "-m", "mpi4py", *code_or_args]
    cmd = base if n is None else [MPIEXEC, "-n", str(n), *base]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env(**(extra_env or {})), cwd=REPO)


def write_synthetic(path: Path, images, labels) -> Path:
    """A file in the synthetic set's layout: images, labels (+ prompt_index, guidance, seed)."""
    import h5py
    import numpy as np

    n = len(labels)
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["labels"] = labels.astype(np.int64)
        f["prompt_index"] = np.zeros(n, np.int64)
        f["guidance"] = np.ones(n, np.float32)
        f["seed"] = np.arange(n, dtype=np.int64)
    return path


def fake_accelerator(dev, rank: int = 0):
    """What pretraining's Trainer uses of an accelerate Accelerator, for in-process tests."""
    import types

    return types.SimpleNamespace(device=dev, process_index=rank, prepare=lambda m, o: (m, o),
                                 backward=lambda loss: loss.backward())
