"""A job's log (workers/joblog.py): as text, or followed as an event stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response
from sse_starlette import ServerSentEvent

from service import sse
from service.api.deps import NOT_FOUND, JobDep, SettingsDep, StoreDep
from service.api.routes.events import STREAM, stream
from service.store import JobNotFound, JobStore
from service.tables import TERMINAL
from workers import joblog

router = APIRouter(tags=["logs"])
LINES_PER_EVENT = 1000  # a long backlog goes out in several events, none of them huge
TEXT = {200: {"content": {"text/plain": {}, "text/event-stream": {}}}}


@router.get(
    "/jobs/{job_id}/logs", response_class=PlainTextResponse, responses=TEXT | STREAM | NOT_FOUND
)
def job_logs(
    job: JobDep,
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
    follow: Annotated[bool, Query(description="an SSE stream of new lines until it ends")] = False,
    since: Annotated[
        datetime | None, Query(description="only records logged after this time (UTC if naive)")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=64, description="resume a followed log"),
    ] = None,
) -> Response:
    """The job's log: its coordinator's records, its workers' lines (with rank and node) and
    the traceback of a failure, oldest first, each record starting with its UTC time.

    Text by default (at most the log's size cap and its rotated files). With `follow=true`,
    an SSE stream: `log` events `{"job_id", "lines"}` (the backlog first, then lines as they
    are written), each with the time of its last record as id (`Last-Event-ID` resumes
    after it), and `end` once the job has ended and its last lines were sent."""
    out_dir = settings.jobs_dir / job.id
    after = joblog.stamp(since) if since is not None else ""
    if not follow:
        return PlainTextResponse("".join(joblog.read(out_dir, after)))
    tail = joblog.Tail(out_dir, since=last_event_id or after)
    return stream(request, _follow(store, job.id, tail))


async def _follow(store: JobStore, job_id: str, tail: joblog.Tail) -> AsyncIterator:
    """`log` events as the log grows, `end` once the job is terminal (after a last read:
    the Trainer's last lines come before the job's end is stored)."""
    while True:
        try:
            ended = (await run_in_threadpool(store.get, job_id)).status in TERMINAL
        except JobNotFound:
            ended = True
        for event in _events(job_id, await run_in_threadpool(tail.lines), tail.since):
            yield event
        if ended:
            yield sse.message("end", {"job_id": job_id}, None)
            return
        await asyncio.sleep(sse.POLL_S)


def _events(job_id: str, lines: list[str], last: str) -> list[ServerSentEvent]:
    chunks = [lines[i : i + LINES_PER_EVENT] for i in range(0, len(lines), LINES_PER_EVENT)]
    return [sse.message("log", {"job_id": job_id, "lines": c}, last or None) for c in chunks]
