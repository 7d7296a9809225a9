"""/sweeps: submit (checked up front against every value it may try), list, read, cancel,
and the live progress of a sweep. The driving loop is service/sweeps.py's."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import SkipValidation, ValidationError
from sse_starlette import EventSourceResponse

from service import sse
from service.api.deps import (
    BODY,
    CONFLICT,
    NO_SWEEP,
    DispatcherDep,
    SettingsDep,
    StoreDep,
    SweepsDep,
)
from service.api.errors import body_errors, field_errors
from service.api.routes.events import STREAM, stream
from service.api.routes.jobs import validate_spec
from service.config import Settings
from service.dispatcher import EPS, Dispatcher
from service.search_space import grid, has_path, set_path
from service.store import Conflict, JobStore
from service.sweep_schemas import Choice, Sweep, SweepCreate, SweepPage, SweepStatus
from service.sweeps import Sweeps
from service.tables import CANCELLING, SWEEP_ACTIVE
from workers.data import with_data

router = APIRouter(prefix="/sweeps", tags=["sweeps"])
SweepBody = Annotated[SweepCreate, SkipValidation, Body(title="SweepCreate")]


def _errors_at(err: RequestValidationError, loc: tuple, what: str) -> list[tuple]:
    """A candidate spec's errors, as errors of the sweep field `loc` that chose it."""
    return [
        (loc, f"{what}: {'.'.join(map(str, e['loc'][1:])) or 'spec'}: {e['msg']}", None)
        for e in err.errors()
    ][:3]


def validate_sweep(body: Any, settings: Settings, total_cpus: float) -> SweepCreate:
    """The sweep, with its base spec valid with each value it may try (each of a `values`
    list, both ends of a range), every trial fitting the cluster and the sweep within the
    server's limits; or a 422 naming the field."""
    context = with_data(settings.uploads_dir, allow_files=settings.allow_file_data)
    try:
        sweep = SweepCreate.model_validate(body, context=context)
    except ValidationError as err:
        raise body_errors(err) from None
    base = sweep.base.model_dump(mode="json")
    errors: list[tuple] = []
    try:
        validate_spec(base, settings)  # admission limits, warm start
    except RequestValidationError as err:
        errors += _errors_at(err, ("body", "base"), "the base spec")
    try:  # the metric is one the base spec's evaluations report
        validate_spec(base | {"keep_best": {"metric": sweep.metric, "mode": sweep.mode}}, settings)
    except RequestValidationError as err:
        errors += _errors_at(err, ("body", "metric"), f"metric {sweep.metric}")
    need = sweep.base.reserved_cpus()
    for path, dist in sweep.parameters.items():
        loc = ("body", "parameters", path)
        if not has_path(base, path):
            errors.append((loc, f"{path!r} names no field of the base spec", path))
            continue
        values = dist.values if isinstance(dist, Choice) else [dist.low, dist.high]
        for value in values:
            try:
                spec = validate_spec(set_path(base, path, value), settings)
            except RequestValidationError as err:
                errors += _errors_at(err, loc, f"with {path} = {value!r}")
                break
            need = max(need, spec.reserved_cpus())
    if sweep.sampler.type == "grid" and grid(sweep) is None:
        msg = "the grid sampler needs a values list or an int range for every parameter"
        errors.append((("body", "sampler", "type"), msg, "grid"))
    if sweep.trials > settings.max_sweep_trials:
        msg = f"at most {settings.max_sweep_trials} trials (SHARDGRAD_MAX_SWEEP_TRIALS)"
        errors.append((("body", "trials"), msg, sweep.trials))
    most = max(1, settings.max_concurrent_jobs)
    if sweep.parallel > most:
        msg = f"at most {most} trials at once (SHARDGRAD_MAX_CONCURRENT_JOBS)"
        errors.append((("body", "parallel"), msg, sweep.parallel))
    elif sweep.parallel * need > total_cpus + EPS and not settings.autoscaling:
        msg = (
            f"{sweep.parallel} trials of up to {need:g} CPUs each need "
            f"{sweep.parallel * need:g}, but the whole cluster has {total_cpus:g}"
        )
        errors.append((("body", "parallel"), msg, sweep.parallel))
    if errors:
        raise field_errors(errors)
    return sweep


def present(sweeps: Sweeps, sweep_id: str) -> Sweep:
    return sweeps.present(sweeps.get(sweep_id))


@router.post("", status_code=status.HTTP_201_CREATED, responses=BODY)
async def create(
    body: SweepBody, sweeps: SweepsDep, dispatcher: DispatcherDep, settings: SettingsDep
) -> Sweep:
    """Start a sweep: Optuna asks trials, each an ordinary job tagged `sweep` and `trial`."""
    total = dispatcher.capacity().total
    sweep = await run_in_threadpool(validate_sweep, body, settings, total)
    row = await run_in_threadpool(sweeps.create, sweep)
    dispatcher.wake()
    return await run_in_threadpool(sweeps.present, row)


@router.get("")
def list_sweeps(
    sweeps: SweepsDep,
    status: SweepStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[
        int | None, Query(ge=0, le=2**62, description="next_cursor of the previous page")
    ] = None,
) -> SweepPage:
    """Sweeps, newest first, a page at a time (without their trials)."""
    rows = sweeps.list(status, limit + 1, cursor)
    page, more = rows[:limit], len(rows) > limit
    return SweepPage(
        items=[sweeps.present(row, trials=False) for row in page],
        next_cursor=str(page[-1].seq) if more else None,
    )


@router.get("/{sweep_id}", responses=NO_SWEEP)
def get_sweep(sweep_id: str, sweeps: SweepsDep) -> Sweep:
    """A sweep with every trial asked so far and its best trial."""
    return present(sweeps, sweep_id)


def cancel_sweep(sweeps: Sweeps, store: JobStore, dispatcher: Dispatcher, sweep_id: str) -> Sweep:
    row = sweeps.get(sweep_id)
    if row.status not in SWEEP_ACTIVE:
        raise Conflict(f"sweep {sweep_id} is {row.status}; only a running sweep cancels")
    for job_id in sweeps.cancel(sweep_id):
        with contextlib.suppress(Conflict):  # one that ended meanwhile: the driver tells how
            if store.cancel(job_id).status == CANCELLING:
                dispatcher.cancel(job_id)
    dispatcher.wake()
    return present(sweeps, sweep_id)


@router.post("/{sweep_id}/cancel", responses=NO_SWEEP | CONFLICT)
def cancel(sweep_id: str, sweeps: SweepsDep, store: StoreDep, dispatcher: DispatcherDep) -> Sweep:
    """Ask no more trials, cancel the queued and running ones: `cancelling`, then
    `cancelled` once they ended."""
    return cancel_sweep(sweeps, store, dispatcher, sweep_id)


events = APIRouter(tags=["sweeps"])


@events.get(
    "/sweeps/{sweep_id}/events",
    response_class=EventSourceResponse,
    responses=STREAM | NO_SWEEP,
)
def sweep_events(sweep_id: str, sweeps: SweepsDep, request: Request) -> EventSourceResponse:
    """Events `sweep` (the whole sweep, whenever it or a trial changed) and a final `end`
    once the sweep finished or was cancelled; then the stream closes."""
    sweeps.get(sweep_id)  # SweepNotFound: 404
    return stream(request, sse.sweep_events(sweeps, sweep_id))
