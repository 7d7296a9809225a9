"""Modules: parameters in a stable order, state dicts that map 1:1 to PyTorch's.

Why the initialisation matters (He for relu, Glorot for tanh and sigmoid, zero bias):

* Symmetry: units that start with equal weights get equal gradients and stay copies
  of each other forever, so weights are drawn at random (seeded, for reproducible runs).
  Biases can start at zero because the random weights already break the symmetry.
* Vanishing and exploding gradients: each layer multiplies the signal, forwards and
  backwards, by roughly fan_in * Var(w) * (the activation's mean squared slope). Keeping
  that product near 1 keeps activations and gradients at the same scale in every layer.
  relu passes half of its inputs, so He uses Var(w) = 2 / fan_in; tanh and sigmoid are
  close to linear near zero and Glorot balances both directions with
  Var(w) = 2 / (fan_in + fan_out). Too small and the signal dies with depth; too large
  and tanh/sigmoid saturate (gradients vanish again) or relu activations blow up.
* Dead neurons: a relu unit whose pre-activation is negative for every input gets no
  gradient and never recovers. Scaled weights and zero biases keep units alive at the
  start; a large negative `bias_init` kills them on purpose (for experiments).
"""

from __future__ import annotations

import contextlib
import threading
from itertools import pairwise

import numpy as np

from core import functional as F
from core.conv import pair
from core.tensor import ACTIVATIONS, Tensor, as_tensor

__all__ = [
    "GELU",
    "MLP",
    "AvgPool2d",
    "Conv2d",
    "Dropout",
    "Embedding",
    "Flatten",
    "LayerNorm",
    "Linear",
    "MaxPool2d",
    "Module",
    "MultiheadAttention",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "TransformerEncoderLayer",
    "sample_context",
]

_samples = threading.local()  # the rows being computed: see `sample_context`


@contextlib.contextmanager
def sample_context(epoch: int, rows):
    """Tell the random layers (Dropout) which samples the batch's rows are: `rows[i]` is
    the dataset index of row i, drawn in `epoch`. Each row's mask is then a function of
    (seed, epoch, rows[i], layer) only, so the result does not depend on how a batch is
    split across workers. Outside a context, a Dropout in training mode numbers its calls
    and the rows 0..N-1 (still reproducible, as torch.manual_seed would make it)."""
    saved = getattr(_samples, "value", None)
    _samples.value = (int(epoch), np.asarray(rows, np.int64))
    try:
        yield
    finally:
        _samples.value = saved


class Module:
    """Base class. Parameters are the Tensor attributes, then those of sub-modules (also
    inside lists), in assignment order; names are dotted paths as in PyTorch."""

    training = True  # train() / eval() set it on the module and every sub-module

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def train(self, mode: bool = True) -> Module:
        self.training = bool(mode)
        for _, child in self._children():
            if isinstance(child, Module):
                child.train(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _children(self):
        """(name, Tensor or Module) pairs in assignment order; lists of modules by index."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor | Module):
                yield name, value
            elif isinstance(value, list | tuple):
                yield from (
                    (f"{name}.{i}", m) for i, m in enumerate(value) if isinstance(m, Module)
                )

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Tensor]]:
        """(dotted name, tensor) pairs; a tensor shared by two modules is listed once."""
        out, seen = [], set()
        for name, value in self._children():
            if isinstance(value, Tensor):
                found = [(prefix + name, value)]
            else:
                found = value.named_parameters(f"{prefix}{name}.")
            for item in found:
                if id(item[1]) not in seen:
                    seen.add(id(item[1]))
                    out.append(item)
        return out

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameter arrays, by name, in parameter order."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state_dict) -> None:
        """Copy arrays into the parameters in place (keeping their dtype), after checking
        that the names and shapes match exactly."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in params]
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        arrays = {
            k: np.asarray(v.data if isinstance(v, Tensor) else v) for k, v in state_dict.items()
        }
        for k, p in params.items():
            if k in arrays and arrays[k].shape != p.shape:
                problems.append(
                    f"shape mismatch for {k}: checkpoint has {arrays[k].shape}, model has {p.shape}"
                )
        if problems:
            raise ValueError(
                f"cannot load state dict into {type(self).__name__}: " + "; ".join(problems)
            )
        for k, p in params.items():
            if not p.data.flags.writeable:  # e.g. arrays shared read-only by Ray
                p.data = p.data.copy()
            p.data[...] = arrays[k]


def init_weight(rng, shape, fan_in: int, fan_out: int, init: str, dtype) -> Tensor:
    """He (normal, std sqrt(2 / fan_in)), Glorot (uniform, limit sqrt(6 / (in + out))) or
    torch.nn.Linear's default "uniform" (limit 1 / sqrt(fan_in))."""
    if init == "he":
        w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif init in ("glorot", "uniform"):
        limit = np.sqrt(6.0 / (fan_in + fan_out) if init == "glorot" else 1.0 / fan_in)
        w = rng.uniform(-limit, limit, shape)
    else:
        raise ValueError(f"init must be 'he', 'glorot' or 'uniform', got {init!r}")
    return Tensor(w.astype(dtype), requires_grad=True)


class Linear(Module):
    """y = x @ weight.T + bias with weight (out_features, in_features), as torch.nn.Linear.

    init="he" (normal, std sqrt(2 / in)) suits relu; init="glorot" (uniform, limit
    sqrt(6 / (in + out))) suits tanh and sigmoid. The bias starts at zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype=np.float64,
        rng: np.random.Generator | int | None = None,
        init: str = "he",
    ):
        rng = np.random.default_rng(rng)
        shape = (out_features, in_features)
        self.weight = init_weight(rng, shape, in_features, out_features, init, dtype)
        self.bias = Tensor(np.zeros(out_features, dtype), requires_grad=True) if bias else None

    def forward(self, x, activation: str | None = None) -> Tensor:
        return F.linear(x, self.weight, self.bias, activation)


class Conv2d(Module):
    """2-D convolution over NCHW input, as torch.nn.Conv2d: weight (out, in, kh, kw), bias
    (out,). Initialised as Linear, with fan_in = in * kh * kw (He) and a zero bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        seed: int | None = None,
        *,
        dtype=np.float64,
        rng: np.random.Generator | None = None,
        init: str = "he",
    ):
        if seed is not None and rng is not None:
            raise ValueError("pass either seed or rng, not both")
        rng = np.random.default_rng(seed if rng is None else rng)
        kh, kw = pair(kernel_size, "kernel_size")
        self.stride, self.padding = pair(stride, "stride"), pair(padding, "padding")
        shape = (out_channels, in_channels, kh, kw)
        fan_in, fan_out = in_channels * kh * kw, out_channels * kh * kw
        self.weight = init_weight(rng, shape, fan_in, fan_out, init, dtype)
        self.bias = Tensor(np.zeros(out_channels, dtype), requires_grad=True) if bias else None

    def forward(self, x, activation: str | None = None) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, activation)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None):
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride)


class AvgPool2d(MaxPool2d):
    def forward(self, x) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride)


class Flatten(Module):
    """(N, ...) -> (N, everything else), as torch.nn.Flatten()."""

    def forward(self, x) -> Tensor:
        x = as_tensor(x)
        out = x.reshape(len(x.data), -1)
        out._op = "flatten"  # a graph names the layer, not the array operation
        return out


class Dropout(Module):
    """Zeroes elements with probability p in training mode (scaling the rest by 1/(1-p));
    the identity in eval mode. The mask of a sample is a pure function of (seed, epoch,
    sample index, layer): see `sample_context`. `layer` defaults to the module's index in
    its Sequential."""

    def __init__(self, p: float = 0.5, seed: int = 0, layer: int | None = None):
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.seed, self.layer, self.calls = float(p), int(seed), layer, 0

    def forward(self, x) -> Tensor:
        x = as_tensor(x)
        scale = self.scale(x.shape, x.dtype)
        return x if scale is None else x._unary(x.data * scale, "dropout", lambda: scale)

    def scale(self, shape, dtype) -> np.ndarray | None:
        """What this layer multiplies an input of `shape` by (0 or 1/(1-p) per element),
        or None where it is the identity (eval mode, p == 0)."""
        if not self.training or self.p == 0:
            return None
        context = getattr(_samples, "value", None)
        if context is None:  # no trainer: number the calls instead of the epochs
            context, self.calls = (self.calls, np.arange(shape[0])), self.calls + 1
        epoch, rows = context
        return F.dropout_scale(self.p, (self.seed, epoch, self.layer or 0), rows, shape, dtype)


class _Activation(Module):
    name = ""

    def forward(self, x) -> Tensor:
        return getattr(as_tensor(x), self.name)()


class ReLU(_Activation):
    name = "relu"


class Tanh(_Activation):
    name = "tanh"


class Sigmoid(_Activation):
    name = "sigmoid"


class Sequential(Module):
    """Modules applied in order; parameter names start with the module index ("0.weight"),
    as in torch.nn.Sequential. A Linear or Conv2d followed by an activation runs as one
    fused node ("conv2d+relu"), with the same result as the two apart."""

    def __init__(self, *modules: Module, input_shape=None):
        """`input_shape`, e.g. (1, 28, 28): rows of flat features are reshaped to it first
        (flat data feeds a CNN); None takes the input as it comes, as torch does."""
        self.modules = list(modules)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        for i, m in enumerate(self.modules):
            if isinstance(m, Dropout) and m.layer is None:
                m.layer = i

    def _children(self):
        return ((str(i), m) for i, m in enumerate(self.modules))

    def forward(self, x) -> Tensor:
        out = as_tensor(x)
        for _, out in self.layer_outputs(x):  # noqa: B007 (the last output is the result)
            pass
        return out

    def layer_outputs(self, x):
        """Yield (index, output) after each module; a fused pair yields once, with the
        activation's index. The one forward pass, for callers that inspect layers."""
        x = as_tensor(x)
        if self.input_shape is not None and x.shape[1:] != self.input_shape:
            x = x.reshape(len(x.data), *self.input_shape)
        i, ms = 0, self.modules
        while i < len(ms):
            m, nxt = ms[i], ms[i + 1] if i + 1 < len(ms) else None
            if isinstance(m, Linear | Conv2d) and isinstance(nxt, _Activation):
                x, i = m(x, activation=nxt.name), i + 1
            else:
                x = m(x)
            yield i, x
            i += 1

    def __getitem__(self, i: int) -> Module:
        return self.modules[i]

    def __len__(self) -> int:
        return len(self.modules)


class MLP(Module):
    """Fully connected net: Linear layers with `activation` between them, none after the last.

    MLP([2, 16, 16, 1]) has parameters layers.0.weight, layers.0.bias, ..., layers.2.bias,
    where i counts Linear layers only. The equivalent torch.nn.Sequential(Linear, ReLU,
    Linear, ReLU, Linear) puts the Linear layers at indices 0, 2, 4, so a loader maps
    layers.<i>.<name> to <2i>.<name>. Each hidden layer is one fused "linear+<activation>"
    graph node.

    Weights use He init for relu and Glorot for tanh/sigmoid (see the module docstring),
    drawn from `rng` (a numpy Generator) or `seed`; every bias starts at `bias_init`.
    """

    def __init__(
        self,
        sizes,
        activation: str = "relu",
        *,
        dtype=np.float64,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        bias_init: float = 0.0,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {sizes}")
        if seed is not None and rng is not None:
            raise ValueError("pass either seed or rng, not both")
        rng = np.random.default_rng(seed if rng is None else rng)
        init = "he" if activation == "relu" else "glorot"
        self.sizes = tuple(int(n) for n in sizes)
        self.activation = activation
        self.layers = [
            Linear(n_in, n_out, dtype=dtype, rng=rng, init=init)
            for n_in, n_out in pairwise(self.sizes)
        ]
        if bias_init:
            self.init_bias(bias_init)

    def init_bias(self, value: float) -> None:
        """Set every bias to `value` (a large negative value makes dead relu units)."""
        for layer in self.layers:
            layer.bias.data[...] = value

    def forward(self, x) -> Tensor:
        *_, out = self.layer_outputs(x)
        return out

    def layer_outputs(self, x):
        """Yield each layer's output in order: the hidden layers' activations, then the
        model's output. The one forward pass, for callers that inspect the hidden layers."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = F.linear(x, layer.weight, layer.bias, None if i == last else self.activation)
            yield x


# --- sequence models -------------------------------------------------------------------------


class Embedding(Module):
    """A table of `num_embeddings` vectors, looked up by integer index, as torch.nn.Embedding:
    weight (num_embeddings, embedding_dim), drawn from N(0, 1) as torch draws it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype=np.float64, rng=None):
        w = np.random.default_rng(rng).standard_normal((num_embeddings, embedding_dim))
        self.weight = Tensor(w.astype(dtype), requires_grad=True)

    def forward(self, indices) -> Tensor:
        return F.embedding(indices, self.weight)


class LayerNorm(Module):
    """Normalise over the last axes, then scale by `weight` (ones) and shift by `bias`
    (zeros), as torch.nn.LayerNorm."""

    def __init__(self, normalized_shape, eps: float = 1e-5, *, dtype=np.float64):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape, self.eps = tuple(int(n) for n in shape), float(eps)
        self.weight = Tensor(np.ones(self.normalized_shape, dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(self.normalized_shape, dtype), requires_grad=True)

    def forward(self, x) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x) -> Tensor:
        return F.gelu(x, self.approximate)


class MultiheadAttention(Module):
    """Self-attention on batch-first (N, T, E) input, as torch.nn.MultiheadAttention(
    embed_dim, num_heads, dropout, batch_first=True) called with query = key = value:
    in_proj_weight (3E, E) (Glorot, as torch), in_proj_bias (3E,), out_proj (E -> E).
    `dropout` drops attention weights, keyed by (seed, epoch, sample, layer) as Dropout."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        dtype=np.float64,
        rng=None,
        seed: int = 0,
        layer: int = 0,
    ):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        rng = np.random.default_rng(rng)
        e, self.num_heads = embed_dim, num_heads
        self.in_proj_weight = init_weight(rng, (3 * e, e), e, 3 * e, "glorot", dtype)
        self.in_proj_bias = Tensor(np.zeros(3 * e, dtype), requires_grad=True)
        self.out_proj = Linear(e, e, dtype=dtype, rng=rng, init="uniform")
        self.dropout = Dropout(dropout, seed, layer)

    def forward(self, x, causal: bool = False, need_weights: bool = False):
        """The (N, T, E) output; with `need_weights`, also the softmax weights as an
        (N, heads, T, T) array (torch's average_attn_weights=False)."""
        x = as_tensor(x)
        if x.ndim != 3:
            raise ValueError(f"MultiheadAttention expects batch-first (N, T, E), got {x.shape}")
        n, t = x.shape[:2]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        keep = self.dropout.scale((n, self.num_heads, t, t), x.dtype)
        y, weights = F.self_attention(qkv, self.num_heads, causal, keep)
        out = self.out_proj(y)
        return (out, weights) if need_weights else out


class TransformerEncoderLayer(Module):
    """torch.nn.TransformerEncoderLayer(..., batch_first=True), pre-LN by default:
    x + attn(norm1(x)), then x + linear2(act(linear1(norm2(x)))), with dropout after the
    attention weights, the activation and each sub-layer. Parameter names are torch's.
    The dropout masks are keyed by (seed, epoch, sample, 4 * layer + site)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "gelu",
        norm_first: bool = True,
        layer_norm_eps: float = 1e-5,
        *,
        dtype=np.float64,
        rng=None,
        seed: int = 0,
        layer: int = 0,
    ):
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        rng, site = np.random.default_rng(rng), 4 * layer
        kw = {"dtype": dtype, "rng": rng}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, **kw, seed=seed, layer=site)
        self.linear1 = Linear(d_model, dim_feedforward, **kw, init="uniform")
        self.dropout = Dropout(dropout, seed, site + 1)
        self.linear2 = Linear(dim_feedforward, d_model, **kw, init="uniform")
        self.norm_first, self.activation = bool(norm_first), activation
        self.norm1 = LayerNorm(d_model, layer_norm_eps, dtype=dtype)
        self.norm2 = LayerNorm(d_model, layer_norm_eps, dtype=dtype)
        self.dropout1 = Dropout(dropout, seed, site + 2)
        self.dropout2 = Dropout(dropout, seed, site + 3)

    def forward(self, x, causal: bool = False) -> Tensor:
        *_, (_, out) = self.sublayers(x, causal)
        return out

    def sublayers(self, x, causal: bool = False, weights: list | None = None):
        """Yield (name, output) of each sub-layer in order, the last being the layer's
        output: pre-LN norm1, self_attn, add1 (the residual), norm2, linear1, gelu (or
        relu), linear2, add2; post-LN self_attn, add1, norm1, linear1, ..., add2, norm2.
        Dropouts belong to the sub-layer they follow. The one forward pass, for callers
        that look inside it; `weights`, a list, receives the attention's softmax weights
        (N, heads, T, T)."""
        x = as_tensor(x)
        a = self.norm1(x) if self.norm_first else x
        if self.norm_first:
            yield "norm1", a
        a, p = self.self_attn(a, causal, need_weights=True)
        if weights is not None:
            weights.append(p)
        yield "self_attn", (a := self.dropout1(a))
        yield "add1", (x := x + a)
        if not self.norm_first:
            yield "norm1", (x := self.norm1(x))
        h = self.norm2(x) if self.norm_first else x
        if self.norm_first:
            yield "norm2", h
        if self.activation == "relu":  # one fused node
            yield "linear1+relu", (h := self.linear1(h, activation="relu"))
        else:
            yield "linear1", (h := self.linear1(h))
            yield "gelu", (h := F.gelu(h))
        yield "linear2", (h := self.dropout2(self.linear2(self.dropout(h))))
        yield "add2", (x := x + h)
        if not self.norm_first:
            yield "norm2", self.norm2(x)
