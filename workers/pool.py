"""Ray worker actors that compute gradient sums, and the pool that keeps them alive.

The pool owns no training state: parameters live in the coordinator. When a
worker dies mid-step, the pool replaces it in the same placement-group bundle
and the coordinator's step is simply asked again, so no progress is lost.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.model import grad_sum, set_parameters

log = logging.getLogger(__name__)


class WorkerFailure(RuntimeError):
    """Workers died more often than the spec's max_failures allows."""


class ClusterTooSmall(RuntimeError):
    """The cluster cannot place all of a job's workers at once."""


@ray.remote(max_restarts=0, max_task_retries=0)
class GradWorker:
    """Holds the training rows (zero-copy from the object store) and a model skeleton."""

    def __init__(self, model_cfg: dict, data: tuple, blas_threads: int):
        from threadpoolctl import threadpool_limits

        from core import nn

        self._limits = threadpool_limits(limits=blas_threads)
        self.X, self.y = data
        self.loss = model_cfg["loss"]
        self.model = nn.MLP(
            model_cfg["sizes"],
            activation=model_cfg["activation"],
            dtype=np.dtype(model_cfg["dtype"]),
        )

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def grad(self, params: list[np.ndarray], idx: np.ndarray):
        set_parameters(self.model, params)
        grads, loss_sum = grad_sum(self.model, self.loss, self.X[idx], self.y[idx])
        return grads, len(idx), loss_sum


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
        on_failure: Callable[[int, str], None] | None = None,
        placement_timeout_s: float = 60.0,
    ):
        self.n, self.cpus = n, cpus_per_worker
        self.model_cfg, self.data_ref = model_cfg, data_ref
        self.max_failures, self.failures = max_failures, failures
        self.on_failure = on_failure
        self.node_ids: list[str] = []
        self.pg = placement_group([{"CPU": cpus_per_worker}] * n, strategy="SPREAD")
        try:
            ray.get(self.pg.ready(), timeout=placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            total = ray.cluster_resources().get("CPU", 0)
            raise ClusterTooSmall(
                f"could not place {n} workers x {cpus_per_worker} CPU within "
                f"{placement_timeout_s:.0f}s (cluster has {total:g} CPUs)"
            ) from None
        self.actors = [self._spawn(rank) for rank in range(n)]

    def _spawn(self, rank: int):
        actor = GradWorker.options(
            num_cpus=self.cpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=rank
            ),
        ).remote(self.model_cfg, self.data_ref, max(1, math.floor(self.cpus)))
        node = ray.get(actor.info.remote())["node_id"]
        if node not in self.node_ids:
            self.node_ids.append(node)
        return actor

    def grads(self, params: list[np.ndarray], pieces: list[np.ndarray]) -> list[tuple]:
        """One (grad_sums, count, loss_sum) per worker, in rank order; dead workers are replaced."""
        while True:
            params_ref = ray.put(params)
            futures = [
                a.grad.remote(params_ref, p) for a, p in zip(self.actors, pieces, strict=True)
            ]
            results, dead = [], []
            for rank, fut in enumerate(futures):
                try:
                    results.append(ray.get(fut))
                except RayActorError as err:
                    dead.append((rank, err))
            if not dead:
                return results
            for rank, err in dead:
                self._replace(rank, err)

    def _replace(self, rank: int, err: Exception) -> None:
        self.failures += 1
        reason = f"worker {rank} died: {type(err).__name__}"
        log.warning("%s (failure %d of at most %d)", reason, self.failures, self.max_failures)
        if self.on_failure:
            self.on_failure(rank, reason)
        if self.failures > self.max_failures:
            raise WorkerFailure(
                f"{self.failures} worker failures exceed max_failures={self.max_failures}; "
                f"last: {reason}"
            )
        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._spawn(rank)

    def worker_pids(self) -> list[int]:
        return [info["pid"] for info in ray.get([a.info.remote() for a in self.actors])]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
