#!/usr/bin/env bash
# The README's test command: install everything (venv, MPI wheels, a local Slurm cluster)
# and run the whole test suite. MPI tests run under mpiexec -n 1 / -n 3 with hard timeouts.
#
# Slurm: when root with apt-get, scripts/slurm-up.sh installs and starts slurmctld/slurmd/munge/
# slurmdbd and the live Slurm tests run; a failing bring-up fails this script. Without root or
# apt the live Slurm tests skip with that reason (GPTFL_SLURM_SKIP).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/install.sh
. scripts/mpi-env.sh
# A second MPI for the live Slurm tests (MPICH under srun --mpi=pmi2), in its own prefix so that
# it does not replace the venv's Open MPI; mpi4py loads it when MPI4PY_LIBMPI points at it.
if [ ! -e .venv/mpich/lib/libmpi.so.12 ] && \
    ! .venv/bin/python -m pip install -q --prefix .venv/mpich "mpich>=4.2"; then
  echo "[test.sh] could not install the mpich wheel: the MPICH tests will skip" >&2
fi
export GPTFL_TEST_MPICH="$PWD/.venv/mpich/lib/libmpi.so.12"
export OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash scripts/slurm-up.sh
  trap 'bash scripts/slurm-down.sh >/dev/null 2>&1 || true' EXIT
else
  export GPTFL_SLURM_SKIP="not root or no apt-get: cannot install a local Slurm"
fi
echo "[test.sh] setup took $(( $(date +%s) - t0 ))s"
# house rules that check themselves: lint everywhere, types in the pure rooms (pyproject.toml)
.venv/bin/ruff check gptfl_hpc tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -ra --durations=20 -p no:cacheprovider tests "$@"
