"""`python -m gptfl_hpc` (run it as `python -m mpi4py -m gptfl_hpc ...` under MPI)."""

from gptfl_hpc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
