"""Config loading: one test per error message, overrides, and the CLI's check-config."""

import pytest
from helpers import run_cli

from gptfl_hpc.config import MODEL_NAMES, load_config
from gptfl_hpc.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "fl: {rounds: 7}\n"), ["fl.client_lr=0.5", "run.seed=3"])
    assert cfg.fl.rounds == 7 and cfg.fl.client_lr == 0.5 and cfg.run.seed == 3
    cfg = load_config("configs/digits.yaml", ["fl.rounds=50", "gen.guidance=[1, 5]"])
    assert cfg.fl.rounds == 50 and cfg.gen.guidance == [1.0, 5.0]
    # YAML 1.1 reads 1e-3 (no dot) as a string: float keys take it, in files and overrides
    cfg = load_config(write(tmp_path, "fl: {server_lr: 1e-3}\n"), ["fl.client_lr=5e-2"])
    assert cfg.fl.server_lr == 0.001 and cfg.fl.client_lr == 0.05


@pytest.mark.parametrize("text,over,match", [
    ("fl: {roundz: 3}\n", [], r"fl\.roundz: unknown key in fl; valid: algorithm, rounds"),
    ("flx: {}\n", [], r"flx: unknown key in top level; valid: run, data"),
    ("", ["fl.rounds=abc"], r"fl\.rounds: expected int, got 'abc'"),
    ("", ["fl.rounds=1e3"], r"fl\.rounds: expected int, got '1e3'"),
    ("", ["fl.client_lr=1e-3x"], r"fl\.client_lr: expected float, got '1e-3x'"),
    ("", ["fl.algorithm=scaffold", "dp.enabled=true"], r"dp\.enabled: SCAFFOLD.*valid: "
                                                         r"dp\.enabled=false"),
    ("", ["fl.rounds=0"], r"fl\.rounds: invalid value 0; valid: >= 1"),
    ("", ["fl.algorithm=fedsgd"], r"fl\.algorithm: invalid value 'fedsgd'; valid: fedavg, fedprox"),
    ("", ["model.name=vgg"], r"model\.name: invalid value 'vgg'; valid: " + ", ".join(MODEL_NAMES)),
    ("", ["fl.clients_per_round=30"], r"fl\.clients_per_round.*<= data\.num_clients \(20\)"),
    ("", ["fl.target_accuracy=90"], r"fl\.target_accuracy.*fraction"),
    ("", ["fl.augment=maybe"], r"fl\.augment: expected bool"),
    ("", ["data.partition=natural"], r"data\.natural_key"),
    ("", ["data.source=cifar10"], r"data\.root"),
    ("", ["fl.init=model.pt"], r"fl\.init.*safetensors"),
    ("", ["norounds"], r"expected KEY=VALUE"),
    ("fl: [1, 2]\n", [], r"config key fl: expected a mapping"),
    ("- a\n- b\n", [], r"top level must be a mapping"),
    ("fl: {rounds: [\n", [], r"not valid YAML"),
])
def test_errors_name_the_key_and_valid_choices(tmp_path, text, over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), over)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_check_config_cli(tmp_path):
    ok = run_cli(["check-config", "configs/digits.yaml", "fl.rounds=5"], timeout=60)
    assert "rounds: 5" in ok.stdout
    bad = run_cli(["check-config", "configs/digits.yaml", "fl.rounds=-1"], check=False, timeout=60)
    assert bad.returncode == 2
    err = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "fl.rounds" in err[0] and "Traceback" not in bad.stderr
