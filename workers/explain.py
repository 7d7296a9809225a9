"""Why a trained model answers what it answers: input attributions, computed by the engine.

`explain(model, inputs, method=...)` gives, for one output (`target`) of every row,
how much each input feature contributes:

* "gradient": df/dx at x, the local sensitivity.
* "gradient_x_input": (x - baseline) * df/dx at x.
* "integrated_gradients": (x - baseline) * the mean of df/dx along the straight path
  from the baseline to x (midpoint rule on `steps` intervals, refined where f bends,
  see `path_mean_gradients`). Its attributions add up to f(x) - f(baseline)
  ("completeness"); `completeness_gap` reports, per row, how far the quadrature is
  from that: sum(attributions) - (f(x) - f(baseline)), signed, in the output's units.

The gradients come from the engine's backward pass on a copy of the model whose
parameters are constants, so only the input gradient is computed and the model
(possibly shared by other requests) is never touched. All the path points of a batch
of rows go through one forward and one backward: the rows of an MLP are independent,
so the gradient of the sum of their target outputs is every row's own gradient.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Literal, NamedTuple, get_args

import numpy as np

from core import Tensor, no_grad
from core.nn import MLP, Sequential
from workers.layers import fmt

__all__ = [
    "METHODS",
    "ExplainError",
    "Method",
    "explain",
    "input_shape",
    "json_values",
    "nesting",
    "path_mean_gradients",
    "predict",
    "samples",
]

Method = Literal["gradient", "gradient_x_input", "integrated_gradients"]
METHODS = get_args(Method)
PATH_BATCH = 8192  # rows (inputs or path points) per forward and backward pass
REFINE_ROUNDS = 8  # integrated gradients: rounds of splitting inexact intervals
SPLIT = 4  # an interval that is split becomes this many
RTOL = 1e-3  # refine until the path's summed interval error is below RTOL * |f(x) - f(b)|


class ExplainError(ValueError):
    """A bad argument, at `loc`: its name, then the indices into it (("inputs", 2, 1)).
    The message starts with the place as Python writes it: "inputs[2][1] is not finite"."""

    def __init__(self, loc: tuple, what: str):
        name, *index = loc
        super().__init__(f"{name}{''.join(f'[{i}]' for i in index)} {what}")
        self.loc = loc


def predict(model: MLP, inputs) -> np.ndarray:
    """The raw model outputs (logits or regression values), rows in the model's dtype."""
    X, _ = _rows(model, inputs, "inputs")
    with no_grad():
        return model(Tensor(X)).data


def explain(
    model: MLP,
    inputs,
    *,
    method: str = "gradient",
    target: int | None = None,
    baseline=None,
    steps: int = 64,
) -> dict:
    """Attributions of output `target` to every input feature, for every row.

    `target` is one output index for all rows; None explains each row's predicted
    class (argmax), or output 0 of a single-output model. `inputs` are rows, or, for a
    model whose input_shape is (C, H, W), images (N x C x H x W); the attributions come
    in the same shape. `baseline` is one row or image (broadcast), or one per input;
    None means zeros. Returns JSON-ready lists: {"outputs", "attributions", "method",
    "targets" (the output explained, per row), "completeness_gap"}; non-finite numbers
    become None, as in predictions. Bad arguments raise ExplainError (a ValueError) at
    the argument.
    """
    if method not in METHODS:
        raise ExplainError(("method",), f"must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ExplainError(("steps",), f"must be a positive integer, got {steps!r}")
    X, images = _rows(model, inputs, "inputs")
    B = _baseline(model, baseline, len(X))
    outputs = predict(model, X)
    targets = _targets(target, outputs)
    frozen = _frozen(model)
    gap = None
    if method == "gradient":
        attributions = _batched(_target_gradients, frozen, X, targets)
    elif method == "gradient_x_input":
        attributions = (X - B) * _batched(_target_gradients, frozen, X, targets)
    else:
        rows = np.arange(len(X))
        change = outputs[rows, targets] - predict(model, B)[rows, targets]
        attributions = (X - B) * path_mean_gradients(frozen, X, B, targets, change, steps)
        gap = attributions.sum(axis=1, dtype=np.float64) - change
    return {
        "outputs": json_values(outputs),
        "attributions": json_values(
            attributions.reshape(-1, *input_shape(model)) if images else attributions
        ),
        "method": method,
        "targets": targets.tolist(),
        "completeness_gap": None if gap is None else json_values(gap),
    }


# --- gradients ---------------------------------------------------------------------------------


def _frozen(model: MLP | Sequential) -> MLP | Sequential:
    """A shallow copy whose parameters are constants sharing the model's arrays."""
    clone = copy.copy(model)
    attr = "layers" if isinstance(model, MLP) else "modules"
    setattr(clone, attr, [copy.copy(layer) for layer in getattr(model, attr)])
    for layer in getattr(clone, attr):
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                setattr(layer, name, getattr(layer, name).detach())
    return clone


def _target_gradients(frozen: MLP, X: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """d out[i, targets[i]] / d X[i] for every row i: one forward, one backward."""
    x = Tensor(X, requires_grad=True)
    out = frozen(x)
    out[np.arange(len(X)), targets].sum().backward()
    return x.grad


def _target_outputs(frozen: MLP, X: np.ndarray, targets: np.ndarray) -> np.ndarray:
    with no_grad():
        return frozen(Tensor(X)).data[np.arange(len(X)), targets]


def _batched(fn, frozen: MLP, X: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`fn` over at most PATH_BATCH rows at a time (or the model's own `path_batch`)."""
    size = getattr(frozen, "path_batch", PATH_BATCH)
    parts = [fn(frozen, X[i : i + size], targets[i : i + size]) for i in range(0, len(X), size)]
    return np.concatenate(parts)


def path_mean_gradients(frozen, X, B, targets, change, steps: int) -> np.ndarray:
    """Mean of df/dx along the straight path from each baseline row to its input row.

    The midpoint rule on `steps` equal intervals of alpha, refined where it is wrong.
    Every interval compares its midpoint estimate of the change of f,
    h * grad f(mid) . (x - b), with the true change f(hi) - f(lo); these errors add up
    to minus the completeness gap. A ReLU kink inside an interval makes them differ by
    up to h/2 times the jump of the gradient, which at 64 steps often exceeds 1% of
    f(x) - f(b). So, while a row's summed error is above RTOL * |f(x) - f(b)|, its worst
    intervals (at most `steps` per round, never for mere rounding noise) are split into
    SPLIT and evaluated again, for at most REFINE_ROUNDS rounds: adaptive quadrature,
    with one forward and backward pass per round for all rows together.
    """
    n = len(X)
    D = X - B
    ends = np.tile(np.arange(steps + 1) / steps, n)
    end_rows = np.repeat(np.arange(n), steps + 1)
    f = _batched(_target_outputs, frozen, _on_path(B, D, end_rows, ends), targets[end_rows])
    f = f.astype(np.float64).reshape(n, steps + 1)
    pool = _intervals(
        frozen,
        B,
        D,
        targets,
        row=np.repeat(np.arange(n), steps),
        lo=np.tile(np.arange(steps) / steps, n),
        h=np.full(n * steps, 1.0 / steps),
        f=f,
    )
    tolerance = RTOL * np.abs(change.astype(np.float64))
    for _ in range(REFINE_ROUNDS):
        split = _worst(pool, tolerance, steps)
        if not split.any():
            break
        pool = pool.take(~split).join(_subdivide(frozen, B, D, targets, pool.take(split)))
    means = np.zeros(X.shape)
    np.add.at(means, pool.row, pool.part)
    return means.astype(X.dtype)


class _Intervals(NamedTuple):
    """Intervals of alpha on the rows' paths, with their share of the mean gradient."""

    row: np.ndarray
    lo: np.ndarray
    h: np.ndarray
    f_lo: np.ndarray  # f at both ends, float64
    f_hi: np.ndarray
    part: np.ndarray  # h * grad f(midpoint), one row of the input's width per interval
    error: np.ndarray  # |f(hi) - f(lo) - part . (x - b)|
    splittable: np.ndarray  # error above rounding noise

    def take(self, mask) -> _Intervals:
        return _Intervals(*(a[mask] for a in self))

    def join(self, other) -> _Intervals:
        return _Intervals(*(np.concatenate(pair) for pair in zip(self, other, strict=True)))


def _intervals(frozen, B, D, targets, row, lo, h, f) -> _Intervals:
    """Evaluate intervals whose ends have f values f[:, :-1] and f[:, 1:] (one row of f per
    run of consecutive intervals)."""
    mid = _on_path(B, D, row, lo + h / 2)
    part = h[:, None] * _batched(_target_gradients, frozen, mid, targets[row])
    f_lo, f_hi = f[:, :-1].ravel(), f[:, 1:].ravel()
    estimate = (part * D[row]).sum(axis=1)
    error = np.abs(f_hi - f_lo - estimate)
    rounding = 64 * np.finfo(D.dtype).eps * (np.abs(f_lo) + np.abs(f_hi) + np.abs(estimate))
    return _Intervals(row, lo, h, f_lo, f_hi, part, error, error > rounding)


def _subdivide(frozen, B, D, targets, parent: _Intervals) -> _Intervals:
    """Each parent interval cut into SPLIT equal ones (f is new only at the inner cuts)."""
    h = parent.h / SPLIT
    lo = parent.lo[:, None] + h[:, None] * np.arange(SPLIT)
    inner_rows = np.repeat(parent.row, SPLIT - 1)
    inner = _batched(
        _target_outputs, frozen, _on_path(B, D, inner_rows, lo[:, 1:].ravel()), targets[inner_rows]
    )
    f = np.column_stack([parent.f_lo, inner.reshape(len(h), -1), parent.f_hi])
    return _intervals(
        frozen, B, D, targets, np.repeat(parent.row, SPLIT), lo.ravel(), np.repeat(h, SPLIT), f
    )


def _on_path(B, D, row, alpha) -> np.ndarray:
    """The points baseline + alpha * (x - baseline) of rows `row`, in the model's dtype."""
    return B[row] + (alpha[:, None] * D[row]).astype(B.dtype)


def _worst(pool: _Intervals, tolerance: np.ndarray, limit: int) -> np.ndarray:
    """Intervals to split: in rows whose summed error exceeds their tolerance, the
    splittable ones, at most `limit` per row, the largest errors first."""
    row, error = pool.row, pool.error
    over = np.bincount(row, error, minlength=len(tolerance)) > tolerance
    order = np.lexsort((-error, row))
    rows_sorted = row[order]
    rank = np.empty(len(row), np.int64)
    rank[order] = np.arange(len(row)) - np.searchsorted(rows_sorted, rows_sorted)
    return over[row] & pool.splittable & (rank < limit)


# --- arguments ---------------------------------------------------------------------------------


def _dtype(model: MLP | Sequential) -> np.dtype:
    return model.parameters()[0].dtype


def input_shape(model: MLP | Sequential) -> tuple[int, ...]:
    """One input's shape: (features,), or (channels, height, width) for a CNN."""
    return (model.sizes[0],) if isinstance(model, MLP) else tuple(model.input_shape)


def nesting(value) -> int:
    """How deeply `value`'s first elements nest: 1 for a row, 2 for rows, 3 for an image,
    4 for images (at most 5). Arguments take any of these, told apart by depth."""
    depth = 0
    while isinstance(value, list | tuple | np.ndarray) and len(value) and depth < 5:
        value, depth = value[0], depth + 1
    return depth


def samples(value, name: str, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, bool]:
    """`value` as a 2-D array, one flat row per sample, and whether it came as images:
    rows of prod(shape) numbers, or, when `shape` is (C, H, W), images of that shape.
    An ExplainError names the bad part and the shape the model takes."""
    if nesting(value) <= 2:
        return _matrix(value, name, math.prod(shape), dtype), False
    if len(shape) != 3:
        msg = f"must be rows of {shape[0]} numbers; the model takes no images"
        raise ExplainError((name,), msg)
    try:
        a = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):  # ragged, or not numbers: find the place
        for i, image in enumerate(value):
            _image_fits(image, shape, (name, i))
        raise ExplainError((name,), f"must be a list of {fmt(shape)} images") from None
    if a.ndim != 4:
        raise ExplainError((name,), f"must be a list of {fmt(shape)} images")
    if a.shape[1:] != shape:
        msg = f"has images of shape {fmt(a.shape[1:])} but the model takes {fmt(shape)}"
        raise ExplainError((name,), msg)
    with np.errstate(over="ignore"):  # 1e39 becomes inf in float32, reported as not finite
        return a.reshape(len(a), -1).astype(dtype), True


_AXES = ("channels", "rows", "values")  # of an image, level by level


def _image_fits(part, shape: tuple[int, ...], loc: tuple, level: int = 0) -> None:
    """An ExplainError at the first place where nested lists `part` (a level of an image)
    differ from `shape`."""
    if not shape:
        if not isinstance(part, numbers.Real):
            raise ExplainError(loc, "must be a number")
        return
    if not isinstance(part, list | tuple | np.ndarray):
        raise ExplainError(loc, f"must be a list of {shape[0]} {_AXES[level]}")
    if len(part) != shape[0]:
        raise ExplainError(loc, f"has {len(part)} {_AXES[level]} but the model takes {shape[0]}")
    for i, inner in enumerate(part):
        _image_fits(inner, shape[1:], (*loc, i), level + 1)


def _matrix(value, name: str, width: int, dtype) -> np.ndarray:
    """`value` as a 2-D array of `width` columns, or an ExplainError at the bad part."""
    try:
        a = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.ndim != 2:
        if a is not None and a.size == 0:
            raise ExplainError((name,), "has no rows")
        for i, row in enumerate(value if isinstance(value, list | tuple) else []):
            if not isinstance(row, list | tuple | np.ndarray):
                raise ExplainError((name, i), f"must be a row of {width} numbers")
            if len(row) != width:
                raise ExplainError((name, i), f"has width {len(row)} but the model takes {width}")
        raise ExplainError((name,), f"must be a list of rows of {width} numbers")
    if a.shape[1] != width:
        raise ExplainError((name,), f"has width {a.shape[1]} but the model takes {width}")
    with np.errstate(over="ignore"):  # 1e39 becomes inf in float32, reported as not finite
        return a.astype(dtype)


def _require_finite(a: np.ndarray, name: str) -> None:
    bad = np.argwhere(~np.isfinite(a))
    if len(bad):
        raise ExplainError((name, *(int(k) for k in bad[0])), "is not finite")


def _rows(model: MLP, inputs, name: str) -> tuple[np.ndarray, bool]:
    """The inputs as flat rows, and whether they came as images."""
    shape = input_shape(model)
    X, images = samples(inputs, name, shape, _dtype(model))
    if len(X) == 0:
        raise ExplainError((name,), "has no rows")
    _require_finite(X.reshape(-1, *shape) if images else X, name)  # at the value's own place
    return X, images


def _baseline(model: MLP, baseline, n: int) -> np.ndarray:
    """One row per input: zeros, one row (or image) repeated, or the rows (or images) given."""
    shape, dtype = input_shape(model), _dtype(model)
    width = math.prod(shape)
    if baseline is None:
        return np.zeros((n, width), dtype)
    one = nesting(baseline) in (1, 3)
    B, images = samples([baseline] if one else baseline, "baseline", shape, dtype)
    given = B.reshape(-1, *shape) if images else B
    _require_finite(given[0] if one else given, "baseline")
    if len(B) not in (1, n):
        raise ExplainError(("baseline",), f"has {len(B)} rows but inputs has {n}; give 1 or {n}")
    return np.broadcast_to(B, (n, width))


def _targets(target, outputs: np.ndarray) -> np.ndarray:
    n_out = outputs.shape[1]
    if target is None:
        return outputs.argmax(axis=1) if n_out > 1 else np.zeros(len(outputs), np.int64)
    if not isinstance(target, numbers.Integral) or isinstance(target, bool):
        raise ExplainError(("target",), f"must be an integer output index, got {target!r}")
    if not 0 <= target < n_out:
        raise ExplainError(
            ("target",),
            f"{target} is out of range: the model has {n_out} output(s), "
            f"so target must be between 0 and {n_out - 1}",
        )
    return np.full(len(outputs), int(target))


def json_values(a: np.ndarray) -> list:
    """Plain floats, with None for non-finite values (JSON has neither NaN nor inf); a
    0-d array or a NumPy scalar gives one float (or None)."""
    a = np.asarray(a)
    out = a.astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()
