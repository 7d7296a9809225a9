"""What the HTTP API returns and accepts (besides the TrainingSpec itself)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.tables import STATUSES, EventRow, JobRow

Status = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
assert set(Status.__args__) == set(STATUSES)


def utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None else None


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class Progress(BaseModel):
    step: int
    total_steps: int | None
    epoch: int
    fraction: float | None = Field(description="step / total_steps, once the run has started")
    eta_s: float | None = Field(description="seconds left at the recent step rate")


class JobEvent(BaseModel):
    at: datetime
    status: Status
    attempt: int
    message: str | None

    @classmethod
    def of(cls, row: EventRow) -> JobEvent:
        return cls(at=utc(row.at), status=row.status, attempt=row.attempt, message=row.message)


class Job(BaseModel):
    id: str
    name: str
    status: Status
    priority: int
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    progress: Progress
    metrics: dict[str, float | int | None] = Field(description="the latest value of each metric")
    attempts: int = Field(description="how many times the job was started or resumed")
    error: str | None
    queue_position: int | None = Field(description="1 = next to run; only while queued")
    pending_reason: str | None = Field(description="why a queued job is not running yet")
    worker_nodes: list[str]
    events: list[JobEvent] | None = Field(
        None, description="status timeline, oldest first; only in GET /jobs/{id}"
    )

    @classmethod
    def of(cls, row: JobRow, *, position=None, reason=None, events=None) -> Job:
        total = row.total_steps
        progress = Progress(
            step=row.step,
            total_steps=total,
            epoch=row.epoch,
            fraction=min(1.0, row.step / total) if total else None,
            eta_s=row.eta_s,
        )
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            priority=row.priority,
            spec=row.spec,
            created_at=utc(row.created_at),
            started_at=utc(row.started_at),
            finished_at=utc(row.finished_at),
            updated_at=utc(row.updated_at),
            progress=progress,
            metrics=row.metrics or {},
            attempts=row.attempts,
            error=row.error,
            queue_position=position,
            pending_reason=reason,
            worker_nodes=row.worker_nodes or [],
            events=None if events is None else [JobEvent.of(e) for e in events],
        )


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page")


class MetricPoint(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    epoch: int | None
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    grad_norm: float | None
    samples_per_s: float | None


class Metrics(BaseModel):
    job_id: str
    points: list[MetricPoint]


class CheckpointOut(BaseModel):
    name: str
    step: int
    created_at: str
    size_bytes: int
    sha256: str


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[list[FiniteFloat]] = Field(min_length=1, max_length=10_000)


class PredictResponse(BaseModel):
    outputs: list[list[float | None]]
    checkpoint: str = Field(description="the checkpoint that answered")


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    n_samples: int
    n_features: int
    n_classes: int | None
    task: str
    filename: str


class Node(BaseModel):
    id: str
    alive: bool
    address: str | None
    cpus: float


class RunningJob(BaseModel):
    job_id: str
    name: str
    workers: int
    cpus: float
    worker_nodes: list[str]


class Cluster(BaseModel):
    nodes: list[Node]
    cpus_total: float
    cpus_free: float
    running_jobs: list[RunningJob]
    max_concurrent_jobs: int
    paused: bool
    autoscaling: bool
    dashboard_url: str | None
