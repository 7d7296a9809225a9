"""Issue 16: hostile or careless input and overload. One section per part of the issue.

Sections of abuse-ops: the crash-loop breaker (item 5), verified checkpoints cached and
streamed (item 7), metric points by page. The auth items are in tests/test_auth.py, the
schemathesis run in tests/test_schemathesis.py.
"""

from __future__ import annotations

import pytest

from service.store import JobStore
from tests.fakes import locs, make_client, make_dispatcher, new_job, submit

# == crash-loop breaker (item 5) ================================================================


def die(store: JobStore, job_id: str, owner: str = "svc", max_attempts: int = 5) -> str:
    """One attempt that ends with its service's death: claimed, then reclaimed at restart."""
    assert [j.id for j in store.claim(owner, lambda j: j.id == job_id or False)] == [job_id]
    store.reclaim_orphans(20.0, owner=owner, everyone=True, max_attempts=max_attempts)
    return store.get(job_id).status


def test_a_job_that_keeps_killing_its_service_fails_after_max_attempts():
    store = JobStore("sqlite://")
    job_id = new_job(store).id
    assert [die(store, job_id) for _ in range(4)] == ["queued"] * 4
    assert die(store, job_id) == "failed"
    job = store.get(job_id)
    assert job.attempts == 5 and job.finished_at is not None and job.owner is None
    assert job.error == (
        "svc stopped during each of the job's last 5 attempts (SHARDGRAD_MAX_ATTEMPTS=5): "
        "the job may be what kills the service; resume it to try again"
    )
    assert store.events(job_id)[-1].message == job.error
    assert store.counts() == {"failed": 1}  # nothing left to requeue it


def test_resume_lets_a_person_try_again_with_as_many_attempts():
    store = JobStore("sqlite://")
    job_id = new_job(store).id
    for _ in range(3):
        die(store, job_id, max_attempts=3)
    assert store.get(job_id).status == "failed"
    store.resume(job_id)
    assert [die(store, job_id, max_attempts=3) for _ in range(3)] == ["queued", "queued", "failed"]


def test_only_deaths_in_a_row_count():
    """An attempt that ended another way (a graceful stop's requeue) breaks the chain."""
    store = JobStore("sqlite://")
    job_id = new_job(store).id
    die(store, job_id, max_attempts=3)
    die(store, job_id, max_attempts=3)
    store.claim("svc", lambda j: True)
    store.note(job_id, "resumed from step 5")  # notes of a running attempt do not break it
    assert store.requeue(job_id, "svc", "service stopping: checkpointed at step 7; queued")
    assert [die(store, job_id, max_attempts=3) for _ in range(3)] == ["queued", "queued", "failed"]


def test_without_a_cap_reclaim_requeues_as_before():
    store = JobStore("sqlite://")
    job_id = new_job(store).id
    for _ in range(8):
        store.claim("svc", lambda j: True)
        store.reclaim_orphans(20.0, owner="svc", everyone=True)
    assert store.get(job_id).status == "queued" and store.get(job_id).attempts == 8


@pytest.mark.timeout(60)
def test_the_dispatcher_applies_shardgrad_max_attempts_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_MAX_ATTEMPTS", "2")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job_id = new_job(store).id
    die(store, job_id, owner="d1", max_attempts=2)
    store.claim("d1", lambda j: True)  # the second attempt; then the service dies again
    dispatcher = make_dispatcher(tmp_path, store, train=None, paused=True)
    assert dispatcher.settings.max_attempts == 2
    dispatcher.start()
    try:
        job = store.get(job_id)
        assert job.status == "failed" and "SHARDGRAD_MAX_ATTEMPTS=2" in job.error
    finally:
        dispatcher.shutdown(timeout=10)


# == metric points by page ======================================================================


def record_points(store: JobStore, job_id: str, steps: int) -> None:
    store.claim("fake", lambda j: j.id == job_id or False)
    for step in range(1, steps + 1):
        point = {"step": step, "epoch": 0, "train_loss": 1.0 / step}
        store.progress(job_id, "fake", {"step": step, "total_steps": steps}, point)


def test_metric_points_come_a_page_at_a_time(tmp_path):
    client, store, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    record_points(store, job_id, 12)
    url = f"/api/v1/jobs/{job_id}/metrics"
    whole = client.get(url).json()  # fewer points than a page: all of them, as before
    assert [p["step"] for p in whole["points"]] == list(range(1, 13))
    assert whole["job_id"] == job_id and whole["next_cursor"] is None
    steps, cursor, pages = [], None, 0
    while True:
        params = {"limit": 5} | ({} if cursor is None else {"cursor": cursor})
        page = client.get(url, params=params).json()
        steps += [p["step"] for p in page["points"]]
        pages, cursor = pages + 1, page["next_cursor"]
        if cursor is None:
            break
    assert steps == list(range(1, 13)) and pages == 3
    assert client.get(url, params={"cursor": 12}).json() == {
        "job_id": job_id,
        "points": [],
        "next_cursor": None,
    }


@pytest.mark.parametrize(
    "params, field",
    [({"limit": 0}, "limit"), ({"limit": 10**6}, "limit"), ({"cursor": "x"}, "cursor")]
    + [({"cursor": 2**63}, "cursor"), ({"cursor": -2}, "cursor")],
)
def test_bad_metric_page_parameters_are_422_naming_them(tmp_path, params, field):
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    r = client.get(f"/api/v1/jobs/{job_id}/metrics", params=params)
    assert locs(r) == [("query", field)]
