"""Behaviours the README promises that no other test pinned down: resuming a failed job, 409
for a finished one, /healthz when a dependency does not answer, progress.eta_s, the Trainer's
keep_checkpoints, and each reason a queued job gives for waiting.

The service is driven through its HTTP API with a fake dispatcher (dependency_overrides), or
with the real dispatcher and a fake Trainer; no test waits on the clock."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.exc import OperationalError

from service.cluster import Capacity
from service.config import Settings
from service.dispatcher import Dispatcher
from tests.fakes import FakeCluster, fake_train, make_client, spec, submit
from tests.helpers import FakeClock, wait_for
from workers.checkpoint import list_checkpoints


def get(client, job_id) -> dict:
    return client.get(f"/api/v1/jobs/{job_id}").json()


# -- finished jobs -----------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["succeeded", "failed", "cancelled"])
def test_cancel_of_a_finished_job_is_409_and_changes_nothing(tmp_path, end):
    client, store, dispatcher = make_client(tmp_path)
    job_id = submit(client)["id"]
    store.claim("fake", lambda job: True)
    assert store.finish(job_id, "fake", end, None if end == "succeeded" else "stopped")
    before = get(client, job_id)
    r = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409, r.text
    assert get(client, job_id) == before and dispatcher.cancelled == []


def test_resume_of_a_succeeded_job_is_409_and_changes_nothing(tmp_path):
    client, store, dispatcher = make_client(tmp_path)
    job_id = submit(client)["id"]
    store.claim("fake", lambda job: True)
    assert store.finish(job_id, "fake", "succeeded", None, step=3, total_steps=3)
    before, woken = get(client, job_id), dispatcher.woken
    assert client.post(f"/api/v1/jobs/{job_id}/resume").status_code == 409
    assert get(client, job_id) == before and dispatcher.woken == woken


def failing_once(steps: int, fail_at: int):
    """fake_train, except that its first run fails at `fail_at`, just after checkpointing
    there; a rerun resumes from that checkpoint. `train.runs` lists each run's first step."""
    fake, runs = fake_train(steps=steps, pause=0), []

    def train(spec, out_dir, *, callback, stop_event, **kwargs):
        first, crash = not runs, threading.Event()

        def on_event(event):
            callback(event)
            if event["type"] == "started":
                runs.append(event["step"])
            elif first and event["step"] == fail_at:
                crash.set()  # the fake checkpoints when it stops

        stop = crash if first else stop_event
        summary = fake(spec, out_dir, callback=on_event, stop_event=stop, **kwargs)
        if first:
            return {"status": "failed", "steps": fail_at, "error": f"diverged at step {fail_at}"}
        return summary

    train.runs = runs
    return train


def test_a_failed_job_resumes_from_its_newest_checkpoint(tmp_path):
    """POST /resume on a failed job queues it again; the dispatcher reruns it from where
    its newest checkpoint left it, and it succeeds."""
    client, store, _ = make_client(tmp_path, store_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    job_id = submit(client)["id"]
    train = failing_once(steps=10, fail_at=4)
    cfg = Settings(data_dir=tmp_path, instance_id="d1", poll_interval_s=0.05)
    d = Dispatcher(store, cfg, FakeCluster(), train=train)
    d.start()
    try:
        wait_for(lambda: store.get(job_id).status == "failed")
        assert get(client, job_id)["error"] == "diverged at step 4"
        r = client.post(f"/api/v1/jobs/{job_id}/resume")
        assert r.status_code == 200 and r.json()["status"] == "queued"
        d.wake()
        wait_for(lambda: store.get(job_id).status == "succeeded")
    finally:
        d.shutdown()
    job = get(client, job_id)
    assert train.runs == [0, 4] and job["attempts"] == 2 and job["error"] is None
    assert job["progress"]["step"] == 10
    messages = [e["message"] or "" for e in job["events"]]
    assert "resumed from step 4" in messages


# -- /healthz ----------------------------------------------------------------------------------


def test_healthz_is_503_when_the_store_does_not_answer(tmp_path, monkeypatch):
    client, store, _ = make_client(tmp_path)
    assert client.get("/healthz").json() == {"status": "ok", "store": True, "ray": True}

    def unreachable():
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(store, "ping", unreachable)
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "unhealthy", "store": False, "ray": True}


def test_healthz_is_503_when_ray_does_not_answer(tmp_path):
    client, _, dispatcher = make_client(tmp_path)
    dispatcher.is_healthy = False  # the dispatcher has not heard from Ray lately
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "unhealthy", "store": True, "ray": False}


# -- progress.eta_s ----------------------------------------------------------------------------


def test_eta_is_the_steps_left_at_the_recent_step_rate(tmp_path, monkeypatch):
    """eta_s = steps left / steps per second, the rate smoothed over recent steps (each new
    interval weighs 0.2); none before a rate exists, none once the job ended."""
    clock = FakeClock()
    monkeypatch.setattr("service.dispatcher.time", clock)
    client, store, _ = make_client(tmp_path, store_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    job_id = submit(client)["id"]
    seen = []

    def train(spec, out_dir, *, callback, stop_event, settings, abandon_event=None):
        callback({"type": "started", "total_steps": 10, "step": 0, "worker_nodes": ["n1"]})
        for step, seconds in [(1, 0.0), (2, 0.5), (3, 0.5), (4, 0.25)]:
            clock.now += seconds
            callback({"type": "step", "step": step, "total_steps": 10, "train_loss": 1.0})
            seen.append(get(client, job_id)["progress"]["eta_s"])
        return {"status": "succeeded", "steps": 4}

    cfg = Settings(data_dir=tmp_path, instance_id="d1", poll_interval_s=0.05)
    d = Dispatcher(store, cfg, FakeCluster(), train=train)
    d.start()
    try:
        wait_for(lambda: store.get(job_id).status == "succeeded")
    finally:
        d.shutdown()
    # rates: none, 2/s, 2/s, then 0.8 * 2 + 0.2 * 4 = 2.4/s; steps left: 9, 8, 7, 6
    assert seen == [None, pytest.approx(4.0), pytest.approx(3.5), pytest.approx(2.5)]
    assert get(client, job_id)["progress"]["eta_s"] is None


# -- keep_checkpoints --------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("keep", [1, 2])
def test_the_trainer_keeps_only_the_newest_checkpoints(tmp_path, keep):
    from workers.spec import TrainingSpec
    from workers.trainer import Trainer

    moons = spec(epochs=2, batch_size=40, workers=1, checkpoint_every=1, keep_checkpoints=keep)
    summary = Trainer(TrainingSpec.model_validate(moons), tmp_path).run()
    assert summary["status"] == "succeeded"
    last = summary["steps"]
    assert last > keep  # a checkpoint at every step, more than it may keep
    assert [c.step for c in list_checkpoints(tmp_path)] == list(range(last - keep + 1, last + 1))


# -- why a queued job waits --------------------------------------------------------------------


def reason(client, job_id) -> str:
    return get(client, job_id)["pending_reason"]


def test_each_reason_a_queued_job_gives_for_waiting(tmp_path):
    client, store, dispatcher = make_client(tmp_path, max_concurrent_jobs=2)
    first, second, third = (submit(client)["id"] for _ in range(3))
    assert reason(client, first) == "about to start"
    assert reason(client, second) == "waiting behind 1 queued job(s)"
    assert reason(client, third) == "waiting behind 2 queued job(s)"

    dispatcher.cap = Capacity(4.0, 0.5)  # the job needs 1 CPU (2 workers x 0.5)
    assert reason(client, first) == "waiting for 1 CPUs, 0.5 free"

    dispatcher.runs = {"a": object(), "b": object()}  # both slots taken
    assert reason(client, first) == "waiting for a job slot (2 of 2 running)"
    assert reason(client, second) == "waiting behind 1 queued job(s)"  # the queue first


def test_a_job_larger_than_the_cluster_waits_for_it_to_scale_up(tmp_path):
    client, _, _ = make_client(tmp_path, autoscaling=True)
    job_id = submit(client, workers=12)["id"]  # 6 CPUs on a 4-CPU cluster
    assert reason(client, job_id) == (
        "waiting for the cluster to scale up: needs 6 CPUs, the cluster has 4"
    )


@pytest.mark.parametrize("settings", [{"paused": True}, {"max_concurrent_jobs": 0}])
def test_a_paused_dispatcher_says_so(tmp_path, settings):
    client, _, _ = make_client(tmp_path, **settings)
    job_id = submit(client)["id"]
    assert reason(client, job_id) == "the dispatcher is paused"
