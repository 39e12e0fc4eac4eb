"""fl.vmap_clients (gptfl_hpc/fl/cohort.py): a chunk of clients trained together with torch.func
gives every client train_client's update, up to float reassociation in batched kernels; models
and settings it cannot match fall back to the sequential loop, bit for bit.

Tolerances, set from measurements (torch 2.13 CPU, AMD EPYC, run.cpu_kernels=invariant; 5 model
and data seeds x 6 digits_cnn clients of 3..31 samples, batch 10, and 3 seeds x 3 simple_cnn
clients), each with a margin of about 10x:

* SGD (plain, momentum + weight decay), FedProx, SCAFFOLD, fl.body_lr_scale: the largest weight
  difference after a client's local training was 3.0e-8 (digits_cnn, weights ~0.1-0.5: one or
  two float32 ulps) and 1.6e-7 (simple_cnn, its dropout replayed): ATOL_SGD = 3e-7 for
  digits_cnn, 2e-6 for simple_cnn.
* Adam / AdamW: Adam divides by the root of the second moment, so a coordinate whose gradient is
  pure cancellation noise (~1e-10 where the sequential one may be ~-1e-10) still moves by about
  the lr: the largest elementwise difference was 6.1e-5 at lr 1e-3 (digits_cnn; 1.1e-4 on
  simple_cnn) in a handful of coordinates; the update as a whole differed by 9.0e-5 relative
  (L2 norm of the difference over the L2 norm of the update): asserted max <= 0.5 lr and
  relative L2 <= 1e-3.
* the mean training loss a client reports: at most 4.0e-7 apart; asserted 5e-6 (SGD family).
* the optimiser update alone is torch.optim's bit for bit (same gradients in, same bits out).
* on CPU a client's vmapped result did not depend on the chunk (alone, with others, in another
  order) or the rank count (asserted bitwise below), nor on the thread count (1 and 2 threads
  gave the same bits; not asserted: two threads on a busy 2-core machine are slow).
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file
from torch import nn

from gptfl_hpc.config import FLConfig, ModelConfig, load_config
from gptfl_hpc.errors import ConfigError
from gptfl_hpc.fl import client as C
from gptfl_hpc.fl.cohort import CohortTrainer, client_steps, fallback_reason
from gptfl_hpc.fl.params import FlatModel
from gptfl_hpc.numerics import training_kernels
from gptfl_hpc.train.models import build_model, classifier_head
from gptfl_hpc.train.transforms import ImageTransform

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "configs/tiny.yaml"
ATOL_SGD = {"digits_cnn": 3e-7, "simple_cnn": 2e-6}
ATOL_LOSS = 5e-6
ADAM_REL_L2 = 1e-3
ADAM_MAX_LR = 0.5
SIZES = [23, 17, 31, 10, 3, 25]
"""Batch 10: unequal last batches (3, 7, 5: vmapped in groups of equal batch size), 1..4 steps
per client (finished clients are masked), and 31 = 3 x 10 + a lone sample that is skipped."""


@pytest.fixture(autouse=True)
def _kernels():
    with training_kernels("invariant"):
        yield


def _setup(name: str, sizes: list[int], seed: int = 0):
    shape = (8, 8, 1) if name == "digits_cnn" else (32, 32, 3)
    torch.manual_seed(seed)
    flat = FlatModel(build_model(ModelConfig(name=name), shape, 10))
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
             torch.randint(0, 10, (n,), generator=g)) for n in sizes]
    return flat, flat.flat.clone(), data, shape


def _controls(fl: FLConfig, n_params: int, k: int) -> list[C.ControlVariates | None]:
    if fl.algorithm != "scaffold":
        return [None] * k
    return [C.ControlVariates(torch.randn(n_params, generator=torch.Generator().manual_seed(i))
                              * 0.01, torch.zeros(n_params)) for i in range(k)]


def _sequential(flat, g0, data, tf, fl, ids, controls):
    rows, losses = [], []
    for cid, (x, y), cv in zip(ids, data, controls):
        flat.flat.copy_(g0)
        losses.append(C.train_client(flat.model, flat.params, g0, x, y, tf, fl, seed=7,
                                     client_id=cid, round_=3, control=cv))
        rows.append(flat.flat.clone())
    return torch.stack(rows), losses


def _compare(fl: FLConfig, name: str, rows, losses, ref, ref_losses, g0) -> None:
    if fl.client_optimizer == "sgd":
        assert (rows - ref).abs().max().item() <= ATOL_SGD[name]
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= ATOL_LOSS
        return
    assert (rows - ref).abs().max().item() <= ADAM_MAX_LR * fl.client_lr
    for r, q in zip(rows, ref):
        assert ((r - q).norm() / (q - g0).norm()).item() <= ADAM_REL_L2


def test_the_key_defaults_to_off_and_is_validated():
    assert load_config(TINY).fl.vmap_clients == 0
    assert load_config(TINY, ["fl.vmap_clients=16"]).fl.vmap_clients == 16
    for bad in ("-1", "70000"):
        with pytest.raises(ConfigError, match=r"config key fl.vmap_clients: invalid value .*"
                                              r"valid: 0 \(off: one client after another\) or "
                                              r"1 \.\. 65536") as e:
            load_config(TINY, [f"fl.vmap_clients={bad}"])
        assert "\n" not in str(e.value)


CASES = {
    "sgd": {},
    "sgd_momentum_wd": {"client_momentum": 0.9, "client_weight_decay": 1e-3},
    "adam": {"client_optimizer": "adam", "client_lr": 1e-3},
    "adamw_wd": {"client_optimizer": "adamw", "client_lr": 1e-3, "client_weight_decay": 1e-2},
    "fedprox": {"algorithm": "fedprox", "prox_mu": 0.1},
    "scaffold": {"algorithm": "scaffold"},
    "body_lr_scale_0.5": {"body_lr_scale": 0.5, "client_momentum": 0.9},
    "body_lr_scale_0.5_adam": {"body_lr_scale": 0.5, "client_optimizer": "adam",
                               "client_lr": 1e-3},
    "body_lr_scale_0": {"body_lr_scale": 0.0},
    "augment_2_epochs_cosine": {"augment": True, "local_epochs": 2,
                                "client_lr_schedule": "cosine"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_client_gets_train_clients_update(case):
    fl = FLConfig(**{"batch_size": 10, "augment": False, "vmap_clients": 8, **CASES[case]})
    flat, g0, data, shape = _setup("digits_cnn", SIZES)
    tf = ImageTransform([0.5], [0.25], shape, fl.augment)
    ids = [4, 0, 9, 2, 7, 5]
    ref_cv = _controls(fl, flat.num_params, len(ids))
    ref, ref_losses = _sequential(flat, g0, data, tf, fl, ids, ref_cv)
    cohort = CohortTrainer(flat.model, fl, tf, data[0][0][:3])
    assert cohort.reason is None
    cvs = _controls(fl, flat.num_params, len(ids))
    rows, losses = cohort.train(g0, data, tf, seed=7, client_ids=ids, round_=3, controls=cvs)
    assert rows.shape == ref.shape
    _compare(fl, "digits_cnn", rows, losses, ref, ref_losses, g0)
    if fl.algorithm == "scaffold":  # the same gradient sums and step counts
        for a, b in zip(cvs, ref_cv):
            assert a is not None and b is not None and a.steps == b.steps
            assert (a.grad_sum - b.grad_sum).abs().max().item() <= 1e-6
    if fl.body_lr_scale == 0:  # the frozen body is bitwise the global model
        head = {id(p) for p in classifier_head(flat.model).parameters()}
        body = torch.zeros(len(g0), dtype=torch.bool)
        offset = 0
        for p in flat.params:
            body[offset:offset + p.numel()] = id(p) not in head
            offset += p.numel()
        assert torch.equal(rows[:, body], g0[body].expand(len(rows), -1))
        assert not torch.equal(rows[:, ~body], g0[~body].expand(len(rows), -1))


@pytest.mark.parametrize("kw", [
    {"client_optimizer": "sgd"},
    {"client_optimizer": "sgd", "client_momentum": 0.9, "client_weight_decay": 1e-3},
    {"client_optimizer": "adam"},
    {"client_optimizer": "adam", "client_weight_decay": 1e-2},
    {"client_optimizer": "adamw", "client_weight_decay": 1e-2},
])
def test_the_functional_optimiser_is_torch_optim_bit_for_bit(kw):
    """On the same gradients: the stacked update equals torch.optim's (make_optimizer) bit for
    bit, and a row past m (a client that has finished) is left alone."""
    from gptfl_hpc.fl.cohort import _Optimiser

    fl = FLConfig(**kw)
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,)]
    ps = [torch.randn(sh, generator=g) for sh in shapes]
    stacked = [torch.stack([p, p]) for p in ps]
    ref = [p.clone().requires_grad_(True) for p in ps]
    opt = C.make_optimizer(fl, ref, 0.05)
    mine = _Optimiser(fl, [0.05, 0.05], stacked)
    for t in range(6):
        grads = [torch.randn(sh, generator=g) * 10.0 ** -t for sh in shapes]
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt.step()
        mine.step(1, [gr.unsqueeze(0).clone() for gr in grads])
    for r, st, p in zip(ref, stacked, ps):
        assert torch.equal(r.detach(), st[0]) and torch.equal(st[1], p)


@pytest.mark.parametrize("augment", [False, True])
def test_dropout_masks_are_replayed_per_client(augment):
    """simple_cnn has two nn.Dropout layers. Without augmentation the transform's output is
    channels-last, and so is the first dropout's input, which changes the mask torch draws
    from the same RNG state: the replay lays its ones out like the layer's input."""
    fl = FLConfig(batch_size=10, augment=augment, vmap_clients=3)
    flat, g0, data, shape = _setup("simple_cnn", [23, 12, 31])
    tf = ImageTransform([0.5] * 3, [0.25] * 3, shape, augment)
    ref, ref_losses = _sequential(flat, g0, data, tf, fl, [0, 1, 2], [None] * 3)
    cohort = CohortTrainer(flat.model, fl, tf, data[0][0][:3])
    assert cohort.reason is None and [s.p for s in cohort.sites] == [0.25, 0.5]
    rows, losses = cohort.train(g0, data, tf, seed=7, client_ids=[0, 1, 2], round_=3)
    _compare(fl, "simple_cnn", rows, losses, ref, ref_losses, g0)


@pytest.mark.parametrize("name, sizes, augment", [("digits_cnn", SIZES, True),
                                                   ("simple_cnn", [23, 17, 31], False)])
def test_a_client_does_not_depend_on_its_chunk(name, sizes, augment):
    """Measured on CPU: the same bits whether a client trains alone, with others or in
    another order (so also on whichever rank trains it). Client 2 (31 samples) is the last
    one training in its chunk; simple_cnn without augmentation gets channels-last inputs."""
    fl = FLConfig(batch_size=10, augment=augment, vmap_clients=8)
    flat, g0, data, shape = _setup(name, sizes)
    tf = ImageTransform([0.5] * shape[2], [0.25] * shape[2], shape, augment)
    cohort = CohortTrainer(flat.model, fl, tf, data[0][0][:3])
    ids = list(range(len(sizes)))
    whole, _ = cohort.train(g0, data, tf, seed=7, client_ids=ids, round_=3)
    alone, _ = cohort.train(g0, data[2:3], tf, seed=7, client_ids=ids[2:3], round_=3)
    back, _ = cohort.train(g0, data[::-1], tf, seed=7, client_ids=ids[::-1], round_=3)
    assert torch.equal(alone[0], whole[2])
    assert torch.equal(back.flip(0), whole)


def test_step_counts_match_train_client():
    """client_steps: train_client's optimiser steps (SCAFFOLD counts them), with a lone last
    sample skipped, for n <= 2 kept, and with batch size 1."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    for n in (1, 2, 3, 11, 20, 21):
        for bs in (1, 2, 10):
            for epochs in (1, 2):
                cfg = FLConfig(algorithm="scaffold", batch_size=bs, local_epochs=epochs)
                cv = C.ControlVariates(torch.zeros(n_params), torch.zeros(n_params))
                x, y = torch.zeros(n, 2, 2, 1), torch.zeros(n, dtype=torch.long)
                C.train_client(model, params, torch.zeros(n_params), x, y,
                               lambda b, _g: b.permute(0, 3, 1, 2), cfg, seed=0, client_id=0,
                               round_=1, control=cv)
                assert client_steps(n, bs, epochs) == cv.steps, (n, bs, epochs)


def test_what_cannot_be_matched_is_named():
    fl = FLConfig(vmap_clients=4)
    digits = build_model(ModelConfig(name="digits_cnn"), (8, 8, 1), 10)
    assert fallback_reason(digits, fl) is None
    assert "central DP" in (fallback_reason(digits, fl, dp=True) or "")
    resnet = build_model(ModelConfig(name="resnet20"), (8, 8, 1), 10)
    assert "BatchNorm in training mode" in (fallback_reason(resnet, fl) or "")
    crnn = build_model(ModelConfig(name="audio_crnn"), (16, 8, 1), 10)
    assert "recurrent layer" in (fallback_reason(crnn, fl) or "")
    drop2d = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout2d(0.1), nn.Flatten(),
                           nn.Linear(72, 10))
    assert "Dropout2d" in (fallback_reason(drop2d, fl) or "")

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.spare = nn.Linear(64, 10), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    tf = ImageTransform([0.5], [0.25], (8, 8, 1), False)
    cohort = CohortTrainer(Unused(), fl, tf, torch.zeros(3, 8, 8, 1, dtype=torch.uint8))
    assert "spare.weight gets no gradient" in (cohort.reason or "")


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny config's prepared data (the prepare stage in process, as the CLI runs it)."""
    from gptfl_hpc import pipeline
    from gptfl_hpc.parallel.comm import LocalComm

    out = tmp_path_factory.mktemp("vmap")
    prepared = pipeline.stage_prepare(load_config(TINY, [f"data.dir={out / 'data'}"]), out,
                                      LocalComm())
    return prepared.manifest, out / "data"


def _one_round(tiny_data, *over: str) -> tuple[torch.Tensor, float]:
    """One round of the engine (in process, one rank): the new global weights, train loss."""
    from gptfl_hpc.fl.aggregate import S_LOSS, S_WEIGHT
    from gptfl_hpc.fl.engine import Federation
    from gptfl_hpc.parallel.comm import LocalComm

    manifest, d = tiny_data
    cfg = load_config(TINY, ["fl.clients_per_round=3", *over])
    fed = Federation(cfg.fl, cfg.model, cfg.run, manifest=manifest, data_dir=d,
                     comm=LocalComm(), init="random", device=torch.device("cpu"), dp=cfg.dp)
    r = fed.run_round(1)
    loss = r.stats[S_LOSS] / r.stats[S_WEIGHT] if r.stats[S_LOSS] else float("nan")
    return fed.global_model.flat.clone(), float(loss)


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_the_engine_round_matches_within_tolerance(tiny_data, algorithm):
    over = f"fl.algorithm={algorithm}"
    (w0, l0), (w4, l4) = (_one_round(tiny_data, over),
                          _one_round(tiny_data, over, "fl.vmap_clients=2"))
    assert (w4 - w0).abs().max().item() <= ATOL_SGD["digits_cnn"] and abs(l4 - l0) <= ATOL_LOSS
    assert not torch.equal(w4, w0)  # the vmapped path ran (the bits differ)


@pytest.mark.parametrize("over, why", [
    (["model.name=resnet20"], "the model has BatchNorm in training mode (bn1)"),
    (["dp.enabled=true", "dp.noise_multiplier=0.0"], "central DP is on"),
])
def test_fallbacks_are_bitwise_the_sequential_loop(tiny_data, caplog, over, why):
    base = _one_round(tiny_data, *over)[0]
    with caplog.at_level(logging.INFO, logger="gptfl_hpc.fl.engine"):
        fallback = _one_round(tiny_data, *over, "fl.vmap_clients=4")[0]
    assert torch.equal(base, fallback)
    lines = [r.getMessage() for r in caplog.records if "fl.vmap_clients" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(
        "fl.vmap_clients=4: clients are trained one after another: " + why)


def test_a_failing_vmapped_step_falls_back_with_a_warning(tiny_data, caplog, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("no batching rule for this op\ndetails")

    monkeypatch.setattr(CohortTrainer, "train", fail)
    base = _one_round(tiny_data)[0]
    with caplog.at_level(logging.INFO, logger="gptfl_hpc.fl.engine"):
        fallback = _one_round(tiny_data, "fl.vmap_clients=2")[0]
    assert torch.equal(base, fallback)
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "vmapped step failed on rank 0 (no batching rule for this op)" \
        in warn[0].getMessage()


# ------------------------------------------------------------------------------ federate


def test_federate_vmapped_agrees_with_sequential(tiny_data, tmp_path):
    """Two rounds of `federate`: vmapped (one process, chunks of 4; three ranks, chunks of
    2) against the sequential loop within the SGD tolerance (two rounds: x2), and the two
    vmapped runs bit for bit (chunk composition, thread count and rank do not matter)."""
    d = tiny_data[1]
    # one thread per process (the one-process runs would take both cores of a busy machine)
    runs = {"seq": (["run.threads=1"], None),
            "vmap1": (["run.threads=1", "fl.vmap_clients=4"], None),
            "vmap3": (["fl.vmap_clients=2"], 3)}
    for name, (over, n) in runs.items():
        run_cli(["federate", TINY, "--out", tmp_path / name, f"data.dir={d}", "fl.rounds=2",
                 *over], n=n, timeout=180)
    seq, vm1, vm3 = (load_file(str(tmp_path / name / "final.safetensors")) for name in runs)
    for k in seq:
        assert (seq[k] - vm1[k]).abs().max().item() <= 2 * ATOL_SGD["digits_cnn"], k
        assert torch.equal(vm1[k], vm3[k]), k  # (the files differ: fl.vmap_clients is in
        # the run's fingerprint, which final.safetensors carries)
