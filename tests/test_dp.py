"""Central DP (DP-FedAvg): the accountant against analytic and published values, target-epsilon
calibration, the noise's statistics and determinism, adaptive clipping against its formula,
clipping applied per client before aggregation (end to end), and the same bits on 1 and 3 ranks
with epsilon after every round in metrics.jsonl."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from gptfl_hpc.config import DPConfig, FLConfig
from gptfl_hpc.errors import ConfigError
from gptfl_hpc.fl.dp import (
    Accountant,
    DPState,
    event,
    fresh_accountant,
    noise_for_epsilon,
    update_noise_multiplier,
)
from gptfl_hpc.seeding import rng

TINY = "configs/tiny.yaml"


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The tight epsilon of the Gaussian mechanism with sensitivity 1 and noise sigma (Balle &
    Wang 2018, Thm. 8): delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s)."""
    def d(eps: float) -> float:
        return _phi(0.5 / sigma - eps * sigma) - math.exp(eps) * _phi(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 1.0
    while d(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (2.0, 16), (0.8, 30)])
def test_accountants_against_the_exact_gaussian(z, rounds):
    """Without subsampling (q = 1), r rounds of noise multiplier z are exactly one Gaussian of
    noise z / sqrt(r). PLD is tight (within 0.5 % above the exact value, never below); RDP is
    an upper bound, at most the classical bound r/(2z^2) + sqrt(2 r log(1/delta)) / z, and its
    Renyi divergence is exactly r alpha / (2 z^2)."""
    delta = 1e-5
    exact = exact_gaussian_epsilon(z / math.sqrt(rounds), delta)
    pld = Accountant("pld", z, 1.0, delta).epsilon(rounds)
    rdp = Accountant("rdp", z, 1.0, delta).epsilon(rounds)
    assert exact <= pld <= exact * 1.005, (exact, pld)
    classical = rounds / (2 * z * z) + math.sqrt(2 * rounds * math.log(1 / delta)) / z
    assert exact <= rdp <= classical, (exact, rdp, classical)
    acc = fresh_accountant("rdp")
    acc.compose(event(z, 1.0, rounds))
    np.testing.assert_allclose(acc._rdp, rounds * np.asarray(acc._orders) / (2 * z * z),
                               rtol=1e-12)


def test_subsampled_gaussian_matches_published_dp_sgd_value():
    """Opacus' compute_dp_sgd_privacy documentation: 60,000 examples, batch 256, noise 1.12,
    60 epochs, delta 1e-5, RDP orders (10, 20, 100) with the classical conversion
    eps = min_a rdp(a) - log(delta)/(a - 1): (2.95, 1e-5). dp-accounting's Poisson-subsampled
    Gaussian, which our accountant uses, reproduces it; our epsilon (all default orders and
    dp-accounting's tighter conversion) is below it, and PLD below RDP."""
    import dp_accounting as dpa

    q, z, steps = 256 / 60000, 1.12, 60 * math.ceil(60000 / 256)
    acc = dpa.rdp.RdpAccountant(orders=[10, 20, 100])
    acc.compose(event(z, q, steps))
    orders = np.array([10.0, 20.0, 100.0])
    classical = float(np.min(acc.rdp - math.log(1e-5) / (orders - 1)))
    assert abs(classical - 2.95) < 0.01, classical
    ours = Accountant("rdp", z, q, 1e-5).epsilon(steps)
    assert ours < classical
    assert Accountant("pld", z, q, 1e-5).epsilon(steps) < ours


def test_accountant_is_a_pure_function_of_rounds_and_matches_dp_accounting():
    q, z = 0.25, 1.3
    for kind in ("rdp", "pld"):
        a = Accountant(kind, z, q, 1e-5)
        eps = [a.epsilon(r) for r in range(1, 8)]
        assert all(x < y for x, y in zip(eps, eps[1:])), eps  # grows with every round
        fresh = fresh_accountant(kind)
        fresh.compose(event(z, q, 7))
        assert eps[-1] == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-9)
        assert Accountant(kind, z, q, 1e-5).epsilon(7) == eps[-1]  # resume-safe
    assert Accountant("rdp", 0.0, q, 1e-5).epsilon(3) == math.inf
    assert Accountant("rdp", z, q, 1e-5).epsilon(0) == 0.0


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_target_epsilon_gives_the_smallest_noise(kind):
    q, rounds, target = 0.25, 30, 8.0
    z = noise_for_epsilon(target, q, rounds, 1e-5, kind)
    assert Accountant(kind, z, q, 1e-5).epsilon(rounds) <= target
    assert Accountant(kind, z * 0.999, q, 1e-5).epsilon(rounds) > target  # and it is tight


def _state(**dp) -> DPState:
    fl = FLConfig(clients_per_round=5)
    return DPState(DPConfig(enabled=True, **dp), fl, num_clients=20, seed=7,
                   noise_multiplier=dp.get("noise_multiplier", 1.0))


def test_noise_statistics_and_determinism():
    s = _state(clip_norm=0.5, noise_multiplier=1.3)
    n = 400_000
    a = s.noise(n, round_=3).numpy()
    std = 1.3 * 0.5
    assert abs(a.mean()) < 5 * std / math.sqrt(n)
    assert abs(a.std() / std - 1) < 5 / math.sqrt(2 * n)  # std of the sample std: s/sqrt(2n)
    # normal: the share beyond 2 sigma is 4.55 %
    assert abs(np.mean(np.abs(a) > 2 * std) - 0.0455) < 0.002
    # the same bits for the same (seed, round) (every rank draws it), other bits otherwise
    assert np.array_equal(a, _state(clip_norm=0.5, noise_multiplier=1.3).noise(n, 3).numpy())
    assert not np.array_equal(a[:100], s.noise(100, 4).numpy())
    # the fixed-denominator estimator: (sum + noise) / K with K = clients_per_round
    summed = torch.ones(n, dtype=torch.float64)
    np.testing.assert_allclose(s.private_mean(summed, 3).numpy(), (1.0 + a) / 5, rtol=1e-15)


def test_clip_factor():
    s = _state(clip_norm=2.0)
    assert s.clip(1.0) == (1.0, True)            # norm 1: kept
    assert s.clip(4.0) == (1.0, True)            # exactly on the norm: kept
    assert s.clip(16.0) == (0.5, False)          # norm 4: scaled to 2
    f, ok = s.clip(9.0)
    assert f == pytest.approx(2 / 3) and not ok


def test_adaptive_clipping_follows_andrew_et_al():
    """b = (sum_k [||d_k|| <= C] + N(0, sigma_b^2)) / K, C <- C exp(-eta (b - gamma)), with the
    update noise raised to z_d = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021)."""
    s = _state(clip_norm=1.0, noise_multiplier=0.5, adaptive_clipping=True,
               clipped_count_stddev=2.0, clip_learning_rate=0.3, target_quantile=0.6)
    assert s.z_update == pytest.approx((0.5 ** -2 - 4.0 ** -2) ** -0.5)
    c = 1.0
    for rnd, unclipped in ((1, 5), (2, 0), (3, 3)):
        b = (unclipped + 2.0 * rng(7, "dp-count-noise", rnd).standard_normal()) / 5
        c *= math.exp(-0.3 * (b - 0.6))
        assert s.update_clip_norm(float(unclipped), rnd) == pytest.approx(b, rel=1e-12)
        assert s.clip_norm == pytest.approx(c, rel=1e-12)
    # the default sigma_b is K/20 = 0.25: too small for z = 1 (needs > z/2)
    with pytest.raises(ConfigError, match="dp.clipped_count_stddev"):
        update_noise_multiplier(1.0, True, 0.25)


# ---- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "data"
    run_cli(["prepare", TINY, "--out", d], timeout=120)
    return d


def federate(out, data_dir, *over, n=None, check=True, env=None):
    return run_cli(["federate", TINY, "--out", out, f"data.dir={data_dir}", *over], n=n,
                   check=check, timeout=240, extra_env=env)


def _flat(path):
    return torch.cat([t.reshape(-1).double() for _, t in sorted(load_file(str(path)).items())
                      if t.is_floating_point()])


def test_clipping_is_applied_per_client_before_aggregation(data_dir, tmp_path):
    """No noise, clip norm C: after one round the model moved by (1/K) sum_k clip(d_k), whose
    norm is <= C, while plain FedAvg moves it by far more; train loss is not collected."""
    init = tmp_path / "init.safetensors"
    federate(tmp_path / "i", data_dir, "fl.rounds=1")
    init.write_bytes((tmp_path / "i" / "final.safetensors").read_bytes())
    c = 0.005
    common = ["fl.rounds=1", f"fl.init={init}"]
    federate(tmp_path / "dp", data_dir, *common, "dp.enabled=true", "dp.noise_multiplier=0",
             f"dp.clip_norm={c}")
    federate(tmp_path / "avg", data_dir, *common)
    w0 = _flat(init)
    moved_dp = float((_flat(tmp_path / "dp" / "final.safetensors") - w0).norm())
    moved_avg = float((_flat(tmp_path / "avg" / "final.safetensors") - w0).norm())
    assert 0 < moved_dp <= c * (1 + 1e-6), moved_dp
    assert moved_avg > 20 * c, moved_avg  # the bound is not vacuous: every update was clipped
    rec = json.loads((tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["train_loss"] is None and rec["grad_diversity"] is None
    assert rec["dp_epsilon"] is None and rec["dp_clip_norm"] == c  # no noise: no guarantee


def test_dp_one_vs_three_ranks_resume_and_epsilon_per_round(data_dir, tmp_path):
    over = ["fl.rounds=3", "dp.enabled=true", "dp.noise_multiplier=0.05", "dp.clip_norm=0.5",
            "dp.adaptive_clipping=true", "dp.clipped_count_stddev=1.0", "dp.accountant=pld",
            "fl.checkpoint_every=1"]
    federate(tmp_path / "one", data_dir, *over)
    federate(tmp_path / "three", data_dir, *over, n=3)
    # preempted after round 2 and resumed: the adapted clip norm comes back from the checkpoint
    p = federate(tmp_path / "cut", data_dir, *over, check=False, env={"GPTFL_STOP_AFTER": "2"})
    assert p.returncode == 124, p.stderr[-3000:]
    federate(tmp_path / "cut", data_dir, *over, "--resume")
    sha = [hashlib.sha256((tmp_path / d / "final.safetensors").read_bytes()).hexdigest()
           for d in ("one", "three", "cut")]
    assert sha[0] == sha[1] == sha[2]  # every rank adds the same noise, after an exact sum
    rec = [json.loads(x) for x in (tmp_path / "three" / "metrics.jsonl").read_text().split("\n")
           if x]
    acc = Accountant("pld", 0.05, 4 / 6, 1e-5)
    for r in rec:
        assert r["dp_epsilon"] == pytest.approx(acc.epsilon(r["round"]), rel=1e-12)
        assert r["dp_delta"] == 1e-5 and r["dp_noise_multiplier"] == 0.05
        assert isinstance(r["dp_unclipped_fraction"], float) and r["dp_clip_norm"] > 0
    assert rec[0]["dp_clip_norm"] == 0.5 and rec[1]["dp_clip_norm"] != 0.5  # adapted
    summary = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert summary["dp"]["epsilon"] == pytest.approx(rec[-1]["dp_epsilon"], rel=1e-12)
    assert summary["dp"]["sampling_rate"] == pytest.approx(4 / 6)


def test_target_epsilon_run_reports_it(data_dir, tmp_path):
    p = federate(tmp_path / "t", data_dir, "fl.rounds=2", "dp.enabled=true",
                 "dp.target_epsilon=50", "dp.delta=0.001")
    assert "gives epsilon 50 at delta 0.001 after 2 rounds" in p.stderr
    s = json.loads((tmp_path / "t" / "summary.json").read_text())["dp"]
    assert s["epsilon"] <= 50 and s["epsilon"] > 49
    assert s["noise_multiplier"] == pytest.approx(
        noise_for_epsilon(50, 4 / 6, 2, 1e-3, "rdp"), rel=1e-9)


def test_dp_config_errors(data_dir, tmp_path):
    p = federate(tmp_path / "o", data_dir, "dp.enabled=true", "dp.adaptive_clipping=true",
                 check=False)
    assert p.returncode != 0 and "error: config key dp.clipped_count_stddev" in p.stderr
    p = run_cli(["check-config", TINY, "dp.delta=0"], check=False)
    assert p.returncode != 0 and "config key dp.delta" in p.stderr
    p = run_cli(["check-config", TINY, "dp.accountant=moments"], check=False)
    assert p.returncode != 0 and "valid: rdp, pld" in p.stderr
