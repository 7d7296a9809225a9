"""Why a job's model answers what it answers: its loss graph and input attributions.

Both come from the checkpoint the request names (`checkpoint`: best, latest or step-N;
by default the best if the job keeps one, else the newest) and run in the thread pool
(plain `def` routes), as predictions do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from core.graph import to_dot
from service.api.deps import BODY, CONFLICT, NOT_FOUND, JobDep, PredictorDep, SettingsDep
from service.api.errors import field_error
from service.limits import check_request_cost
from service.offload import OffloadedRoute
from service.predict import model_spec
from service.schemas import CHECKPOINT, ExplainRequest, ExplainResponse
from workers.data import check_data
from workers.explain import ExplainError
from workers.spec import format_validation_error

router = APIRouter(prefix="/jobs", tags=["interpretability"], route_class=OffloadedRoute)

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
    try:
        spec = model_spec(job.spec)
        check_data(spec, settings.uploads_dir)
    except ValidationError as err:  # e.g. its uploaded dataset was deleted
        detail = f"job {job.id}: its spec no longer validates: {format_validation_error(err)}"
        raise HTTPException(status.HTTP_409_CONFLICT, detail) from None
    run_dir, worker_settings = settings.jobs_dir / job.id, settings.worker_settings()
    result, name = predictor.graph(spec, run_dir, worker_settings, checkpoint)
    headers = {"X-Checkpoint": name}
    if format == "dot":
        return Response(to_dot(result), media_type="text/vnd.graphviz", headers=headers)
    return JSONResponse(result, headers=headers)


@router.post("/{job_id}/explain", responses=BODY | NOT_FOUND | CONFLICT)
def explain(
    job: JobDep, body: ExplainRequest, predictor: PredictorDep, settings: SettingsDep
) -> ExplainResponse:
    """Attributions of one output to every input feature, row by row, from the checkpoint
    `checkpoint` names (as predict): the gradient, (x - baseline) * gradient, or integrated
    gradients with its completeness gap. Outputs are the full rows predict gives."""
    spec = model_spec(job.spec)
    _check_cost(body, width=spec.model.in_width)
    check_request_cost(spec, settings, body.inputs, body.method, body.steps)
    options = body.model_dump(exclude={"inputs", "checkpoint"})
    run_dir = settings.jobs_dir / job.id
    try:
        result, name = predictor.explain(spec, run_dir, body.inputs, body.checkpoint, **options)
    except ExplainError as err:  # a width, or a target, that does not fit the model
        raise field_error(("body", *err.loc), str(err), _value_at(body, err.loc)) from None
    return ExplainResponse(**result, checkpoint=name)


def _check_cost(body: ExplainRequest, width: int) -> None:
    values = len(body.inputs) * body.steps * width
    if body.method == "integrated_gradients" and values > MAX_PATH_VALUES:
        msg = (
            f"rows x steps x input width is {values:,}, over the limit of {MAX_PATH_VALUES:,}; "
            "ask for fewer rows or steps"
        )
        raise field_error(("body", "steps"), msg, body.steps)


def _value_at(body: ExplainRequest, loc: tuple):
    """The request's value at an ExplainError's loc: ("inputs", 2, 1) is body.inputs[2][1]."""
    name, *index = loc
    value = getattr(body, name)
    for i in index:
        value = value[i]
    return value
