"""Large bodies are parsed and validated in another process, never on the event loop.

Parsing a megabyte of JSON (`json.loads`) and validating it (pydantic) are C and Rust
calls that hold the GIL for their whole length: 100 ms to seconds for a hostile body,
during which a thread pool would not help the event loop either. So a body over
OFFLOAD_BYTES goes, as bytes, to a one-process pool, which validates it against the
route's body model and sends back either the first errors (already bounded, see
service/api/errors.py) or the value, its long lists of numbers packed as NumPy arrays so
that unpickling them costs the loop nothing. Smaller bodies take FastAPI's usual path.

Routers opt in with `APIRouter(route_class=OffloadedRoute)`. Dataset uploads are parsed
there too (`BodyValidator.run`): a bomb's memory, if any, is that process's.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute
from pydantic import BaseModel, SkipValidation, ValidationError

from service.api.errors import BoundedErrors, body_errors, bounded
from workers.spec import ALLOW_FILES

OFFLOAD_BYTES = 8 * 1024  # below this, even a body of nothing but errors validates in ~20 ms
PACK_ITEMS = 64  # lists of numbers at least this long travel as arrays


class BodyValidator:
    """The process that parses and validates large bodies, started on first use (or by
    `start`). Every app in a process shares it: one extra process per service."""

    _shared: ProcessPoolExecutor | None = None
    _lock = threading.Lock()

    def __init__(self, executor: Executor | None = None):
        """`executor` replaces the shared process pool (tests)."""
        self._given = executor

    def start(self) -> None:
        """Start the process and its imports now, not at the first large body."""
        self._executor().submit(_warm)

    def _executor(self) -> Executor:
        if self._given is not None:
            return self._given
        with BodyValidator._lock:
            if BodyValidator._shared is None:
                # spawn: the service runs Ray and SQLAlchemy threads, which fork would copy
                spawn = multiprocessing.get_context("spawn")
                BodyValidator._shared = ProcessPoolExecutor(1, mp_context=spawn)
            return BodyValidator._shared

    def _forget(self, pool: Executor) -> Executor | None:
        with BodyValidator._lock:
            if BodyValidator._shared is pool:
                BodyValidator._shared = None
                return pool
        return None

    async def run(self, fn: Callable, *args):
        """fn(*args) in the process (fn and args must pickle); its exceptions come back."""
        pool = self._executor()
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool:  # the child died (killed, out of memory): a new one next time
            self._forget(pool)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, "the body validator restarted; retry"
            ) from None

    async def validate(self, model: type[BaseModel], raw: bytes, as_json: bool, context: dict):
        """The body validated against `model` in the child process: the model (or, with
        `as_json`, its JSON-mode dump, for routes that validate it again themselves)."""
        kind, value, more = await self.run(_validate, model, raw, as_json, context)
        if kind == "errors":
            raise BoundedErrors(value, more)
        if as_json:
            return value
        return model.model_construct(**{k: _unpack(v) for k, v in value.items()})

    def shutdown(self) -> None:
        """Stops the shared process (a later body starts another)."""
        pool = BodyValidator._shared
        if self._given is None and pool is not None and self._forget(pool) is not None:
            pool.shutdown(cancel_futures=True)


def _warm() -> None:
    import service.schemas  # noqa: F401  the body models
    import workers.datasets  # noqa: F401  uploads


def _validate(model: type[BaseModel], raw: bytes, as_json: bool, context: dict):
    """In the child: ("ok", value, 0) or ("errors", the first errors, how many more)."""
    try:
        value = model.model_validate_json(raw, context=context)
    except ValidationError as err:
        tagged = bool(getattr(model, "__pydantic_root_model__", False))  # a union's tag
        return "errors", *bounded(body_errors(err, tagged).errors())
    if as_json:
        return "ok", value.model_dump(mode="json"), 0
    return "ok", {name: _pack(getattr(value, name)) for name in value.model_fields_set}, 0


def _pack(value: Any) -> Any:
    """A long list of numbers, or of equally long lists of numbers, as a float64 array."""
    if isinstance(value, list) and len(value) >= PACK_ITEMS:
        first = value[0]
        if isinstance(first, float | int) or (isinstance(first, list) and first):
            try:
                return _Packed(np.array(value, dtype=np.float64))
            except (ValueError, TypeError):  # ragged: travels as it is
                return value
    return value


class _Packed:
    """An array that stands for a list (so that it goes back to being one in the model)."""

    def __init__(self, array: np.ndarray):
        self.array = array


def _unpack(value: Any) -> Any:
    """Back to lists, in the parent; `tolist` is one C call per row, far faster than
    unpickling the same lists (which holds the GIL for each float)."""
    if isinstance(value, _Packed):
        return value.array.tolist()
    return value


def _offloaded(body_field) -> tuple[type[BaseModel], bool] | None:
    """The body's model, and whether the route validates it itself (SkipValidation)."""
    if body_field is None:
        return None
    info = body_field.field_info
    model = info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    skip = any(m is SkipValidation or isinstance(m, SkipValidation) for m in info.metadata)
    return model, skip


class _Validated(Request):
    """A request whose body was read, parsed and validated already."""

    def __init__(self, request: Request, raw: bytes, parsed: Any):
        super().__init__(request.scope, request.receive)
        self._raw, self._parsed = raw, parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


class OffloadedRoute(APIRoute):
    """A route whose large JSON bodies are validated by the app's BodyValidator."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()
        offloaded = _offloaded(self.body_field)
        if offloaded is None:
            return handle
        model, as_json = offloaded

        async def handler(request: Request) -> Response:
            length = request.headers.get("content-length", "")
            json_body = "json" in request.headers.get("content-type", "")
            if json_body and (not length.isdigit() or int(length) > OFFLOAD_BYTES):
                raw = await request.body()
                if len(raw) > OFFLOAD_BYTES:
                    settings = request.app.state.settings
                    context = {ALLOW_FILES: settings.allow_file_data}
                    validator = request.app.state.body_validator
                    parsed = await validator.validate(model, raw, as_json, context)
                    request = _Validated(request, raw, parsed)
            return await handle(request)

        return handler
