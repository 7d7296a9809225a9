"""Export a trained model for use outside shardgrad: `onnx` or `torch`.

`torch` is one safetensors file: the weights under the names of the torch module that
its metadata describes (key `shardgrad.module`, JSON), so `load_state_dict(load_file(f))`
needs no renaming. Each module in the description is `{"type": <a torch.nn class>,
"args": [...], "kwargs": {...}}`; `Sequential` and `ModuleList` list theirs in `layers`.
An MLP and a sequential model are a `Sequential`; a transformer is `TransformerLM` (not a
torch.nn class: its `modules` are its named children, `forward` says how they connect).
The weights keep the model's dtype (named in `dtype`); torch is not needed to write it.

`onnx` is the graph of workers/onnx_graph.py (needs the `export` extra: the onnx package).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from core import nn
from workers.checkpoint import load_model_state, resolve_checkpoint
from workers.layers import two
from workers.model import build_model
from workers.spec import TrainingSpec

FORMATS = ("onnx", "torch")
SUFFIXES = {"onnx": ".onnx", "torch": ".safetensors"}
DESCRIPTION_KEY = "shardgrad.module"
TORCH_NAMES = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}
LM_FORWARD = (
    "x = tok_emb(tokens) + pos_emb(arange(T)); "
    "for block in blocks: x = block(x, src_mask=causal_mask(T), is_causal=True); "
    "return head(norm(x))"
)


class ExportUnavailable(RuntimeError):
    """The format's library is not installed (onnx: pip install 'shardgrad[export]')."""


@dataclass(frozen=True)
class Exported:
    data: bytes
    checkpoint: str  # the checkpoint exported, e.g. "step-40"
    format: str

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.format]


def export_run(
    spec: TrainingSpec, run_dir: str | os.PathLike, fmt: str, checkpoint: str | None = None
) -> Exported:
    """The model of the checkpoint `checkpoint` chooses in `run_dir` (as predict does:
    resolve_checkpoint's errors) in format `fmt`; a spec whose model does not take the
    checkpoint's parameters is a ValueError naming them."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    path = resolve_checkpoint(Path(run_dir), checkpoint)
    model = build_model(spec)
    model.load_state_dict(load_model_state(path))
    return Exported(export_model(spec, model, fmt), path.name, fmt)


def export_model(spec: TrainingSpec, model, fmt: str) -> bytes:
    """The bytes of `model` (the spec's, with its weights) in format `fmt`."""
    if fmt == "torch":
        return torch_safetensors(spec, model)
    try:
        import onnx  # noqa: F401 (the `export` extra; workers.onnx_graph builds with it)
    except ImportError:
        msg = "ONNX export needs the onnx package: pip install 'shardgrad[export]'"
        raise ExportUnavailable(msg) from None
    from workers.onnx_graph import onnx_bytes

    return onnx_bytes(model)


def torch_safetensors(spec: TrainingSpec, model) -> bytes:
    """The weights under the torch module's names, its description in the metadata."""
    state = model.state_dict()
    if isinstance(model, nn.MLP):  # layers.<i>.x -> <2i>.x: Linear layers between activations
        state = {_mlp_key(k): v for k, v in state.items()}
    description = {**torch_description(spec), "dtype": spec.dtype}
    metadata = {DESCRIPTION_KEY: json.dumps(description), "format": "pt"}
    return save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata=metadata)


def _mlp_key(key: str) -> str:
    _, i, name = key.split(".", 2)
    return f"{2 * int(i)}.{name}"


def _module(type_: str, *args, **kwargs) -> dict:
    out: dict = {"type": type_, "args": list(args)}
    if kwargs:
        out["kwargs"] = kwargs
    return out


def torch_description(spec: TrainingSpec) -> dict:
    """The torch module that the model's (renamed) state dict loads into, as JSON."""
    m = spec.model
    if m.type == "transformer":
        return _lm_description(m)
    if m.type == "mlp":
        layers = []
        for i, (n_in, n_out) in enumerate(pairwise(m.sizes)):
            if i:
                layers.append(_module(TORCH_NAMES[m.activation]))
            layers.append(_module("Linear", n_in, n_out))
        return {"type": "Sequential", "layers": layers, "input_shape": [m.sizes[0]]}
    layers = [_layer(layer, shape) for layer, shape in zip(m.layers, m.shapes(), strict=False)]
    return {"type": "Sequential", "layers": layers, "input_shape": list(m.input_shape)}


def _layer(layer, shape) -> dict:
    """One layer of a sequential spec as its torch.nn module, given its input shape."""
    t = layer.type
    if t == "linear":
        return _module("Linear", shape[0], layer.out_features, bias=layer.bias)
    if t == "conv2d":
        k, s, p = two(layer.kernel_size), two(layer.stride), two(layer.padding)
        return _module("Conv2d", shape[0], layer.out_channels, k, s, p, bias=layer.bias)
    if t in ("max_pool2d", "avg_pool2d"):
        k = two(layer.kernel_size)
        stride = k if layer.stride is None else two(layer.stride)
        return _module("MaxPool2d" if t == "max_pool2d" else "AvgPool2d", k, stride)
    if t == "dropout":
        return _module("Dropout", layer.p)
    if t == "flatten":
        return _module("Flatten")
    return _module(TORCH_NAMES[t])


def _lm_description(m) -> dict:
    e, block = m.d_model, {"batch_first": True, "norm_first": True}
    layer = _module("TransformerEncoderLayer", e, m.heads, m.dim_feedforward, m.dropout, "gelu")
    layer["kwargs"] = block
    modules = {
        "tok_emb": _module("Embedding", m.vocab_size, e),
        "pos_emb": _module("Embedding", m.context, e),
        "blocks": {"type": "ModuleList", "layers": [layer] * m.layers},
        "norm": _module("LayerNorm", e),
        "head": _module("Linear", e, m.vocab_size),
    }
    args = [m.vocab_size, m.context, e, m.heads, m.layers, m.dim_feedforward]
    return {"type": "TransformerLM", "args": args, "modules": modules, "forward": LM_FORWARD}
