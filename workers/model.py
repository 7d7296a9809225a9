"""What a spec means in `core` terms: the model, its optimizer, its loss, and one gradient sum.

The same functions serve the Ray workers, the coordinator's evaluation and the
single-process reference loop, so all three compute exactly the same thing.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import TYPE_CHECKING

import numpy as np

import core.functional as F
from core import Tensor, nn, no_grad, optim

if TYPE_CHECKING:
    from workers.spec import TrainingSpec

LOSSES = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
    "bce": F.binary_cross_entropy_with_logits,
}


def build_model(spec: TrainingSpec) -> nn.MLP:
    m = spec.model
    return nn.MLP(
        m.sizes,
        activation=m.activation,
        dtype=np.dtype(spec.dtype),
        seed=spec.seed,
        bias_init=m.bias_init,
    )


def build_optimizer(spec: TrainingSpec, params) -> optim.SGD | optim.Adam:
    o = spec.optimizer
    if o.type == "sgd":
        return optim.SGD(
            params,
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
        )
    return optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def set_parameters(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Point the model's parameters at `arrays` (no copy: workers only read them)."""
    for p, a in zip(model.parameters(), arrays, strict=True):
        p.data = a


def grad_sum(model: nn.Module, loss: str, X: np.ndarray, y: np.ndarray, params=None):
    """Sum (not mean) of per-sample gradients and losses over the rows of X.

    Returns ``(grads, loss_sum)``; sums from several pieces add up to the sum
    over their union, which is what makes the data-parallel step exact. `params`: the
    model's `parameters()`, from a caller that keeps them (walking the modules every step
    costs as much as a tiny model's step).
    """
    params = model.parameters() if params is None else params
    if len(X) == 0:
        return [np.zeros_like(p.data) for p in params], 0.0
    for p in params:
        p.grad = None
    out = LOSSES[loss](model(Tensor(X)), y, reduction="sum")
    out.backward()
    return [p.grad for p in params], float(out.data)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is what the user sees."""


class Diverged(TrainingError):
    pass


def average_and_step(params, opt, grads, n: int, loss_sum: float, step: int):
    """Divide the batch's gradient sums by its size, check them, step the optimizer.

    Every step strategy ends its step here (the coordinator's, and each replica's), so
    they all perform the same floating-point operations in the same order. Returns
    (mean loss, gradient norm) and leaves each parameter's `.grad` the averaged gradient;
    raises Diverged with the weights unchanged."""
    loss = loss_sum / n
    sq = 0.0
    for p, g in zip(params, grads, strict=True):
        g /= n
        p.grad = g
        sq += float(np.vdot(g, g))
    grad_norm = float(np.sqrt(sq))
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        raise Diverged(f"diverged at step {step + 1} (loss={loss:g})")
    opt.step()
    return loss, grad_norm


def param_bytes(sizes: list[int], dtype: str) -> int:
    """The bytes of an MLP's parameters: weights and biases of each Linear layer."""
    count = sum((a + 1) * b for a, b in zip(sizes, sizes[1:], strict=False))
    return count * np.dtype(dtype).itemsize


def blas_threads(cpus_per_worker: float) -> int:
    """The BLAS threads of a gradient computation: one per whole CPU of a worker's share.
    A worker and an in-process run use the same number, so their matmuls are the same."""
    return max(1, math.floor(cpus_per_worker))


@functools.cache
def _blas():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # finds the BLAS libraries once per process


@contextlib.contextmanager
def blas_limit(threads: int):
    """Compute under `threads` BLAS threads, restored afterwards. Per step, so a library
    already at that count is left alone (half the cost of `ThreadpoolController.limit`)."""
    libs = [lib for lib in _blas().lib_controllers if lib.num_threads != threads]
    before = [lib.num_threads for lib in libs]
    for lib in libs:
        lib.set_num_threads(threads)
    try:
        yield
    finally:
        for lib, n in zip(libs, before, strict=True):
            lib.set_num_threads(n)


def evaluate(model: nn.Module, loss: str, X: np.ndarray, y: np.ndarray, classify: bool) -> dict:
    """Mean loss over X, and accuracy when the task is classification; no graph is built."""
    if len(X) == 0:
        return {"loss": None, "accuracy": None}
    with no_grad():
        out = model(Tensor(X))
        value = float(LOSSES[loss](out, y, reduction="mean").data)
    result = {"loss": value, "accuracy": None}
    if classify:
        result["accuracy"] = float(
            np.mean(predict_classes(out.data, loss) == y.reshape(len(y), -1)[:, 0])
        )
    return result


def predict_classes(outputs: np.ndarray, loss: str) -> np.ndarray:
    """Class index per row: argmax of the logits, or a threshold on a single output."""
    if outputs.shape[1] > 1:
        return outputs.argmax(axis=1)
    threshold = 0.0 if loss == "bce" else 0.5  # bce outputs logits, mse outputs probabilities
    return (outputs[:, 0] > threshold).astype(np.int64)
