"""Every Tensor op: forward against NumPy, backward against finite differences.

One line per case: name, input shapes, our function, NumPy reference.
"""

import numpy as np
import pytest

import core.functional as F
from core import Tensor, concatenate, gradcheck, no_grad, stack
from core.tensor import ACTIVATIONS


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _logsumexp(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return np.squeeze(np.log(np.exp(x - m).sum(axis=axis, keepdims=True)) + m, axis)


def _log_softmax(x):
    return x - _logsumexp(x)[..., None]


def _affine(x, w, b):
    return x @ w.T + b


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _ce(x, t, reduce=np.mean):
    return reduce(-_log_softmax(x)[np.arange(len(t)), t])


def _bce(x, t, reduce=np.mean):
    p = _sigmoid(x)
    return reduce(-(t * np.log(p) + (1 - t) * np.log(1 - p)))


T5 = np.array([0, 3, 1, 4, 4])  # class targets for (5, 5) logits
IDX = np.array([0, 2, 2, 1])  # repeated fancy indices: their gradients must add up
MASK = np.array([True, False, True])
EYE = np.eye(6, 1)  # 0/1 targets for binary cross-entropy
PAIR, XWB = [(6, 2), (6, 2)], [(5, 3), (4, 3), (4,)]  # loss (input, target); linear (x, w, b)
ce, bce, mse, lin = F.cross_entropy, F.binary_cross_entropy_with_logits, F.mse_loss, F.linear
ACT = {"relu": lambda a: np.maximum(a, 0), "tanh": np.tanh, "sigmoid": _sigmoid}  # references


def op(name, shapes, ours, ref=None):
    """One case; without `ref`, the same expression on NumPy arrays is the reference."""
    return pytest.param(shapes, ours, ref or ours, id=name)


OPS = [
    op("add_bcast_col", [(45, 65), (45, 1)], lambda a, b: a + b),
    op("add_bcast_row", [(3, 4), (4,)], lambda a, b: a + b),
    op("mul_4d_bcast", [(5, 3, 14, 16), (5, 1, 14, 1)], lambda a, b: a * b),
    op("mul_col_by_matrix", [(4, 1), (4, 5)], lambda a, b: a * b),
    op("mul_0d_by_matrix", [(), (3, 4)], lambda a, b: a * b),
    op("sub_bcast", [(3, 4), (3, 1)], lambda a, b: a - b),
    op("div_bcast", [(3, 4), (1, 4)], lambda a, b: a / (b * b + 1)),
    op("neg", [(3, 4)], lambda a: -a),
    op("scalar_radd", [(3, 4)], lambda a: 2.5 + a),
    op("scalar_rsub", [(3, 4)], lambda a: 1 - a),
    op("scalar_mul", [(3, 4)], lambda a: 2.5 * a * 2),
    op("scalar_div", [(3, 4)], lambda a: a / 4),
    op("scalar_rdiv", [(3, 4)], lambda a: 2 / (a * a + 1)),
    op("pow_int", [(3, 4)], lambda a: a**3),
    op("pow_float", [(3, 4)], lambda a: (a * a + 1) ** 0.5),
    op("pow_tensor", [(3, 4), (3, 1)], lambda a, b: (a * a + 1) ** b),
    op("rpow", [(3, 4)], lambda a: 2.0**a),
    op("matmul_1d_1d", [(4,), (4,)], lambda a, b: a @ b),
    op("matmul_1d_2d", [(4,), (4, 3)], lambda a, b: a @ b),
    op("matmul_2d_1d", [(3, 4), (4,)], lambda a, b: a @ b),
    op("matmul_2d_2d", [(3, 4), (4, 5)], lambda a, b: a @ b),
    op("matmul_batched", [(2, 3, 4), (2, 4, 5)], lambda a, b: a @ b),
    op("matmul_bcast", [(2, 1, 3, 4), (5, 4, 2)], lambda a, b: a @ b),
    op("matmul_1d_batched", [(3,), (2, 3, 4)], lambda a, b: a @ b),
    op("matmul_batched_1d", [(2, 3, 4), (4,)], lambda a, b: a @ b),
    op("matmul_ndarray_left", [(4, 3)], lambda b: np.ones((2, 4), b.dtype) @ b),
    op("sum_all", [(3, 4, 5)], lambda a: a.sum()),
    op("sum_axis0", [(3, 4, 5)], lambda a: a.sum(0)),
    op("sum_axis_neg", [(3, 4, 5)], lambda a: a.sum(axis=-1)),
    op("sum_axes_keep", [(3, 4, 5)], lambda a: a.sum((0, 2), keepdims=True)),
    op("sum_all_keep", [(3, 4)], lambda a: a.sum(keepdims=True)),
    op("mean_all", [(3, 4, 5)], lambda a: a.mean()),
    op("mean_axis1", [(3, 4, 5)], lambda a: a.mean(1)),
    op("mean_axes_keep", [(3, 4, 5)], lambda a: a.mean((1, 2), keepdims=True)),
    op("max_all", [(3, 4, 5)], lambda a: a.max()),
    op("max_axis1", [(3, 4, 5)], lambda a: a.max(axis=1)),
    op("max_axes_keep", [(3, 4, 5)], lambda a: a.max((0, 2), keepdims=True)),
    op("exp", [(3, 4)], lambda a: a.exp(), np.exp),
    op("log", [(3, 4)], lambda a: (a * a + 1).log(), lambda a: np.log(a * a + 1)),
    *[op(name, [(3, 4)], lambda a, n=name: getattr(a, n)(), ref) for name, ref in ACT.items()],
    op("reshape", [(3, 4)], lambda a: a.reshape(2, 6)),
    op("reshape_tuple", [(3, 4)], lambda a: a.reshape((-1,))),
    op("transpose", [(2, 3, 4)], lambda a: a.transpose(0, 2), lambda a: a.swapaxes(0, 2)),
    op("T", [(3, 4)], lambda a: a.T),
    op("permute", [(2, 3, 4)], lambda a: a.permute(1, 2, 0), lambda a: a.transpose(1, 2, 0)),
    op("getitem_slices", [(4, 5)], lambda a: a[1:3, ::2]),
    op("getitem_int", [(4, 5)], lambda a: a[2]),
    op("getitem_ellipsis", [(2, 3, 4)], lambda a: a[..., None, 1]),
    op("getitem_fancy_repeat", [(3, 5)], lambda a: a[IDX]),
    op("getitem_fancy_cols", [(3, 5)], lambda a: a[:, IDX]),
    op("getitem_mask", [(3, 5)], lambda a: a[MASK]),
    op("getitem_tensor_index", [(3, 5)], lambda a: a[Tensor(IDX)], lambda a: a[IDX]),
    op(
        "concatenate0",
        [(2, 3), (4, 3)],
        lambda a, b: concatenate([a, b]),
        lambda a, b: np.concatenate([a, b]),
    ),
    op(
        "concatenate1",
        [(2, 3), (2, 1)],
        lambda a, b: F.concatenate([a, b], 1),
        lambda a, b: np.concatenate([a, b], 1),
    ),
    op("stack0", [(2, 3), (2, 3)], lambda a, b: stack([a, b]), lambda a, b: np.stack([a, b])),
    op(
        "stack_last",
        [(2, 3), (2, 3)],
        lambda a, b: F.stack([a, b], axis=-1),
        lambda a, b: np.stack([a, b], -1),
    ),
    op("softmax", [(4, 6)], F.softmax, _softmax),
    op("softmax_axis0", [(4, 6)], lambda a: F.softmax(a, axis=0), lambda a: _softmax(a, 0)),
    op("softmax_huge", [(3, 4)], lambda a: F.softmax(a * 1e3), lambda a: _softmax(a * 1e3)),
    op("log_softmax", [(4, 6)], F.log_softmax, _log_softmax),
    op(
        "log_softmax_huge",
        [(3, 4)],
        lambda a: F.log_softmax(a * 1e3),
        lambda a: _log_softmax(a * 1e3),
    ),
    op("logsumexp", [(4, 6)], F.logsumexp, _logsumexp),
    op("logsumexp_axis0", [(4, 6)], lambda a: F.logsumexp(a, axis=0), lambda a: _logsumexp(a, 0)),
    op("cross_entropy", [(5, 5)], lambda a: ce(a, T5), lambda a: _ce(a, T5)),
    op("cross_entropy_sum", [(5, 5)], lambda a: ce(a, T5, "sum"), lambda a: _ce(a, T5, np.sum)),
    op("cross_entropy_none", [(5, 5)], lambda a: ce(a, T5, "none"), lambda a: _ce(a, T5, np.array)),
    op("cross_entropy_huge", [(5, 5)], lambda a: ce(a * 1e3, T5), lambda a: _ce(a * 1e3, T5)),
    op("mse", PAIR, mse, lambda a, b: np.mean((a - b) ** 2)),
    op("mse_sum", PAIR, lambda a, b: mse(a, b, "sum"), lambda a, b: np.sum((a - b) ** 2)),
    op("mse_none", PAIR, lambda a, b: mse(a, b, "none"), lambda a, b: (a - b) ** 2),
    op("bce", PAIR, lambda a, b: bce(a, b.sigmoid()), lambda a, b: _bce(a, _sigmoid(b))),
    op("bce_sum", [(6, 1)], lambda a: bce(a, EYE, "sum"), lambda a: _bce(a, EYE, np.sum)),
    op(
        "bce_none",
        [(6, 1)],
        lambda a: bce(a, EYE / 2, "none"),
        lambda a: _bce(a, EYE / 2, np.array),
    ),
    op("linear", XWB, lin, _affine),
    op("linear_no_bias", [(5, 3), (4, 3)], lin, lambda x, w: x @ w.T),
    *[
        op(f"linear_{name}", XWB, lambda *a, n=name: lin(*a, n), lambda *a, r=ref: r(_affine(*a)))
        for name, ref in ACT.items()
    ],
    op("linear_3d", [(2, 5, 3), (4, 3), (4,)], lin, _affine),
    op("linear_1d", [(3,), (4, 3), (4,)], lin, _affine),
    op(
        "chain",
        [(3, 4), (4,)],
        lambda a, b: (a * b + a).tanh().sum(1) ** 2,
        lambda a, b: np.tanh(a * b + a).sum(1) ** 2,
    ),
]


def test_every_activation_has_a_reference():  # so the op cases above cover each one
    assert set(ACT) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_with_bias_is_exactly_the_activation_of_the_sum(name):
    """forward(x, b, out=x), as the fused linear node calls it, equals act(x + b) bit for bit
    (relu takes max(x, -b) + b), including where x + b is 0 or x is -0.0."""
    x = np.concatenate([_inputs([(7, 4)], seed=1)[0], [[0.0, -0.0, 1.5, -2.0]]])
    b = np.array([0.0, 0.0, -1.5, 2.0])
    act = ACTIVATIONS[name]
    want, y = act.forward(x + b), x.copy()
    got = act.forward(y, b, out=y)
    assert got is y or name == "sigmoid"  # sigmoid_array allocates its result
    np.testing.assert_array_equal(got.view(np.int64), want.view(np.int64))


def _inputs(shapes, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize(("shapes", "ours", "ref"), OPS)
def test_forward_matches_numpy(shapes, ours, ref):
    xs = _inputs(shapes)
    np.testing.assert_allclose(
        ours(*[Tensor(x) for x in xs]).data, ref(*xs), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(("shapes", "ours", "ref"), OPS)
def test_gradcheck(shapes, ours, ref):
    assert gradcheck(ours, *_inputs(shapes), n_directions=4)


@pytest.mark.parametrize(("shapes", "ours", "ref"), OPS)
def test_float32_grads_keep_shape_and_dtype(shapes, ours, ref):
    xs = [Tensor(x, requires_grad=True) for x in _inputs(shapes, dtype=np.float32)]
    out = ours(*xs)
    assert out.dtype == np.float32
    out.backward(np.ones(out.shape, np.float32))
    for x in xs:
        assert x.grad is not None
        assert (x.grad.shape, x.grad.dtype) == (x.shape, np.float32)
        assert type(x.grad) is np.ndarray and x.grad.flags.writeable


def test_gradcheck_reports_input_and_numbers():
    def wrong(a, b):  # backward of mul sees only half of a's gradient
        return a * b.data + 0.5 * (a * b).data

    with pytest.raises(AssertionError, match=r"input 0 .*numerical .* vs analytical"):
        gradcheck(wrong, np.ones(3), np.arange(3.0))
    assert gradcheck(wrong, np.ones(3), np.arange(3.0), raise_exception=False) is False


def test_max_ties_share_the_gradient():
    x = Tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    y = Tensor([5.0, 1.0, 5.0, 5.0], requires_grad=True)
    (y.max() * 3).backward()
    np.testing.assert_array_equal(y.grad, [1.0, 0, 1.0, 1.0])


def test_huge_logits_stay_finite():
    logits = Tensor([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, 1000.0]], requires_grad=True)
    loss = F.cross_entropy(logits, np.array([1, 2]))
    loss.backward()
    assert loss.item() == pytest.approx(1000.0)
    np.testing.assert_allclose(logits.grad, [[0.5, -0.5, 0], [0, 0, 0]], atol=1e-12)
    assert np.isfinite(F.logsumexp(logits).data).all()
    np.testing.assert_allclose(F.logsumexp(logits).data, [1000.0, 1000.0])
    assert np.isfinite(F.softmax(logits).data).all()
    assert np.isfinite(F.log_softmax(logits).data).all()
    assert np.isfinite(F.binary_cross_entropy_with_logits(logits, np.ones((2, 3))).data)
    s = Tensor([-800.0, 0.0, 800.0]).sigmoid().data
    np.testing.assert_array_equal(s, [0.0, 0.5, 1.0])


def test_cross_entropy_targets_are_checked():
    logits = Tensor(np.zeros((2, 3)))
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(logits, np.array([-1, 0]))
    with pytest.raises(ValueError, match="shape"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(logits, np.array([0, 1]), reduction="avg")
    assert F.cross_entropy(logits, Tensor([0, 2])).item() == pytest.approx(np.log(3))


def test_dtypes():
    assert Tensor([1, 2]).dtype == np.float64
    assert Tensor(np.array([True])).dtype == np.float64
    assert Tensor(np.ones(2, np.float32)).dtype == np.float32
    a = Tensor(np.ones(3, np.float32), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    assert (a * 2.5 + 1).dtype == np.float32
    out = a * b  # mixed: float64 result, each gradient keeps its tensor's dtype
    out.sum().backward()
    assert out.dtype == np.float64 and a.grad.dtype == np.float32 and b.grad.dtype == np.float64


def test_data_is_a_private_writable_copy():
    source = np.arange(3.0)
    t = Tensor(source)
    t.data += 1
    assert source[0] == 0.0 and t.data.flags.writeable


def test_deep_chain_backward_is_iterative():
    x = Tensor(1.0, requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y * 1.00001
    y.backward()
    assert x.grad == pytest.approx(1.00001**100_000)
    del y  # freeing a 100k-deep graph must not overflow the stack either


def test_no_grad():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = (x * 2).exp().sum()
        z = F.cross_entropy(x.reshape(1, 3), np.array([0]))
    assert not y.requires_grad and y._prev == () and not z.requires_grad
    assert (x * 2).requires_grad

    @no_grad()
    def predict(t):
        return t * 3

    assert not predict(x).requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_backward_twice_accumulates_leaves_only():
    x = Tensor([1.0, 2.0, 3.0], requires_grad=True)
    h = x * x
    y = (h * 2).sum()
    y.backward()
    first = x.grad.copy()
    assert h.grad is None  # non-leaf gradients are not kept
    y.backward()
    np.testing.assert_array_equal(x.grad, 2 * first)  # micrograd's trap would give 3x


def test_retain_grad_keeps_intermediate():
    x = Tensor([1.0, 2.0], requires_grad=True)
    h = x * 3
    h.retain_grad()
    (h * h).sum().backward()
    np.testing.assert_array_equal(h.grad, 2 * h.data)
    np.testing.assert_array_equal(x.grad, 18 * x.data)
    (h * h).sum().backward()
    np.testing.assert_array_equal(h.grad, 4 * h.data)
    np.testing.assert_array_equal(x.grad, 36 * x.data)


def test_gradients_never_alias():
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    c = Tensor(np.ones((2, 3)), requires_grad=True)
    (a + b + c).sum().backward()
    assert a.grad is not b.grad
    a.grad += 1
    np.testing.assert_array_equal(b.grad, [2, 2, 2])
    c.grad += 1  # came from a read-only broadcast view; must be a private copy now
    (a + b).sum().backward()  # second pass adds in place into private buffers
    np.testing.assert_array_equal(a.grad, [4, 4, 4])
    np.testing.assert_array_equal(b.grad, [3, 3, 3])


def test_backward_with_explicit_gradient():
    x = Tensor([[1.0, 2.0]], requires_grad=True)
    y = x * 2
    with pytest.raises(RuntimeError, match="scalar"):
        y.backward()
    with pytest.raises(ValueError, match="shape"):
        y.backward(np.ones(2))
    seed = np.array([[1.0, 10.0]])
    y.backward(seed)
    np.testing.assert_array_equal(x.grad, [[2.0, 20.0]])
    seed[...] = 0
    np.testing.assert_array_equal(x.grad, [[2.0, 20.0]])


def test_graph_records_ops_and_inputs():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    w = Tensor(np.ones((4, 3)), requires_grad=True)
    h = F.linear(x, w, activation="tanh")
    loss = F.cross_entropy(h, np.array([0, 1]))
    assert (loss._op, h._op, x._op) == ("cross_entropy", "linear+tanh", "")
    assert loss._prev == (h,) and h._prev == (x, w)
    assert h.is_leaf is False and x.is_leaf is True


def test_ndarray_on_the_left_defers_to_tensor():
    x = Tensor([1.0, 2.0], requires_grad=True)
    y = np.array([3.0, 4.0]) * x + np.array([1.0, 1.0])
    assert isinstance(y, Tensor)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_no_grad_decorator_is_reentrant():
    x = Tensor([2.0], requires_grad=True)

    @no_grad()
    def countdown(t, n):
        return t if n == 0 else countdown(t * 1, n - 1)

    assert not countdown(x, 3).requires_grad
    assert (x * 1).requires_grad  # the outermost exit restored grad mode
