"""The computational graph behind a result, as JSON-ready data and as Graphviz DOT.

`export_graph(root)` gives the classic picture of backpropagation: one node per value
of the computation, with the operation that made it, its inputs, its output and the
gradient that reached it. It serves Tensor and Value graphs alike:

    {"root": 4, "nodes": [{"id", "operation", "shape", "output", "gradient", "inputs"}]}

* Ids are positions in topological order (inputs before outputs, the root last), so a
  graph always gets the same ids and a value used twice is one node, listed once.
  `inputs` keeps the op's argument order, repeats included (`a + a` has [i, i]).
* Leaves are "parameter" for a Tensor that requires grad, "source" for data and
  constants. Value has no requires_grad, so its leaves are "source" unless they are
  passed in `parameters` (which works for Tensors too).
* Arrays of at most `max_values` elements are nested lists (a scalar is a number);
  larger ones become {"shape", "min", "max", "mean", "norm"}. `gradient` is null
  where there is none. JSON has no NaN or infinity, so they are written as the
  strings "NaN", "Infinity" and "-Infinity", which Python's float() and JavaScript's
  Number() read back.

The Tensor engine frees intermediate gradients after backward (as PyTorch does), so
`backward_with_graph(loss)` is the way to get a graph with every gradient filled in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from core.tensor import Tensor, topological_order

__all__ = ["backward_with_graph", "export_graph", "to_dot"]


def export_graph(root, *, max_values: int = 64, parameters=(), layers=None) -> dict:
    """The graph that produced `root` (a Tensor or Value), with current outputs and grads.

    Iterative, so graphs 100k nodes deep work. Gradients are whatever `.grad` holds
    now: null for Tensor intermediates whose gradient backward freed. `parameters` may
    be a mapping of names to parameters (`dict(model.named_parameters())`): their nodes
    then also carry a "name".

    `layers`, a mapping of names to intermediate results (a model's sub-layer outputs),
    groups the graph by them: only leaves, those results and the root stay nodes, named;
    every other op joins the first kept node it feeds, whose "operation" then lists the
    ops in order ("linear+attention+linear"), and whose inputs are the kept nodes and
    leaves it was computed from.
    """
    if max_values < 0:
        raise ValueError(f"max_values must be >= 0, got {max_values}")
    topo = topological_order(root)
    named = (
        parameters.items() if isinstance(parameters, Mapping) else ((None, p) for p in parameters)
    )
    chosen = {id(p): name for name, p in named}
    ops, inputs = {id(n): n._op for n in topo}, {id(n): list(n._prev) for n in topo}
    if layers is not None:
        chosen |= {id(t): name for name, t in layers.items()}
        topo = [n for n in topo if not n._prev or id(n) in chosen or n is root]
        for node in topo:
            if node._prev:
                ops[id(node)], inputs[id(node)] = _grouped(node, chosen)
    ids = {id(node): i for i, node in enumerate(topo)}
    nodes = []
    for i, node in enumerate(topo):
        if node._prev:
            op = ops[id(node)]
        else:
            parameter = id(node) in chosen or getattr(node, "requires_grad", False)
            op = "parameter" if parameter else "source"
        nodes.append(
            {
                "id": i,
                "operation": op,
                "shape": list(np.shape(node.data)),
                "output": _values(node.data, max_values),
                "gradient": _values(node.grad, max_values),
                "inputs": [ids[id(p)] for p in inputs[id(node)]],
            }
        )
        if chosen.get(id(node)) is not None:
            nodes[-1]["name"] = chosen[id(node)]
    return {"root": len(topo) - 1, "nodes": nodes}


def _grouped(node, kept: dict) -> tuple[str, list]:
    """The ops that made `node` since the kept nodes and leaves it reads, joined by "+" in
    topological order, and those kept nodes and leaves (each once, in order of use)."""
    ops, inputs, seen = [node._op], [], {id(node)}
    order = []  # absorbed ops, outputs before their inputs
    stack = list(reversed(node._prev))
    while stack:
        p = stack.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p._prev or id(p) in kept:
            inputs.append(p)
        else:
            order.append(p._op)
            stack.extend(reversed(p._prev))
    return "+".join([*reversed(order), *ops]), inputs


def backward_with_graph(loss, *, max_values: int = 64, parameters=(), layers=None) -> dict:
    """`loss.backward()`, then `export_graph(loss)` with every node's gradient filled in.

    Tensor intermediates get `retain_grad()` first, so they keep their `.grad`
    afterwards, as if the caller had asked for it; they go when the graph goes.
    """
    if isinstance(loss, Tensor):  # Value keeps every gradient anyway
        for node in topological_order(loss):
            if not node.is_leaf:
                node.retain_grad()
    loss.backward()
    return export_graph(loss, max_values=max_values, parameters=parameters, layers=layers)


# --- numbers as JSON -------------------------------------------------------------------------


def _number(x) -> float | str:
    x = float(x)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _values(x, max_values: int):
    """Nested lists for small arrays, summary statistics for large ones, None for None."""
    if x is None:
        return None
    if isinstance(x, float) and max_values:  # Value's data and grad
        return _number(x)
    a = np.asarray(x)
    if a.size <= max_values:
        finite = np.isfinite(a)
        if finite.all():
            return a.tolist()
        out = a.astype(object)
        out[~finite] = [_number(v) for v in a[~finite]]
        return out.tolist()
    a = a.astype(np.float64, copy=False)  # norms of large float32 arrays must not overflow
    with np.errstate(all="ignore"):
        lo, hi, mean, norm = map(_number, (a.min(), a.max(), a.mean(), np.linalg.norm(a.ravel())))
    return {"shape": list(a.shape), "min": lo, "max": hi, "mean": mean, "norm": norm}


# --- Graphviz --------------------------------------------------------------------------------


def to_dot(graph: dict) -> str:
    """Graphviz DOT for an exported graph: one record per node, edges input -> op.

    A record shows the id and operation, the shape, and the output and gradient
    (numbers for scalars, the norm for tensors). The fill colour grows with the
    gradient's norm on a log scale across the graph: white for no gradient, grey for
    exactly zero, red for a non-finite one.
    """
    nodes = graph["nodes"]
    norms = {n["id"]: _norm(n["gradient"]) for n in nodes}
    fill = _fill_colours(norms)
    lines = [
        "digraph graph_export {",
        "  rankdir=LR;",
        '  node [shape=record, style=filled, fontname="Helvetica"];',
    ]
    for n in nodes:
        shape = "scalar" if not n["shape"] else "shape " + "x".join(map(str, n["shape"]))
        fields = [
            f"#{n['id']} {n['operation']}" + (f" {n['name']}" if "name" in n else ""),
            shape,
            "out " + _brief(n["output"]),
            "grad " + _brief(n["gradient"]),
        ]
        label = "{" + " | ".join(map(_escape, fields)) + "}"
        lines.append(f'  n{n["id"]} [label="{label}", fillcolor="{fill[n["id"]]}"];')
    lines += [f"  n{i} -> n{n['id']};" for n in nodes for i in n["inputs"]]
    lines.append("}")
    return "\n".join(lines) + "\n"


# Literal text inside a quoted record label: quotes, and the record's own syntax.
_ESCAPES = str.maketrans({ch: "\\" + ch for ch in '\\"{}|<>'} | {"\n": "\\n"})


def _escape(text: str) -> str:
    return text.translate(_ESCAPES)


def _norm(values) -> float | None:
    """The norm of an exported output or gradient (a number, nested lists or a summary)."""
    if values is None:
        return None
    if isinstance(values, dict):
        return float(values["norm"])
    if isinstance(values, int | float | str):
        return abs(float(values))
    with np.errstate(all="ignore"):
        return float(np.linalg.norm(np.asarray(values, dtype=np.float64).ravel()))


def _brief(values) -> str:
    if values is None:
        return "none"
    if isinstance(values, str):
        return values
    if isinstance(values, int | float):
        return f"{values:.4g}"
    return f"norm {_norm(values):.4g}"


def _fill_colours(norms: dict) -> dict:
    logs = [math.log10(v) for v in norms.values() if v is not None and 0 < v < math.inf]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)
    colours = {}
    for i, v in norms.items():
        if v is None:
            colours[i] = "white"
        elif not math.isfinite(v):
            colours[i] = "red"
        elif v == 0:
            colours[i] = "gray90"
        else:  # an orange whose saturation follows log10 |grad|
            t = (math.log10(v) - lo) / (hi - lo) if hi > lo else 1.0
            colours[i] = f"0.08 {0.15 + 0.75 * t:.3f} 1.000"
    return colours
