"""A job's checkpoints, their model weights, and predictions from one of them (the best
when the job keeps one, else the newest, unless the request names another)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse

from service.api.deps import BODY, CONFLICT, NOT_FOUND, JobDep, PredictorDep, SettingsDep
from service.api.errors import field_error, field_errors, value_at
from service.limits import check_request_cost
from service.offload import OffloadedRoute
from service.predict import model_spec
from service.schemas import CHECKPOINT, CheckpointOut, PredictRequest, PredictResponse
from workers.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    UnknownCheckpoint,
    checkpoint_dir,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)
from workers.explain import ExplainError, nesting, samples
from workers.spec import TrainingSpec

router = APIRouter(prefix="/jobs", tags=["checkpoints"], route_class=OffloadedRoute)


@router.get("/{job_id}/checkpoints", responses=NOT_FOUND)
def checkpoints(job: JobDep, settings: SettingsDep) -> list[CheckpointOut]:
    """Verified checkpoints, oldest first."""
    return [CheckpointOut.model_validate(c) for c in list_checkpoints(settings.jobs_dir / job.id)]


WEIGHTS = {200: {"content": {"application/octet-stream": {}}}} | NOT_FOUND


@router.get(
    "/{job_id}/checkpoints/{name}/model.safetensors", response_class=FileResponse, responses=WEIGHTS
)
def download(job: JobDep, name: str, settings: SettingsDep) -> FileResponse:
    """The model weights of the checkpoint `name` (safetensors), streamed from the file."""
    try:
        path = checkpoint_dir(settings.jobs_dir / job.id, name)
        verify_checkpoint(path)  # a hash per (path, size, mtime): a stat once it is known
    except (ValueError, CheckpointError) as err:
        detail = (
            str(err) if isinstance(err, ValueError) else f"job {job.id} has no checkpoint {name!r}"
        )
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail) from None
    return _weights(job.id, path)


@router.get("/{job_id}/weights", response_class=FileResponse, responses=WEIGHTS)
def download_chosen(
    job: JobDep,
    settings: SettingsDep,
    checkpoint: Annotated[str | None, Query(**CHECKPOINT)] = None,
) -> FileResponse:
    """The model weights of the checkpoint `checkpoint` chooses (as predict does), streamed
    from the file; the X-Checkpoint header and the file name name it."""
    try:
        path = resolve_checkpoint(settings.jobs_dir / job.id, checkpoint)  # verified
    except UnknownCheckpoint as err:  # NoCheckpoint too: the weights do not exist
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id}: {err}") from None
    return _weights(job.id, path)


def _weights(job_id: str, path: Path) -> FileResponse:
    file = path / MODEL_FILE
    try:
        stat = os.stat(file)
    except OSError:
        detail = f"job {job_id} has no checkpoint {path.name!r}"
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail) from None
    # Pruned between here and the response's read: the transfer ends short (an error for the
    # client), never a wrong file; a checkpoint is only pruned once `keep` newer ones exist.
    return FileResponse(
        file,
        stat_result=stat,
        media_type="application/octet-stream",
        filename=f"{job_id}-{path.name}-{MODEL_FILE}",
        headers={"X-Checkpoint": path.name},
    )


@router.post("/{job_id}/predict", responses=BODY | NOT_FOUND | CONFLICT)
def predict(
    job: JobDep, body: PredictRequest, predictor: PredictorDep, settings: SettingsDep
) -> PredictResponse:
    """Model outputs (logits or regression values) for each input row, from the checkpoint
    `checkpoint` names (default: the best if the job keeps one, else the newest); works
    while the job is still running. A CNN also takes images of its input_shape
    (N x C x H x W)."""
    spec = model_spec(job.spec)
    check_request_cost(spec, settings, body.inputs)
    if nesting(body.inputs) > 2:
        _check_images(body.inputs, spec)
    else:
        _check_rows(body.inputs, spec.model.in_width, spec.dtype)
    run_dir = settings.jobs_dir / job.id
    outputs, name = predictor.predict(spec, run_dir, body.inputs, body.checkpoint)
    return PredictResponse(outputs=outputs, checkpoint=name)


def _check_images(inputs: list, spec: TrainingSpec) -> None:
    """422 at the first image of the wrong shape, or value not finite in the model's dtype."""
    shape = tuple(getattr(spec.model, "input_shape", None) or (spec.model.in_width,))
    try:
        X, _ = samples(inputs, "inputs", shape, spec.dtype)
        bad = np.argwhere(~np.isfinite(X.reshape(-1, *shape)))
    except ExplainError as err:
        raise field_error(("body", *err.loc), str(err), value_at(inputs, err.loc[1:])) from None
    if len(bad):
        at = tuple(int(k) for k in bad[0])
        msg = f"inputs{''.join(f'[{k}]' for k in at)} is not finite in the model's {spec.dtype}"
        raise field_error(("body", "inputs", *at), msg, value_at(inputs, at))


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
