"""shardgrad's autograd engine: NumPy arrays with PyTorch-style gradients.

from core import Tensor, Value, nn, optim, no_grad
import core.functional as F
"""

from core import functional, nn, optim
from core.gradcheck import gradcheck
from core.graph import backward_with_graph, export_graph, to_dot
from core.tensor import Tensor, concatenate, is_grad_enabled, no_grad, stack, unbroadcast
from core.value import Value

__all__ = [
    "Tensor",
    "Value",
    "backward_with_graph",
    "concatenate",
    "export_graph",
    "functional",
    "gradcheck",
    "is_grad_enabled",
    "nn",
    "no_grad",
    "optim",
    "stack",
    "to_dot",
    "unbroadcast",
]
