"""The scalar Value engine: hand-derived chain rule results, and agreement with Tensor."""

import math

import numpy as np
import pytest

from core import Tensor, Value


def test_add_and_multiply():
    a, b = Value(2.0), Value(-3.0)
    c = a * b + a  # dc/da = b + 1, dc/db = a
    c.backward()
    assert c.data == -4.0
    assert (a.grad, b.grad) == (-2.0, 2.0)


def test_relu_passes_gradient_only_when_positive():
    a, b = Value(1.5), Value(-1.5)
    (a.relu() + b.relu()).backward()
    assert (a.grad, b.grad) == (1.0, 0.0)


def test_value_used_twice_gets_both_gradients():
    a = Value(3.0)
    y = a * a + a  # dy/da = 2a + 1
    y.backward()
    assert a.grad == 7.0


def test_derived_ops_tanh_exp():
    x = Value(0.5)
    y = (1 - x) / 2 + 3 / x - x**2 + x.tanh() * x.exp()
    y.backward()
    expected = -0.5 - 3 / 0.25 - 1.0 + (1 - math.tanh(0.5) ** 2 + math.tanh(0.5)) * math.exp(0.5)
    assert y.data == pytest.approx(0.25 + 6 - 0.25 + math.tanh(0.5) * math.exp(0.5))
    assert x.grad == pytest.approx(expected)


def test_deep_chain():
    x = Value(1.0)
    y = x
    for _ in range(5000):
        y = y * 1.001 + 0.0
    y.backward()
    assert x.grad == pytest.approx(1.001**5000)


def test_backward_twice_does_not_double_intermediates():
    a = Value(2.0)
    h = a * a
    y = h * 3
    y.backward()
    assert (a.grad, h.grad) == (12.0, 3.0)
    y.backward()
    assert (a.grad, h.grad) == (24.0, 3.0)  # leaves accumulate, intermediates restart


def test_graph_is_recorded():
    a, b = Value(1.0), Value(2.0)
    c = (a * b).relu()
    assert c._op == "relu" and c._prev[0]._op == "mul" and c._prev[0]._prev == (a, b)


@pytest.mark.parametrize("values", [(0.3, -1.2, 2.0), (-0.7, 0.4, 1.5), (1.1, 2.2, -0.9)])
def test_value_and_tensor_agree(values):
    def expression(a, b, c):
        return ((a * b + c).tanh() * a - b / c + (a - c) ** 2).relu() + (b * 0.5).exp()

    vs = [Value(v) for v in values]
    out = expression(*vs)
    out.backward()
    ts = [Tensor(v, requires_grad=True) for v in values]
    tout = expression(*ts)
    tout.backward()
    assert out.data == pytest.approx(tout.item(), rel=1e-12)
    np.testing.assert_allclose([v.grad for v in vs], [t.grad for t in ts], rtol=1e-12)
