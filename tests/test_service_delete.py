"""Deleting finished jobs with their files and rows, uploads no job needs, and gc of old
jobs (service/cleanup.py): never a job that may still run, whatever comes first."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service import cli
from service.client import Client
from service.store import Conflict, JobNotFound, utcnow
from service.tables import EventRow, JobRow, MetricRow, TagRow
from tests.fakes import make_client, spec, submit

JOBS, DATASETS = "/api/v1/jobs", "/api/v1/datasets"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    client, store, dispatcher = make_client(tmp_path, store_url=f"sqlite:///{tmp_path}/j.db")
    return client, store, tmp_path


def finish(store, job_id: str, status: str = "succeeded", owner: str = "t") -> None:
    """Run the job one step (a metric point) and end it in `status`."""
    store.claim(owner, lambda q: q.id == job_id or False)
    store.progress(job_id, owner, {"step": 1}, {"step": 1, "train_loss": 0.5})
    store.finish(job_id, owner, status)


def rows_of(store, job_id: str) -> int:
    """The job's rows in every table."""
    with store.engine.connect() as conn:
        count = conn.scalar(select(func.count()).where(JobRow.id == job_id))
        for t in (MetricRow, EventRow, TagRow):
            count += conn.scalar(select(func.count()).where(t.job_id == job_id))
        return count


def test_only_a_finished_job_is_deleted_and_all_of_it(env):
    client, store, tmp_path = env
    job = submit(client, tags={"a": "1"})
    url = f"{JOBS}/{job['id']}"
    assert client.delete(url).status_code == 409  # queued
    store.claim("t", lambda q: True)
    r = client.delete(url)
    assert r.status_code == 409 and "running" in r.json()["detail"]
    store.progress(job["id"], "t", {"step": 1}, {"step": 1, "train_loss": 0.5})
    store.finish(job["id"], "t", "failed", error="boom")
    checkpoint = tmp_path / "jobs" / job["id"] / "checkpoints" / "step-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"x")
    assert rows_of(store, job["id"]) > 3

    r = client.delete(url)
    assert r.status_code == 204 and not r.content and "content-type" not in r.headers
    assert not (tmp_path / "jobs" / job["id"]).exists()
    assert rows_of(store, job["id"]) == 0
    assert client.get(url).status_code == 404
    assert client.delete(url).status_code == 404


def upload(client, rows: int = 40) -> str:
    csv = "x1,x2,y\n" + "".join(f"{i / rows},{-i / rows},{i % 2}\n" for i in range(rows))
    r = client.post(DATASETS, files={"file": ("d.csv", csv, "text/csv")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_an_upload_goes_with_its_last_job_and_not_while_one_may_run(env):
    client, store, _ = env
    dataset = upload(client)
    on_it = spec(data={"type": "dataset", "id": dataset})
    first, second = (client.post(JOBS, json=on_it).json() for _ in range(2))
    r = client.delete(f"{DATASETS}/{dataset}")
    assert r.status_code == 409 and first["id"] in r.json()["detail"]

    client.post(f"{JOBS}/{first['id']}/cancel")
    finish(store, second["id"])
    assert client.delete(f"{JOBS}/{first['id']}").status_code == 204
    assert [d["id"] for d in client.get(DATASETS).json()] == [dataset]  # second still names it
    assert client.delete(f"{JOBS}/{second['id']}").status_code == 204
    assert client.get(DATASETS).json() == []

    unused = upload(client, rows=30)
    assert client.delete(f"{DATASETS}/{unused}").status_code == 204
    assert client.delete(f"{DATASETS}/{unused}").status_code == 404
    assert client.delete(f"{DATASETS}/not-an-id").status_code == 404


def test_a_finished_job_that_named_a_deleted_upload_keeps_its_rows(env):
    client, store, _ = env
    dataset = upload(client)
    job = client.post(JOBS, json=spec(data={"type": "dataset", "id": dataset})).json()
    finish(store, job["id"], "failed")
    assert client.delete(f"{DATASETS}/{dataset}").status_code == 204  # allowed: it is done
    assert client.get(f"{JOBS}/{job['id']}").json()["status"] == "failed"


def race(store, job_id: str) -> dict[str, str]:
    """store.delete and store.resume of one job, let go at once from two threads."""
    barrier, outcome = threading.Barrier(2), {}

    def attempt(name, action):
        barrier.wait()
        try:
            action(job_id)
            outcome[name] = "won"
        except (Conflict, JobNotFound):
            outcome[name] = "lost"

    threads = [
        threading.Thread(target=attempt, args=("delete", store.delete)),
        threading.Thread(target=attempt, args=("resume", store.resume)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def test_delete_and_resume_racing_one_wins_and_leaves_no_half(env):
    client, store, _ = env
    for _ in range(8):
        job = submit(client)
        finish(store, job["id"], "failed")
        outcome = race(store, job["id"])
        assert sorted(outcome.values()) == ["lost", "won"]
        if outcome["delete"] == "won":
            assert rows_of(store, job["id"]) == 0
        else:
            assert store.get(job["id"]).status == "queued" and store.events(job["id"])


def age(store, job_id: str, days: float) -> None:
    with store.engine.begin() as conn:
        ended = utcnow() - timedelta(days=days)
        conn.execute(update(JobRow).where(JobRow.id == job_id).values(finished_at=ended))


def test_gc_deletes_old_finished_jobs_of_the_statuses_asked(env, monkeypatch, capsys):
    client, store, _ = env
    ids = {}
    for status, days in (("succeeded", 40), ("failed", 40), ("cancelled", 40), ("failed", 1)):
        job = submit(client, name=f"{status}-{days}")
        finish(store, job["id"], status)
        age(store, job["id"], days)
        ids[job["name"]] = job["id"]
    running = submit(client)["id"]
    store.claim("t", lambda q: q.id == running or False)
    age(store, running, 40)  # a running job is never garbage, whatever its columns say

    http = TestClient(client.app, base_url="http://testserver/api/v1")
    monkeypatch.setattr(cli, "Client", lambda url=None: _client(http))
    old_failures = "--older-than", "30d", "--status", "failed,cancelled"
    assert cli.main(["gc", *old_failures, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would delete 2 jobs") and ids["failed-40"] in out
    assert client.get(f"{JOBS}/{ids['failed-40']}").status_code == 200

    assert cli.main(["gc", *old_failures]) == 0
    assert capsys.readouterr().out.startswith("deleted 2 jobs")
    left = {j["id"] for j in client.get(JOBS).json()["items"]}
    assert left == {ids["succeeded-40"], ids["failed-1"], running}

    r = client.post(f"{JOBS}/gc", json={"older_than_s": 86400 * 30})  # every finished status
    assert r.json() == {"deleted": [ids["succeeded-40"]], "dry_run": False, "more": False}
    for bad in ({"status": ["running"]}, {"dry_run": "yes"}, {"older_than_s": "1"}, {}):
        body = {"older_than_s": -1} if not bad else {"older_than_s": 1} | bad
        assert client.post(f"{JOBS}/gc", json=body).status_code == 422, body


def _client(http) -> Client:
    c = Client("http://testserver")
    c.http = http
    return c


@pytest.mark.parametrize(
    "text, seconds",
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45", 45), ("2w", 1209600)],
)
def test_gc_durations(text, seconds):
    assert cli.duration(text) == seconds
