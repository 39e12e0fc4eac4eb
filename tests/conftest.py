import inspect

import pytest

# Kinds of test, marked at collection (pytest.ini lists them): `slurm` (tests/test_slurm_live.py,
# a live Slurm), `process` (starts gptfl-hpc, mpiexec or another Python process, itself or
# through a fixture: MPI, CLI and end-to-end tests) and `unit` (everything else, in-process).
# The inner loop is `pytest -m unit` (about a minute); the full suite runs all three.
PROCESS_CALLS = ("run_cli(", "run_py(", "subprocess.", "mpiexec", "federate(", "Popen(",
                 "submit(")


def _starts_processes(fn, depth: int = 2) -> bool:
    """Whether `fn`, or a function of its own module it calls (two levels), starts one."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if any(c in src for c in PROCESS_CALLS):
        return True
    module = inspect.getmodule(fn)
    if depth == 0 or module is None:
        return False
    for name in getattr(getattr(fn, "__code__", None), "co_names", ()):
        obj = getattr(module, name, None)
        if inspect.isfunction(obj) and obj.__module__ == module.__name__ and obj is not fn \
                and _starts_processes(obj, depth - 1):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slurm") or item.fspath.basename == "test_slurm_live.py":
            item.add_marker(pytest.mark.slurm)
            continue
        funcs = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for defs in (info.name2fixturedefs.values() if info else ()):
            funcs += [d.func for d in defs]
        kind = "process" if any(_starts_processes(f) for f in funcs if f) else "unit"
        item.add_marker(getattr(pytest.mark, kind))


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
