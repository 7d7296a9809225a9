"""The sequence-model ops, as torch.nn.functional computes them: embedding, layer_norm,
gelu and scaled dot-product attention. Each is one graph node, its backward right below.

Attention is fused: the softmax weights P (..., T, S) are the one array it keeps, and its
backward builds nothing larger, so memory grows as (N, heads, T, T), never with more.
`self_attention` is the same op on a packed (N, T, 3E) projection, as
torch.nn.MultiheadAttention splits it, so heads are strided views and not copies.

NumPy has no erf: `erf` is W. J. Cody's rational Chebyshev approximations (Math. Comp.
1969; netlib specfun CALERF), three ranges, accurate to about 1e-16 in float64.
"""

from __future__ import annotations

import math

import numpy as np

from core.tensor import Tensor, _node, _send, as_tensor, unbroadcast

# --- erf -----------------------------------------------------------------------------------

# |x| <= 0.46875: erf(x) = x P(x^2) / Q(x^2)
_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02)
_A3, _A4 = 3.20937758913846947e03, 1.85777706184603153e-1
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03)
_B3 = 2.84423683343917062e03
# 0.46875 < |x| <= 4: erfc(x) = exp(-x^2) P(x) / Q(x)
_C = (
    5.64188496988670089e-1,
    8.88314979438837594e00,
    6.61191906371416295e01,
    2.98635138197400131e02,
    8.81952221241769090e02,
    1.71204761263407058e03,
    2.05107837782607147e03,
)
_C7, _C8 = 1.23033935479799725e03, 2.15311535474403846e-8
_D = (
    1.57449261107098347e01,
    1.17693950891312499e02,
    5.37181101862009858e02,
    1.62138957456669019e03,
    3.29079923573345963e03,
    4.36261909014324716e03,
    3.43936767414372164e03,
)
_D7 = 1.23033935480374942e03
# |x| > 4: erfc(x) = exp(-x^2) / x (1/sqrt(pi) - R(1/x^2) / x^2)
_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1)
_P += (1.60837851487422766e-2,)
_P4, _P5 = 6.58749161529837803e-4, 1.63153871373020978e-2
_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1)
_Q += (6.05183413124413191e-2,)
_Q4 = 2.33520497626869185e-3


def _ratio(y, top, lead, bottom):
    """(((lead y + top[0]) y + top[1]) y ...) / (((y + bottom[0]) y + bottom[1]) y ...)."""
    num, den = lead * y, y.copy()
    for a, b in zip(top, bottom, strict=True):
        num += a
        num *= y
        den += b
        den *= y
    return num, den


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in x's float dtype."""
    x = np.asarray(x)
    return _erf(x, np.exp(-x * x))


def _erf(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """erf(x), given e = exp(-x^2) (gelu shares it with its derivative).

    float64: Cody's three ranges, to about 1e-16. float32: Abramowitz and Stegun 7.1.26,
    one formula for every x (no masks, a third of the passes), to 1.5e-7, float32's own
    resolution near 1."""
    y = np.abs(x)
    if x.dtype == np.float32:
        y *= 0.3275911
        y += 1
        out = _horner(np.reciprocal(y, out=y), _AS_7_1_26)  # erfc(y) / exp(-y^2)
    else:
        out = _cody_erfc_scaled(y)
    out *= e
    out = np.copysign(np.subtract(1, out, out=out), x, out=out)
    if x.dtype != np.float32:
        small = y <= 0.46875
        xs = x[small]
        num, den = _ratio(xs * xs, _A, _A4, _B)
        out[small] = xs * (num + _A3) / (den + _B3)
    return out


def _cody_erfc_scaled(y: np.ndarray) -> np.ndarray:
    """erfc(y) / exp(-y^2) for y > 0.46875 (Cody's two upper ranges; unused below)."""
    with np.errstate(over="ignore", invalid="ignore"):
        num, den = _ratio(y, _C, _C8, _D)
        out = (num + _C7) / (den + _D7)
    big = y > 4.0
    if big.any():
        yb = y[big]
        inv = 1 / (yb * yb)
        num, den = _ratio(inv, _P, _P5, _Q)
        out[big] = (1 / math.sqrt(math.pi) - inv * (num + _P4) / (den + _Q4)) / yb
    return out


# erfc(y) ~= exp(-y^2) (a1 t + a2 t^2 + ... + a5 t^5), t = 1 / (1 + p y), p = 0.3275911
_AS_7_1_26 = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def _horner(t: np.ndarray, coefficients) -> np.ndarray:
    """(((c0 t + c1) t + c2) t ... + cn) t, in place of one new array."""
    out = t * coefficients[0]
    for c in coefficients[1:]:
        out += c
        out *= t
    return out


# --- gelu ----------------------------------------------------------------------------------

_SQRT_2_PI = math.sqrt(2 / math.pi)


def gelu(x, approximate: str = "none") -> Tensor:
    """x Phi(x), as torch.nn.functional.gelu: "none" uses erf, "tanh" torch's tanh form."""
    x = as_tensor(x)
    xd = x.data
    if approximate == "none":
        z = xd * (1 / math.sqrt(2))
        e = np.square(z)
        np.exp(np.negative(e, out=e), out=e)  # exp(-x^2 / 2), in erf and in the slope
        cdf = _erf(z, e)
        cdf += 1
        cdf *= 0.5

        def slope():  # Phi(x) + x phi(x)
            s = xd * e
            s *= 1 / math.sqrt(2 * math.pi)
            s += cdf
            return s

    elif approximate == "tanh":
        inner = _SQRT_2_PI * (xd + 0.044715 * xd**3)
        t = np.tanh(inner)
        cdf = 0.5 * (1 + t)

        def slope():
            return cdf + 0.5 * xd * (1 - t * t) * _SQRT_2_PI * (1 + 3 * 0.044715 * xd * xd)

    else:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return x._unary(xd * cdf, "gelu", slope)


# --- layer_norm ----------------------------------------------------------------------------


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last len(normalized_shape)
    axes (biased variance), as torch.nn.functional.layer_norm; one node."""
    x = as_tensor(x)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(f"layer_norm: normalized_shape {shape} does not end input {x.shape}")
    axes = tuple(range(-len(shape), 0))
    xc = x.data - x.data.mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt((xc * xc).mean(axis=axes, keepdims=True) + eps)
    xhat = xc * rstd
    w, b = (None if t is None else as_tensor(t) for t in (weight, bias))
    y = xhat if w is None else xhat * w.data
    if b is not None:
        y += b.data
    out = _node(y, tuple(t for t in (x, w, b) if t is not None), "layer_norm")
    if out.requires_grad:

        def _backward(g):
            if w is not None and w.requires_grad:
                w._accumulate(unbroadcast(g * xhat, w.shape))
            if b is not None and b.requires_grad:
                b._accumulate(unbroadcast(g, b.shape))
            if x.requires_grad:
                gy = g if w is None else g * w.data
                mean_gy = gy.mean(axis=axes, keepdims=True)
                mean_gyx = (gy * xhat).mean(axis=axes, keepdims=True)
                x._accumulate(rstd * (gy - mean_gy - xhat * mean_gyx))

        out._backward = _backward
    return out


# --- embedding -----------------------------------------------------------------------------


def embedding(indices, weight) -> Tensor:
    """weight[indices], as torch.nn.functional.embedding; indices of any shape.

    The gradient is a scatter-add of the output's rows into weight's rows, done by one
    stable sort and np.add.reduceat (several times faster than np.add.at)."""
    weight = as_tensor(weight)
    idx = np.asarray(indices.data if isinstance(indices, Tensor) else indices)
    if idx.dtype.kind not in "iu" and not (idx.size == 0 or np.array_equal(idx, np.round(idx))):
        raise ValueError(f"embedding indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    n = weight.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)].flat[0]
        raise IndexError(f"embedding index {bad} is out of range for {n} embeddings")
    out = _node(weight.data[idx], (weight,), "embedding")
    if out.requires_grad:

        def _backward(g):
            flat, rows = idx.reshape(-1), g.reshape(-1, g.shape[-1])
            order = np.argsort(flat, kind="stable")
            sorted_idx = flat[order]
            starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
            grad = np.zeros_like(weight.data, dtype=g.dtype)
            if len(flat):
                grad[sorted_idx[starts]] = np.add.reduceat(rows[order], starts, axis=0)
            weight._accumulate(grad)

        out._backward = _backward
    return out


# --- attention -----------------------------------------------------------------------------


def _attend(q, k, v, causal: bool, keep=None):
    """softmax(q k^T / sqrt(d) [causal mask]) (* keep) v, and the softmax weights P."""
    s = q @ np.swapaxes(k, -1, -2)
    s *= 1 / math.sqrt(q.shape[-1])
    if causal:  # torch's is_causal: row i sees columns 0..i (top-left aligned)
        s[..., np.triu(np.ones(s.shape[-2:], bool), 1)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s, out=s)
    p /= p.sum(axis=-1, keepdims=True)
    return (p if keep is None else p * keep) @ v, p


def _attend_backward(g, q, k, v, p, keep=None):
    """Gradients of q, k and v from the output's g and the kept weights P."""
    used = p if keep is None else p * keep
    dv = np.swapaxes(used, -1, -2) @ g
    dp = g @ np.swapaxes(v, -1, -2)
    if keep is not None:
        dp *= keep
    dp -= (dp * p).sum(axis=-1, keepdims=True)
    dp *= p  # the softmax's backward; masked columns have p == 0
    dp *= 1 / math.sqrt(q.shape[-1])
    return dp @ k, np.swapaxes(dp, -1, -2) @ q, dv


def scaled_dot_product_attention(q, k, v, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two axes, as
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)."""
    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    y, p = _attend(q.data, k.data, v.data, causal)
    out = _node(y, (q, k, v), "attention")
    if out.requires_grad:
        out._backward = lambda g: _send((q, k, v), _attend_backward(g, q.data, k.data, v.data, p))
    return out


def _heads(a: np.ndarray, heads: int, part: int) -> np.ndarray:
    """Part `part` (0 q, 1 k, 2 v) of a packed (N, T, 3E) array, as an (N, heads, T, E/heads)
    strided view."""
    n, t, e3 = a.shape
    e = e3 // 3
    return a[..., part * e : (part + 1) * e].reshape(n, t, heads, e // heads).transpose(0, 2, 1, 3)


def self_attention(qkv, heads: int, causal: bool = False, keep=None) -> tuple[Tensor, np.ndarray]:
    """Multi-head attention on a packed (N, T, 3E) projection [q | k | v], heads in
    contiguous blocks of E / heads as torch.nn.MultiheadAttention. Returns the (N, T, E)
    output, heads side by side again, and the softmax weights (N, heads, T, T) as an array.
    `keep`: an (N, heads, T, T) dropout scale of the weights, or None."""
    qkv = as_tensor(qkv)
    a = qkv.data
    if a.ndim != 3 or a.shape[-1] % (3 * heads):
        raise ValueError(f"self_attention: {a.shape} is not (N, T, 3 * E) with E % heads == 0")
    q, k, v = (_heads(a, heads, i) for i in range(3))
    y, p = _attend(q, k, v, causal, keep)
    n, t, e3 = a.shape
    out = _node(y.transpose(0, 2, 1, 3).reshape(n, t, e3 // 3), (qkv,), "attention")
    if out.requires_grad:

        def _backward(g):
            g = g.reshape(n, t, heads, -1).transpose(0, 2, 1, 3)
            grad = np.empty_like(a, dtype=g.dtype)
            for i, part in enumerate(_attend_backward(g, q, k, v, p, keep)):
                _heads(grad, heads, i)[...] = part
            qkv._accumulate(grad)

        out._backward = _backward
    return out, p
