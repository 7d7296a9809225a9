"""Live streams (text/event-stream) for EventSource; `?token=` works here too."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, status
from sse_starlette import EventSourceResponse

from service import sse
from service.api.deps import ERROR, NOT_FOUND, DispatcherDep, JobDep, StoreDep
from service.api.routes.jobs import present, present_all

router = APIRouter(tags=["events"])
STREAM = {
    200: {"content": {"text/event-stream": {}}, "description": "an SSE stream"},
    503: {"description": "too many open streams (SHARDGRAD_MAX_SSE_CONNECTIONS)", **ERROR},
}
HEADERS = {"Cache-Control": "no-cache"}
LastEventId = Annotated[
    int,
    Header(
        alias="Last-Event-ID",
        ge=-1,
        le=2**31 - 1,
        description="the id of the last event received: resume after that metric point",
    ),
]


def take_slot(request: Request) -> sse.Slots:
    """One of the open-stream slots, or 503 with Retry-After when all are taken."""
    slots: sse.Slots = request.app.state.streams
    if not slots.take():
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"{slots.cap} event streams are open, the most this service keeps "
            "(SHARDGRAD_MAX_SSE_CONNECTIONS); try again later",
            headers={"Retry-After": str(sse.RETRY_AFTER_S)},
        )
    return slots


def stream(request: Request, events) -> EventSourceResponse:
    """Taken in the route, once every check has passed: a refused request holds no slot."""
    slots = take_slot(request)
    return sse.HeldStream(events, slots, headers=HEADERS, ping=sse.KEEPALIVE_S)


@router.get(
    "/jobs/{job_id}/events", response_class=EventSourceResponse, responses=STREAM | NOT_FOUND
)
def job_events(
    job: JobDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    request: Request,
    last_event_id: LastEventId = -1,
) -> EventSourceResponse:
    """Events `status`, `progress`, `metrics` and a final `end` (then the stream closes;
    an EventSource client should call close() on `end`). Each event's id is the step of
    the last metric point sent; with `Last-Event-ID` the stream sends the status and
    progress, then only the points after that step."""
    events = sse.job_events(
        store, job.id, lambda row: present(row, store, dispatcher), after=last_event_id
    )
    return stream(request, events)


@router.get("/events", response_class=EventSourceResponse, responses=STREAM)
def all_events(request: Request, store: StoreDep, dispatcher: DispatcherDep) -> EventSourceResponse:
    """Status and progress changes of every job, from the moment of connecting."""
    events = sse.all_events(store, lambda rows: present_all(rows, store, dispatcher))
    return stream(request, events)
