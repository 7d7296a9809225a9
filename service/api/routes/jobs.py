"""/jobs: submit, list, read, cancel, resume, and the metric points of a job."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError

from service.api.deps import (
    CONFLICT,
    NOT_FOUND,
    TOO_LARGE,
    DispatcherDep,
    JobDep,
    SettingsDep,
    StoreDep,
)
from service.dispatcher import EPS, Dispatcher
from service.schemas import Job, JobPage, MetricPoint, Metrics, Status
from service.store import Conflict, JobNotFound, JobStore
from service.tables import CANCELLING, QUEUED, JobRow
from workers.spec import TrainingSpec

router = APIRouter(prefix="/jobs", tags=["jobs"])


def present(
    job: JobRow, store: JobStore, dispatcher: Dispatcher, positions=None, events=None
) -> Job:
    position = reason = None
    if job.status == QUEUED:
        position = positions.get(job.id) if positions is not None else store.queue_position(job)
        reason = dispatcher.pending_reason(job, position)
    return Job.of(job, position=position, reason=reason, events=events)


def _invalid(loc: tuple, msg: str, value) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error", "input": value}])


@router.post("", status_code=status.HTTP_201_CREATED, responses=TOO_LARGE)
def submit(
    spec: TrainingSpec, store: StoreDep, dispatcher: DispatcherDep, settings: SettingsDep
) -> Job:
    """Queue a training job. The body is the TrainingSpec (see `shardgrad schema`)."""
    if spec.data.type == "file" and not settings.allow_file_data:
        msg = "data.path: server paths are not accepted over HTTP; upload with POST /datasets"
        raise _invalid(("body", "data", "file", "path"), msg, spec.data.path)
    need = spec.workers * spec.cpus_per_worker
    total = dispatcher.capacity().total
    if need > total + EPS and not settings.autoscaling:
        msg = (
            f"workers x cpus_per_worker = {spec.workers} x {spec.cpus_per_worker:g} = "
            f"{need:g} CPUs, but the whole cluster has {total:g}"
        )
        raise _invalid(("body", "workers"), msg, spec.workers)
    job = store.create(
        spec.model_dump(mode="json"), name=spec.name, priority=spec.priority, cpus=need
    )
    dispatcher.wake()
    return present(job, store, dispatcher)


def _decode_cursor(cursor: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(cursor.encode() + b"==").decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _invalid(("query", "cursor"), "not a cursor returned by GET /jobs", cursor) from None


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


@router.get("")
def list_jobs(
    store: StoreDep,
    dispatcher: DispatcherDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    """Jobs, newest first, one page at a time (keyset pagination)."""
    before = _decode_cursor(cursor) if cursor else None
    rows = store.list(status=status, limit=limit + 1, before=before)
    page, more = rows[:limit], len(rows) > limit
    positions = store.queue_positions() if any(r.status == QUEUED for r in page) else None
    return JobPage(
        items=[present(r, store, dispatcher, positions) for r in page],
        next_cursor=_encode_cursor(page[-1].seq) if more else None,
    )


@router.get("/{job_id}", responses=NOT_FOUND)
def get_job(job: JobDep, store: StoreDep, dispatcher: DispatcherDep) -> Job:
    """A job with its progress, latest metrics and status timeline (`events`)."""
    return present(job, store, dispatcher, events=store.events(job.id))


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"model": Job, "description": "was queued: cancelled now"}}
    | NOT_FOUND
    | CONFLICT,
)
def cancel(job_id: str, response: Response, store: StoreDep, dispatcher: DispatcherDep) -> Job:
    """Queued: cancelled at once (200). Running: `cancelling` (202) until it has stopped after
    its current step with a final checkpoint, then `cancelled`."""
    try:
        job = store.cancel(job_id)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}") from None
    except Conflict as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    if job.status == CANCELLING:
        dispatcher.cancel(job_id)
    else:
        response.status_code = status.HTTP_200_OK
    return present(job, store, dispatcher)


@router.post("/{job_id}/resume", responses=NOT_FOUND | CONFLICT)
def resume(job_id: str, store: StoreDep, dispatcher: DispatcherDep) -> Job:
    """Queue a failed or cancelled job again; it continues from its newest good checkpoint."""
    try:
        job = store.resume(job_id)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}") from None
    except Conflict as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    dispatcher.wake()
    return present(job, store, dispatcher)


@router.get("/{job_id}/metrics", responses=NOT_FOUND)
def metrics(job: JobDep, store: StoreDep) -> Metrics:
    """Every metric point, oldest first; one per step (validation fields at epoch ends)."""
    return Metrics(job_id=job.id, points=[MetricPoint.of(p) for p in store.points(job.id)])
