"""/datasets: upload a .csv or .npz once, train on it by id (`data: {"type": "dataset"}`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile, status
from fastapi.concurrency import run_in_threadpool

from service.api.deps import BODY, SettingsDep
from service.api.errors import field_error
from service.schemas import DatasetOut
from workers.datasets import list_uploaded, save_uploaded

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=status.HTTP_201_CREATED, responses=BODY)
async def upload(
    file: Annotated[UploadFile, File(description=".csv with a header row, or .npz with X, y")],
    settings: SettingsDep,
) -> DatasetOut:
    """Store a dataset; the same content uploaded twice gets the same id."""
    raw = await file.read()
    name, root = file.filename or "upload", settings.uploads_dir
    try:
        saved = await run_in_threadpool(save_uploaded, raw, name, root)
    except ValueError as err:
        raise field_error(("body", "file"), str(err), None) from None
    return DatasetOut.model_validate(saved)


@router.get("")
def datasets(settings: SettingsDep) -> list[DatasetOut]:
    """Every uploaded dataset, oldest first."""
    return [DatasetOut.model_validate(d) for d in list_uploaded(settings.uploads_dir)]
