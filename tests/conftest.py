import pytest


def pytest_report_header(config):
    import platform

    return f"gptfl-hpc tests on {platform.node()} python {platform.python_version()}"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for in-process model tests, as in the MPI subprocesses
    (OMP_NUM_THREADS=1): tiny models gain nothing from threads, and on a busy 2-core CI machine
    OpenMP threads spinning against other processes made such tests ~10x slower (28 s vs 2.6 s).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The gptfl-hpc command sets this before torch loads (gptfl_hpc/numerics.py); in-process tests
# need it too, before any test module imports torch.
import os as _os  # noqa: E402

_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
