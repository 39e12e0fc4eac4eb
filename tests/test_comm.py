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
    """Each rank takes GPU (node-local rank mod visible GPUs), made current: with srun
    --gpus-per-task=1 every rank sees one GPU (cuda:0); with --gpus-per-node the ranks of a node
    spread over them."""
    import torch

    from gptfl_hpc.config import load_config
    from gptfl_hpc.fl.engine import fl_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    comm = type("Comm", (), {"local_rank": local_rank})()
    cfg = load_config(REPO / "configs/tiny.yaml")
    assert str(fl_device(cfg.run, comm)) == want
    assert current == [int(want.split(":")[1])]
    cpu = load_config(REPO / "configs/tiny.yaml", ["run.device=cpu"])
    assert str(fl_device(cpu.run, comm)) == "cpu"


@pytest.mark.parametrize("cpus,rank,size,sharers,client,server", [
    (16, 3, 16, list(range(16)), 1, 1),   # unbound, 16 ranks on a 16-core node
    (16, 1, 4, [0, 1, 2, 3], 5, 4),       # unbound, 4 ranks: the sleeping server's share
                                          # goes to the 3 client ranks
    (2, 1, 2, [0, 1], 2, 1),              # mpiexec -n 2 on 2 cores: the one client rank
                                          # gets both (it used to get one)
    (2, 0, 1, [0], 2, 2),                 # one process plays both roles
    (4, 5, 8, [5], 4, 4),                 # srun --cpus-per-task=4, task binding
    (8, 2, 8, list(range(8)), 1, 1),      # bound per socket, 8 ranks on 8 cores
    (2, 1, 3, [0, 1, 2], 1, 1),           # more ranks than cores: at least one thread
])
def test_torch_threads_go_to_the_ranks_that_compute(monkeypatch, cpus, rank, size, sharers,
                                                    client, server):
    import gptfl_hpc.parallel.comm as comm_mod
    from gptfl_hpc.config import RunConfig
    from gptfl_hpc.fl.engine import threads_for

    monkeypatch.setattr(comm_mod, "cpu_affinity", lambda: list(range(cpus)))
    comm = type("Comm", (), {"rank": rank, "size": size, "sharers": sharers})()
    assert threads_for(RunConfig(), comm, "client") == client
    assert threads_for(RunConfig(), comm, "server") == server
    assert threads_for(RunConfig(threads=3), comm, "client") == 3  # run.threads wins
