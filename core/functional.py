"""Fused ops and losses: each is one graph node whose backward is written by hand.

Fusing matters for speed (one node instead of five or six, no intermediate
gradients) and for stability (the max is subtracted before any exp). Targets are
plain arrays or constant Tensors and never receive gradients, except the float
targets of `mse_loss` and `binary_cross_entropy_with_logits` when they require grad,
as in PyTorch.

`reduction` is "mean" (the default, as in PyTorch), "sum" or "none". Data-parallel
workers use "sum" so that their gradients add up across shards.
"""

from __future__ import annotations

import warnings

import numpy as np

from core.attention import (
    embedding,
    erf,
    gelu,
    layer_norm,
    scaled_dot_product_attention,
    self_attention,
)
from core.conv import avg_pool2d, conv2d, dropout, dropout_scale, max_pool2d
from core.tensor import (
    ACTIVATIONS,
    Tensor,
    _node,
    _squeeze,
    _unsqueeze,
    as_tensor,
    concatenate,
    sigmoid_array,
    stack,
)

__all__ = [
    "avg_pool2d",
    "binary_cross_entropy_with_logits",
    "concatenate",
    "conv2d",
    "cross_entropy",
    "dropout",
    "dropout_scale",
    "embedding",
    "erf",
    "gelu",
    "layer_norm",
    "linear",
    "log_softmax",
    "logsumexp",
    "max_pool2d",
    "mse_loss",
    "relu",
    "scaled_dot_product_attention",
    "self_attention",
    "sigmoid",
    "softmax",
    "stack",
    "tanh",
]


def relu(x) -> Tensor:
    return as_tensor(x).relu()


def tanh(x) -> Tensor:
    return as_tensor(x).tanh()


def sigmoid(x) -> Tensor:
    return as_tensor(x).sigmoid()


def linear(x, weight: Tensor, bias: Tensor | None = None, activation: str | None = None):
    """activation(x @ weight.T + bias) as one node ("linear" or e.g. "linear+relu").

    `weight` is (out, in) as in torch.nn.functional.linear. No gradient is computed
    for an `x` that does not need one, which skips the largest matmul for a data batch.
    """
    if activation is not None and activation not in ACTIVATIONS:
        names = tuple(ACTIVATIONS)
        raise ValueError(f"activation must be one of {names} or None, got {activation!r}")
    x, weight = as_tensor(x), as_tensor(weight)
    bias = None if bias is None else as_tensor(bias)
    w = weight.data
    if x.data.ndim > 2:  # (N, T, in): one matmul over all N * T rows, not N small ones
        y = (x.data.reshape(-1, w.shape[1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])
    else:
        y = x.data @ w.T
    b = None if bias is None else bias.data
    act = None if activation is None else ACTIVATIONS[activation]
    if act is not None:
        y = act.forward(y, b, out=y)  # act(y + b), the bias added inside
    elif b is not None:
        y += b
    prev = (x, weight) if bias is None else (x, weight, bias)
    out = _node(y, prev, "linear" if activation is None else "linear+" + activation)
    if out.requires_grad:

        def _backward(g):
            if act is not None:
                g = g * act.slope(y)
            g2 = g.reshape(-1, g.shape[-1]) if g.ndim != 2 else g
            if weight.requires_grad:
                x2 = x.data.reshape(-1, x.data.shape[-1]) if x.data.ndim != 2 else x.data
                weight._accumulate(g2.T @ x2)
            if bias is not None and bias.requires_grad:
                bias._accumulate(g2.sum(axis=0))
            if x.requires_grad:
                x._accumulate(g @ w if g.ndim <= 2 else (g2 @ w).reshape(x.shape))

        out._backward = _backward
    return out


# --- softmax family ----------------------------------------------------------------------


def _shifted(x: np.ndarray, axis):
    """x - max(x) along axis, with all -inf slices shifted by 0 instead of producing nan."""
    m = x.max(axis=axis, keepdims=True)
    if not np.all(np.isfinite(m)):
        m = np.where(np.isfinite(m), m, 0)
    return x - m, m


def softmax(x, axis: int = -1) -> Tensor:
    x = as_tensor(x)
    e = np.exp(_shifted(x.data, axis)[0])
    y = e / e.sum(axis=axis, keepdims=True)
    out = _node(y, (x,), "softmax")
    if out.requires_grad:
        out._backward = lambda g: x._accumulate(y * (g - (g * y).sum(axis=axis, keepdims=True)))
    return out


def log_softmax(x, axis: int = -1) -> Tensor:
    x = as_tensor(x)
    z = _shifted(x.data, axis)[0]
    y = z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    out = _node(y, (x,), "log_softmax")
    if out.requires_grad:
        out._backward = lambda g: x._accumulate(g - np.exp(y) * g.sum(axis=axis, keepdims=True))
    return out


def logsumexp(x, axis=-1, keepdims: bool = False) -> Tensor:
    """log(sum(exp(x))) along axis (int, tuple or None for all), finite for huge logits."""
    x = as_tensor(x)
    z, m = _shifted(x.data, axis)
    lse = np.log(np.exp(z).sum(axis=axis, keepdims=True)) + m
    out = _node(_squeeze(lse, axis, keepdims), (x,), "logsumexp")
    if out.requires_grad:

        def _backward(g):
            x._accumulate(_unsqueeze(g, axis, keepdims) * np.exp(x.data - lse))

        out._backward = _backward
    return out


# --- losses ----------------------------------------------------------------------------------


def _reduce(losses: np.ndarray, reduction: str):
    """Reduced loss and the factor that turns the output gradient into per-sample ones."""
    if reduction == "mean":  # sum / n is np.mean without its Python overhead
        n = max(losses.size, 1)
        return np.asarray(losses.sum() / n), 1.0 / n
    if reduction == "sum":
        return np.asarray(losses.sum()), 1.0
    if reduction == "none":
        return losses, None
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _per_sample(g, scale):
    """Upstream gradient as a per-sample factor (scalar for mean/sum, array for none)."""
    return g if scale is None else g * scale


def cross_entropy(logits, target, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of (N, C) logits against N integer class indices, or of a
    sequence's (N, T, C) logits against (N, T) targets (the classes last, unlike torch,
    whose (N, C, T) puts them second; "none" gives (N, T) losses, "mean" averages all).

    Same as torch.nn.functional.cross_entropy with class-index targets. Computed from
    the shifted logits, so logits of +-1000 give finite losses and gradients.
    """
    x = as_tensor(logits)
    if x.data.ndim == 3:
        n, t, c = x.shape
        flat = cross_entropy(x.reshape(n * t, c), _flat_targets(target, (n, t)), reduction)
        return flat.reshape(n, t) if reduction == "none" else flat
    t = _class_indices(target, x.data)
    single = x.data.ndim == 1  # unbatched (C,) logits with a scalar target
    data = x.data[None] if single else x.data
    if data.ndim != 2:
        raise ValueError(f"cross_entropy expects (N, C), (C,) or (N, T, C) logits, got {x.shape}")
    rows = np.arange(data.shape[0])
    z = data - data.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    losses = np.log(s[:, 0]) - z[rows, t]
    y, scale = _reduce(losses[0] if single else losses, reduction)
    out = _node(y, (x,), "cross_entropy")
    if out.requires_grad:

        def _backward(g):
            d = e / s
            d[rows, t] -= 1
            g = _per_sample(g, scale)
            d *= g if np.ndim(g) == 0 else np.reshape(g, (-1, 1))
            x._accumulate(d[0] if single else d)

        out._backward = _backward
    return out


def _flat_targets(target, shape) -> np.ndarray:
    t = np.asarray(target.data if isinstance(target, Tensor) else target)
    if t.shape != shape:
        raise ValueError(f"targets shape {t.shape} does not match (N, T) logits {shape}")
    return t.reshape(-1)


def _class_indices(target, logits: np.ndarray) -> np.ndarray:
    t = np.asarray(target.data if isinstance(target, Tensor) else target)
    if t.dtype.kind == "f":
        if not np.array_equal(t, np.round(t)):
            raise ValueError("cross_entropy targets must be integer class indices")
        t = t.astype(np.int64)
    elif t.dtype.kind not in "iu":
        raise ValueError(f"cross_entropy targets must be integer class indices, got {t.dtype}")
    n_expected = () if logits.ndim == 1 else logits.shape[:1]
    t = t.reshape(-1) if t.ndim == 2 and t.shape[1:] == (1,) else t
    if t.shape != n_expected:
        raise ValueError(f"targets shape {t.shape} does not match logits shape {logits.shape}")
    n_classes = logits.shape[-1]
    if t.size and (t.min() < 0 or t.max() >= n_classes):
        bad = t[(t < 0) | (t >= n_classes)].flat[0]
        raise IndexError(f"target {bad} is out of bounds for {n_classes} classes")
    return t.reshape(1) if logits.ndim == 1 else t


def _pair(input, target, name):
    """Input and target as tensors of one shape (broadcast with a warning, like torch).

    Array targets take the input's dtype, so float32 losses stay float32."""
    x = as_tensor(input)
    t = target if isinstance(target, Tensor) else as_tensor(np.asarray(target, x.dtype))
    if x.shape != t.shape:
        warnings.warn(
            f"{name}: target shape {t.shape} differs from input shape {x.shape}; "
            "they will be broadcast, which is rarely intended",
            stacklevel=3,
        )
    return x, t


def mse_loss(input, target, reduction: str = "mean") -> Tensor:
    """Mean (or sum) of squared differences, as torch.nn.functional.mse_loss."""
    x, t = _pair(input, target, "mse_loss")
    d = x.data - t.data
    y, scale = _reduce(d * d, reduction)
    out = _node(y, (x, t), "mse_loss")
    if out.requires_grad:

        def _backward(g):
            dx = (2 * _per_sample(g, scale)) * d
            if x.requires_grad:
                x._accumulate(dx)
            if t.requires_grad:
                t._accumulate(-dx)

        out._backward = _backward
    return out


def binary_cross_entropy_with_logits(input, target, reduction: str = "mean") -> Tensor:
    """-[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))], stable for any x."""
    x, t = _pair(input, target, "binary_cross_entropy_with_logits")
    a, b = x.data, t.data
    y, scale = _reduce(np.maximum(a, 0) - a * b + np.log1p(np.exp(-np.abs(a))), reduction)
    out = _node(y, (x, t), "binary_cross_entropy_with_logits")
    if out.requires_grad:

        def _backward(g):
            g = _per_sample(g, scale)
            if x.requires_grad:
                x._accumulate(g * (sigmoid_array(a) - b))
            if t.requires_grad:
                t._accumulate(g * -a)

        out._backward = _backward
    return out
