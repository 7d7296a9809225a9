"""Sweeps (issue 18 section 1): Optuna's ask-and-tell on the dispatcher's tick, trials as
ordinary jobs, pruning, restarts and the 422s. The trials run a fake Trainer whose
validation loss depends on the learning rate only (lr < 0.01 stays flat: a clearly bad
trial), so the sweeps are fast and their outcome is Optuna's alone."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from service import cli
from service.api.deps import get_dispatcher, get_store, get_sweeps
from service.api.routes.sweeps import validate_sweep
from service.client import Client, sse_events
from service.config import Settings
from service.main import create_app
from service.store import JobStore
from service.sweeps import Sweeps
from tests.fakes import locs, make_client, make_dispatcher, spec
from tests.helpers import EXAMPLES, wait_for
from workers.events import StartedEvent, StepEvent

API = "/api/v1"
GOOD, BAD = [0.1, 0.3], [0.001, 0.0001]
STEPS = 6


def sweep_train(go: threading.Event | None = None):
    """A Trainer stand-in: STEPS steps, an evaluation every `eval_every` steps (val_loss
    1/step, or 1.0 throughout when lr < 0.01); it stops (checkpointed) when asked. With
    `go`, it waits for it before its last step. `train.most` is the most runs at once."""
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
                    event["val_loss"] = 1.0 if lr < 0.01 else 1.0 / step
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


class Service:
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


@pytest.fixture
def service(tmp_path):
    made = []

    def make(train, **settings) -> Service:
        made.append(Service(tmp_path, train, **settings))
        return made[-1]

    yield make
    for s in made:
        s.dispatcher.shutdown()


@pytest.mark.parametrize(
    "pruner",
    [
        {"type": "median", "n_startup_trials": 1},
        {"type": "asha", "min_resource": 2, "reduction_factor": 2},
        {"type": "none"},
    ],
)
def test_a_sweep_runs_to_the_end_and_prunes_bad_trials(service, pruner):
    svc = service(sweep_train(), max_concurrent_jobs=2)
    r = svc.client.post(f"{API}/sweeps", json=sweep_body(pruner=pruner))
    assert r.status_code == 201, r.text
    sweep = svc.wait_ended(r.json()["id"])

    assert sweep["status"] == "finished"
    trials = sweep["trials"]
    assert [t["number"] for t in trials] == list(range(4))
    assert sorted(t["params"]["optimizer.lr"] for t in trials) == sorted(GOOD + BAD)
    pruned = [t for t in trials if t["pruned"]]
    if pruner["type"] == "none":
        assert not pruned and {t["state"] for t in trials} == {"succeeded"}
    else:
        assert pruned, trials
        assert all(t["params"]["optimizer.lr"] in BAD for t in pruned)
        assert sweep["counts"]["pruned"] == len(pruned)
    for t in pruned:  # stopped after a checkpoint: cancelled, short of its last step
        job = svc.client.get(f"{API}/jobs/{t['job_id']}").json()
        assert job["status"] == "cancelled" and job["pruned"] is True
        assert job["progress"]["step"] < STEPS and t["state"] == "cancelled"
    best = sweep["best"]
    assert best["params"]["optimizer.lr"] in GOOD and best["value"] == pytest.approx(1 / STEPS)
    assert best["best_step"] == STEPS and best["state"] == "succeeded"

    # Each trial is an ordinary job with the sweep's tags.
    jobs = svc.client.get(f"{API}/jobs", params={"sweep": sweep["id"]}).json()["items"]
    assert sorted(j["tags"]["trial"] for j in jobs) == [str(n) for n in range(4)]
    assert {j["id"] for j in jobs} == {t["job_id"] for t in trials}


def test_parallel_bounds_the_trials_at_once_and_events_follow_the_sweep(service):
    go = threading.Event()
    train = sweep_train(go)
    svc = service(train, max_concurrent_jobs=3)
    body = sweep_body(parallel=2, sampler={"type": "random", "seed": 1}, trials=4)
    body["parameters"] = {"optimizer.lr": {"type": "log_uniform", "low": 0.05, "high": 0.5}}
    sweep_id = svc.client.post(f"{API}/sweeps", json=body).json()["id"]

    def release_once_two_run():  # the service would run three; the sweep allows two
        wait_for(lambda: len(train.running) == 2, 120)
        go.set()

    releaser = threading.Thread(target=release_once_two_run)
    releaser.start()
    with svc.client.stream("GET", f"{API}/sweeps/{sweep_id}/events") as r:
        events = list(sse_events(r.iter_lines()))
    releaser.join()
    assert events[-1] == ("end", {"sweep_id": sweep_id, "status": "finished"})
    assert {e for e, _ in events[:-1]} == {"sweep"} and len(events) > 2
    assert events[0][1]["status"] == "running"
    assert events[-2][1]["status"] == "finished" and len(events[-2][1]["trials"]) == 4
    assert train.most == 2


def test_the_cli_follows_a_sweep_and_prints_its_trials(service, tmp_path, monkeypatch, capsys):
    svc = service(sweep_train())

    def client(url=None) -> Client:
        c = Client("http://testserver")
        c.http = svc.http
        return c

    monkeypatch.setattr(cli, "Client", client)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep_body(pruner={"type": "median", "n_startup_trials": 1})))
    assert cli.main(["sweep", str(path), "--follow"]) == 0
    out, err = capsys.readouterr()
    assert "started" in err and "finished: " in err.splitlines()[-1]
    lines = out.splitlines()
    assert lines[0].startswith("sweep ") and "finished" in lines[0] and "pruned" in lines[0]
    assert len([line for line in lines if "optimizer.lr=" in line]) == 4
    assert lines[-1].startswith("best: trial 0 (job ")

    assert cli.main(["sweep", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "running" and doc["spec"]["trials"] == 4


def test_cancel_asks_no_more_and_cancels_the_running_trials(service):
    go = threading.Event()
    svc = service(sweep_train(go))
    sweep_id = svc.client.post(f"{API}/sweeps", json=sweep_body()).json()["id"]
    svc.wait_running(sweep_id)
    r = svc.client.post(f"{API}/sweeps/{sweep_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    sweep = svc.wait_ended(sweep_id)
    assert sweep["status"] == "cancelled" and len(sweep["trials"]) == 1
    [trial] = sweep["trials"]
    assert trial["state"] == "cancelled" and not trial["pruned"]
    assert svc.client.post(f"{API}/sweeps/{sweep_id}/cancel").status_code == 409


def test_a_restart_mid_sweep_loses_no_trial_and_asks_nothing_twice(tmp_path):
    go = threading.Event()
    first = Service(tmp_path, sweep_train(go))
    body = sweep_body(trials=4, sampler={"type": "random", "seed": 0})
    body["parameters"] = {"optimizer.lr": {"type": "uniform", "low": 0.05, "high": 0.5}}
    sweep_id = first.client.post(f"{API}/sweeps", json=body).json()["id"]
    first.wait_running(sweep_id)
    # The service stops (its running trial checkpoints and is queued again) ...
    first.dispatcher.shutdown()
    # ... just after Optuna asked a trial whose job it never wrote.
    study, _ = first.sweeps.study(first.sweeps.get(sweep_id))
    orphan = study.ask({"optimizer.lr": study.get_trials()[0].distributions["optimizer.lr"]})
    assert [t["state"] for t in first.sweep(sweep_id)["trials"]] == ["queued", "pending"]

    go.set()
    second = Service(tmp_path, sweep_train(go))  # new objects on the same database
    try:
        sweep = second.wait_ended(sweep_id)
    finally:
        second.dispatcher.shutdown()
    assert sweep["status"] == "finished"
    trials = sweep["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert {t["state"] for t in trials} == {"succeeded"}
    assert trials[1]["params"] == orphan.params  # the orphan ran, as Optuna asked it
    jobs = second.client.get(f"{API}/jobs", params={"sweep": sweep_id}).json()["items"]
    assert len(jobs) == 4 and {j["id"] for j in jobs} == {t["job_id"] for t in trials}
    job = second.client.get(f"{API}/jobs/{trials[0]['job_id']}").json()
    assert job["spec"]["optimizer"]["lr"] == trials[0]["params"]["optimizer.lr"]
    assert job["attempts"] == 2  # the first trial resumed; it was not asked again


def bad(client, **overrides):
    body = sweep_body(**{"sampler": {"type": "random"}, **overrides})
    return client.post(f"{API}/sweeps", json=body)


def test_bad_sweeps_are_422s_naming_the_field(tmp_path):
    client, store, _ = make_client(tmp_path, max_concurrent_jobs=2, max_sweep_trials=50)
    sweeps = Sweeps(store, client.app.state.settings)
    client.app.dependency_overrides[get_sweeps] = lambda: sweeps
    at = ("body", "parameters")

    lr = {"type": "log_uniform", "low": 1e-3, "high": 1}
    assert locs(bad(client, parameters={"optimizer.lrr": lr})) == [(*at, "optimizer.lrr")]
    sizes = {"values": [[2, 8, 2], [3, 8, 2]]}  # moons has 2 features
    r = bad(client, parameters={"model.sizes": sizes})
    assert locs(r) == [(*at, "model.sizes")] and "[3, 8, 2]" in r.json()["detail"][0]["msg"]
    batch = {"type": "int", "low": 0, "high": 64}  # batch_size >= 1
    assert locs(bad(client, parameters={"batch_size": batch})) == [(*at, "batch_size")]
    assert locs(bad(client, parameters={"optimizer.lr": {"type": "normal"}})) == [
        (*at, "optimizer.lr")
    ]
    r = bad(client, parameters={"optimizer.lr": lr}, sampler={"type": "grid"})
    assert locs(r) == [("body", "sampler", "type")]
    assert locs(bad(client, base=spec(validation_fraction=0))) == [("body", "metric")]
    assert locs(bad(client, trials=51)) == [("body", "trials")]
    assert locs(bad(client, parallel=3)) == [("body", "parallel")]
    base = spec(workers=2, cpus_per_worker=1.0)  # 2 trials x 2 CPUs on a 4-CPU cluster fit
    assert bad(client, base=base, parallel=2).status_code == 201
    assert locs(bad(client, base=spec(workers=3, cpus_per_worker=1.0), parallel=2)) == [
        ("body", "parallel")
    ]
    assert client.get(f"{API}/sweeps/nope").status_code == 404
    example = json.loads((EXAMPLES / "moons-sweep.json").read_text())
    assert client.post(f"{API}/sweeps", json=example).status_code == 201
    page = client.get(f"{API}/sweeps", params={"limit": 1}).json()
    assert [s["name"] for s in page["items"]] == ["moons-lr"] and page["next_cursor"]
    page = client.get(f"{API}/sweeps", params={"cursor": page["next_cursor"]}).json()
    assert [s["name"] for s in page["items"]] == ["lr"] and page["next_cursor"] is None


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_trial_round_trip_through_optunas_storage(tmp_path, request, database):
    url = (
        f"sqlite:///{tmp_path}/s.db" if database == "sqlite" else request.getfixturevalue("pg_url")
    )
    store = JobStore(url)
    settings = Settings(data_dir=tmp_path, instance_id="d1")
    sweeps = Sweeps(store, settings)
    body = sweep_body(trials=1, parameters={"optimizer.lr": {"values": [0.1]}})
    row = sweeps.create(validate_sweep(body, settings, total_cpus=4.0))
    sweeps.tick()  # asks trial 0 and queues its job
    [(number, job)] = sweeps.trial_jobs(row.id).items()
    assert number == 0 and job.tags == {"sweep": row.id, "trial": "0"}
    [claimed] = store.claim("d1", lambda _: True)
    again = Sweeps(store, settings)  # another process reads the same study
    assert not again.report(row.id, 0, {"step": 2, "val_loss": 0.5})
    assert not again.report(row.id, 0, {"step": 4, "val_loss": 0.25})
    store.finish(claimed.id, "d1", "succeeded", step=4)
    sweeps.due.set()  # as the dispatcher does when a trial ends
    sweeps.tick()  # tells Optuna, ends the sweep
    sweep = again.present(again.get(row.id))
    assert sweep.status == "finished" and sweep.best.value == 0.25
    assert (sweep.best.best_step, sweep.best.step, sweep.best.job_id) == (4, 4, claimed.id)
