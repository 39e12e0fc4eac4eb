"""The server-phase bootstrap (parallel/accel.py): which ranks are servers, which GPU each uses,
where the rendezvous listens. GPUs are mocked (no GPU here); the torch.distributed world is
real (gloo) under mpiexec."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers import run_py

from gptfl_hpc.errors import ConfigError
from gptfl_hpc.parallel import accel


class FakeComm:
    """A world as seen from one rank: every rank's (node, visible GPUs)."""

    def __init__(self, rank: int, nodes: list[str], gpus: list[list[str]]) -> None:
        self.rank, self.size = rank, len(nodes)
        self.node = nodes[rank]
        self.local_rank = sum(1 for n in nodes[:rank] if n == nodes[rank])
        self._seen = [[n, g] for n, g in zip(nodes, gpus)]
        self.bcasts: list = []

    def allgather_json(self, obj):
        return [obj if r == self.rank else self._other(r, obj) for r in range(self.size)]

    def _other(self, r, obj):
        if isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str) and \
                isinstance(obj[1], list):
            return self._seen[r]
        return obj

    def bcast_json(self, obj, root=0):
        self.bcasts.append(obj)
        return obj

    def split(self, color, key=0):
        return self if color >= 0 else None

    def free(self):
        pass


def _cuda(monkeypatch, visible: list[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible))
    monkeypatch.setattr(accel, "visible_gpus", lambda: list(visible))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)


RUN = SimpleNamespace(device="auto", server_processes=0)


def test_gpus_per_task_one_counts_the_nodes_gpus(monkeypatch):
    """srun --gpus-per-task=1: each rank sees one GPU (index 0), all different. The server
    phase uses all 4, not 1 (the old count read torch.cuda.device_count() on each rank)."""
    nodes = ["a"] * 4 + ["b"] * 4
    gpus = [[f"GPU-a{i}"] for i in range(4)] + [[f"GPU-b{i}"] for i in range(4)]
    _cuda(monkeypatch, ["GPU-a0"])
    comm = FakeComm(0, nodes, gpus)
    assert accel.server_count(comm, RUN) == 4
    assert comm.bcasts == [4]  # decided on rank 0, broadcast to all


def test_all_gpus_visible_counts_them_once(monkeypatch):
    nodes = ["a"] * 6
    gpus = [[f"GPU-{i}" for i in range(4)]] * 6
    _cuda(monkeypatch, [f"GPU-{i}" for i in range(4)])
    assert accel.server_count(FakeComm(0, nodes, gpus), RUN) == 4
    # the device of a rank is its node-local rank modulo what it sees: 0..3 for ranks 0..3
    assert [FakeComm(r, nodes, gpus).local_rank % 4 for r in range(4)] == [0, 1, 2, 3]


def test_cpu_and_explicit_counts(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accel.server_count(FakeComm(0, ["a"] * 3, [[]] * 3), RUN) == 1
    run = SimpleNamespace(device="auto", server_processes=2)
    assert accel.server_count(FakeComm(0, ["a"] * 3, [[]] * 3), run) == 2


def test_two_server_ranks_on_one_gpu_fail_up_front(monkeypatch):
    """One GPU, run.server_processes=2: NCCL would refuse only at the first collective, after
    all of synthesis. Now a one-line ConfigError before any work."""
    _cuda(monkeypatch, ["GPU-0"])
    run = SimpleNamespace(device="auto", server_processes=2)
    comm = FakeComm(0, ["a", "a", "a"], [["GPU-0"]] * 3)
    monkeypatch.setattr(comm, "allgather_json", lambda obj: [["a", "GPU-0"], ["a", "GPU-0"],
                                                             None])
    with pytest.raises(ConfigError, match="server ranks 0 and 1 would share GPU GPU-0"):
        accel.server_comm(comm, run)


def test_rendezvous_address_choice(monkeypatch):
    assert accel.rendezvous_address(True, None) == ("127.0.0.1", "lo")
    monkeypatch.setattr(accel, "interface_addresses",
                        lambda: {"lo": "127.0.0.1", "eth0": "10.0.0.5", "ib0": "192.168.1.5"})
    monkeypatch.setattr(accel, "default_route_interface", lambda: "eth0")
    # Debian's /etc/hosts maps the hostname to 127.0.1.1: never used across hosts
    assert accel.rendezvous_address(False, None) == ("10.0.0.5", "eth0")
    assert accel.rendezvous_address(False, "ib0") == ("192.168.1.5", "ib0")
    assert accel.rendezvous_address(False, "192.168.1.5") == ("192.168.1.5", "ib0")
    with pytest.raises(ConfigError, match=r"run.rendezvous: 'eth9'.*valid: eth0 \(10.0.0.5\)"):
        accel.rendezvous_address(False, "eth9")


LISTEN_SCRIPT = r"""
import json, os, socket, sys
from gptfl_hpc.parallel.comm import get_comm
from gptfl_hpc.parallel.accel import accelerator

def listening():
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            t = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if t.startswith("socket:["):
            inodes.add(t[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).readlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                addr, port = f[1].split(":")
                out.append([addr, int(port, 16)])
    return out

comm = get_comm()
before = listening()  # MPI's own listeners (its TCP transport): not torch's
with accelerator(comm, device="cpu") as acc:
    acc.wait_for_everyone()
    mine = [x for x in listening() if x not in before]
print(json.dumps({"rank": comm.rank, "listening": mine}))
"""


def test_rendezvous_listens_on_loopback_only_on_one_host(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(LISTEN_SCRIPT)
    p = run_py([str(script)], n=2, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    everything = [a for r in rows for a, _ in r["listening"]]
    assert everything, rows  # rank 0 listens (the store), gloo too
    # 0100007F = 127.0.0.1 (little-endian hex); never 00000000 (all interfaces) or ::
    assert all(a == "0100007F" for a in everything), rows
