"""/cluster: Ray's nodes and CPUs, and which jobs run where."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import DispatcherDep, SettingsDep
from service.schemas import Cluster, Node, RunningJob

router = APIRouter(tags=["cluster"])


@router.get("/cluster")
def cluster(dispatcher: DispatcherDep, settings: SettingsDep) -> Cluster:
    cap = dispatcher.capacity()
    return Cluster(
        nodes=[Node(**n) for n in dispatcher.cluster.nodes()],
        cpus_total=cap.total,
        cpus_free=cap.free,
        running_jobs=[RunningJob(**r) for r in dispatcher.running()],
        max_concurrent_jobs=settings.max_concurrent_jobs,
        paused=settings.paused,
        autoscaling=settings.autoscaling,
        dashboard_url=dispatcher.cluster.dashboard_url(),
    )
