"""The job store's transitions and the dispatcher's scheduling, without Ray (a fake Trainer).

Every test runs on SQLite (the embedded default) and on PostgreSQL (a fresh database from
the `pg_url` fixture in conftest.py)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect, text

from service.store import JobStore
from tests.fakes import (
    assert_each_claimed_once,
    claim_one_by_one,
    fake_train,
    make_dispatcher,
    new_job,
)
from tests.helpers import FakeClock, wait_for


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


def test_concurrent_claims_never_run_a_job_twice(store_url):
    store = JobStore(store_url)
    ids = {new_job(store).id for _ in range(40)}
    others = [JobStore(store_url) for _ in range(4)]  # separate engines: separate connections
    claims: dict[str, list[str]] = {}
    barrier = threading.Barrier(len(others))

    def dispatcher(s, owner):
        barrier.wait()
        claims[owner] = claim_one_by_one(s, owner)

    threads = [threading.Thread(target=dispatcher, args=(s, f"d{i}")) for i, s in enumerate(others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_each_claimed_once(store, ids, claims)


def test_claim_follows_priority_then_fifo_and_stops_on_none(store_url):
    store = JobStore(store_url)
    a = new_job(store).id
    b = new_job(store, priority=3).id
    c = new_job(store).id
    order = []
    store.claim("me", lambda job: order.append(job.id) or (None if job.id == a else False))
    assert order == [b, a]  # c is never looked at: a blocks the queue
    assert store.queue_positions() == {b: 1, a: 2, c: 3}


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


def test_an_older_store_gets_the_queue_index(store_url):
    store = JobStore(store_url)
    ids = [new_job(store, priority=p).id for p in (0, 2, 0)]
    with store.engine.begin() as conn:  # the index as an older version made it
        conn.execute(text("DROP INDEX ix_jobs_queue_order"))
        conn.execute(text("CREATE INDEX ix_jobs_queue ON jobs (status, priority, seq)"))
    store = JobStore(store_url)
    names = {index["name"] for index in inspect(store.engine).get_indexes("jobs")}
    assert "ix_jobs_queue_order" in names and "ix_jobs_queue" not in names
    plan, sorts = queue_plan(store)
    assert "ix_jobs_queue_order" in plan and not sorts  # no sort per read
    assert store.queue_positions() == {ids[1]: 1, ids[0]: 2, ids[2]: 3}
    assert [store.queue_position(store.get(i)) for i in ids] == [2, 1, 3]


def test_an_older_store_gets_the_columns_added_since(store_url):
    store = JobStore(store_url)
    job_id = new_job(store).id
    with store.engine.begin() as conn:  # the tables as an older version made them
        conn.execute(text("ALTER TABLE jobs DROP COLUMN health"))
        conn.execute(text("ALTER TABLE metric_points DROP COLUMN layers"))
    store = JobStore(store_url)
    columns = {
        t: {c["name"] for c in inspect(store.engine).get_columns(t)}
        for t in ("jobs", "metric_points")
    }
    assert "health" in columns["jobs"] and "layers" in columns["metric_points"]
    assert store.get(job_id).health is None  # the existing row reads back


def test_reclaim_orphans_after_a_crash(store_url):
    store = JobStore(store_url)
    running, cancelling = new_job(store).id, new_job(store).id
    store.claim("old", lambda job: True)
    store.cancel(cancelling)
    assert store.reclaim_orphans(60, owner="someone-else") == []  # leases still fresh
    assert sorted(store.reclaim_orphans(60, owner="old")) == sorted([running, cancelling])
    assert store.get(running).status == "queued" and store.get(running).attempts == 1
    assert store.get(cancelling).status == "cancelled"
    store.claim("new", lambda job: True)
    assert store.get(running).attempts == 2


def calls_of(fn, calls: list):
    """`fn`, recording each call once it returned or raised (in `calls`)."""

    def recorded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append(args)

    return recorded


def test_gang_scheduling_concurrency_and_completion(tmp_path, store_url):
    store = JobStore(store_url)
    big = new_job(store, cpus=2.0, name="big").id
    small = [new_job(store, cpus=1.0).id for _ in range(3)]
    release, fake = threading.Event(), fake_train(steps=10)

    def train(spec, out_dir, **kwargs):  # the big job holds its CPUs until the test is done
        if spec.name == "big":
            assert release.wait(20)
        return fake(spec, out_dir, **kwargs)

    d = make_dispatcher(tmp_path, store, train, max_concurrent_jobs=2)
    d.start()
    try:
        wait_for(lambda: big in d.runs)
        assert all(store.get(i).status == "queued" for i in small)  # no CPU left
        reason = d.pending_reason(store.get(small[0]), 1)
        assert reason == "waiting for 1 CPUs, 0 free"
        release.set()
        wait_for(lambda: all(store.get(i).status == "succeeded" for i in [big, *small]))
    finally:
        release.set()
        d.shutdown()
    job = store.get(small[0])
    assert job.attempts == 1 and job.step == 10 and job.total_steps == 10
    assert [p.step for p in store.points(small[0])] == list(range(1, 11))


def test_graceful_shutdown_requeues_and_restart_resumes(tmp_path, store_url):
    store = JobStore(store_url)
    job_id = new_job(store).id
    train = fake_train(steps=200, pause=0.01)
    d = make_dispatcher(tmp_path, store, train)
    d.start()
    wait_for(lambda: store.get(job_id).step >= 5)
    d.shutdown()
    job = store.get(job_id)
    assert job.status == "queued" and job.attempts == 1 and job.owner is None
    assert "queued" in store.events(job_id)[-1].message

    d2 = make_dispatcher(tmp_path, store, train)
    d2.start()
    try:
        wait_for(lambda: store.get(job_id).status == "succeeded")
    finally:
        d2.shutdown()
    job = store.get(job_id)
    assert job.attempts == 2
    assert any("resumed from step" in (e.message or "") for e in store.events(job_id))
    assert [p.step for p in store.points(job_id)] == list(range(1, 201))


def test_cancel_stops_a_running_job(tmp_path, store_url):
    store = JobStore(store_url)
    job_id = new_job(store).id
    d = make_dispatcher(tmp_path, store, fake_train(steps=500, pause=0.01))
    d.start()
    try:
        wait_for(lambda: store.get(job_id).step >= 3)
        assert store.cancel(job_id).status == "cancelling"
        # Not told directly: the dispatcher notices "cancelling" in the store (another
        # process may have taken the request).
        wait_for(lambda: store.get(job_id).status == "cancelled")
    finally:
        d.shutdown()
    assert store.get(job_id).error.startswith("stopped at")


@pytest.mark.parametrize("paused", [True, False])
def test_paused_or_zero_slots_start_nothing(tmp_path, store_url, paused, monkeypatch):
    store = JobStore(store_url)
    job_id = new_job(store).id
    extra = {"paused": True} if paused else {"max_concurrent_jobs": 0}
    d = make_dispatcher(tmp_path, store, fake_train(), **extra)
    dispatched = []
    monkeypatch.setattr(d, "_dispatch", calls_of(d._dispatch, dispatched))
    d.start()
    try:
        wait_for(lambda: len(dispatched) >= 2)  # the loop had its chances to start the job
        assert not d.runs
    finally:
        d.shutdown()  # (it would requeue a job it had started: check the job's attempts)
    job = store.get(job_id)
    assert (job.status, job.attempts) == ("queued", 0)
    assert d.pending_reason(store.get(job_id), 1) == "the dispatcher is paused"


def test_a_replacement_workers_node_joins_the_jobs_worker_nodes(tmp_path, store_url):
    """A worker_failure event carries the nodes that ran workers, the replacement's included."""
    store = JobStore(store_url)
    job_id = new_job(store).id
    seen = []

    def train(spec, out_dir, *, callback, stop_event, ray_address, abandon_event):
        callback({"type": "started", "total_steps": 1, "step": 0, "worker_nodes": ["n1", "n2"]})
        seen.append(store.get(job_id).worker_nodes)
        reason = "worker 1 died: its node died"
        nodes = ["n1", "n2", "n3"]
        callback({"type": "worker_failure", "rank": 1, "reason": reason, "worker_nodes": nodes})
        return {"status": "succeeded", "steps": 1}

    d = make_dispatcher(tmp_path, store, train)
    d.start()
    try:
        wait_for(lambda: store.get(job_id).status == "succeeded")
    finally:
        d.shutdown()
    assert seen == [["n1", "n2"]] and store.get(job_id).worker_nodes == ["n1", "n2", "n3"]
    notes = [e.message for e in store.events(job_id)]
    assert "worker 1 died: its node died; the step is recomputed" in notes


class Gated:
    """A store that waits while the test holds `lock`: the test acts between two of its
    owner's store calls (each call is one transaction, so none is half done meanwhile)."""

    def __init__(self, store: JobStore, lock: threading.Lock):
        self._store, self._lock = store, lock

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def gated(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return gated


def test_a_job_taken_back_from_a_stalled_owner_is_abandoned_without_a_write(tmp_path, store_url):
    """The owner missed its lease (say it stalled), another process took the job: the
    owner's next heartbeat finds it gone and its Trainer stops without writing."""
    store, stalled = JobStore(store_url), threading.Lock()
    job_id = new_job(store).id
    train = fake_train(steps=100_000, pause=0.01)
    d = make_dispatcher(
        tmp_path, Gated(store, stalled), train, heartbeat_s=0.05, max_concurrent_jobs=1
    )
    d.start()
    try:
        wait_for(lambda: store.get(job_id).step > 0)
        # d1 stalls: no transaction of its own is open while "b" takes the job (on PostgreSQL
        # a claim skips a row that a heartbeat or a metric point has locked), and d1 cannot
        # take the job back before "b" does.
        with stalled:
            # As if d1's lease had lapsed: a cutoff an hour ahead, whatever d1 beat last.
            assert store.reclaim_orphans(-3600) == [job_id]
            assert [j.id for j in store.claim("b", lambda job: True)] == [job_id]
        wait_for(lambda: train.abandoned and not d.runs)
    finally:
        d.shutdown()
    job = store.get(job_id)
    assert (job.status, job.owner) == ("running", "b")  # d1 wrote nothing after losing it
    assert train.abandoned == [str(tmp_path / "jobs" / job_id)]
    assert [e.message for e in store.events(job_id)][-1] == "started on b"


def test_an_owner_cut_off_from_the_store_abandons_its_jobs_within_half_a_lease(
    tmp_path, store_url, monkeypatch
):
    """No heartbeat reaches the store: before anyone may take the jobs (a lease), their
    Trainers stop; back in touch, the owner requeues them and they resume."""
    clock = FakeClock()
    monkeypatch.setattr("service.dispatcher.time", clock)
    store = JobStore(store_url)
    job_id = new_job(store).id
    train = fake_train(steps=300, pause=0.01)
    lease_s = 60.0  # on d1's clock; the store's (real time) never lapses it meanwhile
    d = make_dispatcher(tmp_path, store, train, heartbeat_s=0.05, lease_s=lease_s)
    d.start()
    try:
        wait_for(lambda: store.get(job_id).step > 0)
        renew, claim = store.heartbeat, store.claim

        def unreachable(*args):
            raise OSError("the database is unreachable")

        failed, renewed = [], []
        monkeypatch.setattr(store, "heartbeat", calls_of(unreachable, failed))
        monkeypatch.setattr(store, "claim", unreachable)  # d1 cannot take it again meanwhile
        wait_for(lambda: len(failed) >= 2)  # a heartbeat failed and its check has run
        assert not train.abandoned  # a hiccup shorter than half a lease stops nothing
        clock.now += lease_s / 2 + 0.01  # past half a lease, still inside the lease
        wait_for(lambda: train.abandoned and not d.runs)
        assert store.get(job_id).status == "queued"  # requeued by d1 itself
        monkeypatch.setattr(store, "heartbeat", calls_of(renew, renewed))
        wait_for(lambda: len(renewed) >= 2)  # a whole lease-loop turn after one got through
        monkeypatch.setattr(store, "claim", claim)
        d.wake()
        wait_for(lambda: store.get(job_id).status == "succeeded")
    finally:
        d.shutdown()
    job = store.get(job_id)
    assert job.attempts == 2 and job.step == 300
    assert any("d1 abandoned it at step" in (e.message or "") for e in store.events(job_id))
