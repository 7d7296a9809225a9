"""Convolution, pooling and dropout on NCHW arrays, as torch.nn.functional computes them.

A convolution is im2col plus one BLAS matmul: `_windows` views every kernel-sized patch
of the (padded) input without copying, one reshape lays the patches out as the rows of a
matrix, and the matmul with the flattened weight gives all outputs at once. The
backward is two matmuls (weight and input gradients) and `_col2im`, the adjoint of
`_windows`, which adds the patches' gradients back in one vectorised add per kernel
offset (kh * kw of them), never per pixel or sample.

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


def _windows(x: np.ndarray, k, s) -> np.ndarray:
    """(N, C, OH, OW, kh, kw) view of every window of x (N, C, H, W); no copy."""
    return sliding_window_view(x, k, axis=(2, 3))[:, :, :: s[0], :: s[1]]


def _col2im(g: np.ndarray, shape, k, s) -> np.ndarray:
    """Adjoint of `_windows`: g (N, C, OH, OW, kh, kw) added into a zero array of `shape`."""
    out = np.zeros(shape, g.dtype)
    oh, ow = g.shape[2:4]
    for i in range(k[0]):
        for j in range(k[1]):
            out[:, :, i : i + s[0] * oh : s[0], j : j + s[1] * ow : s[1]] += g[..., i, j]
    return out


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
    optional fused activation as in `functional.linear`.
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
    xp = np.pad(xd, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1]))) if p != (0, 0) else xd
    win = _windows(xp, (kh, kw), s)
    n, _, oh, ow = win.shape[:4]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    w2 = w.reshape(o, -1)
    y2 = cols @ w2.T  # (N*OH*OW, O): each row one output pixel, each column one channel
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
                weight._accumulate((g2.T @ cols).reshape(w.shape))
            if bias is not None and bias.requires_grad:
                bias._accumulate(g2.sum(axis=0))
            if x.requires_grad:
                gcols = (g2 @ w2).reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 1, 2, 4, 5)
                gx = _col2im(gcols, xp.shape, (kh, kw), s)
                x._accumulate(gx[:, :, p[0] : p[0] + xd.shape[2], p[1] : p[1] + xd.shape[3]])

        out._backward = _backward
    return out


def _pool_windows(x: Tensor, kernel_size, stride, op: str):
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None else pair(stride, "stride")
    _check_input(x.data, op)
    _check_fits(x.data, k, (0, 0), op)
    return _windows(x.data, k, s), k, s


def max_pool2d(x, kernel_size, stride=None) -> Tensor:
    """Maximum of each window (stride defaults to kernel_size, no padding), as torch.
    Of tied maxima, the first in the window gets the gradient, as in torch."""
    x = as_tensor(x)
    win, k, s = _pool_windows(x, kernel_size, stride, "max_pool2d")
    flat = win.reshape(*win.shape[:4], -1)
    arg = flat.argmax(axis=-1)
    y = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    out = _node(y, (x,), "max_pool2d")
    if out.requires_grad:

        def _backward(g):
            onehot = np.zeros(flat.shape, g.dtype)
            np.put_along_axis(onehot, arg[..., None], g[..., None], axis=-1)
            x._accumulate(_col2im(onehot.reshape(win.shape), x.shape, k, s))

        out._backward = _backward
    return out


def avg_pool2d(x, kernel_size, stride=None) -> Tensor:
    """Mean of each window (stride defaults to kernel_size, no padding), as torch."""
    x = as_tensor(x)
    win, k, s = _pool_windows(x, kernel_size, stride, "avg_pool2d")
    y = win.mean(axis=(-2, -1))
    out = _node(y, (x,), "avg_pool2d")
    if out.requires_grad:

        def _backward(g):
            share = np.broadcast_to((g / (k[0] * k[1]))[..., None, None], win.shape)
            x._accumulate(_col2im(share, x.shape, k, s))

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
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if len(rows) != len(x.data):
        raise ValueError(f"dropout: {len(rows)} row ids for a batch of {len(x.data)}")
    keep = uniform_keyed(key, rows, x.data[0].size if len(x.data) else 0) >= p
    scale = (keep / (1 - p)).astype(x.dtype).reshape(x.shape)
    return x._unary(x.data * scale, "dropout", lambda: scale)
