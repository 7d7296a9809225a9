"""/jobs: submit, list (filter, sort, page), read, tag, cancel, resume, delete, and the
metric points of a job."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import SkipValidation, ValidationError

from service import cleanup, listing
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
from service.schemas import (
    MAX_TAGS,
    PRINTABLE,
    GcRequest,
    GcResult,
    Job,
    JobPage,
    JobPatch,
    JobSubmission,
    MetricPoint,
    Metrics,
    Status,
    TagFilter,
)
from service.store import JobStore
from service.tables import CANCELLING, QUEUED, JobRow
from workers.data import describe_data, with_data
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


# The body as OpenAPI documents it (the TrainingSpec schema and tags), handed to the route
# as parsed JSON, unvalidated: FastAPI validates a body without a validation context, and
# the spec's checks need the server's (file datasets allowed or not, where uploads are).
SpecBody = Annotated[JobSubmission, SkipValidation, Body(title="JobSubmission")]


def validate_spec(body: Any, settings: Settings) -> JobSubmission:
    """The TrainingSpec, checked against its data and the server's admission limits, or
    FastAPI's standard 422 with every error's loc under "body"."""
    context = with_data(settings.uploads_dir, allow_files=settings.allow_file_data)
    try:
        spec = JobSubmission.model_validate(body, context=context)
    except ValidationError as err:
        raise body_errors(err) from None
    check_admission(spec, describe_data(spec, settings.uploads_dir), settings)
    try:  # a warm start's source: checked against the model, pinned to one checkpoint
        return pin(spec, settings.worker_settings())
    except InitFromError as err:
        raise field_error(("body", *err.loc), str(err), err.value) from None


def _check_fits(spec: JobSubmission, dispatcher: Dispatcher, settings: Settings) -> float:
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
    """Queue a training job. The body is the TrainingSpec (see `shardgrad schema`), and
    optionally the job's `tags`."""
    data = body.get("data") if isinstance(body, dict) else None
    warm = isinstance(body, dict) and body.get("init_from") is not None  # reads a checkpoint
    if isinstance(data, dict) and data.get("type") == "builtin" and not warm:
        spec = validate_spec(body, settings)  # CPU only, tens of microseconds
    else:  # an upload or a checkpoint is read to check it against the model: not on the loop
        spec = await run_in_threadpool(validate_spec, body, settings)
    need = _check_fits(spec, dispatcher, settings)
    job, position = await store.submit(
        spec.model_dump(mode="json", exclude={"tags"}),
        name=spec.name,
        priority=spec.priority,
        cpus=need,
        tags=spec.tags,
    )
    dispatcher.wake()
    return present(job, store, dispatcher, positions={job.id: position})


def _query_error(err: listing.BadQuery):
    return field_error(("query", err.param), str(err), err.value)


def _tags(tag: list[str], sweep: str | None) -> list[tuple[str, str]]:
    """tag=k:v, each one required (AND), and sweep=<id> as tag=sweep:<id>."""
    return [listing.parse_tag(t) for t in tag] + ([("sweep", sweep)] if sweep else [])


@router.get("")
def list_jobs(
    store: StoreDep,
    dispatcher: DispatcherDep,
    status: Status | None = None,
    tag: Annotated[
        list[TagFilter],
        Query(max_length=MAX_TAGS, description="key:value; repeat to require several"),
    ] = [],  # noqa: B006 - FastAPI copies a query default
    name: Annotated[
        str | None,
        Query(max_length=200, pattern=PRINTABLE, description="a part of the name, any case"),
    ] = None,
    sweep: Annotated[
        str | None, Query(max_length=256, pattern=PRINTABLE, description="= tag=sweep:<id>")
    ] = None,
    sort: Annotated[
        listing.Sort, Query(description="- is descending; jobs without the key come last")
    ] = listing.DEFAULT_SORT,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    """Jobs that pass the filters, in `sort` order (default newest first), one page at a time
    (keyset pagination: a page never repeats or skips a job, however many tie)."""
    try:
        tags = _tags(tag, sweep)
        after = listing.decode_cursor(cursor, sort) if cursor else None
    except listing.BadQuery as err:
        raise _query_error(err) from None
    rows = store.list(status=status, tags=tags, name=name, sort=sort, limit=limit + 1, after=after)
    page, more = rows[:limit], len(rows) > limit
    return JobPage(
        items=present_all(page, store, dispatcher),
        next_cursor=listing.encode_cursor(sort, page[-1]) if more else None,
    )


@router.post("/gc", responses=BODY)
def gc(body: GcRequest, store: StoreDep, settings: SettingsDep) -> GcResult:
    """Delete finished jobs that ended over `older_than_s` ago (as DELETE /jobs/{id} does),
    oldest first, a batch per request: ask again while `more` is true."""
    deleted, more = cleanup.collect(
        store,
        settings.jobs_dir,
        settings.uploads_dir,
        older_than_s=body.older_than_s,
        statuses=body.status,
        dry_run=body.dry_run,
    )
    return GcResult(deleted=deleted, dry_run=body.dry_run, more=more)


@router.get("/{job_id}", responses=NOT_FOUND)
def get_job(job: JobDep, store: StoreDep, dispatcher: DispatcherDep) -> Job:
    """A job with its progress, latest metrics and status timeline (`events`)."""
    return present(job, store, dispatcher, events=store.events(job.id))


@router.patch("/{job_id}", responses=NOT_FOUND | BODY | CONFLICT)
def patch_job(job_id: str, body: JobPatch, store: StoreDep, dispatcher: DispatcherDep) -> Job:
    """Edit a job's tags, as a JSON merge patch: `{"tags": {"a": "1", "b": null}}` sets a,
    removes b and keeps the others. Any status; the run never sees its tags. 409 if the job
    would then carry more than MAX_TAGS (32): that depends on the tags it has."""
    job = store.patch_tags(job_id, body.tags, MAX_TAGS)  # JobNotFound: 404, Conflict: 409
    return present(job, store, dispatcher)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,  # no body, and no content-type that promises one
    responses=NOT_FOUND | CONFLICT,
)
def delete_job(job_id: str, store: StoreDep, settings: SettingsDep) -> None:
    """Delete a finished job (succeeded, failed or cancelled; 409 otherwise): its checkpoints
    and logs, its metric points and timeline, the job, and the upload it trained on if no
    other job names it."""
    cleanup.delete_job(store, settings.jobs_dir, settings.uploads_dir, job_id)


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
