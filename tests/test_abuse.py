"""Issue 16: hostile or careless input and overload. One section per part of the issue.

Sections of abuse-ops: the crash-loop breaker (item 5), verified checkpoints cached and
streamed (item 7), metric points by page. The auth items are in tests/test_auth.py, the
schemathesis run in tests/test_schemathesis.py.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest

from service.store import JobStore
from tests.fakes import locs, make_client, make_dispatcher, new_job, submit
from workers import checkpoint as ckpt
from workers.checkpoint import list_checkpoints, load_latest, save_checkpoint

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


# == verified checkpoints, cached (item 7) ======================================================


@pytest.fixture
def hashes(monkeypatch):
    """The files hashed while a test runs, from a cold verification cache."""
    hashed: list[str] = []
    real = ckpt._hash_file
    monkeypatch.setattr(
        ckpt, "_hash_file", lambda file: hashed.append(os.path.basename(file)) or real(file)
    )
    ckpt._SETTLED.clear()
    yield hashed
    ckpt._SETTLED.clear()


def saved_checkpoints(out, steps, settled=True):
    """Small checkpoints at `steps`; settled ones look written a minute ago (their mtime)."""
    model = {"w": np.arange(6.0).reshape(2, 3), "b": np.zeros(3)}
    for step in steps:
        path = save_checkpoint(out, step, model, {"state": {}}, {"step": step}, keep=None)
        if settled:
            old = time.time_ns() - 60 * 10**9
            for file in path.iterdir():
                os.utime(file, ns=(old, old))
    return out


def test_a_settled_checkpoint_is_hashed_once_then_known_by_its_stat(tmp_path, hashes):
    out = saved_checkpoints(tmp_path, [1, 2, 3])
    first = list_checkpoints(out)
    assert len(hashes) == 9  # three files each (the manifest is read, not hashed)
    assert list_checkpoints(out) == first and load_latest(out).step == 3
    assert len(hashes) == 9  # listing and loading again: a stat per file


def test_a_checkpoint_written_moments_ago_is_hashed_at_every_read(tmp_path, hashes):
    """Its mtime may not move when it changes within the same tick of the filesystem's
    clock, so it is not remembered until it has settled."""
    out = saved_checkpoints(tmp_path, [1], settled=False)
    list_checkpoints(out)
    list_checkpoints(out)
    assert len(hashes) == 6


def test_a_changed_file_is_hashed_again_and_caught(tmp_path, hashes):
    out = saved_checkpoints(tmp_path, [1, 2])
    assert [c.step for c in list_checkpoints(out)] == [1, 2]
    model = out / "checkpoints" / "step-2" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0xFF
    model.write_bytes(bytes(data))  # same size, a new mtime
    assert [c.step for c in list_checkpoints(out)] == [1]
    model.write_bytes(bytes(data[:-1]))
    assert [c.step for c in list_checkpoints(out)] == [1]
    (out / "checkpoints" / "step-1" / "manifest.json").write_text('{"files": ')  # read again
    assert list_checkpoints(out) == []


def test_downloads_stream_from_the_file_and_do_not_hash_it_again(tmp_path, hashes):
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    saved_checkpoints(tmp_path / "jobs" / job_id, [4, 8])
    url = f"/api/v1/jobs/{job_id}/checkpoints"
    listed = client.get(url).json()
    file = tmp_path / "jobs" / job_id / "checkpoints" / "step-8" / "model.safetensors"
    hashes.clear()
    r = client.get(f"{url}/step-8/model.safetensors")
    assert r.status_code == 200 and r.content == file.read_bytes() and hashes == []
    assert r.headers["content-length"] == str(file.stat().st_size) and r.headers["etag"]
    assert r.headers["content-disposition"] == (
        f'attachment; filename="{job_id}-step-8-model.safetensors"'
    )
    assert hashlib.sha256(r.content).hexdigest() == listed[1]["sha256"]
    file.write_bytes(file.read_bytes()[:-1])  # corrupt: no longer a verified checkpoint
    assert client.get(f"{url}/step-8/model.safetensors").status_code == 404
    assert client.get(f"{url}/step-9/model.safetensors").status_code == 404


# == what the OpenAPI document promises =========================================================


def test_an_unparseable_body_is_a_documented_400(tmp_path):
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/jobs", "/api/v1/datasets", f"/api/v1/jobs/{job_id}/predict"):
        template = path.replace(job_id, "{job_id}")
        assert "400" in paths[template]["post"]["responses"], template
        r = client.post(path, content=b"\xff\xfe\xfd", headers={"content-type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["detail"], path
    for template in ("/api/v1/jobs/{job_id}/explain",):
        assert "400" in paths[template]["post"]["responses"]


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("OPTIONS", "/api/v1/jobs", "GET, POST"),
        ("DELETE", "/api/v1/jobs/abc", "GET"),
        ("PUT", "/api/v1/datasets", "GET, POST"),
        ("GET", "/api/v1/jobs/abc/cancel", "POST"),
    ],
)
def test_a_405_allows_every_method_of_the_path(tmp_path, method, path, allow):
    client, _, _ = make_client(tmp_path)
    r = client.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allow


@pytest.mark.parametrize("steps, status", [(8.0, 409), (8, 409), (True, 422), ("8", 422)])
def test_an_integer_is_what_json_schema_calls_one(tmp_path, steps, status):
    """8.0 is an integer to JSON Schema (and so to generated clients); true and "8" are not.
    (409: the body passed, and the job has no checkpoint yet.)"""
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    body = {"inputs": [[0.1, 0.2]], "method": "integrated_gradients", "steps": steps}
    assert client.post(f"/api/v1/jobs/{job_id}/explain", json=body).status_code == status
