"""The queue's index in the queue's own order (priority DESC, seq): the dispatcher reads
the head of the queue, and the API counts the jobs ahead of one, without a sort.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_jobs_queue", "jobs")
    op.create_index("ix_jobs_queue_order", "jobs", ["status", sa.text("priority DESC"), "seq"])


def downgrade() -> None:
    op.drop_index("ix_jobs_queue_order", "jobs")
    op.create_index("ix_jobs_queue", "jobs", ["status", "priority", "seq"])
