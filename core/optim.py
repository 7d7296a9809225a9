"""SGD and Adam with PyTorch's exact update rules, updating `p.data` in place.

`state_dict()` has PyTorch's layout, with copies of every array:

    {"state": {0: {"momentum_buffer": array}, ...},                    # SGD with momentum
     "param_groups": [{"lr": .., "momentum": .., "weight_decay": .., "nesterov": ..,
                       "params": [0, 1, ...]}]}

    {"state": {0: {"step": 3, "exp_avg": array, "exp_avg_sq": array}, ...},   # Adam
     "param_groups": [{"lr": .., "betas": (.9, .999), "eps": .., "weight_decay": ..,
                       "params": [0, 1, ...]}]}

Parameters are numbered in order across the groups. Loading a state dict and
continuing gives bit-identical results to never having stopped.
"""

from __future__ import annotations

import math

import numpy as np

from core.tensor import Tensor

__all__ = ["SGD", "Adam", "Optimizer"]


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

    def _gradients(self):
        """(group, param, gradient) for every param with a grad; L2 weight decay added."""
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p, p.grad + wd * p.data if wd else p.grad

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

    def step(self) -> None:
        for group, p, d in self._gradients():
            momentum = group["momentum"]
            if momentum:
                state = self.state.setdefault(p, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = np.array(d, dtype=p.dtype)
                else:
                    buf *= momentum
                    buf += d
                d = d + momentum * buf if group["nesterov"] else buf
            p.data -= group["lr"] * d


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

    def step(self) -> None:
        for group, p, g in self._gradients():
            (beta1, beta2), state = group["betas"], self.state.setdefault(p, {})
            if not state:
                state.update(
                    step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data)
                )
            state["step"] += 1
            m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
            m += (1 - beta1) * (g - m)  # torch's lerp(m, g, 1 - beta1)
            v *= beta2
            v += (1 - beta2) * g * g
            step_size = group["lr"] / (1 - beta1**step)
            denom = np.sqrt(v) / math.sqrt(1 - beta2**step) + group["eps"]
            p.data -= step_size * (m / denom)
