"""The HTTP API under TestClient, with an in-memory store and a fake dispatcher."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from httpx_sse import connect_sse

from service.client import sse_events
from tests.fakes import locs, make_client, spec, submit
from workers.checkpoint import checkpoint_dir, save_checkpoint
from workers.model import build_model
from workers.spec import TrainingSpec


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    return make_client(tmp_path)


def run(store, job_id, steps=3, owner="fake"):
    """Play the dispatcher's part: claim the job and record `steps` Trainer steps."""
    store.claim(owner, lambda job: job.id == job_id or False)
    for step in range(1, steps + 1):
        point = {"step": step, "epoch": 0, "train_loss": 1.0 / step, "grad_norm": 0.5}
        store.progress(job_id, owner, {"step": step, "total_steps": 30}, point)


# -- submit and read ------------------------------------------------------------------


def test_submit_returns_201_and_the_job(env):
    client, _, dispatcher = env
    job = submit(client)
    assert job["status"] == "queued" and job["name"] == "moons" and job["attempts"] == 0
    assert job["queue_position"] == 1 and job["pending_reason"]
    assert job["spec"]["workers"] == 2 and job["progress"]["step"] == 0
    assert dispatcher.woken == 1
    got = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert got["id"] == job["id"]
    assert [(e["status"], e["message"]) for e in got["events"]] == [("queued", "submitted")]


@pytest.mark.parametrize(
    "overrides, loc",
    [
        ({"bogus": 1}, ("body", "bogus")),
        ({"optimizer": {"type": "rmsprop", "lr": 0.1}}, ("body", "optimizer")),
        ({"optimizer": {"type": "sgd", "lr": -0.1}}, ("body", "optimizer", "sgd", "lr")),
        (
            {"model": {"type": "mlp", "sizes": [3, 8, 2]}},
            ("body", "model", "mlp", "sizes", 0),
        ),
        (
            {"data": {"type": "dataset", "id": "0123456789abcdef"}},
            ("body", "data", "dataset", "id"),
        ),
        ({"workers": 9}, ("body", "workers")),
        ({"data": {"type": "file", "path": "/etc/x.csv"}}, ("body", "data", "file", "path")),
    ],
)
def test_submit_rejects_invalid_specs_with_422(env, overrides, loc):
    client, _, _ = env
    assert loc in locs(client.post("/api/v1/jobs", json=spec(**overrides)))


def test_file_datasets_are_refused_before_anything_is_read(env, monkeypatch, tmp_path):
    client, _, _ = env
    csv = tmp_path / "d.csv"
    csv.write_text("a,b,y\n0.1,0.2,0\n0.3,0.4,1\n")

    def no_reading(*args, **kwargs):
        raise AssertionError("the server read a file dataset")

    monkeypatch.setattr("workers.datasets.load_dataset", no_reading)
    monkeypatch.setattr("workers.datasets._describe_file", no_reading)
    for path in (str(csv), "/does/not/exist.npz", "/etc/passwd"):
        r = client.post("/api/v1/jobs", json=spec(data={"type": "file", "path": path}))
        assert r.status_code == 422
        assert r.json() == {
            "detail": [
                {
                    "type": "invalid_spec",
                    "loc": ["body", "data", "file", "path"],
                    "msg": "data.path: file datasets are disabled on this server; "
                    "upload the data with POST /api/v1/datasets",
                    "input": path,
                }
            ]
        }


def test_file_datasets_when_the_server_allows_them(tmp_path):
    client, _, _ = make_client(tmp_path, allow_file_data=True)
    csv = tmp_path / "d.csv"
    csv.write_text("a,b,y\n" + "\n".join(f"{i % 5}.5,{i % 3}.25,{i % 2}" for i in range(40)))
    job = submit(client, data={"type": "file", "path": str(csv)})
    assert job["spec"]["data"] == {"type": "file", "path": str(csv)}
    missing = spec(data={"type": "file", "path": str(tmp_path / "missing.csv")})
    r = client.post("/api/v1/jobs", json=missing)
    assert locs(r) == [("body", "data", "file", "path")]
    assert "does not exist" in r.json()["detail"][0]["msg"]
    assert TrainingSpec.model_validate(missing | {"data": {"type": "file", "path": str(csv)}})


def test_the_body_must_be_a_json_object(env):
    client, _, _ = env
    headers = {"content-type": "application/json"}
    r = client.post("/api/v1/jobs", content=b"{not json", headers=headers)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    assert locs(client.post("/api/v1/jobs", content=b"[1, 2]", headers=headers)) == [("body",)]
    assert locs(client.post("/api/v1/jobs")) == [("body",)]


def test_nan_in_a_spec_is_a_422_not_a_500(env):
    client, _, _ = env
    body = json.dumps(spec()).replace('"lr": 0.1', '"lr": NaN')
    r = client.post("/api/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert ("body", "optimizer", "sgd", "lr") in locs(r)


def test_autoscaling_queues_a_job_larger_than_the_cluster(tmp_path):
    client, _, _ = make_client(tmp_path, autoscaling=True)
    job = submit(client, workers=10, batch_size=40)
    assert job["status"] == "queued"
    assert "scale up" in job["pending_reason"] and "needs 5 CPUs" in job["pending_reason"]


def test_json_bodies_over_1mb_are_413_even_chunked(env):
    client, _, _ = env
    big = json.dumps(spec(name="x" * 1_100_000)).encode()
    assert client.post("/api/v1/jobs", content=big).status_code == 413

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    r = client.post("/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_uploads_have_their_own_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    client, _, _ = make_client(tmp_path, max_json_bytes=1000, max_upload_bytes=50_000)
    rows = "\n".join(f"{i % 7}.5,{i % 3}.25,{i % 2}" for i in range(2000))
    csv = ("a,b,y\n" + rows).encode()
    assert 1000 < len(csv) < 50_000
    r = client.post("/api/v1/datasets", files={"file": ("d.csv", csv, "text/csv")})
    assert r.status_code == 201, r.text
    too_big = ("a,b,y\n" + rows * 4).encode()
    r = client.post("/api/v1/datasets", files={"file": ("d.csv", too_big, "text/csv")})
    assert r.status_code == 413


def test_list_is_newest_first_with_keyset_pagination(env):
    client, store, _ = env
    ids = [submit(client, name=f"j{i}")["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/api/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    client.post(f"/api/v1/jobs/{ids[0]}/cancel")
    page = client.get("/api/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in page["items"]] == [ids[0]]
    assert locs(client.get("/api/v1/jobs", params={"cursor": "!!"})) == [("query", "cursor")]
    assert locs(client.get("/api/v1/jobs", params={"status": "nope"})) == [("query", "status")]


def test_queue_is_ordered_by_priority_then_fifo(env):
    client, _, _ = env
    low = submit(client, priority=-1)["id"]
    a = submit(client)["id"]
    high = submit(client, priority=5)["id"]
    b = submit(client)["id"]
    items = client.get("/api/v1/jobs").json()["items"]
    position = {j["id"]: j["queue_position"] for j in items}
    assert [position[i] for i in (high, a, b, low)] == [1, 2, 3, 4]
    assert client.get(f"/api/v1/jobs/{b}").json()["queue_position"] == 3


# -- transitions ----------------------------------------------------------------------


def test_cancel_and_resume(env):
    client, store, dispatcher = env
    queued = submit(client)["id"]
    r = client.post(f"/api/v1/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.post(f"/api/v1/jobs/{queued}/cancel").status_code == 409
    r = client.post(f"/api/v1/jobs/{queued}/resume")
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert client.post(f"/api/v1/jobs/{queued}/resume").status_code == 409

    running = submit(client)["id"]
    run(store, running)
    r = client.post(f"/api/v1/jobs/{running}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    assert dispatcher.cancelled == [running]
    assert client.post(f"/api/v1/jobs/{running}/resume").status_code == 409
    assert store.finish(running, "fake", "cancelled", "stopped at step 3")
    job = client.get(f"/api/v1/jobs/{running}").json()
    assert job["status"] == "cancelled" and job["attempts"] == 1
    statuses = [e["status"] for e in job["events"]]
    assert statuses == ["queued", "running", "cancelling", "cancelled"]


def test_metric_points_are_upserted_by_step(env):
    client, store, _ = env
    job_id = submit(client)["id"]
    run(store, job_id, steps=3)
    # A resume recomputes step 3: its point is replaced, not duplicated.
    point = {"step": 3, "epoch": 0, "train_loss": 0.25, "val_loss": 0.5, "val_accuracy": 0.9}
    store.progress(job_id, "fake", {"step": 3}, point)
    points = client.get(f"/api/v1/jobs/{job_id}/metrics").json()["points"]
    assert [p["step"] for p in points] == [1, 2, 3]
    assert points[2]["train_loss"] == 0.25 and points[2]["grad_norm"] is None
    assert points[0]["val_loss"] is None and points[2]["val_accuracy"] == 0.9
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "running" and job["progress"]["fraction"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/api/v1/jobs/nope"),
        ("get", "/api/v1/jobs/nope/metrics"),
        ("get", "/api/v1/jobs/nope/checkpoints"),
        ("get", "/api/v1/jobs/nope/checkpoints/step-1/model.safetensors"),
        ("get", "/api/v1/jobs/nope/events"),
        ("post", "/api/v1/jobs/nope/cancel"),
        ("post", "/api/v1/jobs/nope/resume"),
    ],
)
def test_unknown_jobs_are_404(env, method, path):
    client, _, _ = env
    assert getattr(client, method)(path).status_code == 404


def test_api_token(tmp_path):
    client, _, _ = make_client(tmp_path, api_token="s3cret")
    assert client.get("/api/v1/jobs").status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert client.get("/api/v1/jobs", headers=bad).status_code == 401
    assert client.post("/api/v1/jobs", json=spec(), headers=bad).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert client.get("/api/v1/jobs", headers=good).status_code == 200
    job = client.post("/api/v1/jobs", json=spec(), headers=good).json()
    client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=good)
    events = f"/api/v1/jobs/{job['id']}/events"
    assert client.get(events).status_code == 401
    assert client.get(events, params={"token": "nope"}).status_code == 401
    assert client.get(events, params={"token": "s3cret"}).status_code == 200
    assert client.get("/api/v1/jobs", params={"token": "s3cret"}).status_code == 401
    assert client.get("/healthz").status_code == 200


# -- checkpoints and predictions --------------------------------------------------------


def test_checkpoints_download_and_predict(env, tmp_path):
    client, store, _ = env
    job_id = submit(client)["id"]
    url = f"/api/v1/jobs/{job_id}"
    assert client.post(f"{url}/predict", json={"inputs": [[0.1, 0.2]]}).status_code == 409
    model = build_model(TrainingSpec.model_validate(spec()))
    state = model.state_dict()
    for step in (5, 10):
        save_checkpoint(tmp_path / "jobs" / job_id, step, state, {"state": {}}, {"step": step})
    listed = client.get(f"{url}/checkpoints").json()
    assert [c["name"] for c in listed] == ["step-5", "step-10"]
    assert set(listed[0]) == {"name", "step", "created_at", "size_bytes", "sha256"}
    r = client.get(f"{url}/checkpoints/step-10/model.safetensors")
    file = checkpoint_dir(tmp_path / "jobs" / job_id, "step-10") / "model.safetensors"
    assert r.status_code == 200 and r.content == file.read_bytes()
    assert hashlib.sha256(r.content).hexdigest() == listed[1]["sha256"]
    for bad in ("step-11", "..", "step-1%2F..", "latest"):
        assert client.get(f"{url}/checkpoints/{bad}/model.safetensors").status_code == 404

    r = client.post(f"{url}/predict", json={"inputs": [[0.1, 0.2], [-1.0, 0.5]]})
    assert r.status_code == 200, r.text
    from core import Tensor, no_grad

    with no_grad():
        expected = model(Tensor(np.array([[0.1, 0.2], [-1.0, 0.5]]))).data
    np.testing.assert_array_equal(np.array(r.json()["outputs"]), expected)
    assert r.json()["checkpoint"] == "step-10"

    assert locs(client.post(f"{url}/predict", json={"inputs": [[0.1, 0.2], [1.0]]})) == [
        ("body", "inputs", 1)
    ]
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = '{"inputs": [[0.1, ' + literal + "]]}"
        r = client.post(
            f"{url}/predict", content=body, headers={"content-type": "application/json"}
        )
        assert locs(r) == [("body", "inputs", 0, 1)]
    assert client.post(f"{url}/predict", json={"inputs": []}).status_code == 422


# -- datasets, cluster, health ------------------------------------------------------------


def test_dataset_upload_and_use(env):
    client, _, _ = env
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, X=rng.normal(size=(60, 3)), y=rng.integers(0, 3, 60))
    r = client.post("/api/v1/datasets", files={"file": ("d.npz", buf.getvalue())})
    assert r.status_code == 201, r.text
    info = r.json()
    assert (info["n_samples"], info["n_features"], info["n_classes"]) == (60, 3, 3)
    assert [d["id"] for d in client.get("/api/v1/datasets").json()] == [info["id"]]
    data = {"type": "dataset", "id": info["id"]}
    model = {"type": "mlp", "sizes": [3, 4, 3]}
    assert submit(client, data=data, model=model)["status"] == "queued"
    bad = {"type": "mlp", "sizes": [2, 4, 3]}
    r = client.post("/api/v1/jobs", json=spec(data=data, model=bad))
    assert ("body", "model", "mlp", "sizes", 0) in locs(r)
    r = client.post("/api/v1/datasets", files={"file": ("d.json", b"hello")})
    assert locs(r) == [("body", "file")]


def test_cluster_health_and_prometheus(env):
    client, store, dispatcher = env
    submit(client)
    cluster = client.get("/api/v1/cluster").json()
    assert cluster["cpus_total"] == 4.0 and cluster["nodes"][0]["alive"] is True
    assert client.get("/healthz").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert 'shardgrad_jobs{status="queued"} 1.0' in text and "shardgrad_queue_depth 1.0" in text
    assert "shardgrad_steps_per_second" in text
    dispatcher.is_healthy = False
    assert client.get("/healthz").status_code == 503


def test_job_event_stream(env):
    client, store, _ = env
    job_id = submit(client)["id"]
    run(store, job_id, steps=2)
    store.finish(job_id, "fake", "succeeded", None, step=2)
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    kinds = [kind for kind, _ in events]
    assert kinds == ["status", "progress", "metrics", "end"]
    assert events[0][1]["status"] == "succeeded"
    assert [p["step"] for p in events[2][1]["points"]] == [1, 2]
    assert events[3][1] == {"job_id": job_id, "status": "succeeded"}


def job_stream(client, job_id: str, **headers) -> list[tuple[str, str, dict]]:
    """(event, id, data) of every event of a job's stream, up to its end."""
    with connect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events", headers=headers) as source:
        return [(e.event, e.id, e.json()) for e in source.iter_sse()]


def test_job_event_stream_ids_are_the_last_step_sent_and_resume_after_it(env):
    client, store, _ = env
    job_id = submit(client)["id"]
    run(store, job_id, steps=5)
    store.finish(job_id, "fake", "succeeded", None, step=5)
    full = job_stream(client, job_id)
    assert [(kind, id) for kind, id, _ in full] == [
        ("status", "-1"),
        ("progress", "-1"),
        ("metrics", "5"),
        ("end", "5"),
    ]
    resumed = job_stream(client, job_id, **{"Last-Event-ID": "3"})
    assert [(kind, id) for kind, id, _ in resumed] == [
        ("status", "3"),
        ("progress", "3"),
        ("metrics", "5"),
        ("end", "5"),
    ]
    assert [p["step"] for p in resumed[2][2]["points"]] == [4, 5]
    assert [data for _, _, data in resumed[:2]] == [data for _, _, data in full[:2]]
    caught_up = job_stream(client, job_id, **{"Last-Event-ID": "5"})
    assert [(kind, id) for kind, id, _ in caught_up] == [
        ("status", "5"),
        ("progress", "5"),
        ("end", "5"),
    ]
    bad = client.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 422


@pytest.mark.timeout(60)
def test_all_jobs_event_stream(tmp_path):
    client, store, _ = make_client(tmp_path, store_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    with client.stream("GET", "/api/v1/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == ": connected"
        events = sse_events(lines)

        def next_for(job_id):
            return next(
                (kind, data)
                for kind, data in events
                if data.get("id", data.get("job_id")) == job_id
            )

        job_id = submit(client)["id"]
        kind, job = next_for(job_id)  # a status event carries the whole job
        assert (kind, job["status"], job["name"]) == ("status", "queued", "moons")
        assert job["spec"]["workers"] == 2 and job["progress"]["step"] == 0
        assert job["queue_position"] == 1 and job["pending_reason"]  # as GET /jobs/{id} says

        store.claim("fake", lambda j: j.id == job_id or False)
        kind, job = next_for(job_id)
        assert (kind, job["status"], job["attempts"]) == ("status", "running", 1)

        # Same status, new progress: a compact progress event.
        point = {"step": 1, "epoch": 0, "train_loss": 0.5}
        store.progress(
            job_id, "fake", {"step": 1, "total_steps": 10, "metrics": {"train_loss": 0.5}}, point
        )
        kind, data = next_for(job_id)
        assert kind == "progress" and set(data) == {"job_id", "status", "progress", "metrics"}
        assert data["status"] == "running" and data["progress"]["step"] == 1
        assert data["progress"]["fraction"] == pytest.approx(0.1)
        assert data["metrics"] == {"train_loss": 0.5}

        other = submit(client, name="other")["id"]  # every job's changes, not just one's
        assert next_for(other)[1]["status"] == "queued"

        store.finish(job_id, "fake", "succeeded", None, step=10)
        kind, job = next_for(job_id)
        assert (kind, job["status"], job["progress"]["step"]) == ("status", "succeeded", 10)


def test_all_jobs_event_stream_needs_the_token(tmp_path):
    client, _, _ = make_client(tmp_path, api_token="s3cret")
    assert client.get("/api/v1/events").status_code == 401
    assert client.get("/api/v1/events", params={"token": "nope"}).status_code == 401


def test_an_auto_or_in_process_job_reserves_one_workers_cpus(env):
    """It fits if one worker fits; `workers` shows its count once known (null for auto)."""
    client, store, _ = env  # a 4-CPU cluster
    for workers, shown in (("auto", None), (0, 0), (3, 3)):
        job = submit(client, workers=workers, cpus_per_worker=1.0)
        assert store.get(job["id"]).cpus == (3.0 if workers == 3 else 1.0)
        assert (job["workers"], job["workers_reason"]) == (shown, None)
    r = client.post("/api/v1/jobs", json=spec(workers="auto", cpus_per_worker=8))
    assert locs(r) == [("body", "cpus_per_worker")]
    msg = 'workers "auto" needs one worker\'s cpus_per_worker = 8 CPUs, but the whole cluster has 4'
    assert r.json()["detail"][0]["msg"] == msg
    r = client.post("/api/v1/jobs", json=spec(workers=5, cpus_per_worker=1, batch_size=40))
    assert locs(r) == [("body", "workers")]
