"""The job store's transitions and the dispatcher's scheduling, without Ray (a fake Trainer).

Every test runs on SQLite (the embedded default) and on PostgreSQL (a fresh database from
the `pg_url` fixture in conftest.py)."""

from __future__ import annotations

import threading

import pytest

from service.dispatcher import Dispatcher, Run
from service.store import JobStore
from tests.fakes import (
    assert_each_claimed_once,
    claim_one_by_one,
    fake_train,
    make_dispatcher,
    new_job,
)
from tests.helpers import FakeClock, wait_for
from workers.events import EVENT_TYPES, CheckpointEvent, StartedEvent, WorkersJoinedEvent


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


def test_only_the_owner_writes_progress_and_metric_points(store_url):
    """A run that lost its job (lease lapsed, taken over) writes nothing over the new run."""
    store = JobStore(store_url)
    job_id = new_job(store).id
    store.claim("old", lambda job: True)
    store.progress(job_id, "old", {"step": 1}, {"step": 1, "train_loss": 0.5})
    assert store.reclaim_orphans(60, owner="old") == [job_id]
    store.claim("new", lambda job: True)
    store.progress(job_id, "new", {"step": 1}, {"step": 1, "train_loss": 0.25})
    store.progress(job_id, "old", {"step": 2}, {"step": 2, "train_loss": 9.0})
    store.progress(job_id, "old", {"step": 1}, {"step": 1, "train_loss": 9.0})
    assert store.get(job_id).step == 1
    assert [(p.step, p.train_loss) for p in store.points(job_id)] == [(1, 0.25)]


def calls_of(fn, calls: list):
    """`fn`, recording each call once it returned or raised (in `calls`)."""

    def recorded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append(args)

    return recorded


def run_to_success(tmp_path, store, train, job_id) -> None:
    """A dispatcher runs `train` until the job succeeded."""
    d = make_dispatcher(tmp_path, store, train)
    d.start()
    try:
        wait_for(lambda: store.get(job_id).status == "succeeded")
    finally:
        d.shutdown()


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

    run_to_success(tmp_path, store, train, job_id)
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

    def train(spec, out_dir, *, callback, stop_event, settings, abandon_event):
        callback({"type": "started", "total_steps": 1, "step": 0, "worker_nodes": ["n1", "n2"]})
        seen.append(store.get(job_id).worker_nodes)
        reason = "worker 1 died: its node died"
        nodes = ["n1", "n2", "n3"]
        callback({"type": "worker_failure", "rank": 1, "reason": reason, "worker_nodes": nodes})
        return {"status": "succeeded", "steps": 1}

    run_to_success(tmp_path, store, train, job_id)
    assert seen == [["n1", "n2"]] and store.get(job_id).worker_nodes == ["n1", "n2", "n3"]
    notes = [e.message for e in store.events(job_id)]
    assert "worker 1 died: its node died; the step is recomputed" in notes


def test_the_dispatcher_handles_every_trainer_event():
    assert set(Dispatcher._handlers) == set(EVENT_TYPES)


def test_workers_that_join_after_a_head_start_are_recorded(tmp_path):
    """A head start (workers/headstart.py) starts with no worker nodes; when the workers
    take over, the job lists them and its timeline says at which step."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job_id = new_job(store).id
    d = make_dispatcher(tmp_path, store, fake_train())
    [job] = store.claim(d.owner, lambda _: True)
    run = Run(job_id, job.name, 2, job.cpus)
    d._on_event(run, StartedEvent(type="started", total_steps=9, step=0, worker_nodes=[]))
    assert store.get(job_id).worker_nodes == []
    joined = WorkersJoinedEvent(
        type="workers_joined", step=4, worker_nodes=["n1", "n2"], exchange="replicated"
    )
    d._on_event(run, joined)
    assert store.get(job_id).worker_nodes == ["n1", "n2"]
    messages = [e.message for e in store.events(job_id)]
    assert "the workers took over at step 4 (a head start)" in messages


def test_an_abandoned_job_says_which_checkpoint_it_resumes_from(tmp_path, store_url):
    """The newest checkpoint the Trainer reported (or the one it resumed from) is where
    the job's next owner starts; an abandoned run writes none of its own."""
    store = JobStore(store_url)
    job_id = new_job(store).id
    d = make_dispatcher(tmp_path, store, fake_train())
    [job] = store.claim(d.owner, lambda _: True)
    messages = []
    for checkpoints in ([], [5]):
        run = Run(job_id, job.name, 2, job.cpus)
        started = StartedEvent(
            type="started",
            total_steps=9,
            step=3,
            resumed_from_step=3,
            worker_nodes=["n1"],
            exchange="tasks",
        )
        d._on_event(run, started)
        for step in checkpoints:
            d._on_event(run, CheckpointEvent(type="checkpoint", step=step, path="p"))
        run.abandon.set()
        d._settle(run, {"status": "cancelled", "steps": 7, "error": "abandoned"})
        messages.append(store.events(job_id)[-1].message)
        store.claim(d.owner, lambda _: True)
    assert messages == [
        "d1 abandoned it at step 7; will resume from its checkpoint at step 3",
        "d1 abandoned it at step 7; will resume from its checkpoint at step 5",
    ]


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


def test_an_auto_job_holds_the_free_cpus_until_it_has_chosen(tmp_path, store_url):
    """Claimed on one worker's CPUs; until its Trainer has chosen, it holds every CPU that
    was free (the Trainer's cap); then only what the chosen count uses."""
    store = JobStore(store_url)
    auto = new_job(store, cpus=1.0, name="auto", workers="auto", cpus_per_worker=1.0).id
    started, choose, release, seen = threading.Event(), threading.Event(), threading.Event(), {}
    fake = fake_train(steps=3)

    def train(spec, out_dir, *, callback, max_cpus=None, **kwargs):
        if spec.name != "auto":
            return fake(spec, out_dir, callback=callback, **kwargs)
        seen["max_cpus"] = max_cpus
        started.set()
        assert choose.wait(20)
        reason = "chose in-process: stubbed"
        callback(
            StartedEvent(
                type="started",
                total_steps=1,
                step=0,
                resumed_from_step=None,
                worker_nodes=[],
                exchange=None,
                workers=0,
                workers_reason=reason,
            )
        )
        assert release.wait(20)
        return {"status": "succeeded", "steps": 1, "workers": 0, "workers_reason": reason}

    d = make_dispatcher(tmp_path, store, train, cpus=3.0, max_concurrent_jobs=2)
    d.start()
    try:
        assert started.wait(20)
        assert seen["max_cpus"] == 3.0 and d.capacity().free == 0
        assert d.running()[0]["workers"] is None and store.get(auto).workers is None
        other = new_job(store, cpus=1.0).id
        d.wake()
        assert d.pending_reason(store.get(other), 1) == "waiting for 1 CPUs, 0 free"
        choose.set()
        wait_for(lambda: store.get(other).status == "succeeded")  # CPUs released by the choice
        job = store.get(auto)
        assert (job.workers, job.workers_reason) == (0, "chose in-process: stubbed")
        assert d.runs[auto].cpus == 1.0 and d.running()[0]["workers"] == 0
    finally:
        choose.set()
        release.set()
        d.shutdown()
