"""A job's model exported for use outside shardgrad: ONNX, or safetensors for torch."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status

from service.api.deps import NOT_FOUND, JobDep, SettingsDep
from service.offload import OffloadedRoute
from service.predict import model_spec
from service.schemas import CHECKPOINT
from workers.checkpoint import UnknownCheckpoint
from workers.export import ExportUnavailable, export_run

router = APIRouter(prefix="/jobs", tags=["checkpoints"], route_class=OffloadedRoute)

UNAVAILABLE = {501: {"description": "ONNX export without the onnx package (the export extra)"}}
EXPORTED = {200: {"content": {"application/octet-stream": {}}}} | NOT_FOUND | UNAVAILABLE
FORMAT = "onnx: an ONNX graph (input `input`); torch: safetensors whose metadata describes the "
FORMAT += "torch module its keys load into (`shardgrad.module`)"


@router.get("/{job_id}/export", response_class=Response, responses=EXPORTED)
def export(
    job: JobDep,
    settings: SettingsDep,
    format: Annotated[Literal["onnx", "torch"], Query(description=FORMAT)],
    checkpoint: Annotated[str | None, Query(**CHECKPOINT)] = None,
) -> Response:
    """The model of the checkpoint `checkpoint` chooses (as predict does) in `format`; the
    X-Checkpoint header and the file name name the checkpoint."""
    try:
        exported = export_run(model_spec(job.spec), settings.jobs_dir / job.id, format, checkpoint)
    except UnknownCheckpoint as err:  # NoCheckpoint too
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id}: {err}") from None
    except ExportUnavailable as err:
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, str(err)) from None
    name = f"{job.id}-{exported.checkpoint}{exported.suffix}"
    headers = {
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-Checkpoint": exported.checkpoint,
    }
    return Response(exported.data, media_type="application/octet-stream", headers=headers)
