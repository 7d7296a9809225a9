"""The dispatcher: claims queued jobs when the cluster has CPUs for all their workers and runs
each job's Trainer (the coordinator) in its own thread. Trainer events become progress,
metric points and timeline entries in the store as they arrive.

A job with `workers: "auto"` is claimed when one worker fits. Until its Trainer has chosen
its worker count, it holds the CPUs that were free when it started (the Trainer's cap);
its `started` event then brings the reservation down to what the chosen count uses.

Free CPUs = min(Ray's available CPUs, Ray's total - what our running jobs reserved): Ray's
own figure lags until a new job's placement group exists, ours ignores other Ray users.
The queue is strict (priority, then FIFO): a job that does not fit yet holds back the
ones behind it, so a big job is never starved; only a job larger than the whole cluster
(waiting for an autoscaler) is passed over.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from service.cluster import Capacity, RayCluster
from service.config import Settings
from service.schemas import JobHealth, finite
from service.store import JobStore
from service.tables import POINT_FIELDS, JobRow
from workers.events import (
    CheckpointEvent,
    Event,
    EventType,
    HealthEvent,
    StartedEvent,
    StepEvent,
    WorkerFailureEvent,
    WorkersJoinedEvent,
)
from workers.health import new_warnings
from workers.spec import TrainingSpec

if TYPE_CHECKING:
    from service.sweeps import Sweeps

log = logging.getLogger(__name__)
EPS = 1e-9


@dataclass
class Run:
    """One running job in this process."""

    job_id: str
    name: str
    workers: int | None  # None while an auto run has not chosen
    cpus: float  # reserved: the claim's, all that was free for an auto run until it chose
    stop: threading.Event = field(default_factory=threading.Event)
    # Set with stop when this process may no longer own the job: the Trainer ends without
    # writing anything more, since another process may be resuming it.
    abandon: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # "cancel", "shutdown" or "abandon", once stop is set
    thread: threading.Thread | None = None
    metrics: dict = field(default_factory=dict)
    worker_nodes: list[str] = field(default_factory=list)
    rate: float | None = None  # steps per second, smoothed
    last_step_at: float | None = None
    checkpoint_step: int | None = None  # the newest checkpoint the Trainer reported
    spec: TrainingSpec | None = None  # once validated, as the run starts
    trial: tuple[str, int] | None = None  # (sweep id, trial number) of a sweep's trial
    pruned: bool = False  # the sweep's pruner stopped it


def pending_reason(
    job: JobRow, position: int | None, cap: Capacity, running: int, settings: Settings
) -> str:
    """Why a queued job is not running yet, in the user's words."""
    need = job.cpus
    if settings.paused or settings.max_concurrent_jobs == 0:
        return "the dispatcher is paused"
    if need > cap.total + EPS:
        return (
            f"waiting for the cluster to scale up: needs {need:g} CPUs, "
            f"the cluster has {cap.total:g}"
        )
    if position and position > 1:
        return f"waiting behind {position - 1} queued job(s)"
    if running >= settings.max_concurrent_jobs:
        return f"waiting for a job slot ({running} of {settings.max_concurrent_jobs} running)"
    if need > cap.free + EPS:
        return f"waiting for {need:g} CPUs, {cap.free:g} free"
    return "about to start"


class Dispatcher:
    def __init__(self, store: JobStore, settings: Settings, cluster: RayCluster, train=None):
        self.store, self.settings, self.cluster = store, settings, cluster
        self.owner = settings.owner
        self._train = train  # workers.trainer.train, or a stand-in in tests
        self.sweeps: Sweeps | None = None  # drives sweeps on this loop, when set
        self.runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap = Capacity(0.0, 0.0)
        self._cap_at = 0.0  # monotonic time of the last good read of Ray
        self._held_at = time.monotonic()  # the last heartbeat that reached the store
        self._lease_thread: threading.Thread | None = None
        self.steps_total = 0
        self.health_warnings: collections.Counter[str] = collections.Counter()  # by kind
        self._step_times: collections.deque[float] = collections.deque(maxlen=10_000)

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Connect to Ray, reconcile jobs left active by a previous run, start the loop."""
        self.cluster.start()
        self._refresh()
        for job_id in self.store.reclaim_orphans(
            self.settings.lease_s,
            owner=self.owner,
            everyone=self.store.single_process,
            max_attempts=self.settings.max_attempts,
        ):
            log.info(
                "job %s was left running: queued to resume, or failed if it keeps "
                "ending with the service's death",
                job_id,
            )
        self._held_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()
        self._lease_thread = threading.Thread(target=self._lease_loop, name="lease", daemon=True)
        self._lease_thread.start()

    def shutdown(self, timeout: float = 120.0) -> None:
        """Graceful stop: every running job checkpoints at its current step and is queued
        again for the next start (not failed, not cancelled)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            run.reason = run.reason or "shutdown"
            run.stop.set()
        deadline = time.monotonic() + timeout
        for run in runs:
            if run.thread is not None:
                run.thread.join(max(0.0, deadline - time.monotonic()))
        for thread in (self._thread, self._lease_thread):
            if thread is not None:
                thread.join(5)

    def wake(self) -> None:
        if not self.settings.paused:
            self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Stop a job running here after its current step (it checkpoints, ends cancelled)."""
        with self._lock:
            run = self.runs.get(job_id)
        if run is not None:
            run.reason = "cancel"
            run.stop.set()

    # -- what the API asks ------------------------------------------------------------------

    def capacity(self) -> Capacity:
        reserved = sum(run.cpus for run in self.runs.values())
        cap = self._cap
        return Capacity(cap.total, max(0.0, min(cap.free, cap.total - reserved)))

    def healthy(self) -> bool:
        return time.monotonic() - self._cap_at < max(10.0, 5 * self.settings.poll_interval_s)

    def pending_reason(self, job: JobRow, position: int | None) -> str:
        return pending_reason(job, position, self.capacity(), len(self.runs), self.settings)

    def steps_per_second(self, window: float = 10.0) -> float:
        cutoff = time.monotonic() - window
        return sum(1 for t in list(self._step_times) if t >= cutoff) / window

    def running(self) -> list[dict]:
        return [
            {
                "job_id": r.job_id,
                "name": r.name,
                "workers": r.workers,
                "cpus": r.cpus,
                "worker_nodes": list(r.worker_nodes),
            }
            for r in list(self.runs.values())
        ]

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # a store or Ray hiccup must not kill the dispatcher
                log.exception("dispatcher tick failed")
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()
            time.sleep(0.02)  # coalesce a burst of wake-ups into one tick

    def _refresh(self) -> None:
        self._cap = self.cluster.capacity()
        self._cap_at = time.monotonic()

    def _lease_loop(self) -> None:
        """Renew this process's leases, and never run a job another process may be running.

        On its own thread, so a slow Ray call in the dispatcher's loop cannot delay it. A
        job the heartbeat no longer finds ours was taken back (our lease lapsed while we
        stalled): its Trainer is abandoned. If the store has been out of reach for half a
        lease, every Trainer is abandoned before any other process may take its job; the
        jobs go back to the queue when their leases lapse and resume from their newest
        checkpoint, in whichever process claims them.
        """
        s = self.settings
        while not self._stopping.wait(s.heartbeat_s):
            began = time.monotonic()
            with self._lock:
                runs = [r for r in self.runs.values() if not r.abandon.is_set()]
            try:
                held = self.store.heartbeat(self.owner, [r.job_id for r in runs])
                self._held_at = began
                lost = [r for r in runs if r.job_id not in held]
                self._abandon(lost, "its lease lapsed and the job was taken back")
                # Other processes' lapsed leases.
                self.store.reclaim_orphans(s.lease_s, max_attempts=s.max_attempts)
            except Exception:  # the store is out of reach: keep trying, within the lease
                log.exception("heartbeat failed")
            if time.monotonic() - self._held_at > s.lease_s / 2:
                with self._lock:
                    runs = list(self.runs.values())
                silent = time.monotonic() - self._held_at
                self._abandon(runs, f"no heartbeat reached the store for {silent:.0f}s")

    def _abandon(self, runs: list[Run], why: str) -> None:
        for run in runs:
            if not run.abandon.is_set():
                log.warning("abandoning job %s: %s", run.job_id, why)
                run.reason = "abandon"
                run.abandon.set()
                run.stop.set()

    def _tick(self) -> None:
        # Submissions wake the loop; Ray is asked at most once per poll interval (our own
        # reservations keep the figure right in between).
        if time.monotonic() - self._cap_at >= self.settings.poll_interval_s:
            self._refresh()
        for job_id in self.store.owned(self.owner, "cancelling"):  # cancels via other processes
            self.cancel(job_id)
        if self.sweeps is not None:  # tells ended trials, queues new ones, then they start
            self.sweeps.tick()
        self._dispatch()

    def _dispatch(self) -> None:
        s = self.settings
        if s.paused or self._stopping.is_set() or len(self.runs) >= s.max_concurrent_jobs:
            return
        cap = self.capacity()
        budget = {"free": cap.free, "slots": s.max_concurrent_jobs - len(self.runs)}

        def decide(job) -> bool | None:  # the job's queue columns, see JobStore.claim
            if budget["slots"] <= 0:
                return None
            if job.cpus > cap.total + EPS:
                return False  # only an autoscaler can make room for it; let others pass
            if job.cpus > budget["free"] + EPS:
                return None  # gang: all workers or none, and nobody overtakes it
            budget["free"] -= job.cpus
            budget["slots"] -= 1
            return True

        claimed = self.store.claim(self.owner, decide)
        spare = budget["free"]  # what is left once every claimed job has its claim
        for job in claimed:
            spare = self._start(job, spare)

    def _start(self, job: JobRow, spare: float = 0.0) -> float:
        """Run the claimed `job`. An auto job also holds the `spare` CPUs until it has
        chosen its worker count; returns the spare CPUs left for the next."""
        workers = job.spec.get("workers")
        run = Run(job.id, job.name, workers if isinstance(workers, int) else None, job.cpus)
        tags = job.tags
        if "sweep" in tags and tags.get("trial", "").isdigit():
            run.trial = (tags["sweep"], int(tags["trial"]))
        if workers == "auto":
            run.cpus, spare = job.cpus + spare, 0.0
        run.thread = threading.Thread(target=self._run, args=(run, job), name=f"job-{job.id}")
        with self._lock:  # started under the lock: shutdown() never joins an unstarted thread
            self.runs[job.id] = run
            run.thread.start()
        return spare

    # -- one job ------------------------------------------------------------------------------

    def _run(self, run: Run, job: JobRow) -> None:
        try:
            train = self._train
            if train is None:
                from workers.trainer import train
            spec = run.spec = TrainingSpec.model_validate(job.spec)
            out_dir = self.settings.jobs_dir / job.id
            # An auto run may use what it holds: its claim and the CPUs spare at its start.
            cap = {"max_cpus": run.cpus} if spec.workers == "auto" else {}
            summary = train(
                spec,
                out_dir,
                callback=lambda event: self._on_event(run, event),
                stop_event=run.stop,
                abandon_event=run.abandon,
                settings=self.settings.worker_settings(),
                **cap,
            )
        except Exception as err:  # anything the Trainer did not turn into a summary
            log.exception("job %s crashed", job.id)
            summary = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        try:
            self._settle(run, summary)
        except Exception:
            log.exception("could not record the end of job %s", job.id)
        finally:
            with self._lock:
                self.runs.pop(run.job_id, None)
            if run.trial is not None and self.sweeps is not None:
                self.sweeps.due.set()  # tell Optuna, ask the next trial
            self._wake.set()

    def _settle(self, run: Run, summary: dict) -> None:
        status, error = summary.get("status"), summary.get("error")
        store, owner = self.store, self.owner
        if run.abandon.is_set():  # back to the queue, unless another process took it already
            at = run.checkpoint_step
            resume = "the start" if at is None else f"its checkpoint at step {at}"
            message = f"{owner} abandoned it at step {summary.get('steps')}; will resume from "
            store.requeue(run.job_id, owner, message + resume)
            return
        if run.pruned and status == "cancelled":
            summary = {**summary, "pruned": True}
            error = f"pruned by the sweep's pruner at step {summary.get('steps')}"
        final = {"summary": summary, "eta_s": None}
        if summary.get("steps") is not None:
            final["step"] = summary["steps"]
        if status == "cancelled" and run.reason == "shutdown":
            message = f"service stopping: checkpointed at step {summary.get('steps')}; queued"
            if store.requeue(run.job_id, owner, message):
                return
        if status == "cancelled":
            store.finish(run.job_id, owner, "cancelled", error, **final)
        elif status == "succeeded":
            if summary.get("steps") is not None:
                final["total_steps"] = summary["steps"]
            store.finish(run.job_id, owner, "succeeded", None, **final)
        else:
            store.finish(run.job_id, owner, "failed", error or "training failed", **final)

    def _on_event(self, run: Run, event: Event) -> None:
        handler = self._handlers.get(event.get("type"))
        if handler is None:
            log.warning("job %s: unknown trainer event %r", run.job_id, event.get("type"))
            return
        handler(self, run, event)

    def _on_started(self, run: Run, event: StartedEvent) -> None:
        run.worker_nodes = list(event.get("worker_nodes") or [])
        values = {"total_steps": event["total_steps"], "step": event["step"]}
        values["worker_nodes"] = run.worker_nodes
        if event.get("workers") is not None:
            values |= {"workers": event["workers"], "workers_reason": event.get("workers_reason")}
            if run.workers is None and run.spec is not None:  # auto chose: hold what it uses
                run.cpus = run.spec.reserved_cpus(event["workers"])
                self._wake.set()
            run.workers = event["workers"]
        self.store.progress(run.job_id, self.owner, values)
        run.checkpoint_step = event.get("resumed_from_step")
        if run.checkpoint_step is not None:
            self.store.note(run.job_id, f"resumed from step {run.checkpoint_step}")

    def _on_checkpoint(self, run: Run, event: CheckpointEvent) -> None:
        """Where the job resumes from if this process loses it (said in the timeline entry
        of an abandoned run). Not a timeline entry of its own: the timeline holds status
        changes, and GET /jobs/{id}/checkpoints lists the checkpoints."""
        run.checkpoint_step = event["step"]

    def _on_worker_failure(self, run: Run, event: WorkerFailureEvent) -> None:
        reason = event.get("reason") or f"worker {event.get('rank')} failed"
        self.store.note(run.job_id, f"{reason}; the step is recomputed")
        if event.get("worker_nodes"):  # the replacement may have started on another node
            run.worker_nodes = list(event["worker_nodes"])
            self.store.progress(run.job_id, self.owner, {"worker_nodes": run.worker_nodes})

    def _on_workers_joined(self, run: Run, event: WorkersJoinedEvent) -> None:
        run.worker_nodes = list(event["worker_nodes"])
        self.store.progress(run.job_id, self.owner, {"worker_nodes": run.worker_nodes})
        step = event["step"]
        self.store.note(run.job_id, f"the workers took over at step {step} (a head start)")

    def _on_step(self, run: Run, event: StepEvent) -> None:
        now = time.monotonic()
        if run.last_step_at is not None and now > run.last_step_at:
            rate = 1.0 / (now - run.last_step_at)
            run.rate = rate if run.rate is None else 0.8 * run.rate + 0.2 * rate
        run.last_step_at = now
        self.steps_total += 1
        self._step_times.append(now)

        point = {k: finite(event.get(k)) for k in POINT_KEYS}
        run.metrics.update({k: v for k, v in point.items() if v is not None})
        point["step"], point["epoch"] = event["step"], event.get("epoch")
        left = event["total_steps"] - event["step"]
        values = {
            "step": event["step"],
            "total_steps": event["total_steps"],
            "epoch": event.get("epoch") or 0,
            "eta_s": round(left / run.rate, 3) if run.rate else None,
            "metrics": dict(run.metrics),
        }
        self.store.progress(run.job_id, self.owner, values, point)
        sweeps = self.sweeps if run.trial is not None and not run.pruned else None
        if sweeps is not None and sweeps.report(*run.trial, event):
            run.pruned, run.reason = True, "cancel"
            run.stop.set()  # it checkpoints at this step and ends cancelled

    def _on_health(self, run: Run, event: HealthEvent) -> None:
        """The job's latest health (the Trainer's record already holds each warning once,
        with its first step), and on the step's metric point the per-layer statistics and
        the warnings this check raised."""
        health = JobHealth.model_validate(event).model_dump(mode="json")  # non-finite: null
        step = health["step"]
        raised = [w for w in health["warnings"] if w["last_step"] == step]
        point = {"step": step, "layers": health["layers"], "warnings": raised}
        self.store.progress(run.job_id, self.owner, {"health": health}, point)
        self.health_warnings.update(w["kind"] for w in new_warnings(event))

    # One handler per event type of workers/events.py.
    _handlers: ClassVar[dict[EventType, Callable]] = {
        "started": _on_started,
        "step": _on_step,
        "checkpoint": _on_checkpoint,
        "health": _on_health,
        "worker_failure": _on_worker_failure,
        "workers_joined": _on_workers_joined,
    }


# A StepEvent's metrics, as a metric point stores them (its epoch is copied apart).
POINT_KEYS = tuple(field for field in POINT_FIELDS if field != "epoch")
