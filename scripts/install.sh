#!/usr/bin/env bash
# Create .venv and install gptfl-hpc with everything it needs (CPU torch by default).
#   GPTFL_TORCH   torch requirement to install first (default torch==2.13.0, the CPU wheel on CI;
#                 on a GPU cluster install your CUDA torch build before, or set GPTFL_TORCH)
#   GPTFL_EXTRAS  extras to install (default dev = all runtime extras + test tools)
#   GPTFL_VENV    venv directory (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPTFL_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned, so nothing later pulls a multi-GB CUDA build by accident
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q "${GPTFL_TORCH:-torch==2.13.0}"
fi
"$VENV/bin/python" -m pip install -q -e ".[${GPTFL_EXTRAS:-dev}]"
"$VENV/bin/python" -c "import torch, mpi4py, h5py; print('gptfl-hpc installed: torch', torch.__version__, '| mpi4py', mpi4py.__version__)"
