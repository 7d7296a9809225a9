"""The job store's tables (SQLAlchemy 2). Portable between SQLite and PostgreSQL.

A change here needs a new Alembic revision in service/migrations/versions/ (a test checks
that the revisions build exactly these tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

Status = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
STATUSES = get_args(Status)
QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED = STATUSES
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = (RUNNING, CANCELLING)  # owned by a dispatcher, a Trainer thread is on it

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
Seq = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    # seq orders the queue (FIFO within a priority) and the job list (newest first).
    seq: Mapped[int] = mapped_column(Seq, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(BigInteger, default=0)
    spec: Mapped[dict] = mapped_column(JSON)
    # The CPUs a claim reserves: workers x cpus_per_worker, one worker's for auto or 0.
    cpus: Mapped[float] = mapped_column(Float)
    workers: Mapped[int | None] = mapped_column(Integer)  # the run's count, once started
    workers_reason: Mapped[str | None] = mapped_column(Text)  # why that count

    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    version: Mapped[int] = mapped_column(Integer, default=0)  # bumped on every change

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)

    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    worker_nodes: Mapped[list] = mapped_column(JSON, default=list)
    summary: Mapped[dict | None] = mapped_column(JSON)
    health: Mapped[dict | None] = mapped_column(JSON)  # the latest check: step, layers, warnings

    owner: Mapped[str | None] = mapped_column(String(200))  # the dispatcher running it
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)

    # The list's sort keys that are not columns above: the latest value of three metrics
    # (copies of `metrics`) and the seconds from start to finish, once finished.
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    duration_s: Mapped[float | None] = mapped_column(Float)

    # Loaded with the job (one query per batch of jobs), so every job read has its tags.
    tag_rows: Mapped[list[TagRow]] = relationship(lazy="selectin", order_by="TagRow.key")

    __table_args__ = (Index("ix_jobs_updated", "updated_at"),)

    @property
    def tags(self) -> dict[str, str]:
        return {t.key: t.value for t in self.tag_rows}


# The queue in its own order (priority DESC, seq ASC): the dispatcher reads the head of the
# queue and the API counts the jobs ahead of one without sorting the queue each time.
Index("ix_jobs_queue_order", JobRow.status, JobRow.priority.desc(), JobRow.seq)

# One index per sort of the job list (service/listing.py): (key, seq) serves both
# directions, and the rows without the key (a null key) in seq order.
SORT_COLUMNS = {
    "created": JobRow.seq,
    "name": JobRow.name,
    "priority": JobRow.priority,
    "duration": JobRow.duration_s,
    "train_loss": JobRow.train_loss,
    "val_loss": JobRow.val_loss,
    "val_accuracy": JobRow.val_accuracy,
}
for _key, _column in SORT_COLUMNS.items():
    if _column is not JobRow.seq:
        Index(f"ix_jobs_sort_{_key}", _column, JobRow.seq)
METRIC_COLUMNS = ("train_loss", "val_loss", "val_accuracy")  # copied from `metrics`


class TagRow(Base):
    """A job's tag: free-form key and value (`sweep: <id>` marks a sweep's trials)."""

    __tablename__ = "job_tags"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))

    # `tag=k:v` finds its jobs from (key, value).
    __table_args__ = (Index("ix_job_tags_key_value", "key", "value", "job_id"),)


class MetricRow(Base):
    """One point per (job, step): a recomputed step after a resume replaces its point.

    Two groups of columns, written by separate Trainer events: the step's metrics
    (POINT_FIELDS) and, at health checks, the per-layer statistics and the warnings that
    check raised (LAYER_FIELDS).
    """

    __tablename__ = "metric_points"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int | None] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    val_exact_match: Mapped[float | None] = mapped_column(Float)  # builtin sequence tasks
    grad_norm: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)  # the step's (optimizer.schedule)
    samples_per_s: Mapped[float | None] = mapped_column(Float)
    layers: Mapped[list | None] = mapped_column(JSON)
    warnings: Mapped[list | None] = mapped_column(JSON)


POINT_FIELDS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_exact_match",
    "grad_norm",
    "lr",
    "samples_per_s",
)
LAYER_FIELDS = ("layers", "warnings")


class EventRow(Base):
    """The status timeline of a job: transitions, attempts, errors, worker failures."""

    __tablename__ = "job_events"

    seq: Mapped[int] = mapped_column(Seq, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)


SweepStatus = Literal["running", "cancelling", "finished", "cancelled"]
SWEEP_ACTIVE = ("running", "cancelling")  # the driver still tells, or asks, trials


class SweepRow(Base):
    """A sweep: its request, and its Optuna study (in the same database, Optuna's own
    tables). The trials are jobs tagged `sweep: <id>` and `trial: <n>`."""

    __tablename__ = "sweeps"

    seq: Mapped[int] = mapped_column(Seq, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(BigInteger, default=0)
    spec: Mapped[dict] = mapped_column(JSON)  # the SweepCreate, defaults filled in
    study: Mapped[str] = mapped_column(String(64))  # the Optuna study's name
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_sweeps_status", "status", "seq"),)
