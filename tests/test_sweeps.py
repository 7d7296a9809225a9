"""Sweeps (issue 18 section 1): Optuna's ask-and-tell on the dispatcher's tick, trials as
ordinary jobs, pruning, restarts and the 422s. The trials run a fake Trainer whose
validation loss depends on the learning rate only (lr < 0.01 stays flat: a clearly bad
trial), so the sweeps are fast and their outcome is Optuna's alone."""

from __future__ import annotations

import json
import threading

import pytest

from service import cli
from service.api.deps import get_sweeps
from service.api.routes.sweeps import validate_sweep
from service.client import Client, sse_events
from service.config import Settings
from service.store import JobStore
from service.sweeps import Sweeps
from tests.fakes import (
    API,
    BAD,
    GOOD,
    STEPS,
    SweepService,
    locs,
    make_client,
    spec,
    sweep_body,
    sweep_train,
)
from tests.helpers import EXAMPLES, wait_for


@pytest.fixture
def service(tmp_path):
    made = []

    def make(train, **settings) -> SweepService:
        made.append(SweepService(tmp_path, train, **settings))
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
    first = SweepService(tmp_path, sweep_train(go))
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
    second = SweepService(tmp_path, sweep_train(go))  # new objects on the same database
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
