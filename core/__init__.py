"""shardgrad's autograd engine: NumPy arrays with PyTorch-style gradients.

from core import Tensor, Value, nn, optim, no_grad
import core.functional as F
"""

from core import functional, nn, optim
from core.gradcheck import gradcheck
from core.tensor import Tensor, concatenate, is_grad_enabled, no_grad, stack, unbroadcast
from core.value import Value

__all__ = [
    "Tensor",
    "Value",
    "concatenate",
    "functional",
    "gradcheck",
    "is_grad_enabled",
    "nn",
    "no_grad",
    "optim",
    "stack",
    "unbroadcast",
]
