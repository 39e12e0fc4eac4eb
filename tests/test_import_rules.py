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


# ------------------------------------------------------------------------------ layers and cycles

# Each top-level room of the package and its layer: a room may import rooms of lower layers
# only (its own room too). Nothing imports upward; siblings of one layer (train, gen) do not
# import each other.
LAYERS = {
    "errors": 0, "seeding": 0, "signals": 0, "faults": 0,
    "fsio": 1, "config": 1, "numerics": 1,
    "log": 2,
    "parallel": 3, "provenance": 3,
    "data": 4,
    "train": 5, "gen": 5,
    "fl": 6,
    "report": 7,
    "pipeline": 8,
    "grid": 9, "collect": 9, "launch": 9,
    "choose": 10,
    "cli": 11,
    "__main__": 12,
}


def _module_name(path):
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_imports(path, module_level_only=False):
    """gptfl_hpc modules imported by `path` (resolving `from gptfl_hpc[.x] import y`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gptfl_hpc")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.startswith("gptfl_hpc"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                known = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (PKG.parent / Path(*sub.split("."))).is_dir()
                out.add(sub if known else node.module)
    return out


def _room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_room_has_a_layer():
    rooms = {_room(_module_name(f)) for f in PKG.rglob("*.py")} - {"__init__"}
    assert rooms <= set(LAYERS), sorted(rooms - set(LAYERS))


def test_no_room_imports_upward_or_sideways():
    bad = []
    for f in PKG.rglob("*.py"):
        mod = _module_name(f)
        src = _room(mod)
        if src == "__init__":
            continue
        for target in _package_imports(f):
            dst = _room(target)
            if dst in ("__init__", src):
                continue
            if LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{mod} -> {target} (layer {LAYERS[src]} -> {LAYERS[dst]})")
    assert not bad, bad


def test_no_import_cycles():
    """Between modules, counting every import (module level and inside functions)."""
    graph = {}
    for f in PKG.rglob("*.py"):
        graph[_module_name(f)] = {t for t in _package_imports(f)}
    modules = set(graph)
    for m in graph:  # a package import means its __init__
        graph[m] = {t for t in graph[m] if t in modules and t != m}
    seen, stack, cycles = set(), [], []

    def visit(m, path):
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in seen:
            return
        path.append(m)
        for t in sorted(graph.get(m, ())):
            visit(t, path)
        path.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m, stack)
    assert not cycles, cycles[:5]
