"""The learning rate of each metric point (issue 17: optimizer.schedule).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("metric_points", sa.Column("lr", sa.Float))


def downgrade() -> None:
    op.drop_column("metric_points", "lr")
