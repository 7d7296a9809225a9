"""The schema of the first release: jobs, their metric points and their timeline.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(32), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.BigInteger, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("cpus", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("total_steps", sa.Integer),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("eta_s", sa.Float),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("worker_nodes", sa.JSON, nullable=False),
        sa.Column("summary", sa.JSON),
        sa.Column("owner", sa.String(200)),
        sa.Column("heartbeat_at", sa.DateTime),
    )
    op.create_index("ix_jobs_queue", "jobs", ["status", "priority", "seq"])
    op.create_index("ix_jobs_updated", "jobs", ["updated_at"])
    op.create_table(
        "metric_points",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("step", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.Integer),
        sa.Column("train_loss", sa.Float),
        sa.Column("val_loss", sa.Float),
        sa.Column("val_accuracy", sa.Float),
        sa.Column("grad_norm", sa.Float),
        sa.Column("samples_per_s", sa.Float),
    )
    op.create_table(
        "job_events",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("message", sa.Text),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])


def downgrade() -> None:
    op.drop_table("job_events")
    op.drop_table("metric_points")
    op.drop_table("jobs")
