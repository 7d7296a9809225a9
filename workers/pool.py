"""Ray worker actors that compute gradient sums, and the pool that keeps them alive.

The pool owns no training state. On the gather exchanges (`compiled`, `tasks`) the
parameters live in the coordinator: when a worker dies mid-step, the pool replaces it in
the same placement-group bundle and the coordinator's step is simply asked again. How
parameters and gradients travel is the exchange's business (exchange.py); the pool
reopens it over the new actors. On the `replicated` exchange each worker also holds a
replica (workers/replicated.py), and the replicated step restores a replacement's state
from a surviving replica.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.config import WorkerSettings
from workers.exchange import (
    ExchangeBroken,
    WorkersDied,
    add_in_rank_order,
    claim_cores,
    flatten,
    open_exchange,
    resolve,
    unflatten,
)
from workers.joblog import current as current_job_log
from workers.malloc import reuse_freed_memory
from workers.model import blas_threads, config_model, grad_sum, param_bytes, set_parameters
from workers.ray_private import skip_torch_probe
from workers.replica import Replica
from workers.worker_output import JobOutput

log = logging.getLogger(__name__)


class WorkerFailure(RuntimeError):
    """Workers died more often than the spec's max_failures allows."""


class ClusterTooSmall(RuntimeError):
    """The cluster cannot place all of a job's workers at once."""


class Stopped(RuntimeError):
    """The run was asked to stop while the pool waited for workers to be placed or start."""


POLL_S = 0.1  # how often a wait for Ray looks at the run's stop request


def check_stop(stop: threading.Event | None) -> None:
    """Stopped if the run was asked to stop (while its workers start)."""
    if stop is not None and stop.is_set():
        raise Stopped("stopped while the workers were starting")


def wait_for(ref: ray.ObjectRef, timeout: float, stop: threading.Event | None):
    """`ray.get(ref, timeout=timeout)`, but Stopped as soon as `stop` is set."""
    deadline = time.monotonic() + timeout
    while True:
        check_stop(stop)
        left = deadline - time.monotonic()
        if left <= 0:
            raise GetTimeoutError(f"not ready within {timeout:g}s")
        ready, _ = ray.wait([ref], timeout=min(POLL_S, left))
        if ready:
            return ray.get(ref)


@ray.remote(max_restarts=0, max_task_retries=0)
class GradWorker:
    """Holds the training rows (zero-copy from the object store) and a model skeleton."""

    def __init__(self, model_cfg: dict, data: tuple, blas_threads: int, reuse_memory: bool):
        from threadpoolctl import threadpool_limits

        if reuse_memory:
            reuse_freed_memory()
        self._limits = threadpool_limits(limits=blas_threads)
        self.blas_threads, self.cores = blas_threads, None
        skip_torch_probe()
        self.X, self.y = data
        self.loss = model_cfg["loss"]
        self.model = config_model(model_cfg)
        # The model's parameters are views of one vector that each step overwrites: a copy
        # of the step's input, so no view of a channel or object-store buffer outlives it.
        self.params = self.model.parameters()
        self.flat = flatten([p.data for p in self.params])
        set_parameters(self.model, unflatten(self.flat, [p.shape for p in self.params]))

    def pin(self) -> list[int]:
        """A core of its own for each BLAS thread, if the node has them free (exchange.py)."""
        if self.cores is None:
            self.cores = claim_cores(self.blas_threads)
        return self.cores

    def info(self) -> dict:
        node_id = ray.get_runtime_context().get_node_id()
        return {"node_id": node_id, "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def mark_output(self, mark: str) -> tuple[str, int]:
        """`mark` on stdout and stderr, after all this worker wrote (workers/worker_output.py)."""
        for stream in (sys.stdout, sys.stderr):
            print(mark, file=stream, flush=True)
        return ray.util.get_node_ip_address(), os.getpid()

    def grad(self, flat_params: np.ndarray, piece: tuple[int, np.ndarray]):
        """(flat gradient sum, sample count, loss sum) over the rows `idx` of the piece
        `(epoch, idx)` (the epoch keys dropout masks)."""
        epoch, idx = piece
        self.flat[:] = flat_params
        X, y = self.X[idx], self.y[idx]
        grads, loss_sum = grad_sum(self.model, self.loss, X, y, idx, epoch, self.params)
        return flatten(grads), len(idx), loss_sum

    # The replicated exchange: this worker's replica (workers/replicated.py).

    def replicate(self, spec, rank: int, workers: int, state: dict) -> None:
        self.replica = Replica(spec, rank, workers, self.X, self.y, state)

    def replica_at(self) -> int:
        return self.replica.step

    def replica_pace(self, enough: float) -> float:
        return self.replica.pace(enough)

    def replica_state(self) -> tuple[dict, list]:
        """The replica's state, and the steps it did in its current block."""
        return self.replica.state(), self.replica.results

    def replica_start(self, command):
        return self.replica.start(command)

    def replica_step_once(self, *sums):
        return self.replica.step_once(sums)

    def replica_finish(self, *sums):
        return self.replica.finish(sums)


class OnPool:
    """What a run reports about the workers of a step strategy that runs on a pool."""

    pool: WorkerPool

    @property
    def node_ids(self) -> list[str]:
        return list(self.pool.node_ids)

    @property
    def exchange(self) -> str:
        return self.pool.kind

    @property
    def failures(self) -> int:
        return self.pool.failures


class WorkerPool:
    """`n` GradWorkers spread over the cluster's nodes, one placement-group bundle each."""

    def __init__(
        self,
        n: int,
        cpus_per_worker: float,
        model_cfg: dict,
        data_ref: ray.ObjectRef,
        *,
        max_failures: int,
        failures: int = 0,
        on_failure: Callable[[int, str, list[str]], None] | None = None,
        exchange: str | None = None,
        settings: WorkerSettings | None = None,
        stop: threading.Event | None = None,
    ):
        """`exchange`: the spec's choice ("auto" leaves it to `settings.exchange`). `stop`:
        the run's stop request; waits for workers to be placed or start end with Stopped
        once it is set (each leaves nothing behind)."""
        self.settings = settings or WorkerSettings()
        self.stop = stop
        self.n, self.cpus = n, cpus_per_worker
        self.model_cfg, self.data_ref = model_cfg, data_ref
        self.max_failures, self.failures = max_failures, failures
        self.on_failure = on_failure
        self.output = JobOutput(current_job_log())  # the workers' stdout/stderr: the job's log
        self.placement_timeout_s = timeout = self.settings.placement_timeout_s
        self.node_ids: list[str] = []  # every node that ran a worker, in order of first use
        self.pg = placement_group([{"CPU": cpus_per_worker}] * n, strategy="SPREAD")
        try:
            wait_for(self.pg.ready(), timeout, stop)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            total = ray.cluster_resources().get("CPU", 0)
            raise ClusterTooSmall(
                f"could not place {n} workers x {cpus_per_worker:g} CPU within "
                f"{timeout:g}s (cluster has {total:g} CPUs)"
            ) from None
        except BaseException:
            remove_placement_group(self.pg)
            raise
        # The largest message: the flat parameters plus the batch's indices, with room to spare.
        self.payload_bytes = param_bytes(model_cfg, model_cfg["dtype"]) + 2**20
        # `replicated`: the replicated step runs its own graph; the pool only keeps actors.
        self.kind, self.exchange = resolve(exchange, self.settings), None
        self.fallback_reason: str | None = None
        self.actors: list = []
        starting = []
        try:
            starting = [self._create(rank) for rank in range(n)]  # they start in parallel
            for rank in range(n):
                self.actors.append(self._spawn(rank, starting[rank]))
            if self.kind != "replicated":
                self._connect()
        except BaseException:
            for actor in starting[len(self.actors) :]:
                ray.kill(actor, no_restart=True)
            self.shutdown()
            raise

    def _create(self, rank: int):
        """A new GradWorker in bundle `rank`, starting (not waited for)."""
        return GradWorker.options(
            num_cpus=self.cpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=rank
            ),
        ).remote(
            self.model_cfg, self.data_ref, blas_threads(self.cpus),
            self.settings.reuse_freed_memory,
        )  # fmt: skip

    def _spawn(self, rank: int, actor=None):
        """A started worker for bundle `rank`: `actor` (created by `_create`), or a new one."""
        deadline = time.monotonic() + self.placement_timeout_s
        while True:
            actor = actor or self._create(rank)
            try:
                info = wait_for(actor.info.remote(), deadline - time.monotonic(), self.stop)
                break
            except RayActorError as err:
                if err.actor_init_failed:  # its own error: starting another would fail alike
                    log.error("worker %d could not start: %s", rank, err)
                    cause = str(err).strip().splitlines()[-1]  # the traceback's last line
                    raise WorkerFailure(f"worker {rank} could not start: {cause}") from None
                # Its node died as it started (the bundle moves once Ray declares the node
                # dead): it never worked, so it is no failure of the job. Start another.
                if time.monotonic() > deadline:
                    raise WorkerFailure(f"could not start worker {rank}: {err}") from None
                log.warning("new worker %d died before it started; starting another", rank)
                actor = None
                (self.stop or threading.Event()).wait(1.0)
                check_stop(self.stop)
            except GetTimeoutError:
                ray.kill(actor, no_restart=True)
                raise ClusterTooSmall(
                    f"worker {rank} did not start within {self.placement_timeout_s:g}s"
                ) from None
            except Stopped:
                ray.kill(actor, no_restart=True)
                raise
        if info["node_id"] not in self.node_ids:
            self.node_ids.append(info["node_id"])
        self.output.add(rank, info)
        return actor

    def _connect(self) -> None:
        """Open the exchange over the current actors; replace dead ones or fall back on the way."""
        while self.exchange is None:
            try:
                self.exchange = open_exchange(
                    self.kind, self.actors, self.payload_bytes, self.settings
                )
            except (WorkersDied, ExchangeBroken) as err:
                self._recover(err)

    def _recover(self, err: WorkersDied | ExchangeBroken) -> None:
        """Replace the dead workers, or give up on the compiled graph for this job."""
        if isinstance(err, WorkersDied):
            for rank, cause in err.causes.items():
                self.replace(rank, cause)
        else:
            log.warning("%s; falling back to the tasks exchange", err)
            self.fall_back(str(err))

    def fall_back(self, reason: str) -> None:
        """Go on with the tasks exchange for the rest of the job, because of `reason`."""
        self._close_exchange()
        self.fallback_reason, self.kind = reason, "tasks"
        self._connect()

    def grads(self, params: list[np.ndarray], pieces: list[np.ndarray]) -> tuple:
        """(grad_sums, count, loss_sum) over all pieces, the workers' sums added in rank order.

        Dead workers are replaced and the step asked again.
        """
        flat, shapes = flatten(params), [p.shape for p in params]
        while True:
            try:
                results = self.exchange(flat, pieces)
            except (WorkersDied, ExchangeBroken) as err:
                self._close_exchange()
                self._recover(err)
                self._connect()
                continue
            # The results are views into the exchange's buffers, read here once and dropped.
            return add_in_rank_order(results, shapes)

    def _close_exchange(self) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.close()

    def replace(self, rank: int, cause: str) -> None:
        """Count a failure of worker `rank` (WorkerFailure past max_failures) and start a
        new worker in its bundle."""
        self.failures += 1
        reason = f"worker {rank} died: {cause}"
        log.warning("%s (failure %d of at most %d)", reason, self.failures, self.max_failures)
        try:
            if self.failures > self.max_failures:
                raise WorkerFailure(
                    f"{self.failures} worker failures exceed max_failures={self.max_failures}; "
                    f"last: {reason}"
                )
            ray.kill(self.actors[rank], no_restart=True)
            self.actors[rank] = self._spawn(rank)
        finally:  # reported with the nodes that ran workers, the replacement's included
            if self.on_failure:
                self.on_failure(rank, reason, list(self.node_ids))

    def worker_pids(self) -> list[int]:
        return [info["pid"] for info in ray.get([a.info.remote() for a in self.actors])]

    def shutdown(self) -> None:
        self._close_exchange()
        self.output.drain(self.actors)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
