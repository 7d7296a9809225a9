"""Alembic migrations of the job store (service/migrations): a store that an older version
made, before the store used Alembic, upgrades in place with its rows intact, and the
revisions build exactly the tables of service/tables.py. Every test runs on SQLite and on
PostgreSQL (a fresh database from the `pg_url` fixture in conftest.py)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from service import migrations
from service.store import JobStore
from service.tables import Base

# The DDL that create_all wrote for a new store: at the first release, and at the last
# release before Alembic. One file per database (tests/fixtures/store_schemas/).
SCHEMAS = Path(__file__).parent / "fixtures" / "store_schemas"
# What each release in between changed in an existing store at start-up, oldest first.
LATER_RELEASES = [
    """
    DROP INDEX ix_jobs_queue;
    CREATE INDEX ix_jobs_queue_order ON jobs (status, priority DESC, seq);
    """,
    """
    ALTER TABLE jobs ADD COLUMN health JSON;
    ALTER TABLE metric_points ADD COLUMN layers JSON;
    """,
    "ALTER TABLE metric_points ADD COLUMN warnings JSON;",
]
OLDER_STORES = {  # name -> (DDL file, later changes applied to it)
    "first-release": ("first_release", []),
    "queue-order-index": ("first_release", LATER_RELEASES[:1]),
    "health-and-layers": ("first_release", LATER_RELEASES[:2]),
    "point-warnings": ("first_release", LATER_RELEASES),
    "last-before-alembic": ("last_before_alembic", []),
}
AT = datetime(2026, 11, 20, 12, 0, 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


def older_store(url: str, made_by: str) -> list[str]:
    """Make the tables of an older version, and two jobs as it wrote them: one running, with
    a metric point and its timeline, and one queued at a higher priority. Their ids."""
    schema, changes = OLDER_STORES[made_by]
    engine = create_engine(url, poolclass=NullPool)
    ddl = (SCHEMAS / f"{schema}.{engine.dialect.name}.sql").read_text() + "".join(changes)
    with engine.begin() as conn:
        for statement in ddl.split(";"):
            if statement.strip():
                conn.execute(text(statement))
        for job_id, status, priority in (
            ("oldrunning01", "running", 0),
            ("oldqueued002", "queued", 5),
        ):
            conn.execute(INSERT_JOB, job(job_id, status, priority))
            conn.execute(INSERT_EVENT, {"job_id": job_id, "at": AT, "message": "submitted"})
        point = {"job_id": "oldrunning01", "step": 1, "epoch": 0, "loss": 0.75}
        conn.execute(INSERT_POINT, point)
    engine.dispose()
    return ["oldrunning01", "oldqueued002"]


def job(job_id: str, status: str, priority: int) -> dict:
    return {
        "id": job_id,
        "name": f"old-{status}",
        "status": status,
        "priority": priority,
        "spec": json.dumps({"name": f"old-{status}", "workers": 2}),
        "at": AT,
        "metrics": json.dumps({"train_loss": 0.75} if status == "running" else {}),
        "step": 1 if status == "running" else 0,
        "owner": "old-dispatcher" if status == "running" else None,
    }


INSERT_JOB = text(
    "INSERT INTO jobs (id, name, status, priority, spec, cpus, created_at, updated_at,"
    " version, attempts, step, epoch, metrics, worker_nodes, owner, heartbeat_at)"
    " VALUES (:id, :name, :status, :priority, :spec, 2.0, :at, :at,"
    " 3, 1, :step, 0, :metrics, '[]', :owner, :at)"
)
INSERT_EVENT = text(
    "INSERT INTO job_events (job_id, at, status, attempt, message)"
    " VALUES (:job_id, :at, 'queued', 0, :message)"
)
INSERT_POINT = text(
    "INSERT INTO metric_points (job_id, step, epoch, train_loss)"
    " VALUES (:job_id, :step, :epoch, :loss)"
)


def schema_differences(store: JobStore) -> list:
    """What Alembic's autogenerate would change to make the store's tables the models'."""
    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def revision(store: JobStore) -> str | None:
    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


HEAD = ScriptDirectory(str(migrations.SCRIPTS)).get_current_head()


def test_a_new_store_gets_every_revision_and_exactly_the_models_tables(store_url):
    store = JobStore(store_url)
    assert revision(store) == HEAD
    assert schema_differences(store) == []
    assert JobStore(store_url).list() == []  # a second start changes nothing


@pytest.mark.parametrize("made_by", OLDER_STORES)
def test_an_older_store_upgrades_with_its_rows_intact(store_url, made_by):
    running, queued = older_store(store_url, made_by)
    store = JobStore(store_url)
    assert revision(store) == HEAD
    assert schema_differences(store) == []

    job = store.get(running)
    assert (job.name, job.status, job.owner, job.attempts) == (
        "old-running",
        "running",
        "old-dispatcher",
        1,
    )
    assert job.spec == {"name": "old-running", "workers": 2} and job.created_at == AT
    assert job.metrics == {"train_loss": 0.75} and job.health is None
    [point] = store.points(running)
    assert (point.step, point.train_loss, point.layers, point.warnings) == (1, 0.75, None, None)
    assert [e.message for e in store.events(running)] == ["submitted"]
    assert store.get(queued).status == "queued"

    # The store works as a new one would: new columns written, new jobs queued after.
    point = {"step": 2, "epoch": 0, "layers": [{"name": "0"}], "warnings": ["exploding"]}
    store.progress(running, "old-dispatcher", {"step": 2, "health": {"step": 2}}, point)
    assert store.get(running).health == {"step": 2}
    assert store.points(running, after_step=1)[0].warnings == ["exploding"]
    new = store.create({"name": "new"}, name="new", priority=0, cpus=1.0)
    assert new.seq > store.get(queued).seq
    assert store.queue_positions() == {queued: 1, new.id: 2}
    assert JobStore(store_url).get(new.id).status == "queued"  # a second start is a no-op


QUEUE_HEAD = "SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq LIMIT 100"


def queue_plan(store: JobStore) -> tuple[str, bool]:
    """The database's plan for reading the queue's head, and whether it sorts rows."""
    with store.engine.begin() as conn:
        if store.dialect == "sqlite":
            rows = conn.execute(text(f"EXPLAIN QUERY PLAN {QUEUE_HEAD}"))
            plan = " ".join(str(r[-1]) for r in rows)
            return plan, "TEMP B-TREE" in plan
        # A few rows: PostgreSQL would scan the table; told not to, it picks its best index.
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = " ".join(r[0] for r in conn.execute(text(f"EXPLAIN {QUEUE_HEAD}")))
        return plan, "Sort" in plan


def test_the_first_release_gets_the_queue_order_index(store_url):
    _, queued = older_store(store_url, "first-release")
    store = JobStore(store_url)
    ids = [store.create({}, name="new", priority=p, cpus=1.0).id for p in (0, 2, 0)]
    names = {index["name"] for index in inspect(store.engine).get_indexes("jobs")}
    assert "ix_jobs_queue_order" in names and "ix_jobs_queue" not in names
    plan, sorts = queue_plan(store)
    assert "ix_jobs_queue_order" in plan and not sorts  # no sort per read
    assert store.queue_positions() == {queued: 1, ids[1]: 2, ids[0]: 3, ids[2]: 4}
    assert [store.queue_position(store.get(i)) for i in ids] == [3, 2, 4]
