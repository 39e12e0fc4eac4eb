#!/usr/bin/env bash
# The README's main command: install, then run the embedded GPT-FL demo on 4 MPI ranks.
#   RANKS (default 4), OUT (default runs/demo), CONFIG (default configs/digits.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/mpi-env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/mpiexec -n "${RANKS:-4}" .venv/bin/python -m mpi4py -m gptfl_hpc run \
  "${CONFIG:-configs/digits.yaml}" --out "${OUT:-runs/demo}" "$@"
