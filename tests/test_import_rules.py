"""Heavy libraries are imported in exactly one room each, lazily (AST scan)."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gptfl_hpc"
ROOMS = {
    "mpi4py": {"parallel/comm.py"},
    "accelerate": {"parallel/accel.py"},
    "submitit": {"launch/"},
    "diffusers": {"gen/"},
    "transformers": {"gen/"},
}


def imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_heavy_imports_stay_in_their_room():
    bad = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).as_posix()
        for mod in imports(f):
            rooms = ROOMS.get(mod)
            if rooms and not any(rel == r or (r.endswith("/") and rel.startswith(r))
                                 for r in rooms):
                bad.append(f"{rel} imports {mod}")
    assert not bad, bad


def test_package_import_is_light():
    code = ("import sys, gptfl_hpc, gptfl_hpc.config, gptfl_hpc.cli; "
            "print(sorted(m for m in ('torch','diffusers','accelerate','mpi4py','submitit',"
            "'transformers','h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]", out
