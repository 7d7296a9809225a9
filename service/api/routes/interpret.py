"""Why a job's model answers what it answers: its loss graph, input attributions, and a
CNN's first filters; and the validation samples to ask it about.

All come from the checkpoint the request names (`checkpoint`: best, latest or step-N; by
default the best if the job keeps one, else the newest; the samples from the job's data) and
run in the thread pool (plain `def` routes), as predictions do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, SkipValidation, ValidationError

from core.graph import to_dot
from service.api.deps import BODY, CONFLICT, NOT_FOUND, JobDep, PredictorDep, SettingsDep
from service.api.errors import body_errors, field_error, value_at
from service.api.routes.generate import explain_prompt
from service.limits import check_request_cost
from service.offload import OffloadedRoute
from service.predict import NoFilters, model_spec
from service.schemas import (
    CHECKPOINT,
    ExplainBody,
    ExplainRequest,
    ExplainResponse,
    FiltersResponse,
    SamplesResponse,
    TokenExplainRequest,
    TokenExplainResponse,
)
from workers.data import check_data
from workers.explain import ExplainError
from workers.spec import TrainingSpec, format_validation_error

router = APIRouter(prefix="/jobs", tags=["interpretability"], route_class=OffloadedRoute)

# A filter view shows at most this many weights (a CNN's first layer has a few hundred).
MAX_FILTER_VALUES = 2**16
MAX_SAMPLES = 64  # of a page of validation samples

# Integrated gradients holds rows x steps path points of the input's width at once, and
# refining may add many times as many: past this, a request takes seconds and GBs.
MAX_PATH_VALUES = 2**20

GRAPH_TYPES = {200: {"content": {"application/json": {}, "text/vnd.graphviz": {}}}}


@router.get(
    "/{job_id}/graph", response_class=Response, responses=GRAPH_TYPES | NOT_FOUND | CONFLICT
)
def graph(
    job: JobDep,
    predictor: PredictorDep,
    settings: SettingsDep,
    format: Annotated[Literal["json", "dot"], Query(description="JSON, or Graphviz DOT")] = "json",
    checkpoint: Annotated[str | None, Query(**CHECKPOINT)] = None,
) -> Response:
    """The checkpoint's model on the first training example: the forward pass and
    the loss, which is the root, after backward, so every node has its gradient.

    JSON: {"root", "nodes": [{"id", "operation", "shape", "output", "gradient", "inputs"}]}.
    A hidden layer is one fused node, named after both parts (e.g. "linear+tanh").
    The header X-Checkpoint names the checkpoint.
    """
    spec = _spec_with_data(job, settings)
    run_dir, worker_settings = settings.jobs_dir / job.id, settings.worker_settings()
    result, name = predictor.graph(spec, run_dir, worker_settings, checkpoint)
    headers = {"X-Checkpoint": name}
    if format == "dot":
        return Response(to_dot(result), media_type="text/vnd.graphviz", headers=headers)
    return JSONResponse(result, headers=headers)


# The body as OpenAPI documents it (rows or a prompt), handed to the route as parsed JSON and
# validated there as the job's model takes it, so that its errors name the fields as the
# one request model does.
Explained = Annotated[ExplainBody, SkipValidation, Body(title="ExplainRequest")]


@router.post("/{job_id}/explain", responses=BODY | NOT_FOUND | CONFLICT)
def explain(
    job: JobDep, body: Explained, predictor: PredictorDep, settings: SettingsDep
) -> ExplainResponse | TokenExplainResponse:
    """Attributions of one output to every input feature, row by row, from the checkpoint
    `checkpoint` names (as predict): the gradient, (x - baseline) * gradient, or integrated
    gradients with its completeness gap. Outputs are the full rows predict gives.

    On a transformer job the body is {"prompt", "target", "steps", "checkpoint"}: integrated
    gradients of the target's next-token logit over the prompt's embeddings, one
    attribution per token (see TokenExplainRequest)."""
    spec = model_spec(job.spec)
    if spec.model.type == "transformer":
        return explain_prompt(job, _validated(TokenExplainRequest, body), predictor, settings)
    body = _validated(ExplainRequest, body)
    _check_cost(body, width=spec.model.in_width)
    check_request_cost(spec, settings, body.inputs, body.method, body.steps)
    options = body.model_dump(exclude={"inputs", "checkpoint"})
    run_dir = settings.jobs_dir / job.id
    try:
        result, name = predictor.explain(spec, run_dir, body.inputs, body.checkpoint, **options)
    except ExplainError as err:  # a width, or a target, that does not fit the model
        field, *index = err.loc
        value = value_at(getattr(body, field), index)
        raise field_error(("body", *err.loc), str(err), value) from None
    return ExplainResponse(**result, checkpoint=name)


@router.get("/{job_id}/filters", responses=NOT_FOUND | CONFLICT)
def filters(
    job: JobDep,
    predictor: PredictorDep,
    settings: SettingsDep,
    checkpoint: Annotated[str | None, Query(**CHECKPOINT)] = None,
) -> FiltersResponse:
    """The first conv2d layer's weights at the chosen checkpoint, (out, in, kh, kw), to draw
    as small images: the first filters, up to 65,536 values. 404 when the model has no
    conv2d layer."""
    spec = model_spec(job.spec)
    if not any(layer.type == "conv2d" for layer in getattr(spec.model, "layers", ())):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"job {job.id}: the model has no conv2d layer"
        )
    try:
        run_dir = settings.jobs_dir / job.id
        result, name = predictor.filters(spec, run_dir, MAX_FILTER_VALUES, checkpoint)
    except NoFilters as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id}: {err}") from None
    return FiltersResponse(**result, checkpoint=name)


@router.get("/{job_id}/samples", responses=NOT_FOUND | CONFLICT)
def samples(
    job: JobDep,
    predictor: PredictorDep,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_SAMPLES)] = 16,
) -> SamplesResponse:
    """A page of the job's validation samples, as the trainer holds them out, each in the
    shape predict takes (an image for a CNN) with its label: inputs to try the model on."""
    spec = _spec_with_data(job, settings)
    page, total = predictor.samples.page(spec, settings.uploads_dir, offset, limit)
    return SamplesResponse(total=total, samples=page)


def _validated(model: type[BaseModel], body: Any):
    """The body as `model`, or FastAPI's standard 422 with each loc under "body"."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise body_errors(err) from None


def _spec_with_data(job, settings) -> TrainingSpec:
    """The job's spec, checked against its data again: 409 when they no longer fit."""
    try:
        spec = model_spec(job.spec)
        check_data(spec, settings.uploads_dir)
    except ValidationError as err:  # e.g. its uploaded dataset was deleted
        detail = f"job {job.id}: its spec no longer validates: {format_validation_error(err)}"
        raise HTTPException(status.HTTP_409_CONFLICT, detail) from None
    return spec


def _check_cost(body: ExplainRequest, width: int) -> None:
    values = len(body.inputs) * body.steps * width
    if body.method == "integrated_gradients" and values > MAX_PATH_VALUES:
        msg = (
            f"rows x steps x input width is {values:,}, over the limit of {MAX_PATH_VALUES:,}; "
            "ask for fewer rows or steps"
        )
        raise field_error(("body", "steps"), msg, body.steps)
