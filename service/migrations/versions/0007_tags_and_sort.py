"""Job tags, and the job list's sort keys with an index each: the latest train_loss,
val_loss and val_accuracy as columns (backfilled from `metrics`) and the run's duration.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

METRICS = ("train_loss", "val_loss", "val_accuracy")
SORTS = {"name": "name", "priority": "priority", "duration": "duration_s"} | {m: m for m in METRICS}


def upgrade() -> None:
    for column in (*METRICS, "duration_s"):
        op.add_column("jobs", sa.Column(column, sa.Float))
    for key, column in SORTS.items():
        op.create_index(f"ix_jobs_sort_{key}", "jobs", [column, "seq"])
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    op.create_index("ix_job_tags_key_value", "job_tags", ["key", "value", "job_id"])
    _backfill()


def _backfill() -> None:
    """The new columns of the jobs an older version stored."""
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("metrics", sa.JSON),
        sa.column("started_at", sa.DateTime),
        sa.column("finished_at", sa.DateTime),
        *(sa.column(c, sa.Float) for c in (*METRICS, "duration_s")),
    )
    conn = op.get_bind()
    rows = conn.execute(sa.select(jobs.c.id, jobs.c.metrics, jobs.c.started_at, jobs.c.finished_at))
    for job_id, metrics, started, finished in rows.all():
        values = {m: (metrics or {}).get(m) for m in METRICS}
        if started is not None and finished is not None:
            values["duration_s"] = (finished - started).total_seconds()
        if any(v is not None for v in values.values()):
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))


def downgrade() -> None:
    op.drop_table("job_tags")
    for key in SORTS:
        op.drop_index(f"ix_jobs_sort_{key}", "jobs")
    for column in ("duration_s", *reversed(METRICS)):
        op.drop_column("jobs", column)
