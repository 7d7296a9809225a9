"""Parity with PyTorch in float64 (to 1e-9): every op forward and backward, the losses, and
20 optimizer steps of an MLP initialised identically. Skipped without torch, except
under CI=true, where a missing torch fails the run."""

import numpy as np
import pytest

import core.functional as F
from core import Tensor, nn, optim, stack
from core import concatenate as cat
from tests.helpers import require

torch = require("torch")
TF = torch.nn.functional

IDX = np.array([0, 2, 2, 1])
T5 = np.array([0, 3, 1, 4, 4])


def _t(a):
    return torch.as_tensor(a)


def _pos(x):  # a positive version of an input, written the same way in both engines
    return x * x + 0.5


OPS = [
    # name, shapes, ours, torch (None: the same expression works for both)
    ("add_bcast", [(45, 65), (45, 1)], lambda a, b: a + b, None),
    ("mul_4d_bcast", [(5, 3, 14, 16), (5, 1, 14, 1)], lambda a, b: a * b, None),
    ("mul_col", [(4, 1), (4, 5)], lambda a, b: a * b, None),
    ("mul_0d", [(), (3, 4)], lambda a, b: a * b, None),
    ("sub", [(3, 4), (4,)], lambda a, b: a - b, None),
    ("div", [(3, 4), (3, 1)], lambda a, b: a / _pos(b), None),
    ("neg", [(3, 4)], lambda a: -a, None),
    ("scalars", [(3, 4)], lambda a: (2.5 * a - 1) / 3 + 1 - 2 / _pos(a), None),
    ("pow", [(3, 4)], lambda a: a**3 + _pos(a) ** -1.5, None),
    ("pow_tensor", [(3, 4), (4,)], lambda a, b: _pos(a) ** b, None),
    ("rpow", [(3, 4)], lambda a: 2.0**a, None),
    ("matmul_1d_1d", [(4,), (4,)], lambda a, b: a @ b, None),
    ("matmul_1d_2d", [(4,), (4, 3)], lambda a, b: a @ b, None),
    ("matmul_2d_1d", [(3, 4), (4,)], lambda a, b: a @ b, None),
    ("matmul_2d", [(3, 4), (4, 5)], lambda a, b: a @ b, None),
    ("matmul_bcast", [(2, 1, 3, 4), (5, 4, 2)], lambda a, b: a @ b, None),
    ("sum", [(3, 4, 5)], lambda a: a.sum(), None),
    ("sum_axes", [(3, 4, 5)], lambda a: a.sum((0, 2)), None),
    ("sum_keep", [(3, 4, 5)], lambda a: a.sum(1, keepdims=True), lambda a: a.sum(1, keepdim=True)),
    ("mean", [(3, 4, 5)], lambda a: a.mean(), None),
    ("mean_axis", [(3, 4, 5)], lambda a: a.mean(-1), None),
    ("max", [(3, 4, 5)], lambda a: a.max(), lambda a: a.amax()),
    ("max_keep", [(3, 4, 5)], lambda a: a.max((0, 2), True), lambda a: a.amax((0, 2), True)),
    ("max_ties", [(3, 4)], lambda a: cat([a, a], 1).max(1), lambda a: torch.cat([a, a], 1).amax(1)),
    ("exp", [(3, 4)], lambda a: a.exp(), None),
    ("log", [(3, 4)], lambda a: _pos(a).log(), None),
    ("relu", [(3, 4)], lambda a: a.relu(), None),
    ("tanh", [(3, 4)], lambda a: a.tanh(), None),
    ("sigmoid", [(3, 4)], lambda a: (a * 300).sigmoid() + a.sigmoid(), None),
    ("reshape", [(3, 4)], lambda a: a.reshape(2, 6), None),
    ("transpose", [(2, 3, 4)], lambda a: a.transpose(0, 2), None),
    ("T", [(3, 4)], lambda a: a.T, None),
    ("permute", [(2, 3, 4)], lambda a: a.permute(1, 2, 0), None),
    ("getitem", [(4, 5)], lambda a: a[1:3, ::2] * a[2, 1:4], None),
    ("getitem_fancy", [(3, 5)], lambda a: a[IDX], lambda a: a[_t(IDX)]),
    ("getitem_fancy_cols", [(3, 5)], lambda a: a[:, IDX], lambda a: a[:, _t(IDX)]),
    (
        "concatenate",
        [(2, 3), (2, 1)],
        lambda a, b: cat([a, b], 1),
        lambda a, b: torch.cat([a, b], 1),
    ),
    ("stack", [(2, 3), (2, 3)], lambda a, b: stack([a, b], 1), lambda a, b: torch.stack([a, b], 1)),
    ("softmax", [(4, 6)], lambda a: F.softmax(a * 100), lambda a: TF.softmax(a * 100, -1)),
    ("log_softmax", [(4, 6)], lambda a: F.log_softmax(a, 0), lambda a: TF.log_softmax(a, 0)),
    ("logsumexp", [(4, 6)], lambda a: F.logsumexp(a * 1e3), lambda a: torch.logsumexp(a * 1e3, -1)),
]


def _check(ours, theirs, xs, rng):
    """Same inputs and upstream gradient in both engines; outputs and all input grads agree."""
    mine = [Tensor(x, requires_grad=True) for x in xs]
    ref = [_t(x).clone().requires_grad_(True) for x in xs]
    out, expected = ours(*mine), theirs(*ref)
    np.testing.assert_allclose(out.data, expected.detach().numpy(), rtol=1e-9, atol=1e-12)
    w = rng.standard_normal(out.shape)
    out.backward(w)
    expected.backward(_t(w))
    for a, b in zip(mine, ref, strict=True):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "shapes", "ours", "theirs"), OPS, ids=[c[0] for c in OPS])
def test_op_parity(name, shapes, ours, theirs):
    rng = np.random.default_rng(0)
    _check(ours, theirs or ours, [rng.standard_normal(s) for s in shapes], rng)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse_loss", "binary_cross_entropy_with_logits"])
def test_loss_parity(loss, scale, reduction):
    """Float targets (mse, bce) require grad too, so their gradients are compared as well."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4))
    ours, theirs = getattr(F, loss), getattr(TF, loss)
    if loss == "cross_entropy":
        y = rng.integers(0, 4, 6)
        _check(
            lambda a: ours(a * scale, y, reduction),
            lambda a: theirs(a * scale, _t(y), reduction=reduction),
            [x],
            rng,
        )
    else:
        _check(
            lambda a, t: ours(a * scale, t, reduction),
            lambda a, t: theirs(a * scale, t, reduction=reduction),
            [x, rng.uniform(0, 1, (6, 4))],
            rng,
        )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "relu", "tanh", "sigmoid"])
def test_fused_linear_parity(activation, bias):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(s) for s in [(2, 5, 3), (4, 3), (4,)][: 3 if bias else 2]]
    act = (lambda t: t) if activation is None else (lambda t: getattr(t, activation)())
    _check(lambda *a: F.linear(*a, activation=activation), lambda *a: act(TF.linear(*a)), xs, rng)


def test_max_ties_match_amax():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    a, b = Tensor(x, requires_grad=True), _t(x).clone().requires_grad_(True)
    (a.max(axis=1) * Tensor([1.0, 2.0])).sum().backward()
    (b.amax(1) * _t([1.0, 2.0])).sum().backward()
    np.testing.assert_array_equal(a.grad, b.grad.numpy())


def _torch_twin(model: nn.MLP) -> torch.nn.Sequential:
    """torch.nn.Sequential with the same weights; our layers.<i> is its index 2i."""
    mods = []
    for layer in model.layers:
        mods += [torch.nn.Linear(*layer.weight.shape[::-1]).double(), torch.nn.Tanh()]
    twin = torch.nn.Sequential(*mods[:-1])
    twin.load_state_dict(
        {
            f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": _t(v)
            for k, v in model.state_dict().items()
        }
    )
    return twin


OPTIMIZERS = {
    "sgd_nesterov_wd": (
        lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
    ),
    "sgd_momentum": (
        lambda ps: optim.SGD(ps, lr=0.05, momentum=0.5),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5),
    ),
    "adam_wd": (
        lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
    ),
    "adamw": (
        lambda ps: optim.AdamW(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
    ),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_twenty_optimizer_steps_match(name):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((32, 4)), rng.integers(0, 3, 32)
    model = nn.MLP([4, 16, 16, 3], activation="tanh", seed=0)
    twin = _torch_twin(model)
    make_ours, make_theirs = OPTIMIZERS[name]
    opt, topt = make_ours(model.parameters()), make_theirs(twin.parameters())
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        topt.zero_grad()
        tloss = TF.cross_entropy(twin(_t(X)), _t(y))
        tloss.backward()
        topt.step()
        assert loss.item() == pytest.approx(tloss.item(), rel=1e-9)
    for (k, v), tv in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        np.testing.assert_allclose(v, tv.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
    ours, theirs = opt.state_dict(), topt.state_dict()
    assert set(ours["param_groups"][0]) <= set(theirs["param_groups"][0])
    for i, entries in ours["state"].items():
        assert list(entries) == list(theirs["state"][i])
        for k, v in entries.items():
            np.testing.assert_allclose(v, np.asarray(theirs["state"][i][k]), rtol=1e-9, atol=1e-12)


# Each schedule against torch's scheduler driven step by step: 200 lrs, equal to the bit.
TS = torch.optim.lr_scheduler
SCHEDULES = {  # name: (ours, torch's on an optimizer with lr 0.3)
    "constant": (optim.constant_schedule(0.3), lambda o: TS.LambdaLR(o, lambda e: 1)),
    "step": (optim.step_schedule(0.3, 7, 0.3), lambda o: TS.StepLR(o, 7, 0.3)),
    "cosine": (
        optim.cosine_schedule(0.3, 200, 13, 0.01),
        lambda o: TS.SequentialLR(
            o,
            [TS.LinearLR(o, 1 / 13, total_iters=13), TS.CosineAnnealingLR(o, 200 - 13, 0.01)],
            milestones=[13],
        ),
    ),
    "cosine_no_warmup": (
        optim.cosine_schedule(0.3, 200, 0, 0.0),
        lambda o: TS.CosineAnnealingLR(o, 200),
    ),
    "linear": (
        optim.linear_schedule(0.3, 200, 9, 0.0),
        lambda o: TS.SequentialLR(
            o,
            [TS.LinearLR(o, 1 / 9, total_iters=9), TS.LinearLR(o, 1.0, 0.0, total_iters=191)],
            milestones=[9],
        ),
    ),
    "linear_no_warmup": (
        optim.linear_schedule(0.3, 200, 0, 0.25),
        lambda o: TS.LinearLR(o, 1.0, 0.25, total_iters=200),
    ),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_match_torch_to_the_bit(name):
    schedule, make = SCHEDULES[name]
    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched, want = make(topt), []
    for _ in range(200):
        want.append(topt.param_groups[0]["lr"])
        topt.step()
        sched.step()
    assert [schedule.lr_at(s) for s in range(200)] == want
    assert schedule.lr_at(57) == want[57]  # asked out of order, as a resumed run asks


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(s) * 3 for s in [(4, 5), (5,), (5, 2)]]
    for max_norm in (0.5, 1e3):
        ps = [Tensor(np.zeros_like(g), requires_grad=True) for g in grads]
        tps = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
        for p, tp, g in zip(ps, tps, grads, strict=True):
            p.grad, tp.grad = g.copy(), _t(g.copy())
        norm = optim.clip_grad_norm_(ps, max_norm)
        tnorm = torch.nn.utils.clip_grad_norm_(tps, max_norm)
        assert norm == pytest.approx(tnorm.item(), rel=1e-12)
        for p, tp in zip(ps, tps, strict=True):
            np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-12, atol=0)
