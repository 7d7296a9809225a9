"""A job's checkpoints, their model weights, and predictions from the newest one."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, HTTPException, Response, status

from service.api.deps import CONFLICT, NOT_FOUND, JobDep, PredictorDep, SettingsDep
from service.api.errors import field_errors
from service.limits import check_request_cost
from service.offload import OffloadedRoute
from service.predict import model_spec
from service.schemas import CheckpointOut, PredictRequest, PredictResponse
from workers.checkpoint import MODEL_FILE, checkpoint_dir, list_checkpoints

router = APIRouter(prefix="/jobs", tags=["checkpoints"], route_class=OffloadedRoute)


@router.get("/{job_id}/checkpoints", responses=NOT_FOUND)
def checkpoints(job: JobDep, settings: SettingsDep) -> list[CheckpointOut]:
    """Verified checkpoints, oldest first."""
    return [CheckpointOut.model_validate(c) for c in list_checkpoints(settings.jobs_dir / job.id)]


@router.get(
    "/{job_id}/checkpoints/{name}/model.safetensors",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}} | NOT_FOUND,
)
def download(job: JobDep, name: str, settings: SettingsDep) -> Response:
    """The model weights of one checkpoint (safetensors)."""
    out = settings.jobs_dir / job.id
    try:
        path = checkpoint_dir(out, name)
    except ValueError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    if name not in {c.name for c in list_checkpoints(out)}:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no checkpoint {name!r}")
    try:  # read whole: pruning may remove the directory right after this
        data = (path / MODEL_FILE).read_bytes()
    except OSError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"checkpoint {name!r} was pruned") from None
    disposition = f'attachment; filename="{job.id}-{name}-{MODEL_FILE}"'
    return Response(
        data, media_type="application/octet-stream", headers={"Content-Disposition": disposition}
    )


@router.post("/{job_id}/predict", responses=NOT_FOUND | CONFLICT)
def predict(
    job: JobDep, body: PredictRequest, predictor: PredictorDep, settings: SettingsDep
) -> PredictResponse:
    """Model outputs (logits or regression values) for each input row, from the newest
    checkpoint; works while the job is still running."""
    spec = model_spec(job.spec)
    check_request_cost(spec, settings, body.inputs)
    _check_rows(body.inputs, spec.model.in_width, spec.dtype)
    outputs, name = predictor.predict(spec, settings.jobs_dir / job.id, body.inputs)
    return PredictResponse(outputs=outputs, checkpoint=name)


def _check_rows(inputs: list[list[float]], width: int, dtype: str) -> None:
    """422 for every row of the wrong width; else for every value that is finite in JSON
    but not in the model's dtype (1e39 in float32), as explain says it."""
    wrong = [
        (("body", "inputs", i), f"row {i} has {len(row)} values but the model takes {width}", row)
        for i, row in enumerate(inputs)
        if len(row) != width
    ]
    if wrong:
        raise field_errors(wrong)
    with np.errstate(over="ignore"):
        X = np.asarray(inputs, dtype=np.float64).astype(dtype)
    bad = [(int(i), int(j)) for i, j in zip(*np.nonzero(~np.isfinite(X)), strict=True)]
    if bad:
        msg = "inputs[{}][{}] is not finite in the model's {}"
        raise field_errors(
            (("body", "inputs", i, j), msg.format(i, j, dtype), inputs[i][j]) for i, j in bad
        )
