"""/datasets: upload a .csv, .npz or .txt once, train on it by id (`data: {"type": "dataset"}`),
delete it when no job waits or runs on it.

A .txt upload is UTF-8 text for a character-level language model: its description counts
characters as samples (one feature each) until a model's context cuts it into windows."""

from __future__ import annotations

import tempfile
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool

from service.api.deps import BODY, ERROR, SettingsDep, StoreDep
from service.api.errors import field_error
from service.cleanup import delete_dataset
from service.schemas import DatasetOut
from workers.datasets import TooManyValues, list_uploaded, save_uploaded_file

router = APIRouter(prefix="/datasets", tags=["datasets"])


COPY_CHUNK = 1024 * 1024  # bytes of an upload held in the service at once


@router.post("", status_code=status.HTTP_201_CREATED, responses=BODY)
async def upload(
    file: Annotated[
        UploadFile, File(description=".csv with a header row, .npz with X, y, or .txt (UTF-8 text)")
    ],
    settings: SettingsDep,
    request: Request,
) -> DatasetOut:
    """Store a dataset; the same content uploaded twice gets the same id."""
    name, root = file.filename or "upload", settings.uploads_dir
    # Parsed in the body validator's process (service/offload.py), from a copy on disk:
    # neither the upload nor what parsing it allocates passes through this process.
    with tempfile.NamedTemporaryFile(prefix="shardgrad-upload-") as copy:
        while chunk := await file.read(COPY_CHUNK):
            await run_in_threadpool(copy.write, chunk)
        await run_in_threadpool(copy.flush)
        validator, limit = request.app.state.body_validator, settings.max_dataset_values
        try:
            saved = await validator.run(save_uploaded_file, copy.name, name, root, limit)
        except TooManyValues as err:
            msg = f"{err} (server setting SHARDGRAD_MAX_DATASET_VALUES)"
            raise field_error(("body", "file"), msg, None) from None
        except ValueError as err:
            raise field_error(("body", "file"), str(err), None) from None
    return DatasetOut.model_validate(saved)


@router.get("")
def datasets(settings: SettingsDep) -> list[DatasetOut]:
    """Every uploaded dataset, oldest first."""
    return [DatasetOut.model_validate(d) for d in list_uploaded(settings.uploads_dir)]


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        404: {"description": "no such upload", **ERROR},
        409: {"description": "a queued or running job trains on it", **ERROR},
    },
)
def delete(dataset_id: str, store: StoreDep, settings: SettingsDep) -> None:
    """Delete an upload; 409 while a queued or running job trains on it. A finished job
    that trained on it keeps its checkpoints (predict works), but its resume then fails
    saying the upload is gone."""
    try:
        delete_dataset(store, settings.uploads_dir, dataset_id)
    except (FileNotFoundError, ValueError):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dataset {dataset_id!r}") from None
