"""Server-Sent Events: live status, progress and metric points, read back from the store.

A stream re-reads the store when the store's ChangeFeed fires (a write in this process)
or after `POLL_S` (a write by another service process), and sends only what changed.
sse-starlette frames the events, sends keep-alive pings and stops a stream whose client
went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from service.schemas import Job, MetricPoint
from service.store import JobNotFound, JobStore, utcnow
from service.tables import TERMINAL, JobRow

POLL_S = 1.0  # another process's writes show up within this
MIN_GAP_S = 0.2  # at most ~5 messages a second per stream, however fast the steps
KEEPALIVE_S = 15.0  # a ping comment on an idle stream, so proxies keep it open


RETRY_AFTER_S = 5  # what a refused stream is told to wait before it tries again


class Slots:
    """A cap on the open event streams: each holds a thread-pool read per second and a
    socket, so without one a client could open them until the service starves."""

    def __init__(self, cap: int):
        self.cap, self.open = cap, 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.cap:
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1


class HeldStream(EventSourceResponse):
    """An event stream that gives its slot back however it ends (end event, disconnect,
    shutdown, HEAD)."""

    def __init__(self, events, slots: Slots, **kwargs):
        super().__init__(events, **kwargs)
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slots.give_back()


def message(event: str, data: dict, last_step: int | None = None) -> ServerSentEvent:
    """One event; on a job's stream its id is the step of the last metric point sent."""
    text = json.dumps(data, separators=(",", ":"))
    return ServerSentEvent(text, event=event, id=None if last_step is None else str(last_step))


def _progress(job: JobRow) -> dict:
    out = Job.of(job)
    return {
        "job_id": job.id,
        "status": job.status,
        "progress": out.progress.model_dump(mode="json"),
        "metrics": out.metrics,
    }


async def _wait(woke: asyncio.Event) -> None:
    """Sleep until woken (after at least MIN_GAP_S) or POLL_S."""
    await asyncio.sleep(MIN_GAP_S)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(woke.wait(), POLL_S)


async def job_events(
    store: JobStore, job_id: str, present: Callable[[JobRow], Job], after: int = -1
) -> AsyncIterator[ServerSentEvent]:
    """`status` (the job, on each transition), `progress`, `metrics` (new points: those after
    step `after` first), and `end` once the job is terminal; then the stream closes.

    Every event's id is the step of the last point sent so far (`after` before any), so a
    client that reconnects with `Last-Event-ID` gets the status and progress afresh and
    then only the points it has not seen."""
    status = version = None
    with store.changes.subscribe() as woke:
        while True:
            woke.clear()
            try:
                job = await run_in_threadpool(store.get, job_id)
            except JobNotFound:
                yield message("end", {"job_id": job_id, "status": None}, after)
                return
            if job.status != status:
                job_out = await run_in_threadpool(present, job)
                yield message("status", job_out.model_dump(mode="json"), after)
                status = job.status
            if job.version != version:
                yield message("progress", _progress(job), after)
                version = job.version
            points = await run_in_threadpool(store.points, job_id, after)
            if points:
                after = points[-1].step
                data = [MetricPoint.model_validate(p).model_dump() for p in points]
                yield message("metrics", {"job_id": job_id, "points": data}, after)
            if job.status in TERMINAL:
                yield message("end", {"job_id": job_id, "status": job.status}, after)
                return
            await _wait(woke)


async def all_events(
    store: JobStore, present: Callable[[list[JobRow]], list[Job]]
) -> AsyncIterator[ServerSentEvent]:
    """Every job's changes from now on: `status` (the job, as GET /jobs/{id} has it, queue
    position included) or `progress` (compact)."""
    since = utcnow() - timedelta(seconds=1)
    seen: dict[str, tuple[int, str]] = {}  # job id -> (version, status) last sent
    with store.changes.subscribe() as woke:
        yield ServerSentEvent(comment="connected")
        while True:
            woke.clear()
            rows = await run_in_threadpool(store.changed_since, since)
            changed = [job for job in rows if seen.get(job.id, (None, None))[0] != job.version]
            moved = [job for job in changed if seen.get(job.id, (None, None))[1] != job.status]
            presented = await run_in_threadpool(present, moved) if moved else []
            status_of = {job.id: out for job, out in zip(moved, presented, strict=True)}
            for job in changed:
                if job.id in status_of:
                    yield message("status", status_of[job.id].model_dump(mode="json"))
                else:
                    yield message("progress", _progress(job))
                seen[job.id] = (job.version, job.status)
            if rows:
                # Overlap by a little: writers in other processes have their own clocks.
                since = max(since, rows[-1].updated_at - timedelta(seconds=2))
                keep = {job.id for job in rows}
                seen = {k: v for k, v in seen.items() if k in keep}
            await _wait(woke)


async def sweep_events(sweeps, sweep_id: str) -> AsyncIterator[ServerSentEvent]:
    """`sweep` (the whole sweep, as GET /sweeps/{id} has it) whenever it or one of its trials
    changed, and `end` once it finished or was cancelled; then the stream closes."""
    from service.sweeps import SweepNotFound

    sent = None
    with sweeps.store.changes.subscribe() as woke:
        while True:
            woke.clear()
            try:
                row = await run_in_threadpool(sweeps.get, sweep_id)
                sweep = await run_in_threadpool(sweeps.present, row)
            except SweepNotFound:
                yield message("end", {"sweep_id": sweep_id, "status": None})
                return
            data = sweep.model_dump(mode="json")
            seen = {k: v for k, v in data.items() if k != "updated_at"}
            if seen != sent:
                yield message("sweep", data)
                sent = seen
            if sweep.status in ("finished", "cancelled"):
                yield message("end", {"sweep_id": sweep_id, "status": sweep.status})
                return
            await _wait(woke)
