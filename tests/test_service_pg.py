"""Several service processes on one PostgreSQL database: each job runs once, a live
process's jobs are never taken, a dead one's are requeued once (see the `pg_url` fixture)."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from sqlalchemy import text, update

from service.store import JobStore
from service.tables import JobRow
from tests.fakes import (
    assert_each_claimed_once,
    claim_one_by_one,
    fake_train,
    make_dispatcher,
    new_job,
    spec,
)
from tests.helpers import Server, wait_for

RESUME = "stopped; will resume from the newest checkpoint"


def started_on(store: JobStore, job_id: str) -> list[str]:
    """The owners that started the job, in order (its timeline's "started on" entries)."""
    messages = [e.message or "" for e in store.events(job_id)]
    return [m.removeprefix("started on ") for m in messages if m.startswith("started on ")]


def test_services_starting_together_create_the_schema_once(pg_url):
    barrier, errors = threading.Barrier(4), []

    def start():
        barrier.wait()
        try:
            JobStore(pg_url)
        except Exception as err:  # noqa: BLE001 - every failure is the test's finding
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = JobStore(pg_url)
    assert store.get(new_job(store).id).status == "queued"


def claim_in_process(url: str, owner: str, barrier, out) -> None:
    store = JobStore(url)
    barrier.wait()
    out.put((owner, claim_one_by_one(store, owner)))


def test_claims_from_two_processes_never_overlap(pg_url):
    store = JobStore(pg_url)
    ids = {new_job(store).id for _ in range(60)}
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and pools
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=claim_in_process, args=(pg_url, owner, barrier, out))
        for owner in ("p1", "p2")
    ]
    for p in procs:
        p.start()
    claims = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert_each_claimed_once(store, ids, claims)


def lapse(store: JobStore, *job_ids: str) -> None:
    """The owner's last heartbeat an hour ago: it died without a word."""
    with store.engine.begin() as conn:
        conn.execute(
            update(JobRow)
            .where(JobRow.id.in_(job_ids))
            .values(heartbeat_at=text("heartbeat_at - interval '1 hour'"))
        )


def test_a_heartbeat_keeps_the_lease_and_a_lapsed_one_requeues_once(pg_url):
    a, b, c = JobStore(pg_url), JobStore(pg_url), JobStore(pg_url)
    ids = [new_job(a).id for _ in range(6)]
    a.claim("a", lambda job: True)
    # b and c start up while a lives: not single-process, so a's jobs are not theirs to take.
    assert not b.single_process
    assert b.reclaim_orphans(60, owner="b", everyone=b.single_process) == []
    lapse(a, *ids)
    assert a.heartbeat("a", ids) == set(ids)  # a beat since: the lease is renewed
    assert c.reclaim_orphans(60, owner="c", everyone=c.single_process) == []
    assert {a.get(i).owner for i in ids} == {"a"}

    time.sleep(0.5)  # a misses its heartbeats for longer than a lease of 0.2 s
    barrier, reclaimed = threading.Barrier(2), {}

    def reclaim(store, owner):
        barrier.wait()
        reclaimed[owner] = store.reclaim_orphans(0.2)

    threads = [threading.Thread(target=reclaim, args=(s, o)) for s, o in ((b, "b"), (c, "c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(reclaimed["b"] + reclaimed["c"]) == sorted(ids)  # each job once, by one
    for job_id in ids:
        job = a.get(job_id)
        assert (job.status, job.owner, job.attempts) == ("queued", None, 1)
        assert [e.message for e in a.events(job_id)].count(f"a {RESUME}") == 1
    # a, alive after all, has lost them: it can neither renew nor end them.
    assert a.heartbeat("a", ids) == set()
    assert not a.finish(ids[0], "a", "succeeded")
    assert b.reclaim_orphans(60) == [] and a.get(ids[0]).status == "queued"


def test_a_second_dispatcher_resumes_only_the_jobs_of_dead_owners(tmp_path, pg_url):
    store = JobStore(pg_url)
    live, dead, later = new_job(store).id, new_job(store).id, new_job(store).id
    store.claim("a", lambda job: True)
    lapse(store, dead)
    train = fake_train(steps=5)
    d = make_dispatcher(tmp_path, JobStore(pg_url), train, heartbeat_s=0.05, lease_s=60)
    d.start()  # reconciles at start-up: `dead` is requeued, `live` and `later` are a's
    try:
        wait_for(lambda: store.get(dead).status == "succeeded")
        lapse(store, later)  # a dies now: the running dispatcher notices on its next beat
        wait_for(lambda: store.get(later).status == "succeeded")
        assert store.get(live).status == "running" and store.get(live).owner == "a"
    finally:
        d.shutdown()
    for job_id in (dead, later):
        messages = [e.message for e in store.events(job_id)]
        assert messages.count(f"a {RESUME}") == 1 and store.get(job_id).attempts == 2
        assert started_on(store, job_id) == ["a", "d1"]
    assert [e.message for e in store.events(live)] == ["submitted", "started on a"]


@pytest.mark.slow
def test_two_services_on_one_database_run_each_job_once(tmp_path, pg_url):
    """Two `shardgrad serve` processes (each with its embedded Ray: one CPU, two jobs at a
    time) share the database and the data dir, so either serves any job's checkpoints."""
    data = tmp_path / "var"
    env = {"SHARDGRAD_DATABASE_URL": pg_url, "SHARDGRAD_RAY_NUM_CPUS": "1"}
    servers = {o: Server(data, SHARDGRAD_INSTANCE_ID=o, **env).start() for o in ("a", "b")}
    body = spec(workers=1, cpus_per_worker=0.5, epochs=1, checkpoint_every=4)
    try:
        for server in servers.values():
            server.wait_ready()
        with servers["a"].client() as a, servers["b"].client() as b:
            # Half the submissions go to each: each wakes its own dispatcher, the other polls.
            ids = [(a, b)[i % 2].post("/jobs", json=body).json()["id"] for i in range(10)]
            store = JobStore(pg_url)
            terminal = ("succeeded", "failed", "cancelled")
            wait_for(lambda: all(store.get(i).status in terminal for i in ids), timeout=120)
            ran_on = {}
            for job_id in ids:
                job = store.get(job_id)
                assert job.status == "succeeded" and job.attempts == 1, job.error
                owners = started_on(store, job_id)
                assert owners in (["a"], ["b"])
                ran_on[job_id] = owners[0]
                other = b if owners == ["a"] else a
                checkpoints = other.get(f"/jobs/{job_id}/checkpoints").json()
                assert checkpoints[-1]["step"] == job.step == job.total_steps
        assert set(ran_on.values()) == {"a", "b"}
    finally:
        for server in servers.values():
            server.stop()
