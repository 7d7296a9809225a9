"""A job's latest health check, and the per-layer statistics of a metric point.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("health", sa.JSON))
    op.add_column("metric_points", sa.Column("layers", sa.JSON))


def downgrade() -> None:
    op.drop_column("metric_points", "layers")
    op.drop_column("jobs", "health")
