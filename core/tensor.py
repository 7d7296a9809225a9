"""Tensor: a NumPy array that remembers how it was made, so it can send gradients back.

Every op builds its output with `_node`, then defines `_backward(g)` right below: the
local chain rule that turns the output's gradient `g` into its inputs' gradients.
Inputs receive them through `Tensor._accumulate`, which calls `unbroadcast` (the one
adjoint of NumPy broadcasting) and casts to the input's dtype, so every gradient has
its tensor's shape and dtype.

Gradient buffers are never written in place unless this engine allocated them
(`_owns_grad`): an op may hand its upstream gradient, or a view of it, straight to an
input, and the first accumulation only borrows it. That saves a copy per node and
keeps one tensor's `+=` from leaking into another's gradient.

The activations are one table, `ACTIVATIONS`: each forward beside its derivative, shared
by the Tensor methods (`relu`, `tanh`, `sigmoid`) and the fused `linear+<act>` node.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class _GradMode(threading.local):
    enabled = True  # per thread, like torch


_mode = _GradMode()


def is_grad_enabled() -> bool:
    return _mode.enabled


class no_grad(contextlib.ContextDecorator):
    """Context manager and decorator: ops inside record no graph, like `torch.no_grad`."""

    def __init__(self):
        self._saved = []  # a stack, so one instance can be entered recursively

    def __enter__(self):
        self._saved.append(_mode.enabled)
        _mode.enabled = False

    def __exit__(self, *exc):
        _mode.enabled = self._saved.pop()


def unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Adjoint of broadcasting: sum `g` over the axes that broadcasting added or stretched."""
    if g.shape == shape:
        return g
    if g.ndim > len(shape):
        g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=stretched, keepdims=True) if stretched else g


def _as_float(x, copy: bool = False) -> np.ndarray:
    """Float arrays keep their dtype; integers and bools become float64."""
    arr = np.asarray(x)
    if arr.dtype.kind in "biu":
        return arr.astype(np.float64)
    if arr.dtype.kind != "f":
        raise TypeError(f"Tensor data must be real numbers, got dtype {arr.dtype}")
    return arr.copy() if copy else arr


# --- activations -------------------------------------------------------------------------


def sigmoid_array(x: np.ndarray) -> np.ndarray:
    """1/(1+exp(-x)) without overflow: exp only ever sees -|x|."""
    e = np.exp(-np.abs(x))
    s = 1 / (1 + e)
    return np.where(x >= 0, s, e * s)


def _relu(x, b=None, out=None):
    if b is None:
        return np.maximum(x, 0, out=out)
    y = np.maximum(x, -b, out=out)  # relu(x + b) == max(x, -b) + b exactly, one pass fewer
    y += b
    return y


def _tanh(x, b=None, out=None):
    return np.tanh(x if b is None else np.add(x, b, out=out), out=out)


def _sigmoid(x, b=None, out=None):
    return sigmoid_array(x if b is None else np.add(x, b, out=out))


class Activation(NamedTuple):
    """`forward(x, b=None, out=None)` is act(x + b), written into `out` where it can be
    (`out` may be `x` itself); `slope(y)` is the derivative, from the output y = act(.)."""

    forward: Callable
    slope: Callable


# name: (act(x + b), its derivative from the output y). Tensor.relu/tanh/sigmoid, the fused
# linear+<act> node and nn.MLP all read this table, so each rule stands here once.
ACTIVATIONS = {
    "relu": Activation(_relu, lambda y: y > 0),
    "tanh": Activation(_tanh, lambda y: 1 - y * y),
    "sigmoid": Activation(_sigmoid, lambda y: y * (1 - y)),
}


class Tensor:
    """An array with autograd, following PyTorch's semantics.

    `data` is a plain, writable ndarray (float32 or float64); `grad` is None or an
    ndarray of the same shape and dtype. Graph nodes record `_op` (e.g. "mul",
    "linear+relu"; "" for leaves) and `_prev`, the input tensors, for graph export.
    """

    __slots__ = (
        "data",
        "grad",
        "requires_grad",
        "_backward",
        "_prev",
        "_op",
        "_retain",
        "_owns_grad",
    )
    __array_ufunc__ = None  # `ndarray op Tensor` defers to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False):
        # Copies like torch.tensor, so optimizer steps never write into the caller's array.
        self.data = _as_float(data.data if isinstance(data, Tensor) else data, copy=True)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._backward = None
        self._prev = ()
        self._op = ""
        self._retain = False
        self._owns_grad = False

    # --- attributes --------------------------------------------------------------------

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    is_leaf = property(lambda self: self._backward is None)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({np.array2string(self.data, separator=', ')}{grad})"

    def __len__(self):
        return len(self.data)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.data, dtype=dtype)

    def item(self) -> float:
        return self.data.item()

    def numpy(self) -> np.ndarray:
        return self.data

    def detach(self) -> Tensor:
        return _const(self.data)

    def retain_grad(self) -> None:
        """Keep this non-leaf tensor's .grad after backward (leaves always keep theirs)."""
        self._retain = True

    # --- autograd ----------------------------------------------------------------------

    def _accumulate(self, g) -> None:
        if g.shape != self.data.shape:
            g = unbroadcast(g, self.data.shape)
        if g.dtype != self.data.dtype:
            g = g.astype(self.data.dtype)
        if self.grad is None:
            self.grad, self._owns_grad = g, False  # borrowed: copy before any in-place add
        elif self._owns_grad:
            self.grad += g
        else:
            self.grad, self._owns_grad = self.grad + g, True

    def backward(self, grad=None) -> None:
        """Gradient of this tensor with respect to every leaf that requires grad.

        Leaves accumulate into .grad across calls, as in PyTorch. Non-leaf gradients
        live only during the pass (unless `retain_grad()`), so a second call on the same
        graph adds the leaf gradients again and never doubles an intermediate.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a scalar, got shape {self.shape}"
                )
            grad = np.ones_like(self.data)
        else:
            grad = np.array(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"gradient shape {grad.shape} != tensor shape {self.shape}")
        topo = topological_order(self)
        kept = {}
        for node in topo:
            if node._retain and node._backward is not None:
                kept[node], node.grad = node.grad, None
        self._accumulate(grad)
        for node in reversed(topo):
            backward, g = node._backward, node.grad
            if backward is None or g is None:
                continue
            backward(g)
            if not node._retain:
                node.grad = None
            elif kept.get(node) is not None:
                node.grad, node._owns_grad = kept[node] + g, True
        _own_grads(topo)

    # --- elementwise binary ops --------------------------------------------------------

    def __add__(self, other):
        other = _lift(other, self)
        out = _node(self.data + other.data, (self, other), "add")
        if out.requires_grad:
            out._backward = lambda g: _send((self, other), (g, g))
        return out

    def __mul__(self, other):
        other = _lift(other, self)
        a, b = self.data, other.data
        out = _node(a * b, (self, other), "mul")
        if out.requires_grad:

            def _backward(g):
                if self.requires_grad:
                    self._accumulate(g * b)
                if other.requires_grad:
                    other._accumulate(g * a)

            out._backward = _backward
        return out

    def __pow__(self, other):
        if isinstance(other, int | float):  # plain exponent: keeps float32 as float32
            return self._pow_scalar(other)
        other = _lift(other, self)
        a, b = self.data, other.data
        y = a**b
        out = _node(y, (self, other), "pow")
        if out.requires_grad:

            def _backward(g):
                with np.errstate(divide="ignore", invalid="ignore"):  # torch's zero cases
                    if self.requires_grad:  # d/da = b a**(b-1), taken as 0 where b == 0
                        self._accumulate(g * np.where(b == 0, 0, b * a ** (b - 1)))
                    if other.requires_grad:  # d/db = a**b log(a), taken as 0 where a == 0
                        other._accumulate(g * np.where((a == 0) & (b >= 0), 0, y * np.log(a)))

            out._backward = _backward
        return out

    def _pow_scalar(self, p):
        x = self.data
        out = _node(x**p, (self,), "pow")
        if out.requires_grad:

            def _backward(g):
                self._accumulate(g * (p * x ** (p - 1)) if p != 0 else np.zeros_like(g))

            out._backward = _backward
        return out

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):  # self - other
        return self + (-_lift(other, self))

    def __rsub__(self, other):  # other - self
        return _lift(other, self) + (-self)

    def __truediv__(self, other):  # self * other**-1
        if isinstance(other, int | float):
            return self * (1.0 / other)
        return self * _lift(other, self) ** -1

    def __rtruediv__(self, other):  # other * self**-1
        return _lift(other, self) * self**-1

    def __rpow__(self, other):  # other ** self
        return _lift(other, self) ** self

    __radd__ = __add__
    __rmul__ = __mul__

    # --- matmul ------------------------------------------------------------------------

    def __matmul__(self, other):
        other = _lift(other, self)
        a, b = self.data, other.data
        out = _node(a @ b, (self, other), "matmul")
        if out.requires_grad:

            def _backward(g):
                # 1-D operands act as a row (left) or a column (right), as np.matmul does.
                a2 = a[None, :] if a.ndim == 1 else a
                b2 = b[:, None] if b.ndim == 1 else b
                if b.ndim == 1:
                    g = g[..., None]
                if a.ndim == 1:
                    g = np.expand_dims(g, -2)
                if self.requires_grad:
                    da = g @ np.swapaxes(b2, -1, -2)
                    self._accumulate(da[..., 0, :] if a.ndim == 1 else da)
                if other.requires_grad:
                    db = np.swapaxes(a2, -1, -2) @ g
                    other._accumulate(db[..., 0] if b.ndim == 1 else db)

            out._backward = _backward
        return out

    def __rmatmul__(self, other):
        return _lift(other, self) @ self

    # --- reductions ----------------------------------------------------------------------

    def sum(self, axis=None, keepdims: bool = False):
        return self._reduce(np.sum, "sum", axis, keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return self._reduce(np.mean, "mean", axis, keepdims)

    def _reduce(self, fn, op, axis, keepdims):
        x = self.data
        y = np.asarray(fn(x, axis=axis, keepdims=keepdims))
        out = _node(y, (self,), op)
        if out.requires_grad:
            n = x.size // max(y.size, 1) if op == "mean" else 1

            def _backward(g):
                g = _unsqueeze(g, axis, keepdims)
                self._accumulate(np.broadcast_to(g / n if n != 1 else g, x.shape))

            out._backward = _backward
        return out

    def max(self, axis=None, keepdims: bool = False):
        """Maximum; tied maxima share the gradient equally (torch.amax semantics)."""
        x = self.data
        m = x.max(axis=axis, keepdims=True)
        out = _node(_squeeze(m, axis, keepdims), (self,), "max")
        if out.requires_grad:

            def _backward(g):
                g = _unsqueeze(g, axis, keepdims)
                hit = x == m
                self._accumulate(hit * (g / hit.sum(axis=axis, keepdims=True)))

            out._backward = _backward
        return out

    # --- elementwise unary ops -----------------------------------------------------------

    def _unary(self, y, op, local_grad):
        """Output y with gradient g * local_grad(); local_grad runs only in backward."""
        out = _node(y, (self,), op)
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * local_grad())
        return out

    def exp(self):
        y = np.exp(self.data)
        return self._unary(y, "exp", lambda: y)

    def log(self):
        x = self.data
        return self._unary(np.log(x), "log", lambda: 1.0 / x)

    def relu(self):
        return self._activation("relu")

    def tanh(self):
        return self._activation("tanh")

    def sigmoid(self):
        return self._activation("sigmoid")

    def _activation(self, name):
        act = ACTIVATIONS[name]
        y = act.forward(self.data)
        return self._unary(y, name, lambda: act.slope(y))

    # --- shape ops -------------------------------------------------------------------------

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        x_shape = self.data.shape
        out = _node(self.data.reshape(shape), (self,), "reshape")
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g.reshape(x_shape))
        return out

    def permute(self, *axes):
        """Reorder the axes (numpy.transpose / torch.permute)."""
        axes = tuple(axes[0]) if len(axes) == 1 and not isinstance(axes[0], int) else axes
        out = _node(self.data.transpose(axes), (self,), "permute")
        if out.requires_grad:
            inverse = tuple(np.argsort(axes))
            out._backward = lambda g: self._accumulate(g.transpose(inverse))
        return out

    def transpose(self, dim0: int = -2, dim1: int = -1):  # swap two axes, like torch
        axes = list(range(self.ndim))
        axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
        return self.permute(axes)

    @property
    def T(self):  # all axes reversed
        return self.permute(tuple(reversed(range(self.ndim))))

    def __getitem__(self, index):
        index = _plain_index(index)
        x = self.data
        out = _node(np.asarray(x[index]), (self,), "getitem")
        if out.requires_grad:

            def _backward(g):
                grad = np.zeros_like(x, dtype=g.dtype)
                if _is_basic(index):
                    grad[index] = g
                else:  # repeated fancy indices must add up, so no plain assignment
                    np.add.at(grad, index, g)
                self._accumulate(grad)

            out._backward = _backward
        return out


# --- construction helpers ----------------------------------------------------------------

_new = object.__new__


def _node(data, prev, op) -> Tensor:
    """An op's output; it joins the graph only if grad mode is on and an input needs grad."""
    out = _new(Tensor)
    out.data, out.grad, out._op, out._backward = data, None, op, None
    out._retain = out._owns_grad = False
    if _mode.enabled:
        for p in prev:
            if p.requires_grad:
                out.requires_grad, out._prev = True, prev
                return out
    out.requires_grad, out._prev = False, ()
    return out


def _const(data) -> Tensor:
    """Wrap an array without copying; it needs no grad (data batches, targets, scalars)."""
    return _node(data, (), "")


def _lift(x, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, int | float):  # Python scalars take the tensor's dtype (weak, like torch)
        return _const(np.asarray(x, dtype=like.data.dtype))
    return _const(_as_float(x))


def as_tensor(x) -> Tensor:
    """A Tensor as is; anything else wrapped without copying, as a constant."""
    return x if isinstance(x, Tensor) else _const(_as_float(x))


def _send(inputs, grads) -> None:
    """Each input that requires grad receives its gradient."""
    for t, g in zip(inputs, grads, strict=True):
        if t.requires_grad:
            t._accumulate(g)


def _squeeze(y, axis, keepdims: bool):
    """A reduction computed with keepdims=True, shaped as the caller asked."""
    return y if keepdims else (y.reshape(()) if axis is None else np.squeeze(y, axis))


def _unsqueeze(g, axis, keepdims: bool):
    """Adjoint of `_squeeze`: the output gradient with the reduced axes back, as size 1."""
    return g if keepdims or axis is None else np.expand_dims(g, axis)


def _plain_index(index):
    """Tensors used as indices become integer (or bool) arrays."""
    if isinstance(index, tuple):
        return tuple(_plain_index(i) for i in index)
    if isinstance(index, Tensor):
        return index.data.astype(np.int64)
    return index


def _is_basic(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, int | slice | np.integer) or i is None or i is Ellipsis for i in parts)


def topological_order(root) -> list:
    """Every node reachable from `root` through `_prev`, inputs before outputs.

    Iterative (an explicit stack, not recursion), so 100k-deep graphs work; serves
    Tensor and Value graphs alike.
    """
    topo, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            topo.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((p, False) for p in node._prev if p not in seen)
    return topo


def _own_grads(topo) -> None:
    """After a pass, every kept .grad must be a private, writable array: copy borrowed ones."""
    held = set()
    for t in topo:
        g = t.grad
        if g is None or (t._backward is not None and not t._retain):
            continue
        if not t._owns_grad and (
            type(g) is not np.ndarray
            or g.base is not None
            or not g.flags.writeable
            or id(g) in held
        ):
            t.grad = g = np.array(g)
        t._owns_grad = True
        held.add(id(g))


# --- functions over several tensors --------------------------------------------------------


def concatenate(tensors, axis: int = 0) -> Tensor:
    tensors = [as_tensor(t) for t in tensors]
    out = _node(np.concatenate([t.data for t in tensors], axis=axis), tuple(tensors), "concatenate")
    if out.requires_grad:
        ends = np.cumsum([t.data.shape[axis] for t in tensors])[:-1]
        out._backward = lambda g: _send(tensors, np.split(g, ends, axis=axis))
    return out


def stack(tensors, axis: int = 0) -> Tensor:
    tensors = [as_tensor(t) for t in tensors]
    out = _node(np.stack([t.data for t in tensors], axis=axis), tuple(tensors), "stack")
    if out.requires_grad:
        out._backward = lambda g: _send(tensors, np.moveaxis(g, axis, 0))
    return out
