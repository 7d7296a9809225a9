"""What a run tells its callback as it goes, and the summary it ends with.

The Trainer (workers/trainer.py) emits these events; the service's dispatcher, the
`shardgrad train` progress bar and the tests' stand-in trainer read or write them. They
are TypedDicts: at run time plain JSON-ready dicts (a callback may log or forward them as
they are), and one definition of their keys for every side.

* ``started``: once per run, after the workers are placed (and the worker count chosen);
  with a head start, before they are: its ``worker_nodes`` are then empty.
* ``step``: after every optimizer step, with its lr; at an evaluation step (each epoch's end,
  or every ``eval_every`` steps, and the last) with the validation metrics.
* ``checkpoint``: after a checkpoint is written (never for an abandoned run).
* ``health``: after each training-health check (workers/health.py).
* ``worker_failure``: a worker died; it was replaced and the step is recomputed.
* ``workers_joined``: after a head start (workers/headstart.py), the workers took over
  from the coordinator at ``step``.

`RunSummary` is what `Trainer.run` returns and `shardgrad train --json` prints: every key
is always there (what a run never got to is None, 0 or []), ``error`` only when it failed
or was stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NotRequired, TypedDict, get_args

EventType = Literal["started", "step", "checkpoint", "health", "worker_failure", "workers_joined"]
Status = Literal["succeeded", "failed", "cancelled"]


class StartedEvent(TypedDict):
    type: Literal["started"]
    total_steps: int
    step: int  # the first step this run computes: 0, or where it resumed
    resumed_from_step: int | None
    worker_nodes: list[str]
    exchange: str | None  # the exchange; None in-process (workers: 0) and in a head start
    workers: int  # the worker count of this run: the spec's, or the one auto chose
    workers_reason: str  # why: "set by the spec", or what auto measured and predicted


class StepEvent(TypedDict):
    type: Literal["step"]
    step: int  # 1-based: the number of steps done
    total_steps: int
    epoch: int
    train_loss: float
    grad_norm: float  # of the averaged gradient, before grad_clip
    lr: float  # the learning rate this step used (optimizer.schedule)
    samples_per_s: float | None
    val_loss: NotRequired[float]  # evaluation steps only
    val_accuracy: NotRequired[float | None]  # likewise; None for regression
    # likewise, for the builtin sequence tasks only: the share of validation questions
    # whose greedy answer is exactly right (workers.generate.val_exact_match)
    val_exact_match: NotRequired[float | None]


class CheckpointEvent(TypedDict):
    type: Literal["checkpoint"]
    step: int
    path: str


class LayerStats(TypedDict):
    layer: str  # layers.<i>, as in the checkpoint
    grad_norm: float
    weight_norm: float
    update_ratio: float
    dead_fraction: float | None


class Advice(TypedDict):
    field: str  # the spec field that addresses a warning, e.g. "grad_clip.max_norm"
    change: dict | None  # a JSON merge patch on the run's spec that sets it; None: no one edit


class HealthWarning(TypedDict):
    kind: str  # one of workers.health.KINDS
    layer: str
    message: str
    first_step: int
    last_step: int
    advice: Advice | None  # from a trainer (workers.health.advice_for)


class HealthEvent(TypedDict):
    type: Literal["health"]
    step: int
    layers: list[LayerStats]
    warnings: list[HealthWarning]  # every warning so far, each (kind, layer) once


class WorkerFailureEvent(TypedDict):
    type: Literal["worker_failure"]
    rank: int
    reason: str
    worker_nodes: list[str]  # every node that ran a worker, the replacement's included


class WorkersJoinedEvent(TypedDict):
    type: Literal["workers_joined"]
    step: int  # the steps before it ran on the coordinator, as the workers would have
    worker_nodes: list[str]
    exchange: str  # "replicated", "compiled" or "tasks"


Event = (
    StartedEvent
    | StepEvent
    | CheckpointEvent
    | HealthEvent
    | WorkerFailureEvent
    | WorkersJoinedEvent
)
Callback = Callable[[Event], None]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)


class HealthSummary(TypedDict):
    checked_steps: int
    last_step: int | None
    warnings: list[HealthWarning]


class RunSummary(TypedDict):
    status: Status
    steps: int
    epochs: int
    final_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    checkpoint: str | None
    worker_nodes: list[str]
    exchange: str | None
    workers: int | None  # None if the run failed before its worker count was known
    workers_reason: str | None
    elapsed_s: float
    worker_failures: int
    resumed_from_step: int | None
    health: HealthSummary | None
    stopped_early: bool  # early_stopping ended the run before its last epoch
    best_step: int | None  # keep_best's best evaluation (early_stopping's by default)
    error: NotRequired[str]


def run_summary(
    status: Status,
    steps: int,
    *,
    epochs: int = 0,
    final_loss: float | None = None,
    val_loss: float | None = None,
    val_accuracy: float | None = None,
    checkpoint: str | None = None,
    worker_nodes: list[str] | None = None,
    exchange: str | None = None,
    workers: int | None = None,
    workers_reason: str | None = None,
    elapsed_s: float = 0.0,
    worker_failures: int = 0,
    resumed_from_step: int | None = None,
    health: HealthSummary | None = None,
    stopped_early: bool = False,
    best_step: int | None = None,
    error: str | None = None,
) -> RunSummary:
    """A summary with every key of the contract; `error` only when given."""
    summary = RunSummary(
        status=status,
        steps=steps,
        epochs=epochs,
        final_loss=final_loss,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        checkpoint=checkpoint,
        worker_nodes=list(worker_nodes or []),
        exchange=exchange,
        workers=workers,
        workers_reason=workers_reason,
        elapsed_s=elapsed_s,
        worker_failures=worker_failures,
        resumed_from_step=resumed_from_step,
        health=health,
        stopped_early=stopped_early,
        best_step=best_step,
    )
    if error is not None:
        summary["error"] = error
    return summary
