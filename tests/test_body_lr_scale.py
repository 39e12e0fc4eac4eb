"""fl.body_lr_scale: the clients' local optimiser scales the lr of every parameter but the
final classifier layer. 0 freezes the body bit for bit (in a client's training and through a
whole FL round), 1 is the plain optimiser bit for bit, and the option is part of the identity
of the FL stages."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from gptfl_hpc import provenance as pv
from gptfl_hpc.config import MODEL_NAMES, ModelConfig, load_config
from gptfl_hpc.errors import ConfigError
from gptfl_hpc.fl import client as C
from gptfl_hpc.fl.params import FlatModel
from gptfl_hpc.train.models import build_model, classifier_head

TINY = "configs/tiny.yaml"


def test_the_option_is_validated_and_defaults_to_one() -> None:
    assert load_config(TINY).fl.body_lr_scale == 1.0
    assert load_config(TINY, ["fl.body_lr_scale=0"]).fl.body_lr_scale == 0.0
    for bad in ("1.5", "-0.1"):
        with pytest.raises(ConfigError, match=r"config key fl.body_lr_scale: invalid value "
                                              r".*valid: 0 <= x <= 1") as e:
            load_config(TINY, [f"fl.body_lr_scale={bad}"])
        assert "\n" not in str(e.value)


def test_it_is_part_of_the_fl_stages_identity() -> None:
    a, b = load_config(TINY), load_config(TINY, ["fl.body_lr_scale=0.1"])
    for stage in ("federate", "local_only"):
        assert pv.request(stage, a).fingerprint != pv.request(stage, b).fingerprint, stage
    for stage in ("pretrain", "centralised", "synthesize"):
        assert pv.request(stage, a).fingerprint == pv.request(stage, b).fingerprint, stage


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_classifier_head_is_the_layer_that_outputs_the_logits(name: str) -> None:
    shape = (64, 101, 1) if name.startswith("audio") else (8, 8, 1) if name == "digits_cnn" \
        else (32, 32, 3)
    model = build_model(ModelConfig(name=name), shape, 7)
    head = classifier_head(model)
    assert head.out_features == 7
    x = torch.randn(2, shape[2], shape[0], shape[1])
    seen = []
    h = head.register_forward_hook(lambda m, i, o: seen.append(o))
    model.eval()
    with torch.no_grad():
        out = model(x)
    h.remove()
    assert len(seen) == 1 and torch.equal(seen[0], out)  # its output IS the model's


def _old_make_optimizer(fl_cfg, params, lr, model=None):
    """The client optimiser as it was before fl.body_lr_scale (one group, one lr)."""
    if fl_cfg.client_optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=fl_cfg.client_momentum,
                               weight_decay=fl_cfg.client_weight_decay)
    cls = torch.optim.Adam if fl_cfg.client_optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=fl_cfg.client_weight_decay)


def _train(fl_cfg) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    flat = FlatModel(build_model(ModelConfig(name="digits_cnn"), (8, 8, 1), 10))
    before = flat.state_dict()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    C.train_client(flat.model, flat.params, flat.param_flat.clone(), x, y,
                   lambda b, _g: b, fl_cfg, seed=3, client_id=2, round_=1)
    return before, flat.state_dict()


@pytest.mark.parametrize("optimizer,momentum,wd", [("sgd", 0.9, 1e-3), ("adam", 0.0, 1e-3),
                                                   ("adamw", 0.0, 1e-2)])
def test_zero_freezes_the_body_and_one_is_the_plain_optimizer(monkeypatch, optimizer, momentum,
                                                               wd) -> None:
    base = dataclasses.replace(load_config(TINY).fl, client_optimizer=optimizer,
                               client_momentum=momentum, client_weight_decay=wd,
                               local_epochs=2, client_lr=0.05)
    head = {"fc2.weight", "fc2.bias"}
    before, frozen = _train(dataclasses.replace(base, body_lr_scale=0.0))
    for k, v in frozen.items():
        assert torch.equal(v, before[k]) == (k not in head), k  # body same bits, head moved
    _, half = _train(dataclasses.replace(base, body_lr_scale=0.5))
    _, one = _train(dataclasses.replace(base, body_lr_scale=1.0))
    assert all(not torch.equal(half[k], one[k]) for k in before if k not in head)
    monkeypatch.setattr(C, "make_optimizer", _old_make_optimizer)
    _, old = _train(base)
    assert all(torch.equal(one[k], old[k]) for k in before)


@pytest.mark.timeout(600)
def test_a_round_with_a_frozen_body_moves_only_the_head(tmp_path) -> None:
    out = tmp_path / "run"
    run_cli(["run", TINY, "run.methods=[gptfl]", "fl.rounds=1", "fl.body_lr_scale=0",
             "gen.train.steps=4", "gen.steps=2", "pretrain.epochs=1", "--out", out], n=3,
            timeout=540)
    init = load_file(str(out / "pretrained.safetensors"))
    final = load_file(str(out / "gptfl" / "final.safetensors"))
    assert set(final) == set(init)
    moved = sorted(k for k in init if not torch.equal(init[k], final[k]))
    assert moved == ["fc2.bias", "fc2.weight"], moved
    rec = pv.read_record(out / "gptfl", "federate")
    assert rec["request"]["config"]["fl.body_lr_scale"] == 0.0
    assert json.loads((out / "gptfl" / "summary.json").read_text())["final_accuracy"] > 0
