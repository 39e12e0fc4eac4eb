"""The comm layer at 1 and 3 ranks (plus a plain process), chunked and unchunked, hard timeouts."""

import pytest
from helpers import run_py


@pytest.mark.parametrize("n", [None, 1, 3])
@pytest.mark.parametrize("chunk", ["1073741824", "1000"])
def test_collectives(n, chunk):
    p = run_py(["tests/mpi_comm_checks.py"], n=n, timeout=90,
               extra_env={"GPTFL_MPI_MAX_ELEMENTS": chunk})
    assert p.returncode == 0, p.stderr[-3000:]
    size = n or 1
    assert p.stdout.count("comm-ok") == size
    if n is None:
        assert "is_mpi=False" in p.stdout  # no launcher: a LocalComm, MPI never initialised


def test_spin_wait_mode_also_works():
    p = run_py(["tests/mpi_comm_checks.py"], n=3, timeout=90, extra_env={"GPTFL_MPI_WAIT": "spin"})
    assert p.returncode == 0, p.stderr[-3000:]


def test_buffer_over_2_gib():
    """Large models: a 2.004 GiB flat buffer is reduced and broadcast correctly on 2 ranks."""
    p = run_py(["tests/mpi_big_buffer.py"], n=2, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("big-ok") == 2
