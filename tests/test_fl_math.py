"""FL maths against plain numpy references; flat-buffer aliasing; sampling and placement."""

import numpy as np
import pytest
import torch

from gptfl_hpc.config import ModelConfig
from gptfl_hpc.fl.fedavg import ServerOptimizer, gradient_diversity, weighted_mean
from gptfl_hpc.fl.params import FlatModel
from gptfl_hpc.fl.schedule import place_clients, rounds_to_target, sample_clients
from gptfl_hpc.train.models import build_model


def np_server(alg, w, deltas, lr=0.1, mom=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """Reference implementation (Reddi et al. 2021, Alg. 2) in float64 numpy."""
    m = np.zeros_like(w)
    v = np.full_like(w, tau * tau)
    for d in deltas:
        if alg in ("fedavg", "fedprox"):
            w = w + lr * d
        elif alg == "fedavgm":
            m = mom * m + d
            w = w + lr * m
        else:
            m = b1 * m + (1 - b1) * d
            if alg == "fedadagrad":
                v = v + d * d
            elif alg == "fedadam":
                v = b2 * v + (1 - b2) * d * d
            else:
                v = v - (1 - b2) * d * d * np.sign(v - d * d)
            w = w + lr * m / (np.sqrt(v) + tau)
    return w


@pytest.mark.parametrize("alg", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi",
                                 "fedadagrad"])
def test_server_optimizers_match_numpy(alg):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=50)
    deltas = [rng.normal(scale=0.1, size=50) for _ in range(5)]
    opt = ServerOptimizer(alg, 50, lr=0.1, momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3)
    w = torch.tensor(w0, dtype=torch.float32)
    for d in deltas:
        opt.step(w, torch.tensor(d, dtype=torch.float32))
    np.testing.assert_allclose(w.numpy(), np_server(alg, w0, deltas), rtol=1e-5, atol=1e-6)


def test_weighted_fedavg_is_sample_weighted_not_uniform():
    rng = np.random.default_rng(1)
    updates = [rng.normal(size=20) for _ in range(3)]
    n = [10, 100, 1]
    acc = sum(nk * u for nk, u in zip(n, updates))
    got = weighted_mean(torch.tensor(acc), float(sum(n))).numpy()
    ref = np.average(np.stack(updates), axis=0, weights=n)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert not np.allclose(got, np.mean(updates, axis=0))
    with pytest.raises(ValueError):
        weighted_mean(torch.tensor(acc), 0.0)


def test_gradient_diversity():
    u = np.ones(4)
    # K identical updates: sum ||u||^2 / ||K u||^2 = 1/K
    assert gradient_diversity(3 * u @ u, (3 * u) @ (3 * u)) == pytest.approx(1 / 3)
    # orthogonal updates: ratio 1
    assert gradient_diversity(2.0, 2.0) == 1.0


@pytest.mark.parametrize("name,shape", [("digits_cnn", (8, 8, 1)), ("resnet20", (32, 32, 3))])
def test_flat_model_views_alias_the_buffer(name, shape):
    model = build_model(ModelConfig(name=name), shape, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = FlatModel(model)
    after = model.state_dict()
    for k in before:  # values preserved
        assert torch.equal(before[k], after[k]), k
    assert flat.check_views()
    # writing the buffer changes the model: zero copies per round
    flat.numpy()[:] = 0.5
    assert all(bool((p == 0.5).all()) for p in model.parameters())
    bn = [b for n, b in model.named_buffers() if n.endswith("running_mean")]
    if name == "resnet20":
        assert bn and all(bool((b == 0.5).all()) for b in bn)
        # integer counters are NOT in the float buffer
        counters = [n for n, b in model.named_buffers() if not b.is_floating_point()]
        assert counters and all(n not in flat.names for n in counters)
        assert flat.numel == sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for b in model.buffers() if b.is_floating_point())
    # optimiser steps keep the aliasing
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h, w, c = shape
    model(torch.randn(2, c, h, w)).sum().backward()
    opt.step()
    assert flat.check_views()


def test_sampling_without_replacement_and_deterministic():
    for r in range(1, 50):
        s = sample_clients(7, r, 100, 10)
        assert len(set(s)) == 10 and all(0 <= c < 100 for c in s)
        assert s == sample_clients(7, r, 100, 10)
    assert sample_clients(7, 1, 100, 10) != sample_clients(8, 1, 100, 10)
    assert sample_clients(7, 1, 100, 10) != sample_clients(7, 2, 100, 10)
    with pytest.raises(ValueError):
        sample_clients(0, 1, 5, 6)


def test_placement_balances_expected_work():
    sizes = [35, 473, 2173, 100, 900, 50, 800, 1200, 60, 400]
    owner = place_clients(sizes, [1, 2, 3])
    assert sorted(owner) == list(range(10)) and set(owner.values()) == {1, 2, 3}
    loads = [sum(s for c, s in enumerate(sizes) if owner[c] == w) for w in (1, 2, 3)]
    assert max(loads) - min(loads) <= max(sizes)
    assert owner == place_clients(sizes, [1, 2, 3])


def test_rounds_to_target():
    assert rounds_to_target([(1, 0.2), (2, None), (3, 0.91), (4, 0.95)], 0.9) == 3
    assert rounds_to_target([(1, 0.2)], 0.9) is None


def test_encode_with_a_known_peak_gives_the_elementwise_bits_and_verdicts():
    """The engine passes max |update| (one aminmax pass) so the exact encoder skips its
    elementwise range check and works in place: the same int64 bits and the same refusals as
    the elementwise path, at the range's edge, for NaN and inf, and for float64 input (which
    must not be modified)."""
    import math

    from gptfl_hpc.fl.aggregate import LIMIT, RoundBuffer, peak_abs

    buf = RoundBuffer(8, 1, "exact")
    rng = np.random.default_rng(0)
    cases = [torch.from_numpy(rng.standard_normal(8).astype(np.float32)) * s
             for s in (1e-6, 1.0, 3e3)]
    edge = torch.zeros(8)
    edge[3] = float(np.nextafter(np.float32(LIMIT), np.float32(0)))  # just inside at scale 1
    cases += [edge, edge * 2]
    for u in cases:
        for scale in (1.0, 0.37, 1 / 3):
            a, b = buf.encode(u, scale), buf.encode(u, scale, peak_abs(u))
            assert (a is None) == (b is None), (u, scale)
            if a is not None:
                assert torch.equal(a, b)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = torch.ones(8)
        u[5] = bad
        p = peak_abs(u)
        assert not math.isfinite(p)
        assert buf.encode(u, 0.5, p) is None and buf.encode(u, 0.5) is None
    d = torch.linspace(-1, 1, 8, dtype=torch.float64)
    keep = d.clone()
    assert torch.equal(buf.encode(d, 0.25, peak_abs(d)), buf.encode(d, 0.25))
    assert torch.equal(d, keep)
    assert peak_abs(torch.tensor([-5.0, 2.0])) == 5.0


@pytest.mark.parametrize("encoding,threads", [("exact", 1), ("exact", 2), ("float32", 1)])
def test_add_update_through_scratch_buffers_equals_encode_then_add(encoding, threads):
    """The engine adds each client's update through buffers kept between clients
    (RoundBuffer.add_update: one multiply by scale * 2**40, then numpy's rint into int64 at
    one thread, torch's round and cast above); the sums must be the bits of
    add_vector(encode(u)) for every client in turn, with the scratch reused across updates of
    different sizes and offsets, and fits() must give encode()'s verdict. sq_norm with a
    scratch buffer: the same bits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_add_update(encoding)
    finally:
        torch.set_num_threads(saved)


def _check_add_update(encoding):
    import math

    from gptfl_hpc.fl.aggregate import LIMIT, RoundBuffer, peak_abs, sq_norm

    rng = np.random.default_rng(1)
    ref, new = RoundBuffer(40, 2, encoding, extra=10), RoundBuffer(40, 2, encoding, extra=10)
    scratch = torch.from_numpy(np.full(64, np.nan))
    for k in range(6):
        n = 40 if k % 3 else 17
        u = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * 10.0 ** (k - 3)
        scale = (k + 1) / 7
        assert new.fits(peak_abs(u), scale) == (ref.encode(u, scale, peak_abs(u)) is not None)
        ref.add_vector(ref.encode(u, scale))
        new.add_update(u, scale)
        c = u[:10] * 0.5
        ref.add_vector(ref.encode(c, 0.1), start=40)
        new.add_update(c, 0.1, start=40)
        assert sq_norm(u, scratch) == sq_norm(u)
    assert np.array_equal(ref.host, new.host)
    assert new.host[:50].any()
    if encoding == "exact":
        big = torch.full((5,), float(np.float32(LIMIT)))
        assert not new.fits(peak_abs(big), 1.0) and ref.encode(big, 1.0) is None
        assert not new.fits(math.nan, 0.5)


@pytest.mark.parametrize("kernels", ["invariant", "fast"])
def test_client_transform_once_per_client_gives_the_per_batch_bits(kernels, monkeypatch):
    """Without augmentation train_client transforms a client's images once and indexes the
    float copy per minibatch; with the size cap at 0 it transforms every minibatch. Both must
    give the same trained bits (simple_cnn: dropout, channels-last input) and loss."""
    from types import SimpleNamespace

    from gptfl_hpc.fl import client as client_mod
    from gptfl_hpc.fl.params import FlatModel
    from gptfl_hpc.numerics import training_kernels
    from gptfl_hpc.train.models import build_model
    from gptfl_hpc.train.transforms import make_transform

    fl = SimpleNamespace(client_lr_schedule="constant", client_lr=0.05, rounds=1,
                         body_lr_scale=1.0, client_optimizer="sgd", client_momentum=0.9,
                         client_weight_decay=0.0, batch_size=4, algorithm="fedavg",
                         prox_mu=0.0, local_epochs=2)
    tf = make_transform("image", [0.4] * 3, [0.2] * 3, (12, 12, 3), False)
    assert tf.rowwise and not tf.augment
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (11, 12, 12, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (11,), generator=g)
    calls, outs = [], []
    real = tf.__call__
    monkeypatch.setattr(type(tf), "__call__", lambda self, x, gen=None: (
        calls.append(len(x)), real(x, gen))[1])
    for cap in (client_mod.PRETRANSFORM_BYTES, 0):
        monkeypatch.setattr(client_mod, "PRETRANSFORM_BYTES", cap)
        calls.clear()
        with training_kernels(kernels):
            torch.manual_seed(0)
            flat = FlatModel(build_model(SimpleNamespace(name="simple_cnn", width=0, depth=0),
                                         (12, 12, 3), 10))
            loss = client_mod.train_client(flat.model, flat.params, flat.flat.clone(), images,
                                           labels, tf, fl, seed=5, client_id=2, round_=1)
        outs.append((flat.flat.clone(), loss, list(calls)))
    assert outs[0][2] == [11] and len(outs[1][2]) == 6  # once; per minibatch (2 epochs x 3)
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
