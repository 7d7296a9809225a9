"""What one request may ask of the service: admission limits, and body sizes.

Admission limits are server settings (service/config.py). A spec or a request over one
is refused with a 422 whose error names the field, the limit and the setting that raises
it, before any work starts.

Body sizes are counted as the body streams in (chunked bodies included): a pure ASGI
middleware wraps `receive`, and once a request has sent more bytes than its route
allows, `receive` raises a 413 HTTPException. FastAPI re-raises HTTPExceptions that come
out of body parsing, so the client gets the usual `{"detail": ...}` 413.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import psutil
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import field_error, field_errors
from service.config import Settings
from workers.catalogue import DatasetInfo
from workers.explain import REFINE_ROUNDS, SPLIT
from workers.model import EVAL_CHUNK_ROWS
from workers.sampler import Schedule
from workers.spec import TrainingSpec, model_size

# Passes over the model per row: a gradient is a forward and a backward (~2 forwards).
GRADIENT_PASSES = 3


def over(setting: str, settings: Settings, what: str, value: int) -> str | None:
    """The message when `value` exceeds the setting, else None: `<what> is <value>, over
    the limit of <limit> (server setting SHARDGRAD_<SETTING>)`."""
    limit = getattr(settings, setting)
    if value <= limit:
        return None
    env = f"SHARDGRAD_{setting.upper()}"
    return f"{what} is {value:,}, over the limit of {limit:,} (server setting {env})"


def admission_errors(
    spec: TrainingSpec, info: DatasetInfo, settings: Settings
) -> list[tuple[tuple, str, Any]]:
    """The spec against the server's limits, as (loc, msg, input) for a 422."""
    sizes = _model_at(spec)
    n_train = info.n_samples - int(info.n_samples * spec.validation_fraction)
    schedule = Schedule(max(n_train, 1), spec.batch_size, spec.epochs, spec.seed)
    per_epoch = f"{spec.epochs:,} x {schedule.steps_per_epoch:,} per epoch"
    memory = job_bytes(spec, info)
    values = info.n_samples * (info.n_features + info.n_targets)
    checks = [  # (loc, input), setting, what is measured, its value
        (sizes, "max_model_params", "model: the parameter count", model_size(spec.model).params),
        (sizes, "max_job_memory_bytes", f"model: the job's memory ({MEMORY})", memory),
        ((("body", "workers"), spec.workers), "max_workers", "workers", _count(spec.workers)),
        (
            (("body", "epochs"), spec.epochs),
            "max_total_steps",
            f"epochs: the total steps ({per_epoch})",
            schedule.total_steps,
        ),
        (
            (("body", "keep_checkpoints"), spec.keep_checkpoints),
            "max_keep_checkpoints",
            "keep_checkpoints",
            spec.keep_checkpoints,
        ),
        (_data_at(spec), "max_dataset_values", "data: the values (samples x columns)", values),
    ]
    errors = []
    for (loc, given), setting, what, value in checks:
        if msg := over(setting, settings, what, value):
            errors.append((loc, msg, given))
    node = psutil.virtual_memory().total
    if node < memory <= settings.max_job_memory_bytes:
        msg = f"model: the job's memory ({MEMORY}) is {memory:,}, more than this node's {node:,}"
        errors.append((sizes[0], msg, sizes[1]))
    return errors


MEMORY = "bytes of parameters, gradients, optimizer state, data and an evaluation chunk"


def _count(workers: int | str) -> int:
    return workers if isinstance(workers, int) else 0  # auto chooses within the cluster


def _model_at(spec: TrainingSpec) -> tuple[tuple, Any]:
    """Where a model's size is given: an MLP's sizes, a sequential model's layers, a
    transformer's width."""
    key = {"mlp": "sizes", "sequential": "layers", "transformer": "d_model"}[spec.model.type]
    return ("body", "model", spec.model.type, key), getattr(spec.model, key)


def _data_at(spec: TrainingSpec) -> tuple[tuple, Any]:
    data = spec.data
    key = {"builtin": "n_samples", "file": "path", "dataset": "id"}[data.type]
    return ("body", "data", data.type, key), getattr(data, key)


def check_admission(spec: TrainingSpec, info: DatasetInfo, settings: Settings) -> None:
    """A 422 (RequestValidationError) listing every limit the spec is over."""
    if errors := admission_errors(spec, info, settings):
        raise field_errors(errors)


def job_bytes(spec: TrainingSpec, info: DatasetInfo) -> int:
    """The coordinator's memory for a job, estimated from its spec and data: parameters,
    gradients and optimizer state; the dataset in float64 and its copy in the spec's dtype;
    one evaluation chunk's activations."""
    itemsize = np.dtype(spec.dtype).itemsize
    o = spec.optimizer
    state = 2 if o.type in ("adam", "adamw") else int(o.momentum > 0)  # Adam: 2 moments
    size = model_size(spec.model)
    columns = info.n_features + info.n_targets
    data = info.n_samples * columns * (8 + itemsize)
    chunk = min(EVAL_CHUNK_ROWS, info.n_samples) * size.activations * itemsize
    return size.params * itemsize * (2 + state) + data + chunk


def request_flops(spec: TrainingSpec, rows: int, method: str | None, steps: int = 0) -> int:
    """Multiply-adds of a predict (method None) or explain request, at worst: integrated
    gradients evaluate `steps` points and intervals per row, and refining may split up to
    `steps` intervals per row in each of REFINE_ROUNDS rounds."""
    flops = model_size(spec.model).flops
    if method is None:
        return rows * flops
    if method != "integrated_gradients":
        return rows * GRADIENT_PASSES * flops
    per_round = (SPLIT - 1) + SPLIT * GRADIENT_PASSES  # new ends, then the split intervals
    passes = steps * (1 + GRADIENT_PASSES + REFINE_ROUNDS * per_round)
    return rows * passes * flops


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, upload_path: str):
        self.app = app
        self.upload_path = upload_path

    def limit(self, scope: Scope) -> int:
        settings = scope["app"].state.settings
        if scope["method"] == "POST" and scope["path"].rstrip("/") == self.upload_path:
            return settings.max_upload_bytes
        return settings.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reject(send, limit)  # refuse before reading a byte
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:  # raised where no exception handler turned it into a response
            if started:
                raise
            await _reject(send, limit)


async def _reject(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body is larger than {limit} bytes"}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_request_cost(
    spec: TrainingSpec,
    settings: Settings,
    rows: list,
    method: str | None = None,
    steps: int = 0,
) -> None:
    """A 422 when a predict (method None) or explain request on this model would cost more
    multiply-adds than the server allows, at worst; it names the rows or the steps."""
    flops = request_flops(spec, len(rows), method, steps)
    setting = "max_predict_flops" if method is None else "max_explain_flops"
    what = f"the request's multiply-adds ({len(rows):,} rows on this model"
    what += f", {steps:,} steps)" if method == "integrated_gradients" else ")"
    if msg := over(setting, settings, what, flops):
        if method == "integrated_gradients":
            raise field_error(("body", "steps"), f"steps: {msg}", steps)
        raise field_error(("body", "inputs"), f"inputs: {msg}", rows)
