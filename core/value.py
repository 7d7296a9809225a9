"""Value: a scalar autograd engine in the style of micrograd, kept as a readable reference.

The Tensor engine does the same thing on arrays; tests check one against the other.
Unlike micrograd, the topological sort is iterative (deep graphs work) and backward()
resets the intermediate gradients first, so calling it twice never doubles them;
leaves (Values not made by an op) accumulate across calls, as in PyTorch.
"""

from __future__ import annotations

import math

from core.tensor import topological_order


class Value:
    __slots__ = ("data", "grad", "_backward", "_prev", "_op")

    def __init__(self, data: float, _prev: tuple = (), _op: str = ""):
        self.data = float(data)
        self.grad = 0.0
        self._backward = None
        self._prev = _prev
        self._op = _op

    def __repr__(self):
        return f"Value(data={self.data}, grad={self.grad})"

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other), "add")

        def _backward():
            self.grad += out.grad
            other.grad += out.grad

        out._backward = _backward
        return out

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other), "mul")

        def _backward():
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad

        out._backward = _backward
        return out

    def __pow__(self, p: float):
        assert isinstance(p, int | float), "only int/float powers"
        out = Value(self.data**p, (self,), "pow")

        def _backward():
            self.grad += p * self.data ** (p - 1) * out.grad

        out._backward = _backward
        return out

    def relu(self):
        out = Value(max(self.data, 0.0), (self,), "relu")

        def _backward():
            self.grad += (self.data > 0) * out.grad

        out._backward = _backward
        return out

    def tanh(self):
        out = Value(math.tanh(self.data), (self,), "tanh")

        def _backward():
            self.grad += (1 - out.data**2) * out.grad

        out._backward = _backward
        return out

    def exp(self):
        out = Value(math.exp(self.data), (self,), "exp")

        def _backward():
            self.grad += out.data * out.grad

        out._backward = _backward
        return out

    def __neg__(self):  # -self
        return self * -1

    def __radd__(self, other):  # other + self
        return self + other

    def __sub__(self, other):  # self - other
        return self + (-other)

    def __rsub__(self, other):  # other - self
        return other + (-self)

    def __rmul__(self, other):  # other * self
        return self * other

    def __truediv__(self, other):  # self * other**-1
        return self * other**-1

    def __rtruediv__(self, other):  # other * self**-1
        return other * self**-1

    def backward(self) -> None:
        topo = topological_order(self)
        for node in topo:
            if node._prev:
                node.grad = 0.0  # intermediates start from zero on every pass
        self.grad += 1.0
        for node in reversed(topo):
            if node._backward is not None:
                node._backward()
