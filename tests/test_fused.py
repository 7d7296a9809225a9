"""The fused MLP kernel (core/fused.py) against the graph and finite differences, and the
optimizers' whole-vector step against their per-parameter one."""

import numpy as np
import pytest

import core.functional as F
from core import Tensor, fused, nn, optim
from core.optim import FlatViews, spans
from workers.model import Recipe, average_and_step, grad_sum

LOSS_FNS = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def batch(loss, dtype, n=33, sizes=(3, 7, 5, 4), seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    if loss == "cross_entropy":
        return X, rng.integers(0, sizes[-1], n)
    return X, rng.standard_normal((n, sizes[-1])).astype(dtype)


def graph_grad_sum(model, loss, X, y):
    for p in model.parameters():
        p.grad = None
    out = LOSS_FNS[loss](model(Tensor(X)), y, reduction="sum")
    out.backward()
    return [p.grad.copy() for p in model.parameters()], float(out.data)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_fused_gradients_equal_the_graphs(activation, loss, dtype):
    model = nn.MLP([3, 7, 5, 4], activation=activation, dtype=dtype, seed=2, bias_init=0.1)
    X, y = batch(loss, dtype)
    assert fused.fits(model, loss, y)
    want, want_loss = graph_grad_sum(model, loss, X, y)
    got, got_loss = fused.mlp_grad_sum(model, loss, X, y)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert [g.dtype for g in got] == [dtype] * len(want)
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    assert got_loss == pytest.approx(want_loss, rel=tol)
    # One vector under all of them, in parameter order; the next call's are new arrays.
    want_flat = np.concatenate([g.ravel() for g in want])
    np.testing.assert_allclose(got.flat, want_flat, rtol=tol, atol=tol)
    assert all(np.shares_memory(g, got.flat) for g in got)
    again, _ = fused.mlp_grad_sum(model, loss, X[:5], y[:5])
    assert not np.shares_memory(again.flat, got.flat)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_fused_gradients_match_central_differences(activation, loss):
    model = nn.MLP([3, 6, 4], activation=activation, seed=3, bias_init=0.05)
    X, y = batch(loss, np.float64, n=9, sizes=(3, 6, 4), seed=4)
    grads, _ = fused.mlp_grad_sum(model, loss, X, y)
    grads = [g.copy() for g in grads]
    rng, eps = np.random.default_rng(5), 1e-6
    for p, g in zip(model.parameters(), grads, strict=True):
        for _ in range(2):
            d = rng.standard_normal(p.shape)
            base = p.data.copy()
            p.data = base + eps * d
            up = fused.mlp_grad_sum(model, loss, X, y)[1]
            p.data = base - eps * d
            down = fused.mlp_grad_sum(model, loss, X, y)[1]
            p.data = base
            numeric = (up - down) / (2 * eps)
            assert np.vdot(g, d) == pytest.approx(numeric, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_the_forward_pass_equals_the_graphs(activation):
    model = nn.MLP([3, 7, 5, 4], activation=activation, seed=2, bias_init=0.1)
    X, _ = batch("mse", np.float64)
    np.testing.assert_allclose(fused.mlp_forward(model, X), model(Tensor(X)).data, atol=1e-15)


def test_tanh_is_within_4e_16_of_numpys_and_saturates_without_overflow():
    x = np.concatenate([np.linspace(-40, 40, 20001), [np.inf, -np.inf, 400.0, 1e300, 0.0]])
    with np.errstate(all="raise"):  # no warning for any of these
        got = fused.tanh_(x.copy())
    assert np.max(np.abs(got - np.tanh(x))) <= 4e-16
    assert np.isnan(fused.tanh_(np.array([np.nan])))[0]


def test_grad_sum_takes_the_kernel_only_for_a_plain_mlp_and_falls_back_to_the_graph():
    X, y = batch("cross_entropy", np.float64, n=8, sizes=(3, 4, 2))
    mlp = nn.MLP([3, 4, 2], activation="tanh", seed=0)
    grads, loss = grad_sum(mlp, "cross_entropy", X, y)
    assert hasattr(grads, "flat")
    assert all(p.grad is g for p, g in zip(mlp.parameters(), grads, strict=True))
    want, want_loss = graph_grad_sum(mlp, "cross_entropy", X, y)
    for w, g in zip(want, grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
    # not fused: a Sequential (dropout lives there), bce, float targets, broadcast mse
    seq = nn.Sequential(nn.Linear(3, 4, rng=0), nn.Dropout(0.5, seed=0), nn.Linear(4, 2, rng=1))
    assert not fused.fits(seq, "cross_entropy", y)
    assert not hasattr(grad_sum(seq, "cross_entropy", X, y)[0], "flat")
    assert not fused.fits(mlp, "bce", y)
    assert not fused.fits(mlp, "cross_entropy", y.astype(np.float64))
    assert not fused.fits(mlp, "mse", np.zeros((8, 1)))
    with pytest.raises(IndexError, match="target 2 is out of bounds for 2 classes"):
        fused.mlp_grad_sum(mlp, "cross_entropy", X, np.where(y == 1, 2, y))


OPTIMIZERS = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
    "nesterov_wd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam_wd": lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.1),
    "adamw": lambda ps: optim.AdamW(ps, lr=0.01),
}
SHAPES = [(4, 3), (4,), (2, 4), (2,)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_whole_vector_step_is_bit_identical_to_per_parameter_steps(name):
    def params():
        rng = np.random.default_rng(1)
        return [Tensor(rng.standard_normal(s), requires_grad=True) for s in SHAPES]

    flat_ps, ref_ps = params(), params()
    flat_opt, ref_opt = OPTIMIZERS[name](flat_ps), OPTIMIZERS[name](ref_ps)
    rng = np.random.default_rng(2)
    for step in range(6):
        grads = FlatViews(rng.standard_normal(26), spans(SHAPES))
        for p, q, g in zip(flat_ps, ref_ps, grads, strict=True):
            p.grad, q.grad = g, g.copy()
        flat_opt.step(grads.flat)
        ref_opt.step()
        if step == 2:  # a resume: load_state_dict replaces the state's arrays
            flat_opt.load_state_dict(flat_opt.state_dict())
        if step == 4:  # parameters replaced from outside (a replica loading weights)
            for p in flat_ps:
                p.data = p.data.copy()
    for p, q in zip(flat_ps, ref_ps, strict=True):
        assert np.array_equal(p.data, q.data)
    got, want = flat_opt.state_dict(), ref_opt.state_dict()
    assert got["state"].keys() == want["state"].keys()  # none at all for plain SGD
    for i, entries in want["state"].items():
        assert list(got["state"][i]) == list(entries)
        for k, v in entries.items():
            assert np.array_equal(got["state"][i][k], v)
    assert got["param_groups"] == want["param_groups"]


def test_average_and_step_gives_the_same_bits_for_separate_or_flat_gradients():
    def run(flat: bool):
        model = nn.MLP([3, 5, 2], activation="relu", seed=0)
        params = model.parameters()
        opt = optim.SGD(params, lr=0.1, momentum=0.9)
        recipe = Recipe(optim.constant_schedule(0.1), max_norm=0.5)
        rng, norms = np.random.default_rng(3), []
        for step in range(3):
            g = FlatViews(rng.standard_normal(32), spans([p.shape for p in params]))
            grads = g if flat else [a.copy() for a in g]
            norms.append(average_and_step(params, opt, grads, 7, 1.5, step, recipe)[1])
        return [p.data.copy() for p in params], norms

    (a, na), (b, nb) = run(True), run(False)
    assert na == nb
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
