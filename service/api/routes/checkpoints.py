"""A job's checkpoints, their model weights, and predictions from the newest one."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError

from service.api.deps import CONFLICT, NOT_FOUND, JobDep, SettingsDep
from service.predict import NoCheckpoint, Predictor, model_spec
from service.schemas import CheckpointOut, PredictRequest, PredictResponse
from workers.checkpoint import MODEL_FILE, checkpoint_dir, list_checkpoints

router = APIRouter(prefix="/jobs", tags=["checkpoints"])


@router.get("/{job_id}/checkpoints", responses=NOT_FOUND)
def checkpoints(job: JobDep, settings: SettingsDep) -> list[CheckpointOut]:
    """Verified checkpoints, oldest first."""
    return [
        CheckpointOut(
            name=c.name,
            step=c.step,
            created_at=c.created_at,
            size_bytes=c.size_bytes,
            sha256=c.sha256,
        )
        for c in list_checkpoints(settings.jobs_dir / job.id)
    ]


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
    job: JobDep, body: PredictRequest, request: Request, settings: SettingsDep
) -> PredictResponse:
    """Model outputs (logits or regression values) for each input row, from the newest
    checkpoint; works while the job is still running."""
    spec = model_spec(job.spec)
    width = spec.model.sizes[0]
    errors = [
        {
            "loc": ("body", "inputs", i),
            "msg": f"row {i} has {len(row)} values but the model takes {width}",
            "type": "value_error",
            "input": row,
        }
        for i, row in enumerate(body.inputs)
        if len(row) != width
    ]
    if not errors:  # finite in JSON, but not in a float32 model: as explain says it
        with np.errstate(over="ignore"):
            X = np.asarray(body.inputs, dtype=np.float64).astype(spec.dtype)
        errors = [
            {
                "loc": ("body", "inputs", int(i), int(j)),
                "msg": f"inputs[{i}][{j}] is not finite in the model's {spec.dtype}",
                "type": "value_error",
                "input": body.inputs[i][j],
            }
            for i, j in zip(*np.nonzero(~np.isfinite(X)), strict=True)
        ]
    if errors:
        raise RequestValidationError(errors[:20])
    predictor: Predictor = request.app.state.predictor
    try:
        outputs, name = predictor.predict(spec, settings.jobs_dir / job.id, body.inputs)
    except NoCheckpoint as err:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id}: {err}") from None
    return PredictResponse(outputs=outputs, checkpoint=name)
