"""/jobs: submit, list, read, cancel, resume, and the metric points of a job."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import SkipValidation, ValidationError

from service.api.deps import (
    BODY,
    CONFLICT,
    NOT_FOUND,
    DispatcherDep,
    JobDep,
    SettingsDep,
    StoreDep,
)
from service.api.errors import body_errors, field_error
from service.config import Settings
from service.dispatcher import EPS, Dispatcher
from service.limits import check_admission
from service.offload import OffloadedRoute
from service.schemas import Job, JobPage, MetricPoint, Metrics, Status
from service.store import JobStore
from service.tables import CANCELLING, QUEUED, JobRow
from workers.data import describe_data, with_data
from workers.spec import INT64_MAX, TrainingSpec
from workers.warmstart import InitFromError, pin

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=OffloadedRoute)
POINTS_PAGE, MAX_POINTS_PAGE = 5000, 50_000  # metric points per page: default, most


def present(
    job: JobRow, store: JobStore, dispatcher: Dispatcher, positions=None, events=None
) -> Job:
    position = reason = None
    if job.status == QUEUED:
        position = positions.get(job.id) if positions is not None else store.queue_position(job)
        reason = dispatcher.pending_reason(job, position)
    return Job.of(job, position=position, reason=reason, events=events)


def present_all(rows: list[JobRow], store: JobStore, dispatcher: Dispatcher) -> list[Job]:
    """Several jobs at once: the queue positions are read once, if any job is queued."""
    positions = store.queue_positions() if any(r.status == QUEUED for r in rows) else None
    return [present(r, store, dispatcher, positions) for r in rows]


# The body as OpenAPI documents it (the TrainingSpec schema), handed to the route as parsed
# JSON, unvalidated: FastAPI validates a body without a validation context, and the spec's
# checks need the server's (file datasets allowed or not, where uploads are).
SpecBody = Annotated[TrainingSpec, SkipValidation, Body(title="TrainingSpec")]


def validate_spec(body: Any, settings: Settings) -> TrainingSpec:
    """The TrainingSpec, checked against its data and the server's admission limits, or
    FastAPI's standard 422 with every error's loc under "body"."""
    context = with_data(settings.uploads_dir, allow_files=settings.allow_file_data)
    try:
        spec = TrainingSpec.model_validate(body, context=context)
    except ValidationError as err:
        raise body_errors(err) from None
    check_admission(spec, describe_data(spec, settings.uploads_dir), settings)
    try:  # a warm start's source: checked against the model, pinned to one checkpoint
        return pin(spec, settings.worker_settings())
    except InitFromError as err:
        raise field_error(("body", *err.loc), str(err), err.value) from None


def _check_fits(spec: TrainingSpec, dispatcher: Dispatcher, settings: Settings) -> float:
    """The CPUs the job's claim reserves (see TrainingSpec.reserved_cpus); 422 when the
    whole cluster has fewer (no autoscaler). An auto or in-process job fits if one worker
    does."""
    need = spec.reserved_cpus()
    total = dispatcher.capacity().total
    if need > total + EPS and not settings.autoscaling:
        if isinstance(spec.workers, int) and spec.workers > 0:
            field, value = "workers", spec.workers
            what = f"workers x cpus_per_worker = {spec.workers} x {spec.cpus_per_worker:g} = "
        else:  # auto or in-process: one worker's share
            field, value = "cpus_per_worker", spec.cpus_per_worker
            what = f"workers {json.dumps(spec.workers)} needs one worker's cpus_per_worker = "
        msg = f"{what}{need:g} CPUs, but the whole cluster has {total:g}"
        raise field_error(("body", field), msg, value)
    return need


@router.post("", status_code=status.HTTP_201_CREATED, responses=BODY)
async def submit(
    body: SpecBody, store: StoreDep, dispatcher: DispatcherDep, settings: SettingsDep
) -> Job:
    """Queue a training job. The body is the TrainingSpec (see `shardgrad schema`)."""
    data = body.get("data") if isinstance(body, dict) else None
    warm = isinstance(body, dict) and body.get("init_from") is not None  # reads a checkpoint
    if isinstance(data, dict) and data.get("type") == "builtin" and not warm:
        spec = validate_spec(body, settings)  # CPU only, tens of microseconds
    else:  # an upload or a checkpoint is read to check it against the model: not on the loop
        spec = await run_in_threadpool(validate_spec, body, settings)
    need = _check_fits(spec, dispatcher, settings)
    job, position = await store.submit(
        spec.model_dump(mode="json"), name=spec.name, priority=spec.priority, cpus=need
    )
    dispatcher.wake()
    return present(job, store, dispatcher, positions={job.id: position})


def _decode_cursor(cursor: str) -> int:
    try:
        seq = int(base64.urlsafe_b64decode(cursor.encode() + b"==").decode())
    except (ValueError, binascii.Error, UnicodeError):
        seq = -1
    if not 0 <= seq <= INT64_MAX:  # a row's seq is a 64-bit integer in the store
        msg = "not a cursor returned by GET /jobs"
        raise field_error(("query", "cursor"), msg, cursor) from None
    return seq


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
    return JobPage(
        items=present_all(page, store, dispatcher),
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
    job = store.cancel(job_id)  # JobNotFound: 404, Conflict: 409 (service/main.py)
    if job.status == CANCELLING:
        dispatcher.cancel(job_id)
    else:
        response.status_code = status.HTTP_200_OK
    return present(job, store, dispatcher)


@router.post("/{job_id}/resume", responses=NOT_FOUND | CONFLICT)
def resume(job_id: str, store: StoreDep, dispatcher: DispatcherDep) -> Job:
    """Queue a failed or cancelled job again; it continues from its newest good checkpoint."""
    job = store.resume(job_id)  # JobNotFound: 404, Conflict: 409 (service/main.py)
    dispatcher.wake()
    return present(job, store, dispatcher)


@router.get("/{job_id}/metrics", responses=NOT_FOUND)
def metrics(
    job: JobDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=MAX_POINTS_PAGE)] = POINTS_PAGE,
    cursor: Annotated[
        int | None, Query(ge=-1, le=2**31 - 1, description="next_cursor of the previous page")
    ] = None,
) -> Metrics:
    """The metric points, oldest first, one per step (validation fields at epoch ends), a
    page at a time: up to `limit` points after the step `cursor` names. A job with fewer
    points than `limit` has them all on the first page (`next_cursor` null)."""
    rows = store.points(job.id, -1 if cursor is None else cursor, limit=limit + 1)
    page, more = rows[:limit], len(rows) > limit
    return Metrics(
        job_id=job.id,
        points=[MetricPoint.model_validate(p) for p in page],
        next_cursor=page[-1].step if more else None,
    )
