"""The FastAPI app: routers under /api/v1, ops routes outside, and the service's life cycle.

`create_app(settings)` wires the real parts in its lifespan: the job store, Ray, the
dispatcher (which reconciles unfinished jobs before it starts). Tests build the app
with `start=False` and swap the store and dispatcher through `dependency_overrides`.
"""

from __future__ import annotations

import gc
import logging
import re
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import AUTH, require_token, require_token_or_query
from service.api.errors import bounded_detail
from service.api.routes import (
    checkpoints,
    cluster,
    compare,
    dashboard,
    datasets,
    events,
    export,
    generate,
    interpret,
    jobs,
    logs,
    ops,
    sweeps,
)
from service.cluster import RayCluster
from service.config import Settings
from service.dispatcher import Dispatcher
from service.guard import SameOrigin, host_guard
from service.limits import BodyLimit
from service.offload import BodyValidator
from service.predict import NoCheckpoint, Predictor
from service.sse import Slots
from service.store import Conflict, JobNotFound, JobStore
from service.sweeps import SweepNotFound, Sweeps
from workers.checkpoint import UnknownCheckpoint

API = "/api/v1"
log = logging.getLogger(__name__)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's standard 422 shape, bounded: the first errors, each input echoed briefly
    (see service/api/errors.py), also when the rejected input is not valid JSON."""
    return JSONResponse({"detail": bounded_detail(exc)}, status_code=422)


async def method_not_allowed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """405 with an `Allow` that lists the methods the OpenAPI document gives the path:
    Starlette's names only those of the first route that matched (GET and POST /jobs are
    two routes)."""
    path, headers = request.url.path, exc.headers
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path):
            headers = {"Allow": ", ".join(sorted(m.upper() for m in operations))}
            break
    return JSONResponse({"detail": exc.detail}, status_code=405, headers=headers)


async def job_not_found(request: Request, exc: JobNotFound) -> JSONResponse:
    return JSONResponse({"detail": f"no job {exc.args[0]!r}"}, status_code=404)


async def sweep_not_found(request: Request, exc: SweepNotFound) -> JSONResponse:
    return JSONResponse({"detail": f"no sweep {exc.args[0]!r}"}, status_code=404)


async def conflict(request: Request, exc: Conflict) -> JSONResponse:
    """The job's state does not allow the request; the store's message says why."""
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def no_checkpoint(request: Request, exc: NoCheckpoint) -> JSONResponse:
    """A model was asked of a job that has no (readable) checkpoint yet."""
    job_id = request.path_params.get("job_id")
    return JSONResponse({"detail": f"job {job_id}: {exc}"}, status_code=409)


async def unknown_checkpoint(request: Request, exc: UnknownCheckpoint) -> JSONResponse:
    """The job has checkpoints, but not the one asked for (pruned, never written, or the
    best of a job that keeps none): 404, as for an unknown checkpoint's download."""
    job_id = request.path_params.get("job_id")
    return JSONResponse({"detail": f"job {job_id}: {exc}"}, status_code=404)


def create_app(settings: Settings | None = None, *, start: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not start:
            yield
            return
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.store_url)
        cluster = RayCluster(settings.ray_address, settings.ray_num_cpus, settings.ray_dashboard)
        dispatcher = Dispatcher(store, settings, cluster)
        dispatcher.sweeps = app.state.sweeps = Sweeps(store, settings)
        # On this thread, not a pool's: an embedded Ray's GCS and raylet are killed when the
        # thread that started them ends (PR_SET_PDEATHSIG), and the pool retires idle threads.
        dispatcher.start()
        app.state.body_validator.start()  # its process starts in the background
        app.state.store, app.state.dispatcher = store, dispatcher
        # What startup made (Ray, FastAPI, SQLAlchemy: ~150k objects) lives as long as the
        # process: out of the collector's way, a full collection no longer stalls every
        # request in flight for ~80 ms.
        gc.freeze()
        cpus = dispatcher.capacity().total
        log.info("shardgrad service up: %s store, %g CPUs", store.dialect, cpus)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        print(f"shardgrad is running: open http://{host}:{settings.port}/ (API docs at /docs)")
        try:
            yield
        finally:
            log.info("stopping: checkpointing running jobs; they stay queued")
            await run_in_threadpool(dispatcher.shutdown)
            app.state.body_validator.shutdown()

    app = FastAPI(
        title="shardgrad",
        version="0.1.0",
        summary="Distributed training jobs on Ray with shardgrad's own autograd engine",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(405, method_not_allowed)
    # The store's errors, wherever a route meets them: an unknown job, a state that forbids;
    # and the predictor's, when the job has no checkpoint to answer from.
    app.add_exception_handler(JobNotFound, job_not_found)
    app.add_exception_handler(SweepNotFound, sweep_not_found)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(NoCheckpoint, no_checkpoint)
    app.add_exception_handler(UnknownCheckpoint, unknown_checkpoint)
    app.state.settings = settings
    app.state.predictor = Predictor(settings.predict_cache_bytes)
    app.state.body_validator = BodyValidator()
    app.state.streams = Slots(settings.max_sse_connections)
    app.add_middleware(BodyLimit, upload_path=f"{API}/datasets")
    app.add_middleware(SameOrigin)
    # Outermost: a Host it does not answer gets a 400 before anything else runs.
    app.add_middleware(host_guard, token=settings.token(), allowed=settings.allowed_hosts)

    _include_routes(app, token=settings.token() is not None)
    app.openapi = _with_job_links(app.openapi)
    return app


def _with_job_links(openapi):
    """The OpenAPI document with links from a submitted job (POST /jobs' `id`) to the routes
    that take its id, so clients and schema tests can follow them. Not to the event stream
    (it lasts as long as the job) nor to a checkpoint's file (its name comes from a listing)."""

    def linked() -> dict:
        schema = openapi()  # FastAPI's, made once and kept: the links are added once
        created = schema["paths"][f"{API}/jobs"]["post"]["responses"]["201"]
        if "links" not in created:
            created["links"] = {
                op["operationId"]: {
                    "operationId": op["operationId"],
                    "parameters": {"path.job_id": "$response.body#/id"},
                }
                for path, ops in schema["paths"].items()
                if "{job_id}" in path and "{name}" not in path and not path.endswith("/events")
                for op in ops.values()
            }
        return schema

    return linked


def _include_routes(app: FastAPI, token: bool) -> None:
    """With a token, the API routes need it, and the schema says so (an HTTP bearer scheme
    and their 401); without one, they are open and the schema claims no security."""
    guard = {"responses": AUTH} if token else {}
    routers = (
        jobs.router,
        compare.router,
        checkpoints.router,
        export.router,
        generate.router,
        interpret.router,
        datasets.router,
        cluster.router,
        sweeps.router,
    )
    for router in (*routers, dashboard.api):
        deps = [Depends(require_token)] if token else []
        app.include_router(router, prefix=API, dependencies=deps, **guard)
    deps = [Depends(require_token_or_query)] if token else []
    for router in (events.router, logs.router, sweeps.events):  # EventSource streams: ?token= too
        app.include_router(router, prefix=API, dependencies=deps, **guard)
    app.include_router(ops.router)
    app.include_router(dashboard.router)  # `/` and plotly.min.js, before the /static mount
    app.mount("/static", dashboard.static_files(), name="static")
