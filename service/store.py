"""The job store: the source of truth for jobs, their queue, timeline and metric points.

Every state change is one conditional UPDATE (`... WHERE status = <expected>`), so two
dispatchers, or a dispatcher and a cancel request, can never both win the same job. On
PostgreSQL the claim also reads its candidates with `FOR UPDATE SKIP LOCKED`, so
concurrent dispatchers do not wait on each other. On SQLite the process serialises its
own writes with a lock (no busy-waiting on SQLite's file lock in the hot path).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Text,
    bindparam,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Row, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from service import listing, migrations
from service.batching import GroupCommit
from service.feed import ChangeFeed
from service.tables import (
    ACTIVE,
    CANCELLED,
    CANCELLING,
    FAILED,
    LAYER_FIELDS,
    METRIC_COLUMNS,
    POINT_FIELDS,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    EventRow,
    JobRow,
    MetricRow,
    TagRow,
)


class JobNotFound(LookupError):
    pass


class Conflict(Exception):
    """The job is not in a state that allows the request; the message says why."""


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # stored naive, always UTC


def make_engine(url: str):
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    memory = parsed.database in (None, "", ":memory:")
    if memory:
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    else:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(conn, _):
        cur = conn.cursor()
        if not memory:
            # WAL: readers never block the writer. NORMAL: no fsync per commit; a killed
            # process loses nothing (the WAL is in the OS cache), only a power cut might.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


class JobStore:
    def __init__(self, url: str, changes: ChangeFeed | None = None):
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.changes = changes or ChangeFeed()
        self._submits = GroupCommit(self.submit_many, name="submit")
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else nullcontext()
        with self.engine.begin() as conn:
            migrations.upgrade(conn)  # Alembic: a new store, or one an older version made

    @property
    def single_process(self) -> bool:
        """SQLite: one service process owns the store, so every active job at start is orphaned."""
        return self.dialect == "sqlite"

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._write_lock, Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s
        self.changes.notify()

    def _read(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def ping(self) -> None:
        with self._read() as s:
            s.execute(text("SELECT 1"))

    # -- submit, read ----------------------------------------------------------------

    def create(
        self, spec: dict, *, name: str, priority: int, cpus: float, tags: dict | None = None
    ) -> JobRow:
        job = dict(spec=spec, name=name, priority=priority, cpus=cpus, tags=tags or {})
        return self.submit_many([job])[0][0]

    async def submit(
        self, spec: dict, *, name: str, priority: int, cpus: float, tags: dict | None = None
    ) -> tuple[JobRow, int]:
        """Queue a new job from an event loop, with its queue position: the submissions
        that arrive together are written by submit_many in one transaction."""
        job = dict(spec=spec, name=name, priority=priority, cpus=cpus, tags=tags or {})
        return await self._submits(job)

    def submit_many(self, jobs: list[dict]) -> list[tuple[JobRow, int]]:
        """Queue new jobs (dicts of spec, name, priority, cpus, and optionally tags) in one
        transaction, in order; returns each with its queue position. The API's hot path:
        prebuilt Core statements (no unit of work), and one commit for every submission that
        arrived together."""
        out = []
        with self._tx() as s:
            for job in jobs:
                job = dict(job)
                tags = job.pop("tags", None) or {}
                now = utcnow()
                values = dict(
                    id=uuid.uuid4().hex[:12],
                    status=QUEUED,
                    created_at=now,
                    updated_at=now,
                    version=0,
                    attempts=0,
                    step=0,
                    epoch=0,
                    metrics={},
                    worker_nodes=[],
                    **job,
                )
                seq = s.execute(_INSERT_JOB, values).inserted_primary_key[0]
                event = dict(job_id=values["id"], at=now, status=QUEUED, attempt=0)
                s.execute(_INSERT_EVENT, {**event, "message": "submitted"})
                tag_rows = [TagRow(job_id=values["id"], key=k, value=v) for k, v in tags.items()]
                if tag_rows:
                    s.execute(_INSERT_TAG, [_columns(t) for t in tag_rows])
                position = s.scalar(_AHEAD, {"priority": job["priority"], "seq": seq}) + 1
                out.append((JobRow(seq=seq, **values, tag_rows=tag_rows), position))
        return out

    def get(self, job_id: str) -> JobRow:
        with self._read() as s:
            job = s.scalar(select(JobRow).where(JobRow.id == job_id))
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list(
        self,
        *,
        status: str | None = None,
        tags: Iterable[tuple[str, str]] = (),
        name: str | None = None,
        sort: str = listing.DEFAULT_SORT,
        limit: int = 50,
        after: listing.Cursor | None = None,
    ) -> list[JobRow]:
        """Up to `limit` jobs that pass the filters (service/listing.py), in `sort` order,
        after the row `after` names (the last of the previous page)."""
        rows: list[JobRow] = []
        with self._read() as s:
            for stmt in listing.scans(listing.filtered(status, tags, name), sort, after):
                rows += s.scalars(stmt.limit(limit - len(rows)))
                if len(rows) >= limit:
                    break
        return rows

    def queue_positions(self) -> dict[str, int]:
        with self._read() as s:
            ids = s.scalars(select(JobRow.id).where(JobRow.status == QUEUED).order_by(*_QUEUE))
            return {job_id: i for i, job_id in enumerate(ids, start=1)}

    def queue_position(self, job: JobRow) -> int:
        with self._read() as s:
            return s.scalar(_AHEAD, {"priority": job.priority, "seq": job.seq}) + 1

    def events(self, job_id: str) -> list[EventRow]:
        with self._read() as s:
            stmt = select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.seq)
            return list(s.scalars(stmt))

    def points(
        self, job_id: str, after_step: int = -1, limit: int | None = None
    ) -> list[MetricRow]:
        """The job's metric points after `after_step`, oldest first; at most `limit`."""
        with self._read() as s:
            stmt = (
                select(MetricRow)
                .where(MetricRow.job_id == job_id, MetricRow.step > after_step)
                .order_by(MetricRow.step)
                .limit(limit)
            )
            return list(s.scalars(stmt))

    def series(
        self, job_id: str, fields: Iterable[str], most: int
    ) -> dict[str, tuple[list[tuple[int, float]], int]]:
        """Each field's (step, value) points where it was measured, oldest first, and how
        many there are. Over `most`, the job's steps are cut into `most` equal ranges and each
        range keeps its last point: a bounded curve, read in the database."""
        step = MetricRow.step
        columns = {f: getattr(MetricRow, f) for f in fields}
        mine = MetricRow.job_id == job_id
        out = {}
        with self._read() as s:
            counts = select(func.min(step), func.max(step), *map(func.count, columns.values()))
            lo, hi, *totals = s.execute(counts.where(mine)).one()
            for (field, column), total in zip(columns.items(), totals, strict=True):
                measured = (mine, column.is_not(None))
                stmt = select(step, column).where(*measured).order_by(step)
                if total > most:  # BigInteger: step x most overflows PostgreSQL's integer
                    bucket = cast(step - lo, BigInteger) * most // (hi - lo + 1)
                    last = select(func.max(step)).where(*measured).group_by(bucket)
                    stmt = stmt.where(step.in_(last))
                out[field] = ([tuple(r) for r in s.execute(stmt)], total)
        return out

    def changed_since(self, since: datetime) -> list[JobRow]:
        with self._read() as s:
            stmt = select(JobRow).where(JobRow.updated_at >= since).order_by(JobRow.updated_at)
            return list(s.scalars(stmt))

    def counts(self) -> dict[str, int]:
        with self._read() as s:
            rows = s.execute(select(JobRow.status, func.count()).group_by(JobRow.status))
            return dict(rows.all())

    def owned(self, owner: str, status: str) -> list[str]:
        with self._read() as s:
            stmt = select(JobRow.id).where(JobRow.owner == owner, JobRow.status == status)
            return list(s.scalars(stmt))

    # -- the dispatcher's transitions -----------------------------------------------------

    def claim(self, owner: str, decide: Callable[[Row], bool | None]) -> list[JobRow]:
        """Walk the queue in order; claim each job `decide` accepts, stop at None.

        `decide` sees a job's queue columns (`.id`, `.seq`, `.priority`, `.cpus`); the
        claimed jobs are returned whole.

        The claim is a conditional UPDATE (status still queued), atomic on every database;
        on PostgreSQL, rows another dispatcher is deciding on are skipped, not waited for.
        """
        claimed = []
        with self._tx() as s:
            # Only the queue's columns: the head of a long queue is read on every dispatcher
            # tick, and most ticks claim nothing. Claimed jobs are read whole below.
            stmt = _QUEUE_HEAD
            if self.dialect == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            for queued in s.execute(stmt).all():
                verdict = decide(queued)
                if verdict is None:
                    break
                if not verdict:
                    continue
                now = utcnow()
                values = dict(
                    status=RUNNING,
                    owner=owner,
                    heartbeat_at=now,
                    attempts=JobRow.attempts + 1,
                    started_at=func.coalesce(JobRow.started_at, now),
                    **_touch(now),
                )
                if _cas(s, queued.id, (QUEUED,), values):
                    job = s.scalar(select(JobRow).where(JobRow.id == queued.id))
                    s.add(_event(job, RUNNING, f"started on {owner}"))
                    claimed.append(job)
        return claimed

    def heartbeat(self, owner: str, job_ids: Collection[str]) -> set[str]:
        """Renew the leases of the jobs `owner` runs; return those it still holds. One it
        runs that is missing was taken back (its lease lapsed): its Trainer must stop.
        Only running Trainers renew: a job its owner no longer runs lapses and is resumed."""
        if not job_ids:
            return set()
        with self._tx() as s:
            held = (JobRow.id.in_(job_ids), JobRow.owner == owner, JobRow.status.in_(ACTIVE))
            s.execute(update(JobRow).where(*held).values(heartbeat_at=utcnow()))
            return set(s.scalars(select(JobRow.id).where(*held)))

    def progress(self, job_id: str, owner: str, values: dict, point: dict | None = None) -> None:
        """Persist a Trainer event: progress columns of the job, and its metric point. Only
        while `owner` holds the job: a run that lost its lease writes over nothing of the
        run that took the job over, neither its progress nor its metric points."""
        if "metrics" in values:  # the sortable ones also as columns
            values = {**values, **{m: values["metrics"].get(m) for m in METRIC_COLUMNS}}
        with self._tx() as s:
            held = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.owner == owner, JobRow.status.in_(ACTIVE))
                .values(**values, **_touch(utcnow()))
            ).rowcount
            if held and point is not None:
                _upsert_point(s, {"job_id": job_id, **point})

    def note(self, job_id: str, message: str) -> None:
        """A timeline entry that is not a transition (a resume point, a worker failure)."""
        with self._tx() as s:
            job = s.scalar(select(JobRow).where(JobRow.id == job_id))
            s.add(_event(job, job.status, message))

    def finish(self, job_id: str, owner: str, status: str, error=None, **values) -> bool:
        now = utcnow()
        values = dict(status=status, error=error, owner=None, **values)
        with self._tx() as s:
            job = s.scalar(select(JobRow).where(JobRow.id == job_id))
            values |= _finished(job, now)
            if not _cas(s, job_id, ACTIVE, {**values, **_touch(now)}, owner=owner):
                return False
            s.add(_event(job, status, error))
        return True

    def requeue(self, job_id: str, owner: str, message: str) -> bool:
        """Back to the queue for the next start (graceful stop); False if cancel was asked."""
        with self._tx() as s:
            job = s.scalar(select(JobRow).where(JobRow.id == job_id))
            values = dict(status=QUEUED, owner=None, eta_s=None, **_touch(utcnow()))
            if not _cas(s, job_id, (RUNNING,), values, owner=owner):
                return False
            s.add(_event(job, QUEUED, message))
        return True

    def reclaim_orphans(
        self,
        lease_s: float,
        *,
        owner: str | None = None,
        everyone: bool = False,
        max_attempts: int | None = None,
    ) -> list[str]:
        """Active jobs whose dispatcher is gone: `owner`'s (it is restarting), any whose
        lease lapsed, or all of them (`everyone`: SQLite has one service process).
        Running ones go back to the queue to resume; cancelling ones end cancelled.

        The crash-loop breaker: a running job whose last `max_attempts` attempts all ended
        with its service's death (this one included) fails instead, since it may be what
        kills the service (out of memory, say). `resume` gives it another `max_attempts`."""
        cutoff = utcnow() - timedelta(seconds=lease_s)
        dead = or_(JobRow.heartbeat_at < cutoff, JobRow.owner.is_(None))
        if owner is not None:
            dead = or_(dead, JobRow.owner == owner)
        reclaimed = []
        with self._tx() as s:
            stmt = select(JobRow).where(JobRow.status.in_(ACTIVE))
            if not everyone:
                stmt = stmt.where(dead)
            for job in s.scalars(stmt.with_for_update()).all():
                old = job.owner
                if job.status == RUNNING:
                    status, msg = QUEUED, f"{old} {DIED}"
                else:
                    status, msg = CANCELLED, f"{old} stopped while cancelling"
                values = dict(status=status, owner=None, eta_s=None, **_touch(utcnow()))
                if status == QUEUED and max_attempts is not None:
                    deaths = _deaths_in_a_row(s, job.id) + 1
                    if deaths >= max_attempts:
                        status = values["status"] = FAILED
                        values["error"] = msg = (
                            f"{old} stopped during each of the job's last {deaths} attempts "
                            f"(SHARDGRAD_MAX_ATTEMPTS={max_attempts}): the job may be what "
                            "kills the service; resume it to try again"
                        )
                if status != QUEUED:
                    values |= _finished(job, utcnow())
                if _cas(s, job.id, (job.status,), values, owner=old):
                    s.add(_event(job, status, msg))
                    reclaimed.append(job.id)
        return reclaimed

    # -- the API's transitions -------------------------------------------------------------

    def cancel(self, job_id: str) -> JobRow:
        """queued -> cancelled at once; running -> cancelling (its dispatcher stops it)."""
        with self._tx() as s:
            job = s.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if job is None:
                raise JobNotFound(job_id)
            now = utcnow()
            if job.status == QUEUED:
                values = dict(status=CANCELLED, finished_at=now, error="cancelled while queued")
                new, msg = CANCELLED, "cancelled while queued"
            elif job.status == RUNNING:
                values, new, msg = dict(status=CANCELLING), CANCELLING, "cancel requested"
            elif job.status == CANCELLING:
                return job
            else:
                raise Conflict(f"job {job_id} is {job.status}; only queued or running jobs cancel")
            if not _cas(s, job_id, (job.status,), {**values, **_touch(now)}):
                raise Conflict(f"job {job_id} changed state; try again")
            s.add(_event(job, new, msg))
            s.refresh(job)
        return job

    def resume(self, job_id: str) -> JobRow:
        with self._tx() as s:
            job = s.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if job is None:
                raise JobNotFound(job_id)
            if job.status not in (FAILED, CANCELLED):
                msg = f"job {job_id} is {job.status}; only failed or cancelled jobs resume"
                raise Conflict(msg)
            values = dict(status=QUEUED, error=None, finished_at=None, duration_s=None, eta_s=None)
            if not _cas(s, job_id, (job.status,), {**values, **_touch(utcnow())}):
                raise Conflict(f"job {job_id} changed state; try again")
            s.add(_event(job, QUEUED, "resume requested; continues from the newest checkpoint"))
            s.refresh(job)
        return job

    def patch_tags(self, job_id: str, patch: dict[str, str | None], most: int) -> JobRow:
        """Merge `patch` into the job's tags (RFC 7396: a null value removes its key, keys
        not named stay). Conflict if the job would carry more than `most`."""
        with self._tx() as s:
            job = s.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if job is None:
                raise JobNotFound(job_id)
            tags = {k: v for k, v in (job.tags | patch).items() if v is not None}
            if len(tags) > most:
                msg = f"job {job_id} would carry {len(tags)} tags; at most {most}: remove some"
                raise Conflict(msg + " (a null value removes a key)")
            s.execute(delete(TagRow).where(TagRow.job_id == job_id))
            if tags:
                s.execute(
                    _INSERT_TAG, [dict(job_id=job_id, key=k, value=v) for k, v in tags.items()]
                )
            s.execute(update(JobRow).where(JobRow.id == job_id).values(**_touch(utcnow())))
            s.expire(job)
            s.refresh(job)
        return job

    def delete(self, job_id: str) -> JobRow:
        """Remove a finished job's rows: its timeline, metric points, tags and the job. One
        transaction, conditional on the job still being finished: a resume or a claim that
        gets there first makes it a Conflict, and one that comes later finds no job."""
        with self._tx() as s:
            job = s.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if job is None:
                raise JobNotFound(job_id)
            if job.status not in TERMINAL:
                msg = f"job {job_id} is {job.status}; only finished jobs (succeeded, failed, "
                raise Conflict(msg + "cancelled) are deleted; cancel it first")
            for table in (MetricRow, EventRow, TagRow):
                s.execute(delete(table).where(table.job_id == job_id))
            gone = delete(JobRow).where(JobRow.id == job_id, JobRow.status.in_(TERMINAL))
            if s.execute(gone).rowcount != 1:
                raise Conflict(f"job {job_id} changed state; try again")
        return job

    def dataset_users(self, dataset_id: str, statuses: Collection[str] | None = None) -> list[str]:
        """The jobs (in `statuses`, default any) whose spec trains on the upload."""
        # The spec's text holding the id narrows to the few candidates; their data decides.
        stmt = select(JobRow.id, JobRow.spec).where(cast(JobRow.spec, Text).contains(dataset_id))
        if statuses is not None:
            stmt = stmt.where(JobRow.status.in_(statuses))
        with self._read() as s:
            return [job_id for job_id, spec in s.execute(stmt) if uses_upload(spec) == dataset_id]

    def finished_before(self, cutoff: datetime, statuses: Collection[str], limit: int) -> list[str]:
        """Finished jobs in `statuses` that ended before `cutoff`, oldest first."""
        ended = func.coalesce(JobRow.finished_at, JobRow.created_at)
        stmt = (
            select(JobRow.id)
            .where(JobRow.status.in_(set(statuses) & TERMINAL), ended < cutoff)
            .order_by(JobRow.seq)
            .limit(limit)
        )
        with self._read() as s:
            return list(s.scalars(stmt))


def uses_upload(spec: dict) -> str | None:
    """The id of the uploaded dataset a stored spec trains on, if it trains on one."""
    data = spec.get("data") if isinstance(spec, dict) else None
    if isinstance(data, dict) and data.get("type") == "dataset":
        return data.get("id")
    return None


_QUEUE = (JobRow.priority.desc(), JobRow.seq.asc())
_QUEUE_HEAD = (
    select(JobRow.seq, JobRow.id, JobRow.priority, JobRow.cpus)
    .where(JobRow.status == QUEUED)
    .order_by(*_QUEUE)
    .limit(100)
)
_INSERT_JOB = insert(JobRow.__table__)
_INSERT_EVENT = insert(EventRow.__table__)
_INSERT_TAG = insert(TagRow.__table__)


def _columns(tag: TagRow) -> dict:
    return {"job_id": tag.job_id, "key": tag.key, "value": tag.value}


def _finished(job: JobRow, now: datetime) -> dict:
    """The columns of a job that ends now: when, and how long since it first started."""
    started = job.started_at
    return {
        "finished_at": now,
        "duration_s": None if started is None else (now - started).total_seconds(),
    }


def _count_queued(*where):
    return select(func.count()).where(JobRow.status == QUEUED, *where).scalar_subquery()


# Queued jobs ahead of (priority, seq): two range counts on the queue index (one count of
# `priority > p OR (priority = p AND seq < s)` took 1.6 times as long on SQLite).
_AHEAD = select(
    _count_queued(JobRow.priority > bindparam("priority"))
    + _count_queued(JobRow.priority == bindparam("priority"), JobRow.seq < bindparam("seq"))
)


# The timeline entry of an attempt that ended with its service's death (reclaim_orphans).
DIED = "stopped; will resume from the newest checkpoint"


def _deaths_in_a_row(s: Session, job_id: str) -> int:
    """How many of the job's latest attempts ended with its service's death: the timeline's
    reclaims back to the last other way back to the queue (submitted, resume, a graceful
    stop), with the starts and notes of running attempts in between."""
    stmt = select(EventRow.status, EventRow.message).where(EventRow.job_id == job_id)
    deaths = 0
    for status, message in s.execute(stmt.order_by(EventRow.seq.desc())):
        if status in ACTIVE:
            continue
        if status != QUEUED or not (message or "").endswith(DIED):
            break
        deaths += 1
    return deaths


def _touch(now: datetime) -> dict:
    return {"updated_at": now, "version": JobRow.version + 1}


def _cas(s: Session, job_id: str, expected, values: dict, owner: str | None = None) -> bool:
    """UPDATE jobs SET values WHERE id AND status IN expected [AND owner]: the one transition."""
    stmt = update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(expected))
    if owner is not None:
        stmt = stmt.where(JobRow.owner == owner)
    return s.execute(stmt.values(**values)).rowcount == 1


def _event(job: JobRow, status: str, message: str | None) -> EventRow:
    attempt = job.attempts
    return EventRow(job_id=job.id, at=utcnow(), status=status, attempt=attempt, message=message)


def _upsert_point(s: Session, values: dict) -> None:
    """Insert the point, or replace the groups of columns it carries (MetricRow): all of a
    group (a metric a recomputed step lacks becomes null), none of the other group."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # any other database: a portable (slower) get-or-insert
        s.merge(MetricRow(**values))
        return
    stmt = insert(MetricRow).values(**values)
    s.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "step"],
            set_={
                k: stmt.excluded[k]
                for group in (POINT_FIELDS, LAYER_FIELDS)
                if values.keys() & set(group)
                for k in group
            },
        )
    )


__all__ = ["JobStore", "JobNotFound", "Conflict", "SUCCEEDED", "utcnow"]
