"""The comm layer at 1 and 3 ranks (plus a plain process), chunked and unchunked, hard timeouts."""

import pytest
from helpers import REPO, run_py


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


def test_local_placement_tells_emulated_slurm_nodes_apart():
    from gptfl_hpc.parallel.comm import local_placement

    # 2 emulated Slurm nodes on one host (srun -N 2 --ntasks-per-node=2), block distribution
    keys = [["vm", "n2"], ["vm", "n2"], ["vm", "vm"], ["vm", "vm"]]
    assert [local_placement(keys, r) for r in range(4)] == [
        ("n2", 0, 2), ("n2", 1, 2), ("vm", 0, 2), ("vm", 1, 2)]
    # cyclic distribution over two real hosts; no Slurm: the hostname names the node
    keys = [["a", ""], ["b", ""], ["a", ""], ["b", ""], ["a", ""]]
    assert [local_placement(keys, r) for r in range(5)] == [
        ("a", 0, 3), ("b", 0, 2), ("a", 1, 3), ("b", 1, 2), ("a", 2, 3)]
    # a launcher that forwarded one node's Slurm environment to another host (Hydra over ssh)
    keys = [["a", "a"], ["b", "a"], ["b", "a"]]
    assert [local_placement(keys, r) for r in range(3)] == [("a", 0, 1), ("a", 0, 2),
                                                            ("a", 1, 2)]


@pytest.mark.parametrize("local_rank,gpus,want", [(0, 4, "cuda:0"), (3, 4, "cuda:3"),
                                                  (5, 4, "cuda:1"), (2, 1, "cuda:0")])
def test_gpu_binding_uses_the_node_local_rank(monkeypatch, local_rank, gpus, want):
    """Each rank takes GPU (node-local rank mod visible GPUs): with srun --gpus-per-task=1 every
    rank sees one GPU (cuda:0); with --gpus-per-node the ranks of a node spread over them."""
    import torch

    from gptfl_hpc.config import load_config
    from gptfl_hpc.fl.engine import fl_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    comm = type("Comm", (), {"local_rank": local_rank})()
    cfg = load_config(REPO / "configs/tiny.yaml")
    assert str(fl_device(cfg.run, comm)) == want
    cpu = load_config(REPO / "configs/tiny.yaml", ["run.device=cpu"])
    assert str(fl_device(cpu.run, comm)) == "cpu"


@pytest.mark.parametrize("cpus,sharers,threads", [
    (16, 16, 1),   # unbound, 16 ranks on a 16-core node
    (16, 4, 4),    # unbound, 4 ranks
    (4, 1, 4),     # srun --cpus-per-task=4 with task binding: each rank its own 4 cores
    (8, 8, 1),     # Open MPI's default above 2 ranks: bound per socket, 8 ranks on 8 cores
    (2, 3, 1),     # more ranks than cores: at least one thread
])
def test_torch_threads_share_the_bound_cpus(monkeypatch, cpus, sharers, threads):
    import gptfl_hpc.parallel.comm as comm
    from gptfl_hpc.fl.engine import cores_per_rank

    monkeypatch.setattr(comm, "cpu_affinity", lambda: list(range(cpus)))
    assert cores_per_rank(sharers) == threads
