"""Check backward() against central differences, along random directions, in float64."""

from __future__ import annotations

import numpy as np

from core.tensor import Tensor, no_grad


def gradcheck(
    fn,
    *inputs,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    n_directions: int = 3,
    seed: int = 0,
    raise_exception: bool = True,
) -> bool:
    """Compare the gradient of `fn(*inputs)` with finite differences.

    The output is reduced to the scalar L = sum(out * w) with a fixed random w. For each
    input i and each random direction d, the numerical derivative
    (L(x_i + eps d) - L(x_i - eps d)) / (2 eps) must match <grad_i, d> within
    atol + rtol * |numerical|. Inputs (Tensors or arrays) are copied to float64.
    On a mismatch: AssertionError naming the input and both numbers, or False when
    `raise_exception=False`.
    """
    rng = np.random.default_rng(seed)
    xs = [
        Tensor(np.array(x.data if isinstance(x, Tensor) else x, np.float64), requires_grad=True)
        for x in inputs
    ]
    out = fn(*xs)
    w = rng.standard_normal(out.shape)
    out.backward(w)

    def loss(i, x):
        with no_grad():
            args = [Tensor(x) if j == i else t for j, t in enumerate(xs)]
            return float(np.sum(fn(*args).data * w))

    for i, x in enumerate(xs):
        grad = np.zeros_like(x.data) if x.grad is None else x.grad
        for k in range(n_directions):
            d = rng.standard_normal(x.shape)
            numerical = (loss(i, x.data + eps * d) - loss(i, x.data - eps * d)) / (2 * eps)
            analytical = float(np.sum(grad * d))
            if abs(numerical - analytical) > atol + rtol * abs(numerical):
                message = (
                    f"gradcheck failed for input {i} (shape {x.shape}), direction {k}: "
                    f"numerical {numerical:.10g} vs analytical {analytical:.10g} "
                    f"(difference {abs(numerical - analytical):.3g})"
                )
                if raise_exception:
                    raise AssertionError(message)
                return False
    return True
