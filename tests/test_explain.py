"""Attributions: gradient, gradient x input, integrated gradients."""

import numpy as np
import pytest

import workers.explain as explain_module
from core import Tensor, nn
from tests.helpers import require
from workers.explain import explain, predict


def random_mlp(sizes, activation, seed=0, dtype=np.float64):
    """Random weights and random biases, so relu paths from zero cross kinks."""
    model = nn.MLP(sizes, activation=activation, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for layer in model.layers:
        layer.bias.data[...] = 0.5 * rng.standard_normal(layer.bias.shape)
    return model


def rows(n, width, seed=1, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal((n, width))).tolist()


# --- outputs and targets -----------------------------------------------------------------------


def test_outputs_are_the_predictions():
    model = random_mlp([3, 8, 4], "tanh")
    X = rows(5, 3)
    result = explain(model, X)
    assert result["outputs"] == predict(model, X).tolist()
    assert result["method"] == "gradient" and result["completeness_gap"] is None
    assert np.shape(result["attributions"]) == (5, 3)


def test_default_target_is_each_rows_predicted_class():
    model = random_mlp([3, 8, 4], "tanh")
    X = rows(12, 3, scale=3)
    classes = predict(model, X).argmax(1)
    assert len(set(classes)) > 1
    result = explain(model, X)
    for k in set(classes):
        mine = classes == k
        chosen = np.array(explain(model, X, target=int(k))["attributions"])
        np.testing.assert_array_equal(np.array(result["attributions"])[mine], chosen[mine])


def test_single_output_model_explains_output_zero():
    model = random_mlp([2, 8, 1], "relu")
    X = rows(3, 2)
    assert explain(model, X) == explain(model, X, target=0)


@pytest.mark.parametrize("target", [2, -1, 10])
def test_out_of_range_target_is_a_clear_error(target):
    model = random_mlp([2, 4, 2], "relu")
    with pytest.raises(ValueError, match=f"target {target} is out of range: the model has 2"):
        explain(model, [[0.0, 1.0]], target=target)


@pytest.mark.parametrize("target", [True, 1.5, "1"])
def test_target_must_be_an_integer(target):
    with pytest.raises(ValueError, match="target must be an integer output index"):
        explain(random_mlp([2, 4, 2], "relu"), [[0.0, 1.0]], target=target)


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_gradient_matches_finite_differences_of_predict(activation):
    model = random_mlp([3, 16, 16, 3], activation)
    X = np.array(rows(6, 3))
    grads = np.array(explain(model, X, target=1)["attributions"])
    eps = 1e-6
    for j in range(3):
        step = np.zeros(3)
        step[j] = eps
        numerical = (predict(model, X + step)[:, 1] - predict(model, X - step)[:, 1]) / (2 * eps)
        np.testing.assert_allclose(grads[:, j], numerical, rtol=1e-5, atol=1e-8)


def test_gradient_matches_torch():
    torch = require("torch")
    model = random_mlp([4, 8, 8, 3], "tanh")
    X = np.array(rows(5, 4))
    x = torch.tensor(X, requires_grad=True)
    h = x
    for i, layer in enumerate(model.layers):
        h = h @ torch.tensor(layer.weight.data).T + torch.tensor(layer.bias.data)
        h = torch.tanh(h) if i < len(model.layers) - 1 else h
    h[:, 2].sum().backward()
    grads = explain(model, X, target=2)["attributions"]
    np.testing.assert_allclose(grads, x.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_gradient_x_input_uses_the_baseline():
    model = random_mlp([3, 8, 2], "sigmoid")
    X, b = np.array(rows(4, 3)), [0.5, -1.0, 2.0]
    grads = np.array(explain(model, X, target=0)["attributions"])
    plain = explain(model, X, target=0, method="gradient_x_input")["attributions"]
    shifted = explain(model, X, target=0, method="gradient_x_input", baseline=b)["attributions"]
    np.testing.assert_allclose(plain, X * grads, rtol=1e-12)
    np.testing.assert_allclose(shifted, (X - b) * grads, rtol=1e-12)


def test_the_model_is_left_untouched():
    model = random_mlp([2, 8, 2], "relu")
    before = model.state_dict()
    for method in explain_module.METHODS:
        explain(model, rows(3, 2), method=method)
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_float32_models_explain_in_float32():
    m64 = random_mlp([3, 16, 2], "tanh")
    m32 = random_mlp([3, 16, 2], "tanh", dtype=np.float32)
    m32.load_state_dict(m64.state_dict())
    X = rows(4, 3)
    for method in explain_module.METHODS:
        a32 = explain(m32, X, method=method)["attributions"]
        a64 = explain(m64, X, method=method)["attributions"]
        np.testing.assert_allclose(a32, a64, rtol=1e-3, atol=1e-5)
    assert predict(m32, X).dtype == np.float32


# --- integrated gradients ------------------------------------------------------------------------


def completeness_bound(model, X, baseline, result):
    out = np.array(result["outputs"])
    targets = out.argmax(1)
    f_b = predict(model, np.broadcast_to(baseline, np.shape(X)))
    change = out[np.arange(len(X)), targets] - f_b[np.arange(len(X)), targets]
    return 0.01 * np.abs(change) + 1e-4


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integrated_gradients_are_complete(activation, seed):
    model = random_mlp([3, 16, 16, 3], activation, seed=seed)
    X = rows(8, 3, seed=seed, scale=2)
    for baseline in (None, rows(1, 3, seed=seed + 50)[0], rows(8, 3, seed=seed + 60)):
        result = explain(model, X, method="integrated_gradients", baseline=baseline)
        b = np.zeros(3) if baseline is None else np.array(baseline)
        gap = np.array(result["completeness_gap"])
        assert gap.shape == (8,)
        assert np.all(np.abs(gap) <= completeness_bound(model, X, b, result))
        # the gap is what it says: sum of attributions minus the change of the output
        change = np.array(result["attributions"]).sum(1) - gap
        f_b = predict(model, np.broadcast_to(b, (8, 3)))
        targets = np.array(result["outputs"]).argmax(1)
        expected = predict(model, X)[range(8), targets] - f_b[range(8), targets]
        np.testing.assert_allclose(change, expected, rtol=1e-12, atol=1e-12)


def test_plain_midpoint_rule_misses_relu_kinks_that_refinement_catches(monkeypatch):
    """Why the path grid is refined: 64 equal steps often miss completeness by >1% on relu."""
    model = random_mlp([3, 16, 16, 3], "relu", seed=6)
    X = rows(8, 3, seed=6, scale=2)
    refined = explain(model, X, method="integrated_gradients")
    monkeypatch.setattr(explain_module, "REFINE_ROUNDS", 0)
    plain = explain(model, X, method="integrated_gradients")
    bound = completeness_bound(model, X, np.zeros(3), plain)
    assert np.any(np.abs(plain["completeness_gap"]) > bound)
    assert np.all(np.abs(refined["completeness_gap"]) <= bound / 10)


def test_integrated_gradients_match_a_fine_riemann_sum():
    torch = require("torch")
    model = random_mlp([2, 8, 8, 2], "tanh", seed=3)
    X = np.array(rows(3, 2, seed=3, scale=2))
    alphas = (np.arange(4096) + 0.5) / 4096
    points = torch.tensor(alphas[:, None, None] * X[None], requires_grad=True)
    h = points
    for i, layer in enumerate(model.layers):
        h = h @ torch.tensor(layer.weight.data).T + torch.tensor(layer.bias.data)
        h = torch.tanh(h) if i < len(model.layers) - 1 else h
    h[..., 1].sum().backward()
    reference = X * points.grad.numpy().mean(axis=0)
    result = explain(model, X, method="integrated_gradients", target=1)
    np.testing.assert_allclose(result["attributions"], reference, rtol=1e-4, atol=1e-6)


def test_one_backward_pass_per_batch_of_path_points(monkeypatch):
    calls = []
    backward = Tensor.backward
    monkeypatch.setattr(Tensor, "backward", lambda self, *a: calls.append(1) or backward(self, *a))
    linear = random_mlp([3, 2], "relu")  # no hidden layer: the midpoint rule is exact
    explain(linear, rows(20, 3), method="integrated_gradients", steps=64)
    assert len(calls) == 1  # 20 rows x 64 points, one pass
    calls.clear()
    monkeypatch.setattr(explain_module, "PATH_BATCH", 300)
    explain(linear, rows(20, 3), method="integrated_gradients", steps=64)
    assert len(calls) == 5  # 1280 points in batches of at most 300
    calls.clear()
    monkeypatch.setattr(explain_module, "PATH_BATCH", 8192)
    explain(random_mlp([3, 16, 16, 3], "relu"), rows(20, 3), method="integrated_gradients")
    assert 1 < len(calls) <= 1 + explain_module.REFINE_ROUNDS  # a pass per refinement round


def test_input_equal_to_baseline_has_zero_attribution():
    model = random_mlp([2, 8, 2], "relu")
    result = explain(model, [[0.3, -0.2]], method="integrated_gradients", baseline=[0.3, -0.2])
    assert result["attributions"] == [[0.0, 0.0]] and result["completeness_gap"] == [0.0]


# --- argument errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inputs": [[0.0, 1.0], [np.nan, 0.0]]}, r"inputs\[1\]\[0\] is not finite"),
        ({"inputs": [[0.0, np.inf]]}, r"inputs\[0\]\[1\] is not finite"),
        ({"inputs": [[1.0, 2.0, 3.0]]}, "inputs has width 3 but the model takes 2"),
        ({"inputs": [[1.0, 2.0], [1.0, 2.0, 3.0]]}, r"inputs\[1\] has width 3 but the model"),
        ({"inputs": [[1.0, 2.0], 3.0]}, r"inputs\[1\] must be a row of 2 numbers"),
        ({"inputs": [1.0, 2.0]}, r"inputs\[0\] must be a row of 2 numbers"),
        ({"inputs": [["a", "b"]]}, "inputs must be a list of rows of 2 numbers"),
        ({"inputs": []}, "inputs has no rows"),
        ({"baseline": [0.0, np.nan]}, r"baseline\[1\] is not finite"),
        ({"baseline": [[0.0, 0.0], [1.0, -np.inf]]}, r"baseline\[1\]\[1\] is not finite"),
        ({"baseline": [0.0, 0.0, 0.0]}, "baseline has width 3 but the model takes 2"),
        ({"baseline": [[0.0, 0.0]] * 3}, "baseline has 3 rows but inputs has 2; give 1 or 2"),
        ({"method": "saliency"}, "method must be one of gradient, gradient_x_input, integ"),
        ({"steps": 0}, "steps must be a positive integer"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    args = {"inputs": [[0.0, 1.0], [1.0, 0.0]], "method": "integrated_gradients"} | kwargs
    with pytest.raises(ValueError, match=message):
        explain(random_mlp([2, 4, 2], "relu"), args.pop("inputs"), **args)


def test_float32_overflow_is_not_finite():
    model = random_mlp([2, 4, 2], "relu", dtype=np.float32)
    with pytest.raises(ValueError, match=r"inputs\[0\]\[1\] is not finite"):
        predict(model, [[0.0, 1e39]])


def test_baseline_row_is_broadcast():
    model = random_mlp([2, 8, 2], "tanh")
    X = rows(3, 2)
    one = explain(model, X, method="integrated_gradients", baseline=[0.5, 0.5])
    each = explain(model, X, method="integrated_gradients", baseline=[[0.5, 0.5]] * 3)
    assert one == each
