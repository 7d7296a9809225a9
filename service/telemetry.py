"""Prometheus metrics, read from the store and the dispatcher at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service.tables import QUEUED, STATUSES
from workers.health import KINDS


class JobCollector:
    def __init__(self, store, dispatcher):
        self.store, self.dispatcher = store, dispatcher

    def collect(self):
        counts = self.store.counts()
        jobs = GaugeMetricFamily("shardgrad_jobs", "Jobs in the store by status", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily(
            "shardgrad_queue_depth", "Jobs waiting to run", value=counts.get(QUEUED, 0)
        )
        d = self.dispatcher
        yield GaugeMetricFamily(
            "shardgrad_running_jobs", "Jobs running in this process", value=len(d.runs)
        )
        yield GaugeMetricFamily(
            "shardgrad_steps_per_second",
            "Training steps per second over the last 10 s, all jobs of this process",
            value=d.steps_per_second(),
        )
        yield CounterMetricFamily(
            "shardgrad_steps", "Training steps completed by this process", value=d.steps_total
        )
        warnings = CounterMetricFamily(
            "shardgrad_health_warnings",
            "Training-health warnings of this process's jobs, counted when they first appear",
            labels=["kind"],
        )
        for kind in KINDS:
            warnings.add_metric([kind], d.health_warnings[kind])
        yield warnings
        cap = d.capacity()
        yield GaugeMetricFamily("shardgrad_cluster_cpus", "CPUs of the Ray cluster", cap.total)
        yield GaugeMetricFamily("shardgrad_cluster_cpus_free", "CPUs free for new jobs", cap.free)


def render(store, dispatcher) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(store, dispatcher))
    return generate_latest(registry)
