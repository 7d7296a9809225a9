"""One fused kernel: the summed loss of a plain `nn.MLP` and its gradient, in straight NumPy.

It is the graph's math with the chain rule written out, for the case that dominates a
tiny model's step: walking a graph of a dozen nodes (a Tensor, a closure and a
topological sort per node) costs more than the arithmetic. Layer i computes
h_i = act(h_{i-1} @ W_i.T + b_i) (no activation after the last), as `F.linear`; then

    cross_entropy (sum):  loss = sum(log(sum(exp(z))) - z[target]), z = logits - max,
                          dL/dlogits = softmax(logits) - onehot(target)
    mse (sum):            loss = sum(d * d), d = out - target; dL/dout = 2 d

and backwards, with delta_L = dL/dout:

    dW_i = delta_i.T @ h_{i-1}     db_i = sum over rows of delta_i
    delta_{i-1} = (delta_i @ W_i) * act'(h_{i-1})     (act' from the output, as ACTIVATIONS)

The gradients match the graph's (`F.linear`, `F.cross_entropy`, `F.mse_loss` and
`backward`) to rounding: tests compare both, and a finite-difference gradcheck. One
difference is deliberate: in float64, tanh is 1 - 2 / (exp(2x) + 1), within 4e-16 of
np.tanh and about twice as fast here (numpy's float64 tanh is not vectorised; its exp is).

The activations live in per-model buffers, reused from call to call (per batch size and
thread); the returned gradients are fresh arrays: views of one flat vector, in the
model's parameter order (`FlatViews`), so an optimizer can update every parameter at once.
"""

from __future__ import annotations

import threading
from itertools import pairwise

import numpy as np

from core.nn import MLP
from core.optim import FlatViews, spans
from core.tensor import ACTIVATIONS

__all__ = ["FUSED_LOSSES", "fits", "mlp_forward", "mlp_grad_sum", "tanh_"]

FUSED_LOSSES = ("mse", "cross_entropy")


def fits(model, loss: str, y) -> bool:
    """Whether `mlp_grad_sum` computes this model's gradient: a plain nn.MLP (no dropout,
    no other layer) with a fused loss, cross-entropy targets as integer class indices
    and mse targets shaped like the output (the graph broadcasts others, with a warning)."""
    if type(model) is not MLP or loss not in FUSED_LOSSES or not isinstance(y, np.ndarray):
        return False
    if loss == "mse":
        return y.ndim == 2 and y.shape[1] == model.sizes[-1]
    return y.ndim == 1 and y.dtype.kind in "iu"


def tanh_(x: np.ndarray) -> np.ndarray:
    """tanh(x) in place. float64: 1 - 2 / (exp(2x) + 1), within 4e-16 of np.tanh and twice
    as fast. x is first capped at 177 (tanh is 1.0 from 19.1 on), so exp never overflows
    (2x does, with numpy's warning, below -8.9e307: still -1); a nan stays nan."""
    if x.dtype != np.float64:
        return np.tanh(x, out=x)
    np.minimum(x, 177.0, out=x)
    np.multiply(x, 2.0, out=x)
    np.exp(x, out=x)
    x += 1.0
    np.divide(2.0, x, out=x)
    return np.subtract(1.0, x, out=x)


class _Buffers:
    """A model's activations and deltas for batches of `n` rows (reused between calls)."""

    def __init__(self, sizes, n: int, dtype):
        self.h = [np.empty((n, k), dtype) for k in sizes[1:]]  # each layer's output
        self.delta = [np.empty((n, k), dtype) for k in sizes[1:-1]]  # dL/dh of hidden layers
        self.slope = [np.empty((n, k), dtype) for k in sizes[1:-1]]
        self.classes = np.arange(sizes[-1])
        self.onehot = np.empty((n, sizes[-1]), dtype)
        self.layout = spans([s for a, b in pairwise(sizes) for s in ((b, a), (b,))])
        self.size = self.layout[-1][1]


_local = threading.local()  # buffers per thread: two threads may share a model


def _buffers(model, n: int, dtype) -> _Buffers:
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (id(model), model.sizes, n, dtype)
    found = cache.get(key)
    if found is None:
        if len(cache) >= 16:  # a few models and batch sizes per thread; never unbounded
            cache.clear()
        found = cache[key] = _Buffers(model.sizes, n, dtype)
    return found


def mlp_grad_sum(model, loss: str, X: np.ndarray, y: np.ndarray) -> tuple[FlatViews, float]:
    """(gradients of the summed loss, in parameter order, summed loss) of an nn.MLP over the
    rows of X, as the graph computes them (see the module docstring); `fits` says when."""
    layers = model.layers
    dtype = layers[0].weight.data.dtype
    n = len(X)
    buf = _buffers(model, n, dtype)
    X = np.asarray(X, dtype)
    act = model.activation
    last = len(layers) - 1
    hs = [X, *_forward(model, X, buf.h)]

    # the loss, and its gradient with respect to the output (written over the output)
    out = hs.pop()
    if loss == "cross_entropy":
        onehot = np.equal(y[:, None], buf.classes, out=buf.onehot)  # the targets, as 0/1
        if np.add.reduce(onehot, axis=None) != n:  # a target not in 0..C-1, as the graph
            bad = y[(y < 0) | (y >= len(buf.classes))][0]
            raise IndexError(f"target {bad} is out of bounds for {len(buf.classes)} classes")
        out -= np.maximum.reduce(out, axis=1, keepdims=True)  # z = logits - max
        picked = float(np.vdot(onehot, out))  # sum of z[target]
        np.exp(out, out=out)
        s = np.add.reduce(out, axis=1, keepdims=True)
        loss_sum = float(np.add.reduce(np.log(s), axis=None)) - picked
        out /= s  # softmax
        out -= onehot
    else:
        out -= np.asarray(y, dtype)
        loss_sum = float(np.add.reduce(out * out, axis=None))
        out *= 2.0
    delta = out

    # backward: dW_i = delta_i.T @ h_{i-1}, db_i = sum(delta_i), delta_{i-1} = delta_i @ W_i * act'
    grads = FlatViews(np.empty(buf.size, dtype), buf.layout)
    for i in range(last, -1, -1):
        np.dot(delta.T, hs[i], out=grads[2 * i])
        np.add.reduce(delta, axis=0, out=grads[2 * i + 1])
        if i > 0:
            below, h, slope = buf.delta[i - 1], hs[i], buf.slope[i - 1]
            np.dot(delta, layers[i].weight.data, out=below)
            _slope(act, h, slope)
            below *= slope
            delta = below
    return grads, loss_sum


def mlp_forward(model, X: np.ndarray) -> np.ndarray:
    """The output of an nn.MLP for the rows of X, as `model(Tensor(X)).data` (tanh as
    `tanh_`), without building a graph: for evaluation."""
    dtype = model.layers[0].weight.data.dtype
    X = np.asarray(X, dtype)
    return _forward(model, X, [np.empty((len(X), k), dtype) for k in model.sizes[1:]])[-1]


def _forward(model, X: np.ndarray, hs: list[np.ndarray]) -> list[np.ndarray]:
    """Each layer's output h_i = act(h_{i-1} @ W_i.T + b_i) (none after the last), written
    into the arrays `hs` (sigmoid's come back as new arrays)."""
    act, last, out, h = model.activation, len(model.layers) - 1, [], X
    for i, layer in enumerate(model.layers):
        h = np.dot(h, layer.weight.data.T, out=hs[i])
        b = layer.bias.data
        if i == last:
            h += b
        elif act == "tanh":
            h += b
            tanh_(h)
        else:
            h = ACTIVATIONS[act].forward(h, b, out=h)
        out.append(h)
    return out


def _slope(act: str, h: np.ndarray, out: np.ndarray) -> None:
    """act'(x) from the output h = act(x), into `out` (ACTIVATIONS' slopes, without temporaries)."""
    if act == "tanh":  # 1 - h * h
        np.multiply(h, h, out=out)
        np.subtract(1.0, out, out=out)
    elif act == "sigmoid":  # h * (1 - h)
        np.subtract(1.0, h, out=out)
        out *= h
    else:  # relu: h > 0
        np.greater(h, 0, out=out)
