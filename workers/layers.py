"""The `sequential` model spec: a list of layers, as torch.nn.Sequential takes them.

Shapes are inferred layer by layer from `input_shape` ([features], or [channels, height,
width] for images). Each problem is reported at the layer that has it, e.g.
`model.layers[6]: linear after a 16x7x7 output needs flatten first`. The layer sizes the
spec leaves out (a linear layer's in_features, a conv's in_channels) come from the shapes,
and so do the widths and parameter count that the rest of the system needs
(`in_width`, `out_width`, `n_params`, as MLPSpec has them).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from workers.validation import Strict, raise_errors, spec_error

_Pos = Annotated[int, Field(ge=1, le=100_000)]
_NonNeg = Annotated[int, Field(ge=0, le=100_000)]
Size = _Pos | tuple[_Pos, _Pos]  # an int or an (h, w) pair, as torch takes them
Padding = _NonNeg | tuple[_NonNeg, _NonNeg]
Shape = tuple[int, ...]


class LinearLayer(Strict):
    type: Literal["linear"]
    out_features: _Pos
    bias: bool = True


class Conv2dLayer(Strict):
    type: Literal["conv2d"]
    out_channels: _Pos
    kernel_size: Size
    stride: Size = 1
    padding: Padding = 0
    bias: bool = True


class PoolLayer(Strict):
    """max_pool2d or avg_pool2d; stride defaults to kernel_size; no padding (as torch)."""

    type: Literal["max_pool2d", "avg_pool2d"]
    kernel_size: Size
    stride: Size | None = None


class FlattenLayer(Strict):
    type: Literal["flatten"]


class ActivationLayer(Strict):
    type: Literal["relu", "tanh", "sigmoid"]


class DropoutLayer(Strict):
    """Zeroes each value with probability p in training; its mask is a function of (seed,
    epoch, sample, layer), so it does not depend on the worker count."""

    type: Literal["dropout"]
    p: float = Field(0.5, ge=0, lt=1)


LayerSpec = Annotated[
    LinearLayer | Conv2dLayer | PoolLayer | FlattenLayer | ActivationLayer | DropoutLayer,
    Field(discriminator="type"),
]


def two(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


class ShapeError(ValueError):
    """A layer that cannot take the shape before it; the message names neither the field
    nor the layer (the caller adds `model.layers[i]: `)."""


def _windowed(layer, shape: Shape, where: str) -> Shape:
    """The output shape of a conv or pool over `shape`, or ShapeError."""
    if len(shape) != 3:
        raise ShapeError(f"{layer.type} needs a CxHxW input but gets {shape[0]} {where}")
    c, h, w = shape
    k = two(layer.kernel_size)
    s = k if getattr(layer, "stride", None) is None else two(layer.stride)
    p = two(getattr(layer, "padding", 0))
    hp, wp = h + 2 * p[0], w + 2 * p[1]
    if k[0] > hp or k[1] > wp:
        kernel = str(k[0]) if k[0] == k[1] else fmt(k)
        padded = " (padded)" if p != (0, 0) else ""
        raise ShapeError(f"kernel {kernel} is larger than the {hp}x{wp}{padded} input")
    out = ((hp - k[0]) // s[0] + 1, (wp - k[1]) // s[1] + 1)
    return (layer.out_channels if layer.type == "conv2d" else c, *out)


def next_shape(layer, shape: Shape, first: bool) -> Shape:
    """The shape after `layer`, given the shape before it (without the batch dimension)."""
    where = "features as input" if first else "features from the layer before"
    if layer.type == "linear":
        if len(shape) != 1:
            after = "on a" if first else "after a"
            noun = "input" if first else "output"
            raise ShapeError(f"linear {after} {fmt(shape)} {noun} needs flatten first")
        return (layer.out_features,)
    if layer.type in ("conv2d", "max_pool2d", "avg_pool2d"):
        return _windowed(layer, shape, where)
    if layer.type == "flatten":
        return (math.prod(shape),)
    return shape


def layer_params(layer, shape: Shape) -> int:
    """Parameters of `layer` given its input shape."""
    bias = getattr(layer, "bias", False)
    if layer.type == "linear":
        return (shape[0] + bias) * layer.out_features
    if layer.type == "conv2d":
        kh, kw = two(layer.kernel_size)
        return (shape[0] * kh * kw + bias) * layer.out_channels
    return 0


def layer_flops(layer, shape: Shape, out: Shape) -> int:
    """Multiply-adds of `layer` for one sample, given its input and output shapes."""
    if layer.type == "linear":
        return shape[0] * layer.out_features
    if layer.type in ("conv2d", "max_pool2d", "avg_pool2d"):
        kh, kw = two(layer.kernel_size)
        per_value = kh * kw * (shape[0] if layer.type == "conv2d" else 1)
        return math.prod(out) * per_value
    return math.prod(out)  # elementwise


class SequentialSpec(Strict):
    """Layers applied in order, as torch.nn.Sequential; parameters are named by the layer's
    index (`0.weight`, `0.bias`, `3.weight`, ...), so a checkpoint loads into torch."""

    type: Literal["sequential"]
    input_shape: list[_Pos] = Field(
        min_length=1,
        max_length=3,
        description="One sample's shape: [features], or [channels, height, width] for images.",
    )
    layers: list[LayerSpec] = Field(min_length=1, max_length=200)

    @model_validator(mode="after")
    def _shapes_fit(self) -> SequentialSpec:
        errors = []
        if len(self.input_shape) == 2:
            msg = "model.input_shape must be [features] or [channels, height, width]"
            errors.append(spec_error(("input_shape",), msg, self.input_shape))
        else:
            shape = tuple(self.input_shape)
            for i, layer in enumerate(self.layers):
                try:
                    shape = next_shape(layer, shape, i == 0)
                except ShapeError as e:
                    errors.append(spec_error(("layers", i), f"model.layers[{i}]: {e}", layer.type))
                    break
            else:
                if len(shape) != 1:
                    i = len(self.layers) - 1
                    msg = (
                        f"model.layers[{i}]: the model's output is {fmt(shape)}; "
                        "end with flatten and linear to give one value per output"
                    )
                    errors.append(spec_error(("layers", i), msg, self.layers[i].type))
        raise_errors(type(self).__name__, errors)
        return self

    def shapes(self) -> list[Shape]:
        """The input shape, then the shape after each layer (the spec is valid)."""
        out = [tuple(self.input_shape)]
        for i, layer in enumerate(self.layers):
            out.append(next_shape(layer, out[-1], i == 0))
        return out

    @property
    def in_width(self) -> int:
        return math.prod(self.input_shape)

    @property
    def out_width(self) -> int:
        return self.shapes()[-1][0]

    @property
    def n_params(self) -> int:
        return sum(map(layer_params, self.layers, self.shapes()))
