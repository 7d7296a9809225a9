"""A trained model as an ONNX graph (opset 17), built with the `onnx` package.

Input `input`, output `output`, a dynamic batch dimension, float32 weights (cast from the
model's dtype). An MLP takes (batch, features); a sequential model (batch, *input_shape),
images for a CNN as torch takes them; a transformer int64 tokens (batch, tokens) with the
token count dynamic from 1 to its context, and gives (batch, tokens, vocab_size) logits.
Dropout is the identity (eval mode), so it has no node.
"""

from __future__ import annotations

import math

import numpy as np

from core import nn
from core.lm import TransformerLM

OPSET = 17  # LayerNormalization
IR_VERSION = 8  # the IR of opset 17: readable by onnxruntime releases from 1.12 on
ACTIVATION_OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}
_MODULE_OPS = {nn.ReLU: "Relu", nn.Tanh: "Tanh", nn.Sigmoid: "Sigmoid", nn.Flatten: "Flatten"}


class Graph:
    """Nodes and initializers in the order they are added; every node has one output,
    named after its op and a counter."""

    def __init__(self):
        from onnx import helper, numpy_helper  # the `export` extra, needed only here

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self.count = [], [], 0

    def const(self, array, dtype=np.float32) -> str:
        name = f"const_{len(self.initializers)}"
        tensor = self.numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name)
        self.initializers.append(tensor)
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values), np.int64)

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def linear(self, x: str, layer: nn.Linear) -> str:
        """x @ weight.T + bias over the last axis of any rank (MatMul, then Add)."""
        out = self.op("MatMul", x, self.const(layer.weight.data.T))
        return out if layer.bias is None else self.op("Add", out, self.const(layer.bias.data))

    def serialize(self, in_shape: list, in_type, out_rank: int) -> bytes:
        """The model from `input` to the last node's output, renamed `output`."""
        h = self.helper
        from onnx import TensorProto, checker

        if not self.nodes:  # a model of dropout alone
            self.op("Identity", "input")
        self.nodes[-1].output[0] = "output"
        out_shape = ["batch", *([None] * (out_rank - 1))]
        graph = h.make_graph(
            self.nodes,
            "shardgrad",
            [h.make_tensor_value_info("input", in_type, in_shape)],
            [h.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
            self.initializers,
        )
        opsets = [h.make_opsetid("", OPSET)]
        model = h.make_model(graph, opset_imports=opsets, producer_name="shardgrad")
        model.ir_version = IR_VERSION
        checker.check_model(model)
        return model.SerializeToString()


def onnx_bytes(model: nn.MLP | nn.Sequential | TransformerLM) -> bytes:
    """The serialized ONNX model of a core model (its current weights)."""
    from onnx import TensorProto

    g = Graph()
    if isinstance(model, TransformerLM):
        _lm(g, model)
        return g.serialize(["batch", "tokens"], TensorProto.INT64, 3)
    if isinstance(model, nn.MLP):
        _mlp(g, model)
        shape = [model.sizes[0]]
    else:
        _sequential(g, model)
        shape = list(model.input_shape)
    return g.serialize(["batch", *shape], TensorProto.FLOAT, 2)


def _mlp(g: Graph, model: nn.MLP) -> str:
    x = "input"
    for i, layer in enumerate(model.layers):
        x = g.linear(x, layer)
        if i < len(model.layers) - 1:
            x = g.op(ACTIVATION_OPS[model.activation], x)
    return x


def _sequential(g: Graph, model: nn.Sequential) -> str:
    x = "input"
    for m in model.modules:
        if isinstance(m, nn.Linear):
            x = g.linear(x, m)
        elif isinstance(m, nn.Conv2d):
            x = _conv(g, x, m)
        elif isinstance(m, nn.MaxPool2d):  # AvgPool2d too
            kernel = _pair(m.kernel_size)
            strides = kernel if m.stride is None else _pair(m.stride)
            pool = "AveragePool" if isinstance(m, nn.AvgPool2d) else "MaxPool"
            x = g.op(pool, x, kernel_shape=kernel, strides=strides)
        elif type(m) in _MODULE_OPS:
            x = g.op(_MODULE_OPS[type(m)], x)
        elif not isinstance(m, nn.Dropout):
            raise ValueError(f"no ONNX export for {type(m).__name__}")
    return x


def _conv(g: Graph, x: str, m: nn.Conv2d) -> str:
    bias = [] if m.bias is None else [g.const(m.bias.data)]
    kernel, pads = list(m.weight.shape[2:]), [*m.padding, *m.padding]  # begins, then ends
    weight = g.const(m.weight.data)
    return g.op("Conv", x, weight, *bias, kernel_shape=kernel, strides=list(m.stride), pads=pads)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if np.isscalar(v) else [int(k) for k in v]


def _lm(g: Graph, model: TransformerLM) -> str:
    """Embeddings of the tokens and of positions 0..T-1, the causal blocks, norm, head."""
    t = g.op("Shape", "input", start=1, end=2)  # [T], as a 1-D tensor
    positions = g.op("Slice", g.const(model.pos_emb.weight.data), g.ints([0]), t, g.ints([0]))
    x = g.op("Add", g.op("Gather", g.const(model.tok_emb.weight.data), "input"), positions)
    c = model.context
    upper = np.where(np.triu(np.ones((c, c), bool), 1), -np.inf, 0.0)  # row i sees 0..i
    tt = g.op("Concat", t, t, axis=0)
    mask = g.op("Slice", g.const(upper), g.ints([0, 0]), tt, g.ints([0, 1]))
    for block in model.blocks:
        x = g.op("Add", x, _attention(g, _norm(g, x, block.norm1), block.self_attn, mask))
        h = g.linear(_norm(g, x, block.norm2), block.linear1)
        h = _gelu(g, h) if block.activation == "gelu" else g.op("Relu", h)
        x = g.op("Add", x, g.linear(h, block.linear2))
    return g.linear(_norm(g, x, model.norm), model.head)


def _norm(g: Graph, x: str, norm: nn.LayerNorm) -> str:
    w, b = g.const(norm.weight.data), g.const(norm.bias.data)
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=norm.eps)


def _gelu(g: Graph, x: str) -> str:
    """x * (1 + erf(x / sqrt 2)) / 2, torch's exact GELU."""
    erf = g.op("Erf", g.op("Mul", x, g.const(1 / math.sqrt(2))))
    return g.op("Mul", g.op("Mul", x, g.op("Add", erf, g.const(1.0))), g.const(0.5))


def _attention(g: Graph, x: str, attn: nn.MultiheadAttention, mask: str) -> str:
    """softmax(q k^T / sqrt(d) + mask) v per head, heads in contiguous blocks of E / heads
    of the packed in_proj (as torch), then out_proj."""
    e, heads = attn.out_proj.weight.shape[0], attn.num_heads
    w, b = attn.in_proj_weight.data, attn.in_proj_bias.data
    split = g.ints([0, 0, heads, e // heads])  # (N, T, E) -> (N, T, heads, d)

    def part(i: int, perm: list[int]) -> str:
        rows = slice(i * e, (i + 1) * e)
        y = g.op("Add", g.op("MatMul", x, g.const(w[rows].T)), g.const(b[rows]))
        return g.op("Transpose", g.op("Reshape", y, split), perm=perm)

    q, k_t, v = part(0, [0, 2, 1, 3]), part(1, [0, 2, 3, 1]), part(2, [0, 2, 1, 3])
    scores = g.op("Mul", g.op("MatMul", q, k_t), g.const(1 / math.sqrt(e // heads)))
    weights = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
    y = g.op("Transpose", g.op("MatMul", weights, v), perm=[0, 2, 1, 3])
    return g.linear(g.op("Reshape", y, g.ints([0, 0, e])), attn.out_proj)
