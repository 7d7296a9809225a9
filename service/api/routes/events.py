"""Live streams (text/event-stream) for EventSource; `?token=` works here too."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service import sse
from service.api.deps import NOT_FOUND, DispatcherDep, JobDep, StoreDep
from service.api.routes.jobs import present, present_all

router = APIRouter(tags=["events"])
STREAM = {200: {"content": {"text/event-stream": {}}, "description": "an SSE stream"}}
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses=STREAM | NOT_FOUND)
def job_events(job: JobDep, store: StoreDep, dispatcher: DispatcherDep) -> StreamingResponse:
    """Events `status`, `progress`, `metrics` and a final `end` (then the stream closes;
    an EventSource client should call close() on `end`)."""
    stream = sse.job_events(store, job.id, lambda row: present(row, store, dispatcher))
    return StreamingResponse(stream, media_type="text/event-stream", headers=HEADERS)


@router.get("/events", response_class=StreamingResponse, responses=STREAM)
def all_events(store: StoreDep, dispatcher: DispatcherDep) -> StreamingResponse:
    """Status and progress changes of every job, from the moment of connecting."""
    stream = sse.all_events(store, lambda rows: present_all(rows, store, dispatcher))
    return StreamingResponse(stream, media_type="text/event-stream", headers=HEADERS)
