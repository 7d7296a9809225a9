"""The warnings that a health check raised, on the metric point of that check.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("metric_points", sa.Column("warnings", sa.JSON))


def downgrade() -> None:
    op.drop_column("metric_points", "warnings")
