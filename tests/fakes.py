"""Shared stand-ins for the service tests (no tests here): an in-memory store, a dispatcher
without Ray, a fake Trainer, and the service with a real dispatcher driving sweeps of it."""

from __future__ import annotations

import collections
import threading

from fastapi.testclient import TestClient
from sqlalchemy import insert
from sqlalchemy.orm import Session

from service.api.deps import get_dispatcher, get_store, get_sweeps
from service.cluster import Capacity
from service.config import Settings
from service.dispatcher import Dispatcher, pending_reason
from service.main import create_app
from service.store import JobStore
from service.sweeps import Sweeps
from service.tables import MetricRow
from tests.helpers import small_moons, wait_for
from workers.events import StartedEvent, StepEvent


def spec(**overrides) -> dict:
    """The service tests' job: the small moons run (see tests.helpers.small_moons)."""
    return small_moons(**{"batch_size": 20, **overrides})


class FakeCluster:
    """A Ray cluster of one node with `cpus` CPUs, all free."""

    def __init__(self, cpus: float = 4.0):
        self.cpus = cpus

    def start(self):
        pass

    def capacity(self):
        return Capacity(self.cpus, self.cpus)

    def nodes(self):
        return [{"id": "node-1", "alive": True, "address": "10.0.0.1", "cpus": self.cpus}]

    def dashboard_url(self):
        return None


def fake_train(steps=20, pause=0.02, fail: str | None = None):
    """Behaves like workers.trainer.train: events, stop_event, resume from `done` (a
    checkpoint, which an abandoned run does not write); a spec named `fail` fails after its
    first step. `train.abandoned` lists the out dirs of abandoned runs."""
    done: dict[str, int] = {}

    def train(spec, out_dir, *, callback, stop_event, settings, abandon_event=None):
        key = str(out_dir)
        step = done.get(key, 0)
        callback(
            StartedEvent(
                type="started",
                total_steps=steps,
                step=step,
                resumed_from_step=step or None,
                worker_nodes=["n1"],
                exchange="tasks",
            )
        )
        while step < steps:
            if stop_event.wait(pause):
                if abandon_event is not None and abandon_event.is_set():
                    train.abandoned.append(key)
                    return {"status": "cancelled", "steps": step, "error": "abandoned"}
                done[key] = step
                return {"status": "cancelled", "steps": step, "error": f"stopped at {step}"}
            step += 1
            callback(
                StepEvent(
                    type="step",
                    step=step,
                    total_steps=steps,
                    epoch=0,
                    train_loss=1.0 / step,
                    grad_norm=0.1,
                    samples_per_s=100.0,
                )
            )
            if spec.name == fail:
                return {"status": "failed", "steps": step, "error": "diverged at step 1"}
        done[key] = step
        return {"status": "succeeded", "steps": steps, "final_loss": 0.1}

    train.abandoned = []
    return train


class FakeDispatcher:
    """Answers like the real one from a fixed 4-CPU cluster; records what it was asked."""

    owner = "fake"

    def __init__(self, settings: Settings, total: float = 4.0):
        self.settings = settings
        self.cluster = FakeCluster()
        self.cap = Capacity(total, total)
        self.runs: dict = {}
        self.cancelled: list[str] = []
        self.woken = 0
        self.steps_total = 0
        self.health_warnings: collections.Counter[str] = collections.Counter()
        self.is_healthy = True

    def capacity(self):
        return self.cap

    def wake(self):
        self.woken += 1

    def cancel(self, job_id):
        self.cancelled.append(job_id)

    def healthy(self):
        return self.is_healthy

    def pending_reason(self, job, position):
        return pending_reason(job, position, self.cap, len(self.runs), self.settings)

    def steps_per_second(self):
        return 0.0

    def running(self):
        return []


def make_client(
    tmp_path, store_url: str = "sqlite://", **settings
) -> tuple[TestClient, JobStore, FakeDispatcher]:
    """The app on an in-memory store (a file one when streams read while the test writes)."""
    # TestClient's Host, which without a token is not answered unless allowed (service/guard.py)
    settings.setdefault("allowed_hosts", ["testserver"])
    cfg = Settings(data_dir=tmp_path, instance_id="fake", **settings)
    app = create_app(cfg, start=False)
    store = JobStore(store_url)
    dispatcher = FakeDispatcher(cfg)
    app.dependency_overrides[get_store] = lambda: store
    app.dependency_overrides[get_dispatcher] = lambda: dispatcher
    return TestClient(app), store, dispatcher


# -- helpers of the service tests ---------------------------------------------------------


def submit(client, **overrides):
    r = client.post("/api/v1/jobs", json=spec(**overrides))
    assert r.status_code == 201, r.text
    return r.json()


def finished_job(client, store, points: list[dict], finish: str = "succeeded", **spec) -> str:
    """A job (the small moons spec with `spec`) that measured `points` ({"step", ...}, one
    transaction for all but the last) and ended `finish`; its id."""
    job_id = submit(client, **spec)["id"]
    store.claim("t", lambda q: q.id == job_id or False)
    with Session(store.engine) as s, s.begin():
        s.execute(insert(MetricRow), [{"job_id": job_id, **p} for p in points[:-1]])
    last = points[-1]
    metrics = {k: v for k, v in last.items() if k not in ("step", "epoch")}
    store.progress(job_id, "t", {"step": last["step"], "metrics": metrics}, point=last)
    store.finish(job_id, "t", finish)
    return job_id


def curve(steps: int, every: int, slope: float) -> list[dict]:
    """Metric points: train_loss at each step; val_loss and val_accuracy every `every`."""
    out = []
    for s in range(1, steps + 1):
        p = {"step": s, "epoch": 0, "train_loss": slope / s}
        if s % every == 0:
            p |= {"val_loss": 2 * slope / s, "val_accuracy": min(1.0, s / steps) / slope}
        out.append(p)
    return out


def locs(r):
    assert r.status_code == 422, r.text
    return [tuple(e["loc"]) for e in r.json()["detail"]]


def new_job(store, cpus=1.0, priority=0, **overrides):
    s = spec(**overrides)
    return store.create(s, name=s["name"], priority=priority, cpus=cpus)


def claim_one_by_one(store: JobStore, owner: str) -> list[str]:
    """A dispatcher that takes one job per claim (many short transactions that interleave
    with the others') until the queue is empty."""
    claimed = []
    while store.counts().get("queued"):
        budget = iter([True])
        claimed += [job.id for job in store.claim(owner, lambda _, b=budget: next(b, None))]
    return claimed


def assert_each_claimed_once(store: JobStore, ids, claims: dict[str, list[str]]) -> None:
    """Every job was claimed by exactly one owner, once: by the store's and the owners' count."""
    assert sorted(i for got in claims.values() for i in got) == sorted(ids)
    for owner, got in claims.items():
        for job_id in got:
            job, events = store.get(job_id), store.events(job_id)
            assert job.owner == owner and job.attempts == 1
            assert [e.message for e in events if e.status == "running"] == [f"started on {owner}"]


def make_dispatcher(tmp_path, store, train, cpus=2.0, **settings):
    cfg = Settings(data_dir=tmp_path, instance_id="d1", poll_interval_s=0.05, **settings)
    return Dispatcher(store, cfg, FakeCluster(cpus), train=train)


# -- sweeps: a real dispatcher and Sweeps driving a fake Trainer ------------------------------

API = "/api/v1"
GOOD, BAD = [0.1, 0.3], [0.001, 0.0001]
STEPS = 6


def flat_below_0_01(lr: float, step: int) -> float:
    """The fake's validation loss: 1/step, or 1.0 throughout when lr < 0.01 (a bad trial)."""
    return 1.0 if lr < 0.01 else 1.0 / step


def sweep_train(go: threading.Event | None = None, val_loss=flat_below_0_01):
    """A Trainer stand-in: STEPS steps, an evaluation every `eval_every` steps (`val_loss`
    of the lr and the step); it stops (checkpointed) when asked. With `go`, it waits for it
    before its last step. `train.most` is the most runs at once."""
    lock, running = threading.Lock(), set()

    def train(spec, out_dir, *, callback, stop_event, settings, abandon_event=None):
        with lock:
            running.add(out_dir)
            train.most = max(train.most, len(running))
        try:
            callback(StartedEvent(type="started", total_steps=STEPS, step=0, worker_nodes=[]))
            lr = spec.optimizer.lr
            for step in range(1, STEPS + 1):
                while go is not None and step == STEPS and not go.is_set():
                    if stop_event.wait(0.01):
                        break
                if stop_event.is_set():
                    return {"status": "cancelled", "steps": step - 1}
                event = StepEvent(type="step", step=step, total_steps=STEPS, epoch=0)
                event |= {"train_loss": 1.0, "grad_norm": 0.1, "lr": lr, "samples_per_s": None}
                if step % spec.eval_every == 0:
                    event["val_loss"] = val_loss(lr, step)
                callback(event)
            return {"status": "succeeded", "steps": STEPS}
        finally:
            with lock:
                running.discard(out_dir)

    train.most, train.running = 0, running
    return train


def sweep_body(**overrides) -> dict:
    body = {
        "name": "lr",
        "base": spec(workers=0, eval_every=2),
        "parameters": {"optimizer.lr": {"values": GOOD + BAD}},
        "trials": 4,
        "parallel": 1,
        # Seed 5 runs the grid in the order 0.1, 0.3, 0.001, 0.0001: the bad trials come
        # after a good one has finished, so a pruner has something to compare with.
        "sampler": {"type": "grid", "seed": 5},
        "pruner": {"type": "none"},
    }
    return body | overrides


class SweepService:
    """The app on a file store, with a real dispatcher (fake Trainer) driving sweeps."""

    def __init__(self, tmp_path, train, store_url=None, **settings):
        self.store = JobStore(store_url or f"sqlite:///{tmp_path}/store.db")
        self.dispatcher = make_dispatcher(tmp_path, self.store, train, cpus=4.0, **settings)
        self.sweeps = self.dispatcher.sweeps = Sweeps(self.store, self.dispatcher.settings)
        cfg = self.dispatcher.settings.model_copy(update={"allowed_hosts": ["testserver"]})
        app = create_app(cfg, start=False)
        app.dependency_overrides[get_store] = lambda: self.store
        app.dependency_overrides[get_dispatcher] = lambda: self.dispatcher
        app.dependency_overrides[get_sweeps] = lambda: self.sweeps
        self.client = TestClient(app)
        self.http = TestClient(app, base_url="http://testserver/api/v1")  # for a Client
        self.dispatcher.start()

    def sweep(self, sweep_id: str) -> dict:
        return self.client.get(f"{API}/sweeps/{sweep_id}").json()

    def wait_ended(self, sweep_id: str) -> dict:
        wait_for(lambda: self.sweeps.get(sweep_id).status in ("finished", "cancelled"), 120)
        return self.sweep(sweep_id)

    def wait_running(self, sweep_id: str) -> None:
        """Until the sweep's only job is running."""

        def states() -> list[str]:
            return [job.status for job in self.store.list(tags=[("sweep", sweep_id)])]

        wait_for(lambda: states() == ["running"], 120)
