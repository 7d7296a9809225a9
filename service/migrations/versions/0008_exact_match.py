"""The exact-match metric of each metric point (issue 15: builtin sequence tasks).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("metric_points", sa.Column("val_exact_match", sa.Float))


def downgrade() -> None:
    op.drop_column("metric_points", "val_exact_match")
