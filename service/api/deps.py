"""Dependencies of the routes, as Annotated aliases. Tests swap them with
`app.dependency_overrides` (an in-memory store, a fake dispatcher, other settings).

The ones that do not block are `async def`: FastAPI runs a plain `def` dependency in the
thread pool, and a thread hop per dependency per request costs more than the work."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings
from service.dispatcher import Dispatcher
from service.predict import Predictor
from service.store import JobStore
from service.sweeps import Sweeps
from service.tables import JobRow


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


async def get_predictor(request: Request) -> Predictor:
    return request.app.state.predictor


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]

bearer = HTTPBearer(auto_error=False, description="SHARDGRAD_API_TOKEN, when it is set")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _check(settings: Settings, given: str | None) -> None:
    expected = settings.token()
    if expected is None:
        return
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid API token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_token(settings: SettingsDep, credentials: Credentials) -> None:
    _check(settings, credentials.credentials if credentials else None)


async def require_token_or_query(
    settings: SettingsDep,
    credentials: Credentials,
    token: Annotated[str | None, Query(description="for EventSource (no headers)")] = None,
) -> None:
    """The SSE routes also accept ?token=, since EventSource cannot set headers."""
    _check(settings, credentials.credentials if credentials else token)


def get_job(job_id: str, store: StoreDep) -> JobRow:  # a database read: in the thread pool
    return store.get(job_id)  # JobNotFound: 404 (service/main.py)


JobDep = Annotated[JobRow, Depends(get_job)]

# Documented error responses, so clients and schema checks know them.
ERROR = {"content": {"application/json": {"example": {"detail": "..."}}}}
AUTH = {401: {"description": "missing or invalid API token", **ERROR}}
NOT_FOUND = {404: {"description": "no such job", **ERROR}}
CONFLICT = {409: {"description": "not allowed in the job's state", **ERROR}}
TOO_LARGE = {413: {"description": "request body too large", **ERROR}}
# What a route with a body answers before its own checks: FastAPI's 400 for a body it cannot
# parse (bytes that are not UTF-8 JSON, broken multipart), the 413 of service/limits.py.
BODY = {400: {"description": "the body could not be parsed", **ERROR}} | TOO_LARGE


async def get_sweeps(request: Request) -> Sweeps:
    return request.app.state.sweeps


SweepsDep = Annotated[Sweeps, Depends(get_sweeps)]
NO_SWEEP = {404: {"description": "no such sweep", **ERROR}}
