"""The dispatcher's view of Ray: CPUs for gang scheduling, nodes for GET /cluster."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capacity:
    total: float
    free: float


class RayCluster:
    """Embedded Ray (the machine's CPUs, or `num_cpus`), or the cluster at `address`."""

    def __init__(self, address: str | None, num_cpus: int | None, dashboard: bool):
        self.address, self.num_cpus, self.dashboard = address, num_cpus, dashboard

    def start(self) -> None:
        from workers.cluster import ensure_ray

        ensure_ray(self.address, num_cpus=self.num_cpus, dashboard=self.dashboard)

    def stop(self) -> None:
        import ray

        ray.shutdown()

    def capacity(self) -> Capacity:
        from workers.cluster import free_cpus

        total, free = free_cpus()
        return Capacity(total, free)

    def nodes(self) -> list[dict]:
        import ray

        return [
            {
                "id": n["NodeID"],
                "alive": bool(n["Alive"]),
                "address": n.get("NodeManagerAddress"),
                "cpus": float(n.get("Resources", {}).get("CPU", 0.0)),
            }
            for n in ray.nodes()
        ]

    def dashboard_url(self) -> str | None:
        if not self.dashboard:
            return None
        try:  # Ray keeps the URL of the connected cluster's dashboard here
            from ray._private.worker import get_dashboard_url

            url = get_dashboard_url()
        except Exception:  # noqa: BLE001 - a missing dashboard must not break /cluster
            log.debug("no Ray dashboard URL", exc_info=True)
            return None
        return url if not url or "://" in url else f"http://{url}"
