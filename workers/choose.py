"""`workers: "auto"`: the worker count, 0 (in-process) included, that makes a step fastest.

The result does not depend on the worker count (beyond 1e-9), so the job may pick
whatever is fastest on the cluster it got. A step of N workers is predicted to take the
gradient compute of the global batch divided by N, plus the exchange's cost for N; an
in-process step takes the compute alone. The compute is measured (`measure_gradient`:
a few gradient sums of a real batch, not applied); the exchange is estimated from
`WorkerSettings` (a fixed cost per step for the exchange kind, plus the bytes that cross
over a bandwidth), because measuring it would mean starting the workers it may not need.
N is capped by the batch size and by the free CPUs, which are asked for only when some
N > 0 could beat the in-process step (so a tiny model never starts Ray).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workers.config import WorkerSettings
from workers.data import PreparedData
from workers.exchange import resolve
from workers.model import blas_limit, blas_threads, build_model, grad_sum, param_bytes
from workers.spec import TrainingSpec


@dataclass(frozen=True)
class WorkerChoice:
    workers: int
    reason: str


def measure_gradient(
    spec: TrainingSpec, data: PreparedData, rounds: int = 5, budget_s: float = 0.3
) -> float:
    """Seconds of one in-process gradient sum over a global batch (the fastest of a few
    after a warm-up, within about `budget_s`), on a model of its own: nothing is applied."""
    model = build_model(spec)
    idx = np.arange(min(spec.batch_size, len(data.X)))
    X, y = data.X[idx], data.y[idx]
    times: list[float] = []
    with blas_limit(blas_threads(spec.cpus_per_worker)):
        for _ in range(rounds + 1):
            began = time.perf_counter()
            grad_sum(model, spec.loss, X, y)
            times.append(time.perf_counter() - began)
            if sum(times) > budget_s:
                break
    return min(times[1:] or times)


def exchange_seconds(kind: str, n: int, param_bytes: int, settings: WorkerSettings) -> float:
    """The predicted exchange cost of one step with `n` workers. Gather: the parameters go
    out once, `n` gradient sums come back. Replicated: each worker reads the other `n - 1`
    sums (the workers read in parallel) and steps its own optimizer."""
    if kind == "replicated":
        return settings.auto_replicated_step_s + (n - 1) * param_bytes / settings.auto_bytes_per_s
    fixed = settings.auto_compiled_step_s if kind == "compiled" else settings.auto_tasks_step_s
    return fixed + (n + 1) * param_bytes / settings.auto_bytes_per_s


def choose_workers(
    spec: TrainingSpec,
    settings: WorkerSettings,
    measure: Callable[[], float],
    free_cpus: Callable[[], float],
) -> WorkerChoice:
    """The fastest worker count for `spec`. `measure()`: seconds of the in-process gradient
    compute of one global batch; `free_cpus()`: the CPUs this job may use."""
    compute = measure()
    kind = resolve(spec.exchange, settings)
    size = param_bytes(spec.model, spec.dtype)

    def step_s(n: int) -> float:
        return compute if n == 0 else compute / n + exchange_seconds(kind, n, size, settings)

    cap, limit = spec.batch_size, "no count of workers could beat it; the cluster was not asked"
    if _fastest(step_s, min(cap, 1024)) > 0:  # workers could pay: how many may we have?
        free = free_cpus()
        by_cpus = math.floor(free / spec.cpus_per_worker + 1e-9)
        limits = [
            (cap, f"batch_size {cap}"),
            (by_cpus, f"{free:g} free CPUs"),
            (settings.max_workers, f"SHARDGRAD_MAX_WORKERS={settings.max_workers}"),
        ]
        cap, why = min(limits, key=lambda limit: limit[0])
        limit = f"at most {cap} workers ({why})"
    best = _fastest(step_s, cap)
    shown = sorted({0, 1, 2, best, cap} & set(range(cap + 1)))
    predicted = ", ".join(f"{_label(n)} {_ms(step_s(n))}" for n in shown)
    reason = (
        f"chose {_label(best)}: gradient compute {_ms(compute)} per step, {kind} exchange "
        f"estimated; predicted step {predicted}; {limit}"
    )
    return WorkerChoice(best, reason)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms:.0f} ms"


def _fastest(step_s: Callable[[int], float], cap: int) -> int:
    """The count with the shortest predicted step (the fewest workers on a tie)."""
    return min(range(max(0, cap) + 1), key=lambda n: (step_s(n), n))


def _label(n: int) -> str:
    return "in-process" if n == 0 else f"{n} worker{'s' * (n != 1)}"
