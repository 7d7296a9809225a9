"""Convolution, pooling, flatten and dropout: torch parity in float64 (forward and the
gradients of input, weight and bias within 1e-9), gradcheck on every op, and the
modules' torch names and train/eval behaviour. Skipped without torch, except under
CI=true."""

import numpy as np
import pytest

import core.functional as F
from core import Tensor, gradcheck, nn
from core.nn import sample_context
from tests.helpers import require

torch = require("torch")
TF = torch.nn.functional

CONV = [
    # id, x shape (N, C, H, W), weight shape (O, C, kh, kw), stride, padding
    ("s1_p0", (5, 1, 6, 6), (3, 1, 3, 3), 1, 0),
    ("s2_p1", (5, 3, 7, 7), (8, 3, 3, 3), 2, 1),
    ("s1_p1_rect", (1, 3, 6, 9), (8, 3, 2, 4), 1, 1),
    ("pairs", (5, 1, 9, 8), (3, 1, 3, 2), (2, 1), (1, 0)),
    ("batch1_s2_p0", (1, 8, 8, 8), (3, 8, 3, 3), 2, 0),
    ("1x1", (5, 3, 4, 4), (8, 3, 1, 1), 1, 0),
]
POOL = [
    # id, x shape, kernel_size, stride
    ("k2", (5, 3, 8, 8), 2, None),
    ("k3_s2_overlap", (1, 8, 7, 7), 3, 2),
    ("rect_s1", (5, 1, 6, 7), (2, 3), 1),
    ("odd_tail", (5, 3, 7, 5), 2, None),
]


def _close(ours, theirs):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=0, atol=1e-9)


def _both(arrays):
    ours = [Tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    return ours, theirs


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", [None, "relu", "tanh", "sigmoid"])
@pytest.mark.parametrize(("x_shape", "w_shape", "stride", "padding"), [c[1:] for c in CONV])
def test_conv2d_matches_torch(x_shape, w_shape, stride, padding, act, bias):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(x_shape), rng.standard_normal(w_shape)]
    arrays += [rng.standard_normal(w_shape[0])] if bias else []
    ours, theirs = _both(arrays)
    y = F.conv2d(*ours[:2], ours[2] if bias else None, stride, padding, activation=act)
    ty = TF.conv2d(*theirs[:2], theirs[2] if bias else None, stride, padding)
    ty = getattr(torch, act)(ty) if act else ty
    g = rng.standard_normal(y.shape)
    y.backward(g)
    ty.backward(torch.tensor(g))
    _close(y.data, ty)
    for a, b in zip(ours, theirs, strict=True):
        _close(a.grad, b.grad)


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize(("x_shape", "kernel", "stride"), [c[1:] for c in POOL])
def test_pool_matches_torch_with_ties(op, x_shape, kernel, stride):
    rng = np.random.default_rng(2)
    x = np.round(rng.standard_normal(x_shape))  # few distinct values: many tied maxima
    (ours,), (theirs,) = _both([x])
    y = getattr(F, op)(ours, kernel, stride)
    ty = getattr(TF, op)(theirs, kernel, stride)
    g = rng.standard_normal(y.shape)
    y.backward(g)
    ty.backward(torch.tensor(g))
    _close(y.data, ty)
    _close(ours.grad, theirs.grad)


@pytest.mark.parametrize(("x_shape", "w_shape", "stride", "padding"), [c[1:] for c in CONV])
def test_conv2d_gradcheck(x_shape, w_shape, stride, padding):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding), x, w, b)
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding, "tanh"), x, w, b)


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize(("x_shape", "kernel", "stride"), [c[1:] for c in POOL])
def test_pool_gradcheck(op, x_shape, kernel, stride):
    x = np.random.default_rng(4).standard_normal(x_shape)  # no ties: differentiable
    assert gradcheck(lambda x: getattr(F, op)(x, kernel, stride), x)


def test_flatten_and_dropout_gradcheck():
    x = np.random.default_rng(5).standard_normal((4, 2, 3, 3))
    assert gradcheck(lambda x: nn.Flatten()(x), x)
    with sample_context(0, np.arange(4)):
        assert gradcheck(lambda x: nn.Dropout(0.4, seed=1, layer=2)(x), x)


def test_sequential_names_and_state_dict_load_into_torch():
    ours = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, seed=0),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2), seed=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(12, 3, rng=2),
        nn.Sigmoid(),
    )
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, (3, 2), stride=(1, 2)),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.25),
        torch.nn.Linear(12, 3),
        torch.nn.Sigmoid(),
    ).double()
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in theirs.named_parameters()]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias", "8.weight", "8.bias"]
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    x = np.random.default_rng(6).standard_normal((5, 1, 10, 16))
    ours.eval(), theirs.eval()
    assert not ours[7].training and not ours.training
    _close(ours(x).data, theirs(torch.tensor(x)))


def test_dropout_mask_is_a_function_of_the_sample_not_the_batch():
    x = np.ones((6, 3, 4))
    drop = nn.Dropout(0.5, seed=7, layer=3)
    rows = np.array([10, 4, 99, 5, 0, 7])
    with sample_context(2, rows):
        whole = drop(x).data
    with sample_context(2, rows[:2]):
        head = drop(x[:2]).data
    with sample_context(2, rows[2:]):
        tail = drop(x[2:]).data
    np.testing.assert_array_equal(whole, np.concatenate([head, tail]))
    assert set(np.unique(whole)) == {0.0, 2.0}
    assert 0.3 < (whole == 0).mean() < 0.7
    with sample_context(3, rows):  # another epoch, another mask
        assert not np.array_equal(drop(x).data, whole)
    other_layer = nn.Dropout(0.5, seed=7, layer=4)
    with sample_context(2, rows):
        assert not np.array_equal(other_layer(x).data, whole)
    assert np.array_equal(drop.eval()(x).data, x)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="kernel 5x5 is larger than the 4x4 input"):
        F.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 5, 5)))
    with pytest.raises(ValueError, match="expects 2 input channels, got 3"):
        F.conv2d(np.ones((1, 3, 4, 4)), np.ones((1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        F.max_pool2d(np.ones((4, 4)), 2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        nn.Dropout(1.0)
