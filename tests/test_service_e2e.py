"""End to end: real `shardgrad serve` processes (embedded Ray, 2 CPUs), real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest
from safetensors.numpy import load

from tests.fakes import spec
from tests.helpers import REPO, Server, wait_job

pytestmark = pytest.mark.slow


TOKEN = "e2e-token"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A normal server, and a paused one with an API token; started together."""
    root = tmp_path_factory.mktemp("e2e")
    (root / "a").mkdir(), (root / "b").mkdir()
    a = Server(root / "a" / "var").start()
    b = Server(root / "b" / "var", SHARDGRAD_API_TOKEN=TOKEN, SHARDGRAD_PAUSED="true").start()
    try:
        a.wait_ready(), b.wait_ready()
        yield a, b
    finally:
        a.stop(), b.stop()


def test_train_then_metrics_checkpoint_and_predict(servers):
    server, _ = servers
    with server.client() as c:
        r = c.post("/jobs", json=spec(epochs=4))
        assert r.status_code == 201, r.text
        job = wait_job(c, r.json()["id"], lambda j: j["status"] in ("succeeded", "failed"))
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 1 and job["progress"]["fraction"] == 1.0
        assert job["metrics"]["val_accuracy"] > 0.5 and job["worker_nodes"]
        points = c.get(f"/jobs/{job['id']}/metrics").json()["points"]
        assert [p["step"] for p in points] == list(range(1, 33))  # 160 rows / 20 x 4 epochs
        assert points[-1]["val_loss"] is not None and points[0]["val_loss"] is None
        ckpts = c.get(f"/jobs/{job['id']}/checkpoints").json()
        assert ckpts[-1]["name"] == "step-32"
        r = c.get(f"/jobs/{job['id']}/checkpoints/step-32/model.safetensors")
        assert r.status_code == 200
        weights = load(r.content)
        assert weights and all(np.isfinite(w).all() for w in weights.values())
        r = c.post(f"/jobs/{job['id']}/predict", json={"inputs": [[0.3, -0.2], [1.0, 0.5]]})
        assert r.status_code == 200, r.text
        assert np.array(r.json()["outputs"]).shape == (2, 2)
        bad = c.post(f"/jobs/{job['id']}/predict", json={"inputs": [[0.3]]})
        assert bad.status_code == 422
        assert c.get("/cluster").json()["cpus_total"] == 2.0


def test_cancel_a_running_job(servers):
    server, _ = servers
    with server.client() as c:
        job_id = c.post("/jobs", json=spec(epochs=200, batch_size=10)).json()["id"]
        wait_job(c, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 2)
        r = c.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 202 and r.json()["status"] == "cancelling"
        job = wait_job(c, job_id, lambda j: j["status"] == "cancelled")
        step = job["progress"]["step"]
        assert c.get(f"/jobs/{job_id}/checkpoints").json()[-1]["step"] == step  # final one
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 409
        assert c.post(f"/jobs/{job_id}/resume").json()["status"] == "queued"
        wait_job(c, job_id, lambda j: j["status"] == "running" and j["attempts"] == 2)
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 202
        wait_job(c, job_id, lambda j: j["status"] == "cancelled")


def test_errors_422_413_404(servers):
    server, _ = servers
    with server.client() as c:
        cases = {
            ("body", "bogus"): spec(bogus=1),
            ("body", "optimizer", "sgd", "lr"): spec(optimizer={"type": "sgd", "lr": -1}),
            ("body", "workers"): spec(workers=8, batch_size=40),
            ("body", "model", "mlp", "sizes", 0): spec(model={"type": "mlp", "sizes": [5, 2]}),
            ("body", "data", "dataset", "id"): spec(data={"type": "dataset", "id": "0" * 16}),
        }
        for loc, body in cases.items():
            r = c.post("/jobs", json=body)
            assert r.status_code == 422 and loc in [tuple(e["loc"]) for e in r.json()["detail"]]
        big = spec(name="x" * 2_000_000)
        assert c.post("/jobs", json=big).status_code == 413
        assert c.get("/jobs/doesnotexist").status_code == 404


def test_401_without_the_token(servers):
    _, paused = servers
    with paused.client() as c:
        assert c.get("/jobs").status_code == 401
        assert c.post("/jobs", json=spec()).status_code == 401
    with paused.client("wrong") as c:
        assert c.get("/cluster").status_code == 401


def test_burst_of_200_submissions_keeps_every_job_in_priority_order(servers):
    _, paused = servers
    priorities = [(i * 7) % 3 for i in range(200)]

    async def burst():
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=paused.url + "/api/v1", headers=headers) as c:
            sem = asyncio.Semaphore(50)

            async def one(i, p):
                async with sem:
                    r = await c.post("/jobs", json=spec(name=f"burst-{i}", priority=p))
                    assert r.status_code == 201, r.text
                    return r.json()["id"]

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(priorities)))

    ids = asyncio.run(burst())
    assert len(set(ids)) == 200
    with paused.client(TOKEN) as c:
        items = c.get("/jobs", params={"status": "queued", "limit": 500}).json()["items"]
    assert {j["id"] for j in items} == set(ids)
    created = {j["id"]: n for n, j in enumerate(reversed(items))}  # the list is newest first
    by_position = sorted(items, key=lambda j: j["queue_position"])
    assert [j["queue_position"] for j in by_position] == list(range(1, 201))
    expected = sorted(items, key=lambda j: (-j["priority"], created[j["id"]]))
    assert [j["id"] for j in by_position] == [j["id"] for j in expected]
    assert all(j["pending_reason"] == "the dispatcher is paused" for j in items)


def shardgrad(*argv, **env) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in its own process."""
    env = {**os.environ, **env}
    cmd = [sys.executable, "-m", "service", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_submit_follow_then_status(servers, tmp_path):
    server, paused = servers
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec(name="cli-follow", epochs=2)))
    done = shardgrad("submit", str(path), "--follow", "--url", server.url)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    assert f"{job_id}  cli-follow  succeeded  (attempts 1)" in done.stdout
    assert "step 16/16" in done.stdout and "val_accuracy" in done.stdout
    status = shardgrad("status", job_id, "--url", server.url)
    assert status.returncode == 0 and "cli-follow  succeeded" in status.stdout

    refused = shardgrad("jobs", "--url", paused.url)
    assert refused.returncode == 1 and "401 Unauthorized" in refused.stderr
    listed = shardgrad("jobs", "--url", paused.url, SHARDGRAD_API_TOKEN=TOKEN)
    assert listed.returncode == 0 and listed.stdout.startswith("ID ")


def test_kill_9_mid_job_then_restart_is_bit_identical(tmp_path, ray_session):
    from workers.spec import TrainingSpec
    from workers.trainer import Trainer

    body = spec(name="crash", epochs=30, batch_size=10, checkpoint_every=20)
    data_dir = tmp_path / "var"
    server = Server(data_dir).start().wait_ready()
    try:
        with server.client() as c:
            job_id = c.post("/jobs", json=body).json()["id"]
            wait_job(
                c,
                job_id,
                lambda j: (
                    j["status"] == "running"
                    and j["progress"]["step"] > 45
                    and j["progress"]["step"] < j["progress"]["total_steps"] - 40
                ),
            )
            assert c.get(f"/jobs/{job_id}/checkpoints").json()
        server.stop(signal.SIGKILL)
        server = Server(data_dir, port=server.port).start().wait_ready()
        with server.client() as c:
            job = wait_job(c, job_id, lambda j: j["status"] in ("succeeded", "failed"))
            assert job["status"] == "succeeded", job["error"]
            assert job["attempts"] == 2
            messages = [e["message"] or "" for e in job["events"]]
            assert any("resume from the newest checkpoint" in m for m in messages)
            steps = [p["step"] for p in c.get(f"/jobs/{job_id}/metrics").json()["points"]]
            assert steps == list(range(1, job["progress"]["total_steps"] + 1))
            name = c.get(f"/jobs/{job_id}/checkpoints").json()[-1]["name"]
            served = load(c.get(f"/jobs/{job_id}/checkpoints/{name}/model.safetensors").content)
    finally:
        server.stop()

    reference = tmp_path / "reference"
    Trainer(TrainingSpec.model_validate(body), reference).run()
    ref = load((reference / "checkpoints" / name / "model.safetensors").read_bytes())
    assert ref.keys() == served.keys()
    for key in ref:
        assert np.array_equal(ref[key], served[key]), key


def test_sigterm_checkpoints_and_requeues(tmp_path):
    data_dir = tmp_path / "var"
    server = Server(data_dir).start().wait_ready()
    with server.client() as c:
        body = spec(name="graceful", epochs=300, batch_size=10, checkpoint_every=1000)
        job_id = c.post("/jobs", json=body).json()["id"]
        wait_job(c, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 3)
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises it
    server = Server(data_dir, port=server.port, SHARDGRAD_PAUSED="true").start().wait_ready()
    try:
        with server.client() as c:
            job = c.get(f"/jobs/{job_id}").json()
            assert job["status"] == "queued" and job["attempts"] == 1
            step = job["progress"]["step"]
            assert c.get(f"/jobs/{job_id}/checkpoints").json()[-1]["step"] == step
    finally:
        server.stop()
