"""What a spec means in `core` terms: the model, its optimizer, its loss, and one gradient sum.

The same functions serve the Ray workers, the coordinator's evaluation and the
single-process reference loop, so all three compute exactly the same thing.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np
from pydantic import TypeAdapter

import core.functional as F
from core import Tensor, fused, nn, no_grad, optim
from core.lm import TransformerLM
from core.tensor import ACTIVATIONS
from workers.spec import ModelSpec, TrainingSpec

LOSSES = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
    "bce": F.binary_cross_entropy_with_logits,
}


def build_model(spec: TrainingSpec) -> nn.MLP | nn.Sequential | TransformerLM:
    """The spec's model with its initial weights, in eval mode (`grad_sum` trains it for
    its one pass, so predictions and evaluations never see dropout)."""
    return model_from(spec.model, spec.dtype, spec.seed)


def model_from(model: ModelSpec, dtype: str, seed: int) -> nn.MLP | nn.Sequential | TransformerLM:
    if model.type == "transformer":
        return TransformerLM(
            model.vocab_size,
            model.context,
            model.d_model,
            model.heads,
            model.layers,
            model.dim_feedforward,
            model.dropout,
            dtype=np.dtype(dtype),
            seed=seed,
        ).eval()
    if model.type == "mlp":
        built = nn.MLP(
            model.sizes,
            activation=model.activation,
            dtype=np.dtype(dtype),
            seed=seed,
            bias_init=model.bias_init,
        )
        return built.eval()
    rng, shapes = np.random.default_rng(seed), model.shapes()
    modules = [
        _module(model.layers, i, shape, np.dtype(dtype), rng, seed)
        for i, shape in enumerate(shapes[:-1])
    ]
    return nn.Sequential(*modules, input_shape=model.input_shape).eval()


def _module(layers, i: int, shape, dtype, rng, seed: int) -> nn.Module:
    """Layer i of a sequential spec, given its input shape; weights drawn from `rng` in
    layer order. He init, or Glorot when the next activation is tanh or sigmoid (as MLP)."""
    layer = layers[i]
    if layer.type in ("linear", "conv2d"):
        act = next((la.type for la in layers[i + 1 :] if la.type in ACTIVATIONS), "relu")
        init = "he" if act == "relu" else "glorot"
        if layer.type == "linear":
            return nn.Linear(
                shape[0], layer.out_features, layer.bias, dtype=dtype, rng=rng, init=init
            )
        return nn.Conv2d(
            shape[0],
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.bias,
            dtype=dtype,
            rng=rng,
            init=init,
        )
    if layer.type in ("max_pool2d", "avg_pool2d"):
        pool = nn.MaxPool2d if layer.type == "max_pool2d" else nn.AvgPool2d
        return pool(layer.kernel_size, layer.stride)
    if layer.type == "dropout":
        return nn.Dropout(layer.p, seed=seed, layer=i)
    if layer.type == "flatten":
        return nn.Flatten()
    return MODULES[layer.type]()


MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def worker_config(spec: TrainingSpec) -> dict:
    """What a worker needs to rebuild the model and its loss: plain data, cheap to ship."""
    model = spec.model.model_dump(mode="json")
    return {"model": model, "dtype": spec.dtype, "loss": spec.loss, "seed": spec.seed}


def config_model(config: dict) -> nn.MLP | nn.Sequential | TransformerLM:
    """The model of a `worker_config` (its weights are the worker's to overwrite)."""
    return model_from(_model_spec(config), config["dtype"], config["seed"])


_MODEL_SPEC = TypeAdapter(ModelSpec)


def _model_spec(config: dict) -> ModelSpec:
    return _MODEL_SPEC.validate_python(config["model"])


def build_optimizer(spec: TrainingSpec, params) -> optim.SGD | optim.Adam | optim.AdamW:
    o = spec.optimizer
    if o.type == "sgd":
        return optim.SGD(
            params,
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
        )
    adam = optim.AdamW if o.type == "adamw" else optim.Adam
    return adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


@dataclass(frozen=True)
class Recipe:
    """What happens between the averaged gradient and the optimizer's step: the step's lr
    (`schedule.lr_at(step)`) and, with a `max_norm`, clipping of the gradient's norm."""

    schedule: optim.LRSchedule
    max_norm: float | None = None


def build_recipe(spec: TrainingSpec, total_steps: int) -> Recipe:
    """The spec's schedule over a run of `total_steps`, and its clipping. Each caller gets
    its own (a schedule is fastest asked in step order)."""
    o, s = spec.optimizer, spec.optimizer.schedule
    warmup = getattr(s, "warmup_steps", 0)
    if warmup >= total_steps:  # refused with the data at submission; a spec file's run here
        msg = f"optimizer.schedule.warmup_steps ({warmup}) must be less than the "
        raise TrainingError(msg + f"total steps ({total_steps})")
    if s.type == "step":
        schedule = optim.step_schedule(o.lr, s.step_size, s.gamma)
    elif s.type == "cosine":
        schedule = optim.cosine_schedule(o.lr, total_steps, s.warmup_steps, s.min_lr)
    elif s.type == "linear":
        schedule = optim.linear_schedule(o.lr, total_steps, s.warmup_steps, s.end_factor)
    else:
        schedule = optim.constant_schedule(o.lr)
    return Recipe(schedule, spec.grad_clip.max_norm if spec.grad_clip else None)


def set_parameters(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Point the model's parameters at `arrays` (no copy: workers only read them)."""
    for p, a in zip(model.parameters(), arrays, strict=True):
        p.data = a


def grad_sum(
    model: nn.Module, loss: str, X: np.ndarray, y: np.ndarray, rows=None, epoch=0, params=None
):
    """Sum (not mean) of per-sample gradients and losses over the rows of X.

    Returns ``(grads, loss_sum)``; sums from several pieces add up to the sum
    over their union, which is what makes the data-parallel step exact. `rows` are the
    dataset indices of X's rows and `epoch` the epoch they were drawn in: dropout masks
    are a function of them (see `core.nn.sample_context`), never of the split. `params`:
    the model's `parameters()`, from a caller that keeps them (walking the modules every
    step costs as much as a tiny model's step).

    A plain MLP with mse or cross-entropy takes the fused kernel (`core.fused`: the same
    math without the graph, gradients as views of one flat vector); other models take
    the graph. Every caller (workers, in-process) comes through here, so all agree.
    """
    params = model.parameters() if params is None else params
    if len(X) == 0:
        return [np.zeros_like(p.data) for p in params], 0.0
    if fused.fits(model, loss, y):
        grads, loss_sum = fused.mlp_grad_sum(model, loss, X, y)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return grads, loss_sum
    for p in params:
        p.grad = None
    rows = np.arange(len(X)) if rows is None else rows
    with in_mode(model, training=True), nn.sample_context(epoch, rows):
        if isinstance(model, TransformerLM):
            out = next_token_losses(model, X).sum()
        else:
            out = LOSSES[loss](model(Tensor(X)), y, reduction="sum")
    out.backward()
    return [p.grad for p in params], float(out.data)


def next_token_losses(model: TransformerLM, X: np.ndarray) -> Tensor:
    """Each sample's loss: the mean cross-entropy of predicting tokens 1..T of a row of
    X (N, T + 1) from the ones before. Summed over samples, the gradient sums of pieces
    add up as they do for any other model."""
    tokens = np.asarray(X).astype(np.int64)
    return next_token_loss_of(model(tokens[:, :-1]), tokens)


def next_token_loss_of(logits: Tensor, tokens: np.ndarray) -> Tensor:
    """Each sample's mean cross-entropy of `logits` (N, T, V), read from tokens[:, :-1],
    against the tokens after them, tokens[:, 1:]."""
    return F.cross_entropy(logits, tokens[:, 1:], reduction="none").mean(axis=1)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is what the user sees."""


class Diverged(TrainingError):
    pass


def average_and_step(params, opt, grads, n: int, loss_sum: float, step: int, recipe: Recipe):
    """Divide the batch's gradient sums by its size, check them, clip them (with a
    `recipe.max_norm`), step the optimizer with the lr of `step` (0-based).

    Every step strategy ends its step here (the coordinator's, and each replica's), so
    they all perform the same floating-point operations in the same order: on one vector
    of all the gradients (`optim.FlatViews`, as the fused kernel and the exchanges give
    them; other gradients are copied into one), whatever the strategy. Returns
    (mean loss, gradient norm before clipping) and leaves each parameter's `.grad` the
    averaged (clipped) gradient; raises Diverged with the weights unchanged."""
    loss = loss_sum / n
    flat = getattr(grads, "flat", None)  # one vector under all the gradients (FlatViews)
    if flat is None:  # the graph's separate arrays: copied into one (a fraction of a step)
        flat = np.concatenate([np.ravel(g) for g in grads])
        grads = optim.FlatViews(flat, optim.spans([np.shape(g) for g in grads]))
    flat /= n
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    grad_norm = math.sqrt(float(np.vdot(flat, flat)))
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        raise Diverged(f"diverged at step {step + 1} (loss={loss:g})")
    if recipe.max_norm is not None:
        optim.clip_grad_norm_(params, recipe.max_norm, grad_norm)
    lr = recipe.schedule.lr_at(step)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step(flat)
    return loss, grad_norm


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool):
    """The model in training mode (dropout on) or eval mode for the block, then as it was.
    A model without a mode-dependent layer is left alone: switching walks every module,
    which costs a tenth of a tiny model's step."""
    was = model.training
    if was == training or not _has_modes(model):
        yield model
        return
    model.train(training)
    try:
        yield model
    finally:
        model.train(was)


def _has_modes(model: nn.Module) -> bool:
    """Whether any of the model's layers behaves differently in training (Dropout)."""
    found = model.__dict__.get("_has_modes")
    if found is None:
        found = model.__dict__["_has_modes"] = _any_dropout(model)
    return found


def _any_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) or any(
        _any_dropout(child) for _, child in module._children() if isinstance(child, nn.Module)
    )


def param_bytes(model: ModelSpec | dict, dtype: str) -> int:
    """The bytes of a model's parameters; `model` is a model spec or a `worker_config`."""
    if isinstance(model, dict):
        model = _model_spec(model)
    return model.n_params * np.dtype(dtype).itemsize


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


EVAL_CHUNK_ROWS = 4096  # rows evaluated at once: the coordinator's activations stay bounded


def chunks(n: int, size: int | None = None) -> list[slice]:
    """Slices over `n` rows, `size` (default EVAL_CHUNK_ROWS) at a time."""
    size = size or EVAL_CHUNK_ROWS  # read now: tests set the module's value
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def evaluate(model: nn.Module, loss: str, X: np.ndarray, y: np.ndarray, classify: bool) -> dict:
    """Mean loss over X, and accuracy when the task is classification; no graph is built.
    In chunks of EVAL_CHUNK_ROWS rows, so a large validation set never is one forward pass."""
    if len(X) == 0:
        return {"loss": None, "accuracy": None}
    if isinstance(model, TransformerLM):
        return _evaluate_lm(model, X, classify)
    total, count, correct = 0.0, 0, 0
    plain = type(model) is nn.MLP  # no graph: the fused kernel's forward pass
    with no_grad(), in_mode(model, training=False):
        for rows in chunks(len(X)):
            out = fused.mlp_forward(model, X[rows]) if plain else model(Tensor(X[rows])).data
            losses = LOSSES[loss](out, y[rows], reduction="none").data
            total, count = total + float(losses.sum()), count + losses.size
            if classify:
                truth = y[rows].reshape(len(out), -1)[:, 0]
                correct += int(np.sum(predict_classes(out, loss) == truth))
    result = {"loss": total / count, "accuracy": None}
    if classify:
        result["accuracy"] = correct / len(X)
    return result


LM_EVAL_ROWS = 256  # rows per forward pass: attention keeps (rows, heads, T, T) values


def _evaluate_lm(model: TransformerLM, X: np.ndarray, classify: bool) -> dict:
    """Mean next-token loss over X's samples and, for classification, the share of next
    tokens predicted right; in chunks of LM_EVAL_ROWS samples."""
    loss_sum, hits = 0.0, 0
    with no_grad(), in_mode(model, training=False):
        for rows in chunks(len(X), LM_EVAL_ROWS):
            tokens = np.asarray(X[rows]).astype(np.int64)
            logits = model(tokens[:, :-1]).data
            loss_sum += float(F.cross_entropy(logits, tokens[:, 1:], reduction="sum").data)
            hits += int(np.sum(logits.argmax(axis=-1) == tokens[:, 1:]))
    n_tokens = len(X) * (X.shape[1] - 1)
    return {"loss": loss_sum / n_tokens, "accuracy": hits / n_tokens if classify else None}


def lm_logits(model: TransformerLM):
    """The model as a `logits_fn` for workers.generate: token ids (N, T) in, logits
    (N, T, V) out as an array, with no graph and in eval mode (no dropout)."""

    def logits(tokens: np.ndarray) -> np.ndarray:
        with no_grad(), in_mode(model, training=False):
            return model(np.asarray(tokens, dtype=np.int64)).data

    return logits


def predict_classes(outputs: np.ndarray, loss: str) -> np.ndarray:
    """Class index per row: argmax of the logits, or a threshold on a single output."""
    if outputs.shape[1] > 1:
        return outputs.argmax(axis=1)
    threshold = 0.0 if loss == "bce" else 0.5  # bce outputs logits, mse outputs probabilities
    return (outputs[:, 0] > threshold).astype(np.int64)
