"""Server-Sent Events: live status, progress and metric points, read back from the store.

A stream re-reads the store when the store's ChangeFeed fires (a write in this process)
or after `poll_s` (a write by another service process), and sends only what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool

from service.schemas import Job, MetricPoint
from service.store import JobNotFound, JobStore, utcnow
from service.tables import TERMINAL, JobRow

POLL_S = 1.0  # another process's writes show up within this
MIN_GAP_S = 0.2  # at most ~5 messages a second per stream, however fast the steps
KEEPALIVE_S = 15.0


def message(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _progress(job: JobRow) -> dict:
    out = Job.of(job)
    return {
        "job_id": job.id,
        "status": job.status,
        "progress": out.progress.model_dump(mode="json"),
        "metrics": out.metrics,
    }


async def _wait(woke: asyncio.Event, last_sent: float) -> bool:
    """Sleep until woken or POLL_S; True when a keep-alive comment is due."""
    await asyncio.sleep(MIN_GAP_S)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(woke.wait(), POLL_S)
    return time.monotonic() - last_sent > KEEPALIVE_S


async def job_events(
    store: JobStore, job_id: str, present: Callable[[JobRow], Job]
) -> AsyncIterator[str]:
    """`status` (the job, on each transition), `progress`, `metrics` (new points; all
    existing ones first), and `end` once the job is terminal; then the stream closes."""
    status = version = None
    after = -1
    last_sent = time.monotonic()
    with store.changes.subscribe() as woke:
        while True:
            woke.clear()
            try:
                job = await run_in_threadpool(store.get, job_id)
            except JobNotFound:
                yield message("end", {"job_id": job_id, "status": None})
                return
            out = []
            if job.status != status:
                job_out = await run_in_threadpool(present, job)
                out.append(message("status", job_out.model_dump(mode="json")))
                status = job.status
            if job.version != version:
                out.append(message("progress", _progress(job)))
                version = job.version
            points = await run_in_threadpool(store.points, job_id, after)
            if points:
                data = [MetricPoint.model_validate(p).model_dump() for p in points]
                out.append(message("metrics", {"job_id": job_id, "points": data}))
                after = points[-1].step
            if job.status in TERMINAL:
                out.append(message("end", {"job_id": job_id, "status": job.status}))
            for text in out:
                yield text
            if job.status in TERMINAL:
                return
            if out:
                last_sent = time.monotonic()
            if await _wait(woke, last_sent):
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()


async def all_events(
    store: JobStore, present: Callable[[list[JobRow]], list[Job]]
) -> AsyncIterator[str]:
    """Every job's changes from now on: `status` (the job, as GET /jobs/{id} has it, queue
    position included) or `progress` (compact)."""
    since = utcnow() - timedelta(seconds=1)
    seen: dict[str, tuple[int, str]] = {}  # job id -> (version, status) last sent
    last_sent = time.monotonic()
    with store.changes.subscribe() as woke:
        yield ": connected\n\n"
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
            sent = bool(changed)
            if rows:
                # Overlap by a little: writers in other processes have their own clocks.
                since = max(since, rows[-1].updated_at - timedelta(seconds=2))
                keep = {job.id for job in rows}
                seen = {k: v for k, v in seen.items() if k in keep}
            if sent:
                last_sent = time.monotonic()
            if await _wait(woke, last_sent):
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
