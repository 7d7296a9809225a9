"""End to end: small MLPs trained with core learn XOR and two moons."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import core.functional as F
from core import nn, optim

# The demo's plain-NumPy two-moons generator serves the tests too (and the demo is tested).
_spec = importlib.util.spec_from_file_location(
    "core_demo", Path(__file__).parents[1] / "examples" / "core_demo.py"
)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)
two_moons, accuracy = demo.two_moons, demo.accuracy


def fit(model, X, y, steps, lr):
    opt = optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
    return loss.item()


def test_xor():
    X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = np.array([0, 1, 1, 0])
    model = nn.MLP([2, 8, 2], activation="tanh", seed=0)
    assert fit(model, X, y, steps=300, lr=0.05) < 0.05
    assert accuracy(model, X, y) == 1.0


def test_two_moons():
    rng = np.random.default_rng(0)
    X, y = two_moons(300, 0.1, rng)
    X_test, y_test = two_moons(300, 0.1, rng)
    model = nn.MLP([2, 16, 16, 2], seed=0)
    fit(model, X, y, steps=400, lr=0.02)
    assert accuracy(model, X, y) >= 0.97
    assert accuracy(model, X_test, y_test) >= 0.97


def test_two_moons_with_sgd_and_sum_reduction():
    """The distributed recipe: summed losses, gradients divided by the batch size."""
    rng = np.random.default_rng(1)
    X, y = two_moons(200, 0.1, rng)
    model = nn.MLP([2, 16, 16, 2], activation="tanh", seed=1)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(600):
        opt.zero_grad()
        F.cross_entropy(model(X), y, reduction="sum").backward()
        for p in model.parameters():
            p.grad /= len(X)
        opt.step()
    assert accuracy(model, X, y) >= 0.97


def test_core_demo_reaches_97_percent(capsys):
    assert demo.main() >= 0.97
    assert "final validation accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("chunk_rows", [4096, 7])  # one forward pass, and 8 chunks
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_evaluate_in_chunks_is_the_whole_sets_mean(chunk_rows, loss, monkeypatch):
    from workers.model import evaluate

    monkeypatch.setattr("workers.model.EVAL_CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(0)
    model, X = nn.MLP([3, 8, 2], seed=0), rng.normal(size=(50, 3))
    y = rng.integers(0, 2, 50) if loss == "cross_entropy" else rng.normal(size=(50, 2))
    got = evaluate(model, loss, X, y, classify=loss == "cross_entropy")
    out = model(X).data
    if loss == "cross_entropy":
        expected = F.cross_entropy(model(X), y).item()
        assert got["accuracy"] == np.mean(out.argmax(axis=1) == y)
    else:
        expected = np.mean((out - y) ** 2)
        assert got["accuracy"] is None
    assert got["loss"] == pytest.approx(expected, rel=1e-13)
