"""The worker count a run used (the one `workers: "auto"` chose) and why.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("workers", sa.Integer))
    op.add_column("jobs", sa.Column("workers_reason", sa.Text))


def downgrade() -> None:
    op.drop_column("jobs", "workers_reason")
    op.drop_column("jobs", "workers")
