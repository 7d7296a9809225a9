"""Convolution, pooling and dropout on NCHW arrays, as torch.nn.functional computes them.

A convolution is im2col plus one BLAS matmul: a sliding-window view shows every
kernel-sized patch of the (padded) input without copying, one reshape lays the patches
out as the rows of a matrix, and the matmul with the flattened weight gives all outputs
at once. The backward is two matmuls (weight and input gradients) and col2im, which adds
the patches' gradients back with one vectorised add per kernel offset (kh * kw of them,
see `_offsets`), never a loop over pixels or samples. Pools loop over the same offsets.

Dropout's mask is a hash of (seed, epoch, sample index, layer, element), not a draw from
a stateful generator, so a sample gets the same mask whichever worker holds it and a
resumed run draws exactly the masks of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from core.tensor import ACTIVATIONS, Tensor, _node, as_tensor


def pair(v, name: str) -> tuple[int, int]:
    """An int or a pair of ints as (h, w), as torch takes kernel_size, stride, padding."""
    h, w = (v, v) if isinstance(v, int | np.integer) else tuple(v)
    if not all(isinstance(n, int | np.integer) for n in (h, w)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(h), int(w)


def out_size(n: int, k: int, s: int, p: int = 0) -> int:
    """Output length of a window of `k` with stride `s` over `n` padded by `p` per side."""
    return (n + 2 * p - k) // s + 1


def _offsets(k, s, oh: int, ow: int):
    """(i, j, index) per kernel offset, row-major: x[index] is the (N, C, OH, OW) array of
    every window's element (i, j). Pools and col2im loop over these kh * kw offsets."""
    for i in range(k[0]):
        for j in range(k[1]):
            yield (
                i,
                j,
                (
                    slice(None),
                    slice(None),
                    slice(i, i + s[0] * oh, s[0]),
                    slice(j, j + s[1] * ow, s[1]),
                ),
            )


def _channels_last(shape, dtype) -> np.ndarray:
    """Zeros of NCHW `shape` laid out NHWC in memory, the layout the conv matmul produces."""
    n, c, h, w = shape
    return np.zeros((n, h, w, c), dtype).transpose(0, 3, 1, 2)


def _im2col(xp: np.ndarray, k, s, oh: int, ow: int) -> np.ndarray:
    """(N*OH*OW, kh*kw*C): a row per output pixel, its patch in (i, j, channel) order.

    From NHWC memory. Many channels: one gather from the sliding-window view, in runs of
    C. Few: one strided copy per kernel offset instead (a run of one is slow to gather).
    """
    n, c = xp.shape[:2]
    if c >= 8:
        win = sliding_window_view(xp, k, axis=(2, 3))[:, :, :: s[0], :: s[1]]
        return win.transpose(0, 2, 3, 4, 5, 1).reshape(n * oh * ow, -1)
    cols = np.empty((n, oh, ow, *k, c), xp.dtype)
    for i, j, index in _offsets(k, s, oh, ow):
        cols[:, :, :, i, j] = xp[index].transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, -1)


def _check_input(x: np.ndarray, op: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{op} expects (N, C, H, W) input, got shape {x.shape}")


def _check_fits(x: np.ndarray, k, p, op: str) -> None:
    h, w = x.shape[2] + 2 * p[0], x.shape[3] + 2 * p[1]
    if k[0] > h or k[1] > w:
        raise ValueError(f"{op}: kernel {k[0]}x{k[1]} is larger than the {h}x{w} input")


def conv2d(x, weight, bias=None, stride=1, padding=0, activation: str | None = None) -> Tensor:
    """activation(conv2d(x, weight) + bias) as one node ("conv2d" or e.g. "conv2d+relu").

    x (N, C, H, W), weight (O, C, kh, kw), bias (O,): torch.nn.functional.conv2d, plus an
    optional fused activation as in `functional.linear`. Inside, the channels are last in
    memory (NHWC): each patch row is then kh * kw contiguous runs of C, and the matmul's
    (N*OH*OW, O) result is already the output, returned as an NCHW view without a copy.
    """
    x, weight = as_tensor(x), as_tensor(weight)
    bias = None if bias is None else as_tensor(bias)
    s, p = pair(stride, "stride"), pair(padding, "padding")
    xd, w = x.data, weight.data
    _check_input(xd, "conv2d")
    o, c, kh, kw = w.shape
    if xd.shape[1] != c:
        raise ValueError(f"conv2d: weight expects {c} input channels, got {xd.shape[1]}")
    _check_fits(xd, (kh, kw), p, "conv2d")
    n, _, h, wd = xd.shape
    xp = _channels_last((n, c, h + 2 * p[0], wd + 2 * p[1]), xd.dtype)
    inner = (slice(None), slice(None), slice(p[0], p[0] + h), slice(p[1], p[1] + wd))
    xp[inner] = xd
    oh, ow = out_size(h, kh, s[0], p[0]), out_size(wd, kw, s[1], p[1])
    cols = _im2col(xp, (kh, kw), s, oh, ow)
    w2 = w.transpose(0, 2, 3, 1).reshape(o, -1)  # (O, kh*kw*C), matching the columns
    y2 = cols @ w2.T  # (N*OH*OW, O): a row per output pixel, a column per channel
    b = None if bias is None else bias.data
    act = None if activation is None else ACTIVATIONS[activation]
    if act is not None:
        y2 = act.forward(y2, b, out=y2)
    elif b is not None:
        y2 += b
    y = y2.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)
    prev = (x, weight) if bias is None else (x, weight, bias)
    out = _node(y, prev, "conv2d" if activation is None else "conv2d+" + activation)
    if out.requires_grad:

        def _backward(g):
            g2 = g.transpose(0, 2, 3, 1).reshape(-1, o)
            if act is not None:
                g2 = g2 * act.slope(y2)
            if weight.requires_grad:
                gw = (g2.T @ cols).reshape(o, kh, kw, c).transpose(0, 3, 1, 2)
                weight._accumulate(gw)
            if bias is not None and bias.requires_grad:
                bias._accumulate(np.ones(len(g2), g2.dtype) @ g2)  # BLAS: faster than sum
            if x.requires_grad:  # col2im, one matmul per kernel offset: patch (i, j)'s
                # gradient, (N*OH*OW, C), is added at once where that offset reads.
                w3 = w2.reshape(o, kh * kw, c)
                gx = _channels_last(xp.shape, g2.dtype)
                for i, j, index in _offsets((kh, kw), s, oh, ow):
                    part = (g2 @ w3[:, i * kw + j]).reshape(n, oh, ow, c)
                    gx[index] += part.transpose(0, 3, 1, 2)
                x._accumulate(gx[inner])

        out._backward = _backward
    return out


def _pool_setup(x: Tensor, kernel_size, stride, op: str):
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None else pair(stride, "stride")
    _check_input(x.data, op)
    _check_fits(x.data, k, (0, 0), op)
    h, w = x.data.shape[2:]
    return k, s, list(_offsets(k, s, out_size(h, k[0], s[0]), out_size(w, k[1], s[1])))


def max_pool2d(x, kernel_size, stride=None) -> Tensor:
    """Maximum of each window (stride defaults to kernel_size, no padding), as torch.
    Of tied maxima, the first in the window (row-major) gets the gradient, as in torch."""
    x = as_tensor(x)
    k, s, offsets = _pool_setup(x, kernel_size, stride, "max_pool2d")
    xd, overlap = x.data, s[0] < k[0] or s[1] < k[1]
    y = xd[offsets[0][2]].copy(order="K")  # keeps the input's memory layout (NHWC after a conv)
    for *_, index in offsets[1:]:
        np.maximum(y, xd[index], out=y)
    out = _node(y, (x,), "max_pool2d")
    if out.requires_grad:

        def _backward(g):
            gx = np.zeros_like(xd, dtype=g.dtype)
            hit, free = np.empty(y.shape, bool), np.ones(y.shape, bool)
            for k, (*_, index) in enumerate(offsets):
                np.equal(xd[index], y, out=hit)
                hit &= free  # only the first maximum of a window, as torch
                if k < len(offsets) - 1:
                    free ^= hit
                if overlap:
                    gx[index] += g * hit
                else:  # the windows tile the input: write in place, no temporary
                    np.multiply(g, hit, out=gx[index])
            x._accumulate(gx)

        out._backward = _backward
    return out


def avg_pool2d(x, kernel_size, stride=None) -> Tensor:
    """Mean of each window (stride defaults to kernel_size, no padding), as torch."""
    x = as_tensor(x)
    k, s, offsets = _pool_setup(x, kernel_size, stride, "avg_pool2d")
    xd, area = x.data, k[0] * k[1]
    y = xd[offsets[0][2]].copy(order="K")
    for *_, index in offsets[1:]:
        y += xd[index]
    y /= area
    out = _node(y, (x,), "avg_pool2d")
    if out.requires_grad:

        def _backward(g):
            gx, share = np.zeros_like(xd, dtype=g.dtype), g / area
            for *_, index in offsets:
                gx[index] += share
            x._accumulate(gx)

        out._backward = _backward
    return out


# --- dropout -------------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters every input bit."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def uniform_keyed(key: tuple[int, ...], rows: np.ndarray, width: int) -> np.ndarray:
    """(len(rows), width) uniforms in [0, 1): a pure function of (key, row id, column)."""
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for part in key:
            h = _mix(np.asarray(h ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF)))
        r = _mix(h ^ np.asarray(rows, np.uint64)[:, None] * np.uint64(0xD1B54A32D192ED03))
        bits = _mix(r ^ np.arange(width, dtype=np.uint64)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def dropout(x, p: float, key: tuple[int, ...], rows: np.ndarray) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p), as torch in
    training mode; the mask of row i is a function of (key, rows[i]) alone."""
    x = as_tensor(x)
    scale = dropout_scale(p, key, rows, x.shape, x.dtype)
    return x._unary(x.data * scale, "dropout", lambda: scale)


def dropout_scale(p: float, key: tuple[int, ...], rows: np.ndarray, shape, dtype) -> np.ndarray:
    """The array dropout multiplies by: 0 or 1/(1-p) per element of `shape`, row i's
    values a function of (key, rows[i]) alone."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if len(rows) != shape[0]:
        raise ValueError(f"dropout: {len(rows)} row ids for a batch of {shape[0]}")
    width = int(np.prod(shape[1:])) if shape[0] else 0
    keep = uniform_keyed(key, rows, width) >= p
    return (keep / (1 - p)).astype(dtype).reshape(shape)
