"""SGD, Adam and AdamW with PyTorch's exact update rules, updating `p.data` in place;
learning-rate schedules and gradient-norm clipping as PyTorch computes them.

`state_dict()` has PyTorch's layout, with copies of every array:

    {"state": {0: {"momentum_buffer": array}, ...},                    # SGD with momentum
     "param_groups": [{"lr": .., "momentum": .., "weight_decay": .., "nesterov": ..,
                       "params": [0, 1, ...]}]}

    {"state": {0: {"step": 3, "exp_avg": array, "exp_avg_sq": array}, ...},   # Adam
     "param_groups": [{"lr": .., "betas": (.9, .999), "eps": .., "weight_decay": ..,
                       "params": [0, 1, ...]}]}

Parameters are numbered in order across the groups. Loading a state dict and
continuing gives bit-identical results to never having stopped. AdamW's layout is Adam's.

A schedule is a pure function of the step, `LRSchedule.lr_at(step)`: the lr of the 0-based
optimizer step `step`, which is torch's scheduler's lr after `step` calls of its `step()`.
It follows torch's recursive (chainable) formulas, not their closed forms, so the values
are equal to the last bit; there is no scheduler state to checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from operator import attrgetter, is_, itemgetter

import numpy as np

from core.tensor import Tensor

__all__ = [
    "SGD",
    "FlatViews",
    "Adam",
    "AdamW",
    "LRSchedule",
    "Optimizer",
    "clip_grad_norm_",
    "constant_schedule",
    "cosine_schedule",
    "linear_schedule",
    "spans",
    "step_schedule",
]


class FlatViews(list):
    """A list of arrays (gradients, say) that are views, in order, of one 1-D array, `flat`
    (their concatenation): an operation on `flat` is that operation on every array."""

    def __init__(self, flat: np.ndarray, layout):
        """`layout`: (start, stop, shape) of each array in `flat`, as `spans` gives it."""
        if flat.shape != (layout[-1][1] if layout else 0,):
            raise ValueError(f"a vector of shape {flat.shape} does not hold arrays {layout}")
        super().__init__([flat[a:b].reshape(shape) for a, b, shape in layout])
        self.flat = flat


def spans(shapes) -> list[tuple[int, int, tuple]]:
    """(start, stop, shape) of each array of `shapes` in their flat concatenation."""
    out, start = [], 0
    for shape in shapes:
        stop = start + math.prod(shape)
        out.append((start, stop, tuple(shape)))
        start = stop
    return out


_data = attrgetter("data")


class Optimizer:
    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[Tensor, dict] = {}

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _gradients(self, l2: bool = True):
        """(group, param, gradient) for every param with a grad; L2 weight decay added
        unless `l2` is False (AdamW decays the weights instead)."""
        for group in self.param_groups:
            wd = group["weight_decay"] if l2 else 0
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p, p.grad + wd * p.data if wd else p.grad

    decoupled = False  # AdamW: weight decay on the weights, not added to the gradient

    def step(self, flat_grad: np.ndarray | None = None) -> None:
        """Update every parameter that has a `.grad`. `flat_grad`: all the gradients as one
        vector (their concatenation in parameter order, each `.grad` a view of it, as
        `FlatViews.flat`); then, with one parameter group, the update is a few operations
        on whole vectors (see `_step_flat`), bit-identical to the per-parameter one."""
        if flat_grad is not None and self._step_flat(flat_grad):
            return
        for group, p, g in self._gradients(l2=not self.decoupled):
            state = self.state.get(p, {})
            self._update(group, p.data, g, state)
            if state:  # a parameter without state (SGD without momentum) has no entry
                self.state[p] = state

    def _update(self, group: dict, data: np.ndarray, g: np.ndarray, state: dict) -> None:
        """One parameter's update, in place: `data` its values, `g` its gradient (with L2
        weight decay added), `state` its state (filled on the first step)."""
        raise NotImplementedError

    def _step_flat(self, flat_grad: np.ndarray) -> bool:
        """`_update` once, on the parameters, gradients and state as whole vectors. Every
        operation of an update is elementwise, so this is bit-identical to updating each
        parameter in turn. The parameters' arrays (and the state's) become views of the
        vectors, moved there once (and again only if something replaced them, as
        `load_state_dict` does). False, with nothing done, when it does not apply: several
        groups, mixed dtypes, or parameters whose states differ (some not yet stepped)."""
        if len(self.param_groups) != 1:
            return False
        group = self.param_groups[0]
        params = group["params"]
        data = self._flat_data(params, flat_grad)
        state = None if data is None else self._flat_state(params)
        if state is None:
            return False
        wd = 0 if self.decoupled else group["weight_decay"]
        before = set(state)
        self._update(group, data, flat_grad + wd * data if wd else flat_grad, state)
        for k, v in state.items():  # back into each parameter's state
            if isinstance(v, np.ndarray):
                if k in before:
                    continue  # updated in place: the parameters' views see it
                v = self._flat_states[k] = (v, FlatViews(v, self._flat[1]))  # new: views
            for i, p in enumerate(params):
                self.state.setdefault(p, {})[k] = v[1][i] if isinstance(v, tuple) else v
        return True

    _flat: tuple | None = None  # (values vector, layout, .data views) once moved there
    _flat_states: dict  # state key -> (vector, each parameter's view of it)

    def _flat_data(self, params, flat_grad: np.ndarray) -> np.ndarray | None:
        """The parameters' values as one vector, each `.data` a view of it; None when a
        dtype differs from the gradient's or the sizes do not add up to its size."""
        if self._flat is not None:
            data, _, views = self._flat
            if len(views) == len(params) and all(map(is_, map(_data, params), views)):
                return data
        if any(p.dtype != flat_grad.dtype for p in params):
            return None
        layout = spans([p.shape for p in params])
        if flat_grad.shape != (layout[-1][1],):
            return None
        data = np.concatenate([p.data.ravel() for p in params])
        views = FlatViews(data, layout)
        for p, view in zip(params, views, strict=True):
            p.data = view
        self._flat, self._flat_states = (data, layout, views), {}
        return data

    def _flat_state(self, params) -> dict | None:
        """The state of every parameter as one: each array key's vector (the parameters'
        arrays become views of it), each other value (a step count) when all agree; {}
        before the first step; None when the parameters' states differ."""
        states = list(map(self.state.get, params))
        if None in states:  # not yet stepped: all or nothing
            return {} if states.count(None) == len(states) else None
        sizes = list(map(len, states))
        if sizes.count(sizes[0]) != len(sizes):
            return None
        out = {}
        for k in states[0]:  # the same keys in all: as many, and each has these
            try:
                values = list(map(itemgetter(k), states))
            except KeyError:
                return None
            if not isinstance(values[0], np.ndarray):
                if values.count(values[0]) != len(values):
                    return None
                out[k] = values[0]
                continue
            vector, views = self._flat_states.get(k, (None, ()))
            if len(views) != len(values) or not all(map(is_, values, views)):
                vector = np.concatenate([s[k].ravel() for s in states])
                views = FlatViews(vector, self._flat[1])
                for s, view in zip(states, views, strict=True):
                    s[k] = view
                self._flat_states[k] = (vector, views)
            out[k] = vector
        return out

    def zero_grad(self) -> None:
        for p in self._params():
            p.grad = None

    def state_dict(self) -> dict:
        index = {p: i for i, p in enumerate(self._params())}
        state = {
            index[p]: {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in s.items()}
            for p, s in self.state.items()
        }
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**group, "params": list(range(start, start + n))})
            start += n
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("state dict has a different number of parameter groups or parameters")
        params = self._params()
        state = {}
        for i, entries in state_dict["state"].items():
            p = params[int(i)]
            state[p] = {}
            for k, v in entries.items():
                if k == "step":
                    state[p][k] = int(v)
                    continue
                v = np.array(v, dtype=p.dtype)  # a private copy, in the parameter's dtype
                if v.shape != p.shape:
                    raise ValueError(
                        f"state {k!r} of parameter {i} has shape {v.shape}, not {p.shape}"
                    )
                state[p][k] = v
        for mine, saved in zip(self.param_groups, groups, strict=True):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = tuple(v) if isinstance(v, list) else v
        self.state = state


class SGD(Optimizer):
    """torch.optim.SGD (dampening 0): d = g + wd*p; buf = d, then momentum*buf + d;
    d = d + momentum*buf (nesterov) or buf; p -= lr*d."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum requires momentum > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(params, defaults)

    def _update(self, group: dict, data: np.ndarray, d: np.ndarray, state: dict) -> None:
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(d, dtype=data.dtype)
            else:
                buf *= momentum
                buf += d
            d = d + momentum * buf if group["nesterov"] else buf
        data -= group["lr"] * d


class Adam(Optimizer):
    """torch.optim.Adam (not amsgrad): bias-corrected moments, weight decay added to g."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("need lr, eps, weight_decay >= 0 and 0 <= betas < 1")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _update(self, group: dict, data: np.ndarray, g: np.ndarray, state: dict) -> None:
        if self.decoupled and group["weight_decay"]:
            data *= 1 - group["lr"] * group["weight_decay"]
        beta1, beta2 = group["betas"]
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(data), exp_avg_sq=np.zeros_like(data))
        state["step"] += 1
        m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m += (1 - beta1) * (g - m)  # torch's lerp(m, g, 1 - beta1)
        v *= beta2
        v += (1 - beta2) * g * g
        step_size = group["lr"] / (1 - beta1**step)
        denom = np.sqrt(v) / math.sqrt(1 - beta2**step) + group["eps"]
        data -= step_size * (m / denom)


class AdamW(Adam):
    """torch.optim.AdamW (not amsgrad): p *= 1 - lr*wd, then Adam's step without L2."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def clip_grad_norm_(params, max_norm: float, total_norm: float | None = None) -> float:
    """torch.nn.utils.clip_grad_norm_: scale every gradient by max_norm / (norm + 1e-6),
    clamped to 1, where norm is the 2-norm of all gradients together (`total_norm`, when
    the caller has it). Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if total_norm is None:
        total_norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
    coef = min(max_norm / (total_norm + 1e-6), 1.0)
    for g in grads:
        g *= coef
    return total_norm


# ---------------------------------------------------------------- learning-rate schedules


class LRSchedule:
    """`lr_at(step)` from a generator of the lrs of steps 0, 1, 2, ... Asked in order (as a
    run asks), each value costs one recursion step; asked for an earlier step (a resume),
    it recomputes from step 0."""

    def __init__(self, lrs: Callable[[], Iterator[float]]):
        self._lrs = lrs
        self._restart()

    def _restart(self) -> None:
        self._it, self._step = self._lrs(), 0
        self._lr = next(self._it)

    def lr_at(self, step: int) -> float:
        if step < self._step:
            self._restart()
        while self._step < step:
            self._lr = next(self._it)
            self._step += 1
        return self._lr


def constant_schedule(lr: float) -> LRSchedule:
    return LRSchedule(lambda: _forever(lr))


def step_schedule(lr: float, step_size: int, gamma: float) -> LRSchedule:
    """torch StepLR(step_size, gamma), counted in steps."""
    return LRSchedule(lambda: _step_lrs(lr, step_size, gamma))


def cosine_schedule(lr: float, total_steps: int, warmup_steps: int, min_lr: float) -> LRSchedule:
    """SequentialLR([LinearLR(start_factor=1/W, total_iters=W), CosineAnnealingLR(
    T_max=total_steps - W, eta_min=min_lr)], milestones=[W]); W = 0: the cosine alone."""
    t_max = total_steps - warmup_steps

    def lrs():
        if warmup_steps == 0:
            return _cosine_lrs(lr, lr, min_lr, t_max)
        # The cosine's start: its closed form at 0, as SequentialLR's milestone sets it.
        start = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * 0 / t_max)) / 2
        return _then(_warmup(lr, warmup_steps), warmup_steps, _cosine_lrs(start, lr, min_lr, t_max))

    return LRSchedule(lrs)


def linear_schedule(
    lr: float, total_steps: int, warmup_steps: int, end_factor: float
) -> LRSchedule:
    """The warmup as cosine's, then LinearLR(1.0, end_factor, total_iters=total_steps - W)."""
    n = total_steps - warmup_steps

    def lrs():
        if warmup_steps == 0:
            return _linear_lrs(lr * 1.0, 1.0, end_factor, n)
        start = lr * (1.0 + (end_factor - 1.0) * min(n, 0) / n)  # closed form at 0
        return _then(
            _warmup(lr, warmup_steps), warmup_steps, _linear_lrs(start, 1.0, end_factor, n)
        )

    return LRSchedule(lrs)


def _forever(lr: float) -> Iterator[float]:
    while True:
        yield lr


def _then(first: Iterator[float], n: int, second: Iterator[float]) -> Iterator[float]:
    """SequentialLR: `first`'s first n values, then `second`'s."""
    for _ in range(n):
        yield next(first)
    yield from second


def _step_lrs(lr: float, step_size: int, gamma: float) -> Iterator[float]:
    epoch = 0
    while True:
        yield lr
        epoch += 1
        if epoch % step_size == 0:
            lr = lr * gamma


def _warmup(lr: float, warmup_steps: int) -> Iterator[float]:
    """LinearLR(start_factor=1/W, end_factor=1, total_iters=W) from its first value."""
    start = 1.0 / warmup_steps
    return _linear_lrs(lr * start, start, 1.0, warmup_steps)


def _linear_lrs(lr: float, start: float, end: float, total: int) -> Iterator[float]:
    """LinearLR's recursion from its value `lr` at epoch 0."""
    epoch = 0
    while True:
        yield lr
        epoch += 1
        if epoch <= total:
            lr = lr * (1.0 + (end - start) / (total * start + (epoch - 1) * (end - start)))


def _cosine_lrs(lr: float, base: float, eta_min: float, t_max: int) -> Iterator[float]:
    """CosineAnnealingLR's recursion from its value `lr` at epoch 0."""
    epoch = 0
    while True:
        yield lr
        epoch += 1
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            lr = lr + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            ratio = (1 + math.cos(math.pi * epoch / t_max)) / (
                1 + math.cos(math.pi * (epoch - 1) / t_max)
            )
            lr = ratio * (lr - eta_min) + eta_min
