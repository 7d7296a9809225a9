"""Train an MLP on two moons with shardgrad's core engine alone (no Ray, no service).

    .venv/bin/python examples/core_demo.py

The loop is the one a PyTorch user writes: forward, loss, zero_grad, backward, step.
"""

from __future__ import annotations

import numpy as np

import core.functional as F
from core import nn, no_grad, optim


def two_moons(n: int, noise: float, rng: np.random.Generator):
    """Two interleaved half circles (the shape of sklearn's make_moons) in plain NumPy."""
    y = rng.integers(0, 2, n)
    t = rng.uniform(0.0, np.pi, n)
    arc = np.stack([np.cos(t), np.sin(t)], axis=1)
    X = np.where(y[:, None] == 0, arc, np.array([1.0, 0.5]) - arc)
    return X + noise * rng.standard_normal((n, 2)), y


def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    with no_grad():
        return float(np.mean(model(X).data.argmax(axis=1) == y))


def main(epochs: int = 40, batch_size: int = 64, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    X, y = two_moons(1200, noise=0.15, rng=rng)
    X_train, y_train, X_val, y_val = X[:1000], y[:1000], X[1000:], y[1000:]

    model = nn.MLP([2, 32, 32, 2], activation="relu", seed=seed)
    opt = optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(X_train))
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(X_train[idx]), y_train[idx], reduction="sum")
            opt.zero_grad()
            (loss / len(idx)).backward()
            opt.step()
            total += loss.item()
        if epoch == 1 or epoch % 5 == 0:
            print(
                f"epoch {epoch:3d}  loss {total / len(X_train):.4f}  "
                f"train acc {accuracy(model, X_train, y_train):.3f}"
            )
    val_acc = accuracy(model, X_val, y_val)
    print(f"final validation accuracy: {val_acc:.3f}")
    return val_acc


if __name__ == "__main__":
    if main() < 0.97:
        raise SystemExit("accuracy below 97%")
