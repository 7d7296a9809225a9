"""The dispatcher's view of Ray: CPUs for gang scheduling, nodes for GET /cluster."""

from __future__ import annotations

import logging
import signal
import threading
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
        from workers.config import WorkerSettings

        # ray.init on the main thread installs Ray's own SIGTERM handler, which exits at once;
        # the server's (uvicorn's) must stay: it checkpoints running jobs before exiting.
        main = threading.current_thread() is threading.main_thread()
        server_handler = signal.getsignal(signal.SIGTERM) if main else None
        settings = WorkerSettings(ray_address=self.address) if self.address else None
        ensure_ray(settings, num_cpus=self.num_cpus, dashboard=self.dashboard)
        if server_handler is not None:
            signal.signal(signal.SIGTERM, server_handler)

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
        from workers.ray_private import dashboard_url

        url = dashboard_url()
        return url if not url or "://" in url else f"http://{url}"
