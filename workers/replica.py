"""A worker's replica for the replicated step (workers/replicated.py): its copy of the
model and optimizer, and its part of each step.

Per step it computes the gradient sum of its rank-order piece of the global batch, takes
every worker's sum of that step (its own included), adds them in rank order and steps with
`average_and_step`: the coordinator's own arithmetic, so every replica performs the same
floating-point operations in the same order as every other and as the gather step.
"""

from __future__ import annotations

import hashlib
import struct
import time

import numpy as np

from workers.exchange import add_in_rank_order, flatten, unflatten
from workers.health import snapshot, step_stats
from workers.model import (
    Diverged,
    average_and_step,
    build_model,
    build_optimizer,
    build_recipe,
    grad_sum,
)
from workers.sampler import Schedule, split_batch

# A gradient sum's message: the flat sum's bytes, then its row count and loss sum.
_TAIL = struct.Struct("<qd")


def pack(flat: np.ndarray, rows: int, loss_sum: float) -> bytes:
    """One bytes message for a channel. Ray writes bytes as they are, where a tuple holding
    an array goes through pickle: about 0.1 ms more per message on each side, most of a
    small model's hop (benchmarks/channel_pingpong.py, docs/performance.md)."""
    return flat.tobytes() + _TAIL.pack(rows, loss_sum)


def unpack(msg, dtype: np.dtype) -> tuple[np.ndarray, int, float]:
    """`(flat sum, rows, loss sum)` of a `pack` message; the sum is a view of `msg`."""
    body = len(msg) - _TAIL.size
    rows, loss_sum = _TAIL.unpack_from(msg, body)
    return np.frombuffer(msg, dtype, body // dtype.itemsize), rows, loss_sum


def params_digest(params) -> str:
    """sha256 of the parameters' bytes, in order: equal for bit-identical replicas."""
    h = hashlib.sha256()
    for p in params:
        h.update(np.ascontiguousarray(p.data).tobytes())
    return h.hexdigest()


class Replica:
    """One worker's copy of the model and optimizer, and its part of each step."""

    def __init__(self, spec, rank: int, workers: int, X: np.ndarray, y: np.ndarray, state):
        self.model = build_model(spec)
        self.params = self.model.parameters()
        self.opt = build_optimizer(spec, self.params)
        self.shapes = [p.shape for p in self.params]
        self.dtype = self.params[0].data.dtype
        self.loss, self.X, self.y = spec.loss, X, y
        self.rank, self.workers = rank, workers
        self.schedule = Schedule(len(X), spec.batch_size, spec.epochs, spec.seed)
        self.recipe = build_recipe(spec, self.schedule.total_steps)  # lr and clipping
        self.end, self.fetch, self.verify, self.checked = 0, False, False, ()
        self.before = None  # rank 0, at a checked step: the health snapshot from before it
        # This block's steps: (rows, loss, gradient norm, health statistics or None).
        self.results: list[tuple] = []
        self.diverged: str | None = None
        self.load(state)

    def load(self, state: dict) -> None:
        """Take another replica's (or the coordinator's) state: parameters, optimizer, step."""
        for p, a in zip(self.params, unflatten(state["params"], self.shapes), strict=True):
            p.data = np.array(a)  # a private copy: the optimizer updates it in place
            p.grad = None
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.results, self.diverged = [], None

    def state(self) -> dict:
        """Everything another replica needs to continue from here, and the last gradient."""
        grads = [p.grad for p in self.params]
        return {
            "step": self.step,
            "params": flatten([p.data for p in self.params]),
            "optimizer": self.opt.state_dict(),
            "grads": None if any(g is None for g in grads) else flatten(grads),
        }

    # The three stages of a block (exchange.ReplicatedGraph): start, step, ..., finish.

    def start(self, command: tuple):
        """A new block up to step `end` (fetch, verify, the 1-based steps whose health is
        checked); this replica's first gradient sum."""
        self.end, self.fetch, self.verify, self.checked = command
        self.results, self.before = [], None  # nothing of a block that failed carries over
        return self._grad()

    def step_once(self, sums: tuple):
        """Apply the step whose sums these are, then the next step's own sum."""
        self._apply(sums)
        return self._grad()

    def finish(self, sums: tuple) -> dict:
        """Apply the last step; what the coordinator asked for."""
        self._apply(sums)
        out: dict = {"step": self.step, "diverged": self.diverged, "results": None}
        if self.rank == 0:
            out["results"] = self.results
            if self.fetch or self.diverged:
                out["state"] = self.state()
        if self.verify:
            out["sha256"] = params_digest(self.params)
        return out

    def pace(self, enough: float) -> float:
        """Seconds this replica takes for the gradient sum of its piece of the next step, 0
        at the end of the schedule: the faster of two runs (the first warms up), or the
        first alone if it took `enough` seconds (a slow model's start-up is spared a
        second run). The replica is left as it was (its gradients unset, as loaded)."""
        if self.step >= self.schedule.total_steps:
            return 0.0
        times: list[float] = []
        while len(times) < 2 and min(times, default=0.0) < enough:
            began = time.perf_counter()
            self._grad_sum(self.schedule.batch(self.step))
            times.append(time.perf_counter() - began)
        for p in self.params:
            p.grad = None
        return min(times)

    def _grad(self) -> bytes | None:
        """(flat gradient sum, rows, loss sum) of this replica's piece as one message
        (`pack`), or None when done."""
        if self.step >= self.end or self.diverged is not None:
            return None
        batch = self.schedule.batch(self.step)
        if self.rank == 0 and self.step + 1 in self.checked:
            self.before = snapshot(self.model, self.X[batch])  # the weights before the step
        return pack(*self._grad_sum(batch))

    def _grad_sum(self, batch: np.ndarray) -> tuple[np.ndarray, int, float]:
        idx = split_batch(batch, self.workers)[self.rank]
        X, y, epoch = self.X[idx], self.y[idx], self.schedule.epoch_of(self.step)
        grads, loss_sum = grad_sum(self.model, self.loss, X, y, idx, epoch, self.params)
        return flatten(grads), len(idx), loss_sum

    def _apply(self, sums: tuple) -> None:
        if sums[0] is None:
            return
        sums = [unpack(msg, self.dtype) for msg in sums]
        grads, n, loss_sum = add_in_rank_order(sums, self.shapes)  # as the gather step adds
        try:
            loss, norm = average_and_step(
                self.params, self.opt, grads, n, loss_sum, self.step, self.recipe
            )
        except Diverged as err:
            self.diverged = str(err)
            return
        stats = step_stats(self.model, self.before) if self.before is not None else None
        self.before = None
        self.results.append((n, loss, norm, stats))
        self.step += 1
