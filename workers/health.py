"""Training health: per-layer statistics of a step and the warnings they raise.

Every `health_every` steps the trainer measures, for each parametrised layer (`layers.<i>`
of an MLP, `<i>` of a sequential model: Linear or Conv2d), the gradient norm, the weight
norm, the update-to-weight ratio and, for layers followed by relu, the fraction of dead
units, or of dead channels for a conv (zero on the whole global batch of the step). Three warnings:

* exploding: a layer's gradient norm above EXPLODING_FACTOR times its initial value (the
  first check's), or not finite; a non-finite gradient also ends the run ("diverged").
* vanishing: the first layer's gradient norm below VANISHING_RATIO times the last one's.
* dead: more than DEAD_FRACTION of a layer's relu units dead.

Each warning carries `advice`: the spec field that addresses it and a change that sets it
(a JSON merge patch on the run's spec, None where no single edit does; `advice_for`), so
that a dashboard can offer the run's spec with that change as a template.

The functions are pure; `HealthMonitor` is the trainer's record of one run (the initial
norms and each warning once, with the steps it was first and last seen). The record
travels in the checkpoints, so a resumed run warns exactly as an uninterrupted one.
Nothing here writes to the model: health never changes the trained parameters.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, get_args

import numpy as np

from core import Tensor, no_grad
from core.nn import MLP, Conv2d, Linear, ReLU, Sequential
from workers.model import chunks, in_mode
from workers.spec import TrainingSpec

EXPLODING_FACTOR = 1e3  # gradient norm above this many times its initial value
VANISHING_RATIO = 1e-6  # first layer's gradient norm below this times the last layer's
DEAD_FRACTION = 0.5  # more than this fraction of a layer's ReLU units dead
WarningKind = Literal["exploding", "vanishing", "dead"]
KINDS = get_args(WarningKind)


def active_units(model: MLP | Sequential, X) -> list[np.ndarray | None]:
    """Per parametrised layer followed by relu, a bool vector: the unit (or, for a conv,
    the channel) was > 0 for at least one row (and position); None for the others.

    The model's own forward pass (`layer_outputs`) under no_grad, in eval mode, over
    EVAL_CHUNK_ROWS rows at a time (a global batch can be large).
    """
    X = np.asarray(X, dtype=model.parameters()[0].dtype)
    parts = [_active_units(model, Tensor(X[rows])) for rows in chunks(len(X)) or [slice(0, 0)]]
    return [None if m[0] is None else np.logical_or.reduce(m) for m in zip(*parts, strict=True)]


def _active_units(model: MLP | Sequential, x: Tensor) -> list[np.ndarray | None]:
    with no_grad():
        if isinstance(model, MLP):
            hidden = itertools.islice(model.layer_outputs(x), len(model.layers) - 1)
            return [(h.data > 0).any(axis=0) for h in hidden]
        masks: list[np.ndarray | None] = []
        done = 0  # modules covered by the outputs so far (a fused pair yields once)
        with in_mode(model, training=False):
            for i, out in model.layer_outputs(x):
                covered, done = model.modules[done : i + 1], i + 1
                masks += [None for m in covered if isinstance(m, Linear | Conv2d)]
                if isinstance(covered[-1], ReLU) and masks:
                    h = out.data
                    masks[-1] = (h > 0).any(axis=(0, 2, 3) if h.ndim == 4 else 0)
        return masks


def _has_relu(model) -> bool:
    if isinstance(model, MLP):
        return model.activation == "relu"
    return any(isinstance(m, ReLU) for m in model.modules)


def layer_stats(model: MLP, grads, prev_weights, active_masks=None) -> list[dict]:
    """Per Linear layer `layers.<i>`: gradient norm, weight norm, update-to-weight ratio
    and, for ReLU hidden layers with masks given, the fraction of dead units.

    `grads` and `prev_weights` are arrays in `model.parameters()` order; the model holds
    the weights after the step, so the update is their difference. Norms cover all of a
    layer's parameters (weight and bias) in float64; they may be inf or nan, which is
    what the exploding check looks for.
    """
    params, layers = _layers(model)
    if not len(params) == len(grads) == len(prev_weights):
        raise ValueError(
            f"model has {len(params)} parameters; got {len(grads)} gradients "
            f"and {len(prev_weights)} previous weights"
        )
    stats = []
    relu = _has_relu(model)
    with np.errstate(over="ignore"):  # an overflowing norm is inf: what the check is for
        for i, (layer, ks) in enumerate(layers.items()):
            weight_norm = _norm(params[k].data for k in ks)
            update_norm = _norm(params[k].data - np.asarray(prev_weights[k]) for k in ks)
            dead, mask = None, None
            if relu and active_masks is not None and i < len(active_masks):
                mask = active_masks[i]
            if mask is not None:
                dead = float(1.0 - np.mean(mask))
            ratio = update_norm / weight_norm if weight_norm else _ratio0(update_norm)
            stats.append(
                {
                    "layer": layer,
                    "grad_norm": _norm(grads[k] for k in ks),
                    "weight_norm": weight_norm,
                    "update_ratio": ratio,
                    "dead_fraction": dead,
                }
            )
    return stats


def snapshot(model: MLP, X: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """What a check needs from before the optimizer step: copies of the weights (the
    optimizer updates them in place) and, for relu nets, the units active on the step's
    global batch `X` (exact, and no round trip to the workers)."""
    prev = [p.data.copy() for p in _layers(model)[0]]
    return prev, active_units(model, X) if _has_relu(model) else None


def step_stats(model: MLP, before) -> list[dict]:
    """`layer_stats` of the step just taken: the model holds the weights after it and each
    parameter's `.grad` its averaged gradient; `before` is its `snapshot`."""
    prev, masks = before
    return layer_stats(model, [p.grad for p in _layers(model)[0]], prev, masks)


def health_warnings(stats: list[dict], initial_grad_norms=None) -> list[dict]:
    """Warnings {"kind", "layer", "message"}, kind "exploding", "vanishing" or "dead".

    `initial_grad_norms` are the layers' gradient norms at the first check (same order
    as `stats`); without them only non-finite gradients count as exploding.
    """
    found = []

    def warn(kind, layer, message):
        found.append({"kind": kind, "layer": layer, "message": f"{layer}: {message}"})

    for k, s in enumerate(stats):
        g, layer = s["grad_norm"], s["layer"]
        g0 = None if initial_grad_norms is None else initial_grad_norms[k]
        if not math.isfinite(g):
            warn("exploding", layer, f"gradient norm is {g}; lower the learning rate")
        elif g0 is not None and 0 < g0 < math.inf and g > EXPLODING_FACTOR * g0:
            warn(
                "exploding",
                layer,
                f"gradient norm {g:.3g} is {g / g0:.3g} times its initial {g0:.3g}; "
                "lower the learning rate or clip gradients",
            )
        dead = s.get("dead_fraction")
        if dead is not None and dead > DEAD_FRACTION:
            warn(
                "dead",
                layer,
                f"{dead:.0%} of its ReLU units are zero on the whole batch and get no "
                "gradient; lower the learning rate, or use He init and zero biases",
            )
    first, last = (stats[0]["grad_norm"], stats[-1]["grad_norm"]) if stats else (0.0, 0.0)
    if len(stats) > 1 and math.isfinite(first + last) and first < VANISHING_RATIO * last:
        warn(
            "vanishing",
            stats[0]["layer"],
            f"gradient norm {first:.3g} is {first / last:.3g} times the last layer's "
            f"{last:.3g}; use fewer layers, relu with He init, or a normalising layer",
        )
    return found


def _ratio0(update_norm: float) -> float:  # the ratio for all-zero weights
    return 0.0 if update_norm == 0 else math.inf


def _norm(arrays) -> float:
    """The 2-norm of the arrays together, in float64 (under layer_stats' errstate)."""
    squares = (np.add.reduce(np.square(a, dtype=np.float64), axis=None) for a in arrays)
    return math.sqrt(sum(float(x) for x in squares))


def _layers(model) -> tuple[list, dict[str, list[int]]]:
    """The model's parameters and, per layer name, the indices of its parameters; found
    once per model (walking the modules costs more than a tiny model's statistics)."""
    found = model.__dict__.get("_health_layers")
    if found is None:
        named = model.named_parameters()
        layers: dict[str, list[int]] = {}
        for k, (name, _) in enumerate(named):
            layers.setdefault(name.rpartition(".")[0], []).append(k)
        found = model.__dict__["_health_layers"] = ([p for _, p in named], layers)
    return found


def advice_for(spec: TrainingSpec, total_steps: int) -> dict[str, dict]:
    """Per warning kind, {"field", "change"}: the spec field that addresses it and a JSON
    merge patch on `spec` that sets it (None where no single edit does)."""
    model, opt = spec.model, spec.optimizer

    def fix(field: str, change: dict | None) -> dict:
        return {"field": field, "change": change}

    # Gentler steps: a warmup (a tenth of the run, at least 5 steps) where the lr is
    # constant or steps down, else a lower lr.
    warmup = min(max(5, total_steps // 10), total_steps - 1)
    if opt.schedule.type in ("constant", "step") and warmup >= 1:
        cosine = {"type": "cosine", "warmup_steps": warmup}
        gentler = fix("optimizer.schedule", {"optimizer": {"schedule": cosine}})
    else:
        gentler = fix("optimizer.lr", {"optimizer": {"lr": opt.lr / 10}})
    clip = fix("grad_clip.max_norm", {"grad_clip": {"max_norm": 1.0}})
    advice = {"exploding": gentler if spec.grad_clip else clip, "dead": gentler}
    advice["vanishing"] = fix("model.layers", None)
    if model.type == "mlp":
        if model.bias_init < 0:
            advice["dead"] = fix("model.bias_init", {"model": {"bias_init": 0.0}})
        elif model.activation == "relu":
            advice["dead"] = fix("model.activation", {"model": {"activation": "tanh"}})
        relu = fix("model.activation", {"model": {"activation": "relu"}})
        advice["vanishing"] = fix("model.sizes", None) if model.activation == "relu" else relu
    return advice


def new_warnings(event: dict) -> list[dict]:
    """The warnings of a "health" event that first appeared at its step."""
    return [w for w in event["warnings"] if w["first_step"] == event["step"]]


class HealthMonitor:
    """The health record of one run: when to check, the initial norms, the warnings so far.

    A check follows the first step of a run (so the initial norms exist) and every step
    whose 1-based number is a multiple of `every`. Each (kind, layer) warning is kept
    once, with `first_step` and `last_step` (the latest check that raised it) and the
    latest message, and the run's `advice` for its kind (`advice_for`), if given.
    """

    def __init__(
        self,
        model: MLP | Sequential,
        every: int,
        state: dict | None = None,
        advice: dict[str, dict] | None = None,
    ):
        self.model, self.every, self.advice = model, every, advice
        state = state or {}
        self.initial: list[float] | None = state.get("initial_grad_norms")
        self.checked_steps: int = state.get("checked_steps", 0)
        self.last_step: int | None = state.get("last_step")
        self.warnings: list[dict] = [dict(w) for w in state.get("warnings", [])]

    def due(self, step: int) -> bool:
        """Whether 1-based `step` is checked."""
        return self.initial is None or step % self.every == 0

    def due_steps(self, first: int, end: int) -> list[int]:
        """The 1-based steps checked among the steps after `first` up to `end` (the first
        check is due at once, then every `every` steps)."""
        due = [s for s in range(first + 1, end + 1) if s % self.every == 0]
        if self.initial is None and first < end and (not due or due[0] != first + 1):
            due.insert(0, first + 1)
        return due

    def before_step(self, X: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        return snapshot(self.model, X)

    def check(self, step: int, before) -> dict:
        """The "health" event of `step`: the model holds the weights after the step and
        each parameter's `.grad` the step's averaged gradient."""
        return self.record(step, step_stats(self.model, before))

    def record(self, step: int, stats: list[dict]) -> dict:
        """The "health" event of `step` from its `layer_stats` (computed where the step ran:
        in the coordinator, or on a replica)."""
        if self.initial is None:
            self.initial = [s["grad_norm"] for s in stats]
        seen = {(w["kind"], w["layer"]): w for w in self.warnings}
        for w in health_warnings(stats, self.initial):
            w["advice"] = None if self.advice is None else self.advice.get(w["kind"])
            known = seen.get((w["kind"], w["layer"]))
            if known is None:
                self.warnings.append(w | {"first_step": step, "last_step": step})
            else:
                known.update(w, first_step=known["first_step"], last_step=step)
        self.checked_steps += 1
        self.last_step = step
        return {"type": "health", "step": step, "layers": stats, "warnings": self._warnings()}

    def summary(self) -> dict:
        return {
            "checked_steps": self.checked_steps,
            "last_step": self.last_step,
            "warnings": self._warnings(),
        }

    def state(self) -> dict:
        """The record for a checkpoint (see `HealthMonitor(state=...)`)."""
        return self.summary() | {"initial_grad_norms": self.initial}

    def _warnings(self) -> list[dict]:
        return [dict(w) for w in self.warnings]
