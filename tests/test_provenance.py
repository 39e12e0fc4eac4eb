"""The one "is this output complete and made from this request?" mechanism (provenance.py).

Every config field must either enter exactly the declared stages' fingerprints, or be declared
as an input (its content digest enters instead) or as having no effect (with the reason). The
test perturbs every leaf field of the config and checks which stage fingerprints move, so a new
field that nobody classified fails here.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import torch

from gptfl_hpc import provenance as pv
from gptfl_hpc.config import Config, load_config
from gptfl_hpc.errors import StaleOutputError

# data.root set (digits ignores it) so that data.source can change to a source needing it
BASE = load_config("configs/digits.yaml", ["data.root=/tmp/source.npz"])


def _fields_of(cls: typing.Any, prefix: str = "") -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, typing.Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_fields_of(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


FIELDS = _fields_of(Config)

# a valid changed value for each field whose type alone does not suggest one
SPECIAL = {
    "model.name": "convnet", "data.source": "arrays", "data.root": "/tmp/x.npz",
    "data.dir": "/tmp/prepared", "run.store": "/tmp/store", "run.rendezvous": "ib0",
    "data.partition": "iid", "data.natural_key": "k", "gen.generator": "/tmp/gen",
    "gen.expand_prompts": "/tmp/gpt2", "fl.init": "/tmp/i.safetensors",
    "pretrain.init": "/tmp/b.safetensors", "gen.guidance": [1.0, 5.0],
    "gen.templates": ["a picture of {label}"], "gen.domains": ["photo"],
    "gen.train.block_out_channels": [16, 32], "data.label_names": [str(i) for i in range(10)],
    "run.methods": ["gptfl"], "slurm.time": "02:00:00", "slurm.mpi": "pmi2",
    "slurm.setup": ["module load x"], "slurm.extra": ["--exclusive"], "gen.count": 100,
    "gen.micro_batch": 32, "slurm.partition": "p", "slurm.account": "a", "slurm.qos": "q",
    "slurm.mem": "8G", "run.server_processes": 1, "fl.target_accuracy": 0.5,
    "data.test_size": 100.0, "data.public_fraction": 0.2, "data.train_fraction": 0.5,
    "run.algorithms": ["fedavg", "scaffold"], "dp.target_epsilon": 8.0,
    "dp.clipped_count_stddev": 1.0,
}


def _changed(name: str, tp: typing.Any, value: typing.Any) -> typing.Any:
    if name in SPECIAL:
        return SPECIAL[name]
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return next(a for a in typing.get_args(tp) if a != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    raise AssertionError(f"no changed value for {name} ({tp}, {value!r}): add it to SPECIAL")


def _set(cfg: Config, name: str, value: typing.Any) -> Config:
    *path, leaf = name.split(".")
    if not path:
        return dataclasses.replace(cfg, **{leaf: value})
    section = getattr(cfg, path[0])
    return dataclasses.replace(cfg, **{path[0]: _set(section, ".".join([*path[1:], leaf]),
                                                     value)})


def _fingerprints(cfg: Config) -> dict[str, str]:
    return {s: pv.request(s, cfg).fingerprint for s in pv.STAGES}


def _declared(name: str) -> str:
    kinds = [k for k, table in (("input", pv.INPUT_FIELDS), ("no effect", pv.NO_EFFECT))
             if any(pv._matches(name, p) for p in table)]
    stages = [s for s in pv.STAGES if name in pv.stage_fields(s, [name])]
    if name == "fl.rounds":  # a progress target; tested below
        return "progress"
    assert len(kinds) + bool(stages) == 1, (name, kinds, stages)
    return kinds[0] if kinds else "stages"


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_changes_exactly_its_declared_stages(name):
    kind = _declared(name)
    if kind == "progress":
        return
    # fields valid only beside another setting are changed from a base that has it
    base = _set(BASE, "fl.select", "synthetic_val") if name == "fl.patience" else BASE
    value = pv.leaf_fields(base)[name]
    changed = _set(base, name, _changed(name, FIELDS[name], value))
    before, after = _fingerprints(base), _fingerprints(changed)
    moved = sorted(s for s in pv.STAGES if before[s] != after[s])
    if kind == "stages":
        want = sorted(s for s in pv.STAGES if name in pv.stage_fields(s, [name]))
        assert moved == want, (name, moved, want)
    else:  # inputs enter as content digests, no-effect fields not at all
        assert moved == [], (name, moved)


def test_rounds_are_identity_only_when_the_schedule_depends_on_them():
    cos = _set(BASE, "fl.client_lr_schedule", "cosine")
    const = _set(BASE, "fl.client_lr_schedule", "constant")
    assert pv.request("federate", cos).fingerprint != \
        pv.request("federate", _set(cos, "fl.rounds", 50)).fingerprint
    a, b = pv.request("federate", const), pv.request("federate", _set(const, "fl.rounds", 50))
    assert a.fingerprint == b.fingerprint and (a.progress, b.progress) == ({"rounds": 30},
                                                                          {"rounds": 50})
    # a model chosen over the rounds run (fl.select) depends on them too
    sel = _set(const, "fl.select", "synthetic_val")
    assert pv.request("federate", sel).fingerprint != \
        pv.request("federate", _set(sel, "fl.rounds", 50)).fingerprint


def test_inputs_and_derived_values_enter_the_fingerprint():
    a = pv.request("pretrain", BASE, inputs={"synthetic": "aa"})
    b = pv.request("pretrain", BASE, inputs={"synthetic": "bb"})
    c = pv.request("synthesize", BASE, derived={"dtype": "fp16"})
    d = pv.request("synthesize", BASE, derived={"dtype": "fp32"})
    assert a.fingerprint != b.fingerprint and c.fingerprint != d.fingerprint
    assert b.diff(a) == ["inputs.synthetic"] and d.diff(c) == ["derived.dtype"]


def test_status_complete_absent_conflict_tamper_and_adopt(tmp_path):
    from gptfl_hpc.fsio import save_safetensors

    req = pv.request("pretrain", BASE, inputs={"synthetic": "x"})
    other = pv.request("pretrain", _set(BASE, "pretrain.lr", 0.5), inputs={"synthetic": "x"})
    outs = {"weights": "w.safetensors"}
    assert pv.status(tmp_path, req, what="w", outputs=outs) == "absent"
    save_safetensors({"a": torch.ones(2)}, tmp_path / "w.safetensors",
                     metadata={"fingerprint": req.fingerprint})
    # written but the record is missing (killed in between): the embedded fingerprint proves it
    assert pv.status(tmp_path, req, what="w", outputs=outs) == "complete"
    assert pv.read_record(tmp_path, "pretrain")["fingerprint"] == req.fingerprint
    assert pv.status(tmp_path, req, what="w", outputs=outs) == "complete"
    with pytest.raises(StaleOutputError, match=r"for another request \(differs in pretrain.lr"):
        pv.status(tmp_path, other, what="w", outputs=outs)
    save_safetensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors",
                     metadata={"fingerprint": req.fingerprint})
    with pytest.raises(StaleOutputError, match="content differs from its completion record"):
        pv.status(tmp_path, req, what="w", outputs=outs)
    # an output of unknown origin is never adopted
    (tmp_path / "u").mkdir()
    save_safetensors({"a": torch.ones(2)}, tmp_path / "u" / "w.safetensors")
    with pytest.raises(StaleOutputError, match="exists without pretrain.done.json"):
        pv.status(tmp_path / "u", req, what="w", outputs=outs)
    # a torn record is an error naming it, not a traceback
    (tmp_path / "pretrain.done.json").write_text('{"fingerp')
    with pytest.raises(StaleOutputError, match="unreadable completion record"):
        pv.status(tmp_path, req, what="w", outputs=outs)


def test_digests_ignore_hdf5_attributes_and_see_content(tmp_path):
    import h5py
    import numpy as np

    for name, stamp, value in (("a.h5", "t1", 1), ("b.h5", "t2", 1), ("c.h5", "t1", 2)):
        with h5py.File(tmp_path / name, "w") as f:
            f["images"] = np.full((3, 2), value, np.uint8)
            f.attrs["created"] = stamp
    da, db, dc = (pv.digest(tmp_path / n) for n in ("a.h5", "b.h5", "c.h5"))
    assert da == db != dc


def test_safetensors_files_are_byte_identical_for_equal_tensors(tmp_path):
    import subprocess
    import sys

    code = ("import torch, sys; from gptfl_hpc.fsio import save_safetensors; "
            "save_safetensors({'b': torch.arange(4.), 'a': torch.ones(2, 2)}, sys.argv[1], "
            "metadata={'z': '1', 'y': '2', 'x': '3', 'w': '4'})")
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True,
                       timeout=60, env={"PYTHONHASHSEED": name == "one" and "1" or "2",
                                        "PATH": "/usr/bin:/bin"})
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "one"))["a"], torch.ones(2, 2))


def test_records_are_json_with_the_request(tmp_path):
    req = pv.request("prepare", BASE)
    (tmp_path / "manifest.json").write_text("{}")
    pv.write_record(tmp_path, req, {"manifest": "manifest.json"})
    rec = json.loads((tmp_path / "prepare.done.json").read_text())
    assert rec["fingerprint"] == req.fingerprint
    assert rec["request"]["config"]["data.alpha"] == BASE.data.alpha
