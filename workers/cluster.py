"""Attach to a Ray cluster, or start an embedded one for local runs."""

from __future__ import annotations

import logging

import ray

from workers.config import WorkerSettings
from workers.ray_private import quiet_token_auth_notice
from workers.worker_output import route


def ensure_ray(
    settings: WorkerSettings | None = None,
    *,
    num_cpus: int | None = None,
    dashboard: bool = False,
) -> None:
    """Connect once per process: to `settings.ray_address` (which $RAY_ADDRESS sets), else
    to a local embedded Ray. The workers' stdout and stderr go to their jobs' logs
    (workers/worker_output.py), not to this process's."""
    if not ray.is_initialized():
        _connect((settings or WorkerSettings()).ray_address or None, num_cpus, dashboard)
    route()


def _connect(address: str | None, num_cpus: int | None, dashboard: bool) -> None:
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return
    with quiet_token_auth_notice():
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, **kwargs)


def free_cpus() -> tuple[float, float]:
    """(total, available) CPUs of the cluster right now."""
    return ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
