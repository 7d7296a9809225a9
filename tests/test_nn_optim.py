"""Modules (names, init, state dicts) and optimizers (closed-form trajectories, resume)."""

import numpy as np
import pytest

import core.functional as F
from core import Tensor, nn, optim

# --- modules ------------------------------------------------------------------------------


def test_mlp_parameters_and_state_dict_layout():
    m = nn.MLP([3, 5, 4, 2], seed=0)
    names = [n for n, _ in m.named_parameters()]
    assert names == [f"layers.{i}.{k}" for i in range(3) for k in ("weight", "bias")]
    assert [p.shape for p in m.parameters()] == [(5, 3), (5,), (4, 5), (4,), (2, 4), (2,)]
    assert list(m.state_dict()) == names
    assert all(p.requires_grad and p.dtype == np.float64 for p in m.parameters())


def test_mlp_forward_is_linear_activation_linear():
    m = nn.MLP([3, 4, 2], activation="tanh", seed=1)
    x = np.random.default_rng(0).standard_normal((6, 3))
    (w0, b0), (w1, b1) = [(layer.weight.data, layer.bias.data) for layer in m.layers]
    np.testing.assert_allclose(m(x).data, np.tanh(x @ w0.T + b0) @ w1.T + b1, rtol=1e-12)
    assert m(Tensor(x))._op == "linear" and m(x)._prev[0]._op == "linear+tanh"


def test_init_is_seeded_he_or_glorot_with_zero_bias():
    first, again = nn.MLP([4, 3], seed=7).state_dict(), nn.MLP([4, 3], seed=7).state_dict()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    rng_model = nn.MLP([4, 3], rng=np.random.default_rng(7))
    assert np.array_equal(
        rng_model.layers[0].weight.data, nn.MLP([4, 3], seed=7).layers[0].weight.data
    )
    he = nn.MLP([1000, 400], "relu", seed=0).layers[0]
    assert he.weight.data.std() == pytest.approx(np.sqrt(2 / 1000), rel=0.02)
    assert not he.bias.data.any()
    glorot = nn.MLP([1000, 400], "sigmoid", seed=0).layers[0].weight.data
    limit = np.sqrt(6 / 1400)
    assert np.abs(glorot).max() <= limit
    assert glorot.std() == pytest.approx(limit / np.sqrt(3), rel=0.02)
    with pytest.raises(ValueError, match="seed or rng"):
        nn.MLP([2, 2], seed=1, rng=np.random.default_rng(1))
    with pytest.raises(ValueError, match="activation"):
        nn.MLP([2, 2], activation="gelu")


def test_bias_init_and_float32():
    m = nn.MLP([2, 8, 1], dtype=np.float32, seed=0, bias_init=-5.0)
    assert all(p.dtype == np.float32 for p in m.parameters())
    assert all((layer.bias.data == -5).all() for layer in m.layers)
    m.init_bias(0.25)
    assert all((layer.bias.data == 0.25).all() for layer in m.layers)
    assert m(np.ones((3, 2), np.float32)).dtype == np.float32


def test_state_dict_copies_and_load_in_place():
    m = nn.MLP([2, 3, 1], dtype=np.float32, seed=0)
    state = m.state_dict()
    state["layers.0.weight"][...] = 0
    assert m.layers[0].weight.data.any()  # a copy, not a view
    arrays = [p.data for p in m.parameters()]
    source = nn.MLP([2, 3, 1], seed=1).state_dict()  # float64 values
    m.load_state_dict(source)
    assert all(p.data is a for p, a in zip(m.parameters(), arrays, strict=True))  # in place
    assert all(p.dtype == np.float32 for p in m.parameters())
    np.testing.assert_allclose(m.layers[1].weight.data, source["layers.1.weight"], rtol=1e-6)


def test_load_state_dict_errors_are_clear():
    m = nn.MLP([2, 3, 1], seed=0)
    state = m.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.bias'\]"):
        m.load_state_dict({k: v for k, v in state.items() if k != "layers.1.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        m.load_state_dict({**state, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"shape mismatch for layers.0.weight"):
        m.load_state_dict({**state, "layers.0.weight": np.zeros((2, 3))})


def test_sequential_uses_torch_names_and_matches_mlp():
    mlp = nn.MLP([2, 4, 4, 1], seed=3)
    seq = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert list(seq.state_dict()) == names
    seq.load_state_dict(
        {f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in mlp.state_dict().items()}
    )
    x = np.random.default_rng(0).standard_normal((5, 2))
    np.testing.assert_allclose(seq(x).data, mlp(x).data, rtol=1e-12)
    assert len(seq) == 5 and isinstance(seq[1], nn.ReLU)


def test_linear_without_bias_and_zero_grad():
    layer = nn.Linear(3, 2, bias=False, rng=0, init="glorot")
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    layer(np.ones((1, 3))).sum().backward()
    assert layer.weight.grad is not None
    layer.zero_grad()
    assert layer.weight.grad is None


# --- optimizers: closed-form trajectories ---------------------------------------------------


def _run(opt_factory, loss_fn, p0, steps):
    p = Tensor(np.array(p0, dtype=np.float64), requires_grad=True)
    opt = opt_factory([p])
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(p).backward()
        opt.step()
    return p.data


C = np.array([1.0, -2.0, 0.5])
P0 = np.array([3.0, 0.0, -1.0])
A = np.array([0.5, -2.0, 3.0])


def quadratic(p):  # gradient p - C
    return ((p - C) ** 2).sum() * 0.5


def linear(p):  # constant gradient A
    return (p * A).sum()


def test_sgd_on_quadratic():
    lr, k = 0.1, 12
    got = _run(lambda ps: optim.SGD(ps, lr=lr), quadratic, P0, k)
    np.testing.assert_allclose(got, C + (1 - lr) ** k * (P0 - C), rtol=1e-12)


def test_sgd_weight_decay_on_quadratic():
    lr, wd, k = 0.1, 0.5, 15  # gradient (1 + wd) p - C: fixed point C / (1 + wd)
    got = _run(lambda ps: optim.SGD(ps, lr=lr, weight_decay=wd), quadratic, P0, k)
    fixed = C / (1 + wd)
    np.testing.assert_allclose(got, fixed + (1 - lr * (1 + wd)) ** k * (P0 - fixed), rtol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_with_constant_gradient(nesterov):
    lr, mu, k = 0.05, 0.9, 12
    got = _run(lambda ps: optim.SGD(ps, lr=lr, momentum=mu, nesterov=nesterov), linear, P0, k)
    bufs = [(1 - mu**j) / (1 - mu) for j in range(1, k + 1)]  # buf_j / A
    steps = [1 + mu * b for b in bufs] if nesterov else bufs
    np.testing.assert_allclose(got, P0 - lr * A * sum(steps), rtol=1e-12)


def test_adam_with_constant_gradient_moves_lr_per_step():
    lr, eps, k = 0.01, 1e-8, 12  # bias-corrected moments are exactly g and g**2
    got = _run(lambda ps: optim.Adam(ps, lr=lr, eps=eps), linear, P0, k)
    np.testing.assert_allclose(got, P0 - k * lr * A / (np.abs(A) + eps), rtol=1e-12)


def test_adam_weight_decay_adds_to_gradient():
    p = Tensor(np.array([2.0]), requires_grad=True)
    opt = optim.Adam([p], lr=0.1, weight_decay=0.5)
    p.grad = np.array([0.0])  # the whole gradient is wd * p = 1.0
    opt.step()
    np.testing.assert_allclose(p.data, [2.0 - 0.1 * 1.0 / (1.0 + 1e-8)], rtol=1e-12)


def test_param_group_lr_can_change_and_validation():
    p = Tensor(np.array([1.0]), requires_grad=True)
    opt = optim.SGD([p], lr=1.0)
    opt.param_groups[0]["lr"] = 0.5
    p.grad = np.array([1.0])
    opt.step()
    assert p.data[0] == 0.5
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="empty"):
        optim.Adam([])


# --- optimizers: state dicts -------------------------------------------------------------------

X = np.random.default_rng(0).standard_normal((16, 3))
Y = np.random.default_rng(1).integers(0, 2, 16)

OPTIMIZERS = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "adam": lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
}


def _train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()


def _as_from_json(state):
    """What a checkpoint gives back: tuples become lists, arrays stay arrays."""
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in state["param_groups"]
    ]
    return {"state": state["state"], "param_groups": groups}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_resume_is_bit_identical(name):
    straight = nn.MLP([3, 8, 2], seed=0)
    opt = OPTIMIZERS[name](straight.parameters())
    _train(straight, opt, 10)

    first = nn.MLP([3, 8, 2], seed=0)
    opt = OPTIMIZERS[name](first.parameters())
    _train(first, opt, 5)
    model_state, opt_state = first.state_dict(), opt.state_dict()
    _train(first, opt, 2)  # later steps must not leak into the saved copies

    resumed = nn.MLP([3, 8, 2], seed=99)
    resumed.load_state_dict(model_state)
    opt = OPTIMIZERS[name](resumed.parameters())
    opt.load_state_dict(_as_from_json(opt_state))
    _train(resumed, opt, 5)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert np.array_equal(a.data, b.data)


def test_optimizer_state_dict_format():
    m = nn.MLP([3, 4, 2], seed=0)
    sgd = optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    adam = optim.Adam(m.parameters(), lr=0.01)
    _train(m, sgd, 1)
    _train(m, adam, 2)
    s = sgd.state_dict()
    assert list(s["state"]) == [0, 1, 2, 3] and list(s["state"][0]) == ["momentum_buffer"]
    assert s["param_groups"] == [
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False, "params": [0, 1, 2, 3]}
    ]
    a = adam.state_dict()
    assert a["state"][3]["step"] == 2 and a["state"][0]["exp_avg"].shape == (4, 3)
    assert a["param_groups"][0]["betas"] == (0.9, 0.999) and a["param_groups"][0]["params"] == [
        0,
        1,
        2,
        3,
    ]
    a["state"][0]["exp_avg"][...] = 123  # copies, not the live buffers
    assert not (adam.state_dict()["state"][0]["exp_avg"] == 123).any()
    with pytest.raises(ValueError, match="shape"):
        bad = adam.state_dict()
        bad["state"][0]["exp_avg"] = np.zeros(2)
        adam.load_state_dict(bad)


def test_shared_parameter_is_listed_once():
    first = nn.Linear(3, 3, rng=0)
    seq = nn.Sequential(first, nn.Tanh(), first)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]
