"""Outside /api/v1: liveness for load balancers and Prometheus scraping."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import telemetry
from service.api.deps import DispatcherDep, StoreDep

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)


@router.get("/healthz", responses={503: {"description": "the store or Ray does not answer"}})
def healthz(store: StoreDep, dispatcher: DispatcherDep) -> dict:
    """200 when the job store answers and the dispatcher heard from Ray recently."""
    checks = {"store": True, "ray": dispatcher.healthy()}
    try:
        store.ping()
    except Exception:  # any database error means unhealthy, not a 500
        log.warning("store ping failed", exc_info=True)
        checks["store"] = False
    if not all(checks.values()):
        return JSONResponse({"status": "unhealthy", **checks}, status.HTTP_503_SERVICE_UNAVAILABLE)
    return {"status": "ok", **checks}


@router.get("/metrics", response_class=Response, include_in_schema=False)
def metrics(store: StoreDep, dispatcher: DispatcherDep) -> Response:
    return Response(telemetry.render(store, dispatcher), media_type=CONTENT_TYPE_LATEST)
