"""The job store's schema history (Alembic revisions in versions/, oldest first).

`upgrade(conn)` brings a store to the newest schema on the caller's connection and
transaction: a new database gets every revision in order; a store made before the store
used Alembic (no alembic_version table) is first stamped with the revision its tables
match, then upgraded from there. A new schema change is a new revision
(`alembic revision -m "..."`, configured in pyproject.toml), never an edit of an old one.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, inspect, text

SCRIPTS = Path(__file__).parent
SCHEMA_LOCK = 0x73686172646772  # "shardgr": the advisory lock key of schema changes
# Alembic's `context` and `op` are module-level proxies: one migration at a time per process.
_ALEMBIC = threading.Lock()


def upgrade(conn: Connection) -> None:
    # PostgreSQL: services that start together take turns, and the first one's commit is
    # what the next one reads (a lock held until the caller's transaction ends).
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
    cfg = Config(attributes={"connection": conn})
    cfg.set_main_option("script_location", str(SCRIPTS))
    with _ALEMBIC:
        if (legacy := legacy_revision(conn)) is not None:
            command.stamp(cfg, legacy)
        command.upgrade(cfg, "head")


def legacy_revision(conn: Connection) -> str | None:
    """The revision that the tables of a store made before Alembic match, or None (a new
    database, or one Alembic manages). Each release before Alembic brought the whole store
    to its own schema at start-up, so the newest change present tells the revision."""
    inspector = inspect(conn)
    tables = inspector.get_table_names()
    if "jobs" not in tables or "alembic_version" in tables:
        return None
    point_columns = {c["name"] for c in inspector.get_columns("metric_points")}
    if "warnings" in point_columns:
        return "0004"
    if "layers" in point_columns:
        return "0003"
    if "ix_jobs_queue_order" in {i["name"] for i in inspector.get_indexes("jobs")}:
        return "0002"
    return "0001"
