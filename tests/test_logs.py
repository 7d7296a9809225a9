"""Per-job logs (issue 18 §4): capture by job context, rotation, reading after a time, the
route (text and followed), and `shardgrad logs`."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest
import ray
from fastapi.testclient import TestClient

from service import cli
from service.api.deps import get_dispatcher, get_store
from service.client import Client, sse_events
from service.config import Settings
from service.dispatcher import Dispatcher
from service.main import create_app
from service.store import JobStore
from tests.fakes import FakeCluster, spec
from tests.helpers import OVERFLOWING, wait_for
from workers import joblog, worker_output
from workers import pool as pool_module

log = logging.getLogger("workers.test_logs")


def test_each_job_keeps_only_what_is_logged_in_its_own_thread(tmp_path):
    ready = threading.Barrier(2)

    def run(name: str) -> None:
        with joblog.JobLog(tmp_path / name, 1 << 20, 1):
            ready.wait()  # both logs are open while each job logs
            for i in range(50):
                log.info("%s line %d", name, i)
            ready.wait()

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    log.warning("not any job's")
    for t in threads:
        t.join()
    for name, other in (("a", "b"), ("b", "a")):
        recs = joblog.read(tmp_path / name)
        assert [r.split(": ", 1)[1] for r in recs] == [f"{name} line {i}\n" for i in range(50)]
        assert all(" INFO workers.test_logs: " in r for r in recs)
        assert not any(other in r or "any job" in r for r in recs)


def test_a_failure_leaves_its_traceback_and_worker_lines_carry_their_source(tmp_path):
    with pytest.raises(ZeroDivisionError), joblog.JobLog(tmp_path, 1 << 20, 1) as job_log:
        job_log.write("worker 1 on node 5f2c stderr", ["a warning\n", "another"])
        1 / 0  # noqa: B018
    recs = joblog.read(tmp_path)
    assert [r.split(" ", 1)[1] for r in recs[:2]] == [
        "INFO worker 1 on node 5f2c stderr: a warning\n",
        "INFO worker 1 on node 5f2c stderr: another\n",
    ]
    assert "the run ended with ZeroDivisionError" in recs[2]
    assert "Traceback (most recent call last)" in recs[2] and recs[2].endswith("by zero\n")
    assert len(recs) == 3  # the traceback's lines belong to its record


def test_rotation_caps_the_log_and_reading_follows_it(tmp_path):
    tail = joblog.Tail(tmp_path)
    seen: list[str] = []
    with joblog.JobLog(tmp_path, 1024, 2):
        for i in range(100):
            log.info("line %03d %s", i, "x" * 40)
            if i % 7 == 0:
                seen += tail.poll()
    seen += tail.poll()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["job.log", "job.log.1", "job.log.2"]
    assert all((tmp_path / "logs" / f).stat().st_size <= 1024 for f in files)
    kept = joblog.read(tmp_path)
    numbers = [int(r.split("line ")[1][:3]) for r in kept]
    assert numbers == list(range(100 - len(kept), 100))  # the newest, in order
    # The tail saw every record once, in order, across the rotations.
    assert [int(r.split("line ")[1][:3]) for r in seen] == list(range(100))
    middle = kept[len(kept) // 2][: joblog.STAMP_WIDTH - 1]
    assert joblog.read(tmp_path, middle) == [r for r in kept if r[:27] > middle]


def test_worker_lines_are_routed_by_node_and_pid_within_the_cap(tmp_path):
    """Ray's log thread (here: another thread) feeds the router; a worker printing in a loop
    fills the job's log only up to its cap, and nothing is written once the job's log is
    closed."""
    route = worker_output._router.dispatch
    info = {"node_id": "5f2c1a9e77", "ip": "10.0.0.7", "pid": 4242}
    route("10.0.0.7", 4242, True, ["printed while it started"])  # before the pool knew it
    route("10.0.0.7", 4243, False, ["another process's"])
    with joblog.JobLog(tmp_path, 4096, 2) as job_log:
        output = worker_output.JobOutput(job_log)
        output.add(3, info)
        lines = [f"line {i}" for i in range(400)]  # 24 kB, in Ray's batches of a round
        flood = threading.Thread(
            target=lambda: [
                route("10.0.0.7", 4242, False, lines[i : i + 50]) for i in range(0, 400, 50)
            ]
        )
        flood.start()
        flood.join()
        route("10.0.0.8", 4242, False, ["same pid, another node"])
    route("10.0.0.7", 4242, False, ["after the job"])
    output.drain([])
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["job.log", "job.log.1", "job.log.2"]
    assert all((tmp_path / "logs" / f).stat().st_size <= 4096 for f in files)
    recs = joblog.read(tmp_path)
    assert all(" INFO worker 3 on node 5f2c1a9e stdout: line " in r for r in recs)
    assert recs[-1].endswith("stdout: line 399\n")  # the newest kept, the oldest rotated away
    assert (info["ip"], info["pid"]) not in worker_output._router.routes


def test_a_workers_early_lines_wait_for_its_pool(tmp_path):
    worker_output._router.dispatch("10.0.0.9", 77, True, ["early"])
    with joblog.JobLog(tmp_path, 4096, 0) as job_log:
        worker_output.JobOutput(job_log).add(0, {"node_id": "ab" * 28, "ip": "10.0.0.9", "pid": 77})
    assert [r.split(" ", 1)[1] for r in joblog.read(tmp_path)] == [
        "INFO worker 0 on node abababab stderr: early\n"
    ]


# -- the service ------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path, monkeypatch):
    """The app with a real dispatcher and the real Trainer (in-process jobs, no Ray)."""
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    settings = Settings(data_dir=tmp_path, instance_id="logs", poll_interval_s=0.05)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    dispatcher = Dispatcher(store, settings, FakeCluster(4.0))
    app = create_app(settings, start=False)
    app.dependency_overrides[get_store] = lambda: store
    app.dependency_overrides[get_dispatcher] = lambda: dispatcher
    http = TestClient(app, base_url="http://localhost/api/v1")
    monkeypatch.setattr(cli, "Client", lambda url=None: _client(http))
    dispatcher.start()
    try:
        yield http
    finally:
        dispatcher.shutdown()


def _client(http) -> Client:
    client = Client("http://testserver")
    client.http = http
    return client


def finished(http, **overrides) -> dict:
    job = http.post("/jobs", json=spec(**{"workers": 0, "epochs": 1, **overrides})).json()
    wait_for(lambda: http.get(f"/jobs/{job['id']}").json()["status"] in ("succeeded", "failed"))
    return http.get(f"/jobs/{job['id']}").json()


def test_a_jobs_log_as_text_and_followed(service, capsys):
    job = finished(service)
    assert job["status"] == "succeeded"
    text = service.get(f"/jobs/{job['id']}/logs")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    lines = text.text.splitlines()
    assert "INFO workers.trainer: training from step 0 of 8, in-process" in lines[1]
    assert lines[-1].split(" ", 1)[1].startswith("INFO workers.trainer: succeeded at step 8")
    with service.stream("GET", f"/jobs/{job['id']}/logs", params={"follow": True}) as r:
        events = list(sse_events(r.iter_lines()))
    assert [e for e, _ in events] == ["log", "end"]
    assert events[0][1] == {"job_id": job["id"], "lines": lines}
    # Resumed after the first record: the rest.
    first = lines[0][:27]
    headers = {"Last-Event-ID": first}
    with service.stream("GET", f"/jobs/{job['id']}/logs?follow=1", headers=headers) as r:
        assert dict(sse_events(r.iter_lines()))["log"]["lines"] == lines[1:]
    since = datetime.fromisoformat(first).astimezone(timezone(timedelta(hours=2)))
    after = service.get(f"/jobs/{job['id']}/logs", params={"since": since.isoformat()})
    assert after.text.splitlines() == lines[1:]

    assert cli.main(["logs", job["id"]]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    assert cli.main(["logs", "-f", job["id"], "--since", first]) == 0
    assert capsys.readouterr().out.splitlines() == lines[1:]
    assert cli.main(["logs", job["id"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"job_id": job["id"], "lines": lines}


def test_a_failed_jobs_log_has_the_traceback(service):
    job = finished(service, **OVERFLOWING)
    assert job["status"] == "failed"
    text = service.get(f"/jobs/{job['id']}/logs").text
    assert "ERROR workers.trainer: failed at step 1: diverged at step 1" in text
    assert "Traceback (most recent call last)" in text and "Diverged: diverged" in text


WORKER_LINE = re.compile(r"\S+ INFO worker (\d) on node ([0-9a-f]{8}) (stdout|stderr): (.*)\n")


def chatty_worker():
    """GradWorker, printing to stdout as it starts and to both streams as it takes its
    replica; rank 1 then raises."""

    class Chatty(pool_module.GradWorker.__ray_actor_class__):
        def info(self):
            print("starting")
            return super().info()

        def replicate(self, spec, rank, workers, state):
            print(f"rank {rank} on stdout")
            print(f"rank {rank} on stderr", file=sys.stderr)
            if rank == 1:
                raise ValueError("rank 1 gives up")
            return super().replicate(spec, rank, workers, state)

    return ray.remote(max_restarts=0, max_task_retries=0)(Chatty)


def test_each_workers_stdout_and_stderr_and_traceback_are_in_the_jobs_log(
    service, monkeypatch, ray_session
):
    monkeypatch.setattr(pool_module, "GradWorker", chatty_worker())
    job = finished(service, workers=2, cpus_per_worker=0.5, exchange="replicated")
    assert job["status"] == "failed"
    recs = joblog.records(service.get(f"/jobs/{job['id']}/logs").text)
    said = [WORKER_LINE.match(r).groups() for r in recs if WORKER_LINE.match(r)]
    node = ray_session.get_runtime_context().get_node_id()[:8]  # the session's one node
    assert {n for _, n, _, _ in said} == {node}
    assert sorted((rank, stream, text) for rank, _, stream, text in said) == [
        ("0", "stderr", "rank 0 on stderr"),
        ("0", "stdout", "rank 0 on stdout"),
        ("0", "stdout", "starting"),
        ("1", "stderr", "rank 1 on stderr"),
        ("1", "stdout", "rank 1 on stdout"),
        ("1", "stdout", "starting"),
    ]  # each once; none lost though the pool ended right after; no end-of-output markers
    # The job's error is the worker's own, in a line; the log ends with its traceback, then
    # the run's last word.
    assert job["error"] == "a worker raised ValueError: rank 1 gives up"
    *_, trace, last = recs
    assert "ERROR workers.trainer: failed at step 0: a worker raised" in trace
    assert "in replicate" in trace and trace.endswith("ValueError: rank 1 gives up\n")
    assert last.endswith("INFO workers.trainer: failed at step 0: " + job["error"] + "\n")


def test_bad_requests(service):
    assert service.get("/jobs/nope/logs").status_code == 404
    job = service.post("/jobs", json=spec(workers=0)).json()
    r = service.get(f"/jobs/{job['id']}/logs", params={"since": "yesterday"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "since"]
