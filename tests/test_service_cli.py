"""The `shardgrad` client commands against the app: the CLI's Client talks to it through a
TestClient, and the real Dispatcher runs jobs with a fake Trainer (no Ray)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import cli
from service.api.deps import get_dispatcher, get_store
from service.client import Client, Reconnect
from service.config import Settings
from service.dispatcher import Dispatcher
from service.main import create_app
from service.store import JobStore
from tests.fakes import FakeCluster, fake_train, spec
from workers.checkpoint import save_checkpoint
from workers.model import build_model
from workers.spec import TrainingSpec


class Service:
    """The app with a file store, a paused real dispatcher and a Client the CLI uses."""

    def __init__(self, tmp_path, monkeypatch):
        self.settings = Settings(
            data_dir=tmp_path, instance_id="cli", poll_interval_s=0.05, paused=True
        )
        self.store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
        self.dispatcher = Dispatcher(
            self.store, self.settings, FakeCluster(4.0), train=fake_train(steps=12, fail="boom")
        )
        app = create_app(self.settings, start=False)
        app.dependency_overrides[get_store] = lambda: self.store
        app.dependency_overrides[get_dispatcher] = lambda: self.dispatcher
        self.http = TestClient(app, base_url="http://localhost/api/v1")
        monkeypatch.setattr(cli, "Client", self.client)
        self.tmp_path = tmp_path

    def client(self, url=None) -> Client:
        client = Client(url or "http://testserver")
        client.http = self.http
        return client

    def resume_dispatching(self) -> None:
        self.settings.paused = False
        self.dispatcher.wake()

    def spec_file(self, **overrides) -> str:
        path = self.tmp_path / f"{overrides.get('name', 'moons')}.json"
        path.write_text(json.dumps(spec(**overrides)))
        return str(path)


@pytest.fixture
def service(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    s = Service(tmp_path, monkeypatch)
    s.dispatcher.start()
    try:
        yield s
    finally:
        s.dispatcher.shutdown()


def shardgrad(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def submitted_id(out: str) -> str:
    first = out.splitlines()[0]
    assert first.startswith("submitted "), out
    return first.split()[1]


def test_submit_jobs_status_cancel_resume(service, capsys):
    code, out, _ = shardgrad(capsys, "submit", service.spec_file())
    job_id = submitted_id(out)
    assert code == 0 and f"submitted {job_id} (moons): queued" in out
    assert "the dispatcher is paused" in out
    second = submitted_id(shardgrad(capsys, "submit", service.spec_file(name="second"))[1])

    code, out, _ = shardgrad(capsys, "jobs")
    header, *rows = out.splitlines()
    assert code == 0 and header == header.rstrip()
    assert header.split() == ["ID", "NAME", "STATUS", "PROGRESS", "LOSS", "ATTEMPTS", "CREATED"]
    assert [r.split()[:3] for r in rows] == [
        [second, "second", "queued"],
        [job_id, "moons", "queued"],
    ]
    assert "#2 in queue" in rows[0] and "#1 in queue" in rows[1]
    code, out, _ = shardgrad(capsys, "jobs", "--status", "running")
    assert code == 0 and out.splitlines()[1:] == []
    code, out, _ = shardgrad(capsys, "jobs", "--limit", "1")
    assert len(out.splitlines()) == 3 and out.splitlines()[-1] == "(more: --limit 2)"

    code, out, _ = shardgrad(capsys, "status", job_id)
    assert code == 0 and out.startswith(f"{job_id}  moons  queued  (attempts 0)")
    assert "queue position 1: the dispatcher is paused" in out and "queued     #0  submitted" in out

    assert shardgrad(capsys, "cancel", job_id)[:2] == (0, f"{job_id}: cancelled\n")
    code, _, err = shardgrad(capsys, "cancel", job_id)
    assert code == 1 and err.startswith("error: 409 Conflict:") and "only queued or running" in err
    assert shardgrad(capsys, "resume", job_id)[:2] == (0, f"{job_id}: queued\n")
    code, out, _ = shardgrad(capsys, "status", job_id)
    assert "cancelled while queued" in out and "resume requested" in out


def test_status_shows_training_health_warnings(service, capsys):
    code, out, _ = shardgrad(capsys, "submit", service.spec_file())
    job_id = submitted_id(out)
    assert len(service.store.claim("owner", lambda job: True)) == 1
    message = "layers.0: 100% of its ReLU units are zero on the whole batch"
    warning = {"kind": "dead", "layer": "layers.0", "message": message}
    health = {"step": 20, "layers": [], "warnings": [warning | {"first_step": 1, "last_step": 20}]}
    service.store.progress(job_id, "owner", {"health": health})
    code, out, _ = shardgrad(capsys, "status", job_id)
    assert code == 0 and f"  warning (dead, from step 1): {message}" in out.splitlines()


@pytest.mark.timeout(60)
def test_submit_follow_until_succeeded(service, capsys):
    service.resume_dispatching()
    code, out, err = shardgrad(capsys, "submit", service.spec_file(), "--follow")
    job_id = submitted_id(out)
    assert code == 0, err
    # The progress bar (stderr) and the final job (stdout).
    assert f"{job_id}  moons  succeeded  (attempts 1)" in out
    assert "step 12/12" in out and "train_loss: 0.0833333" in out
    assert "12/12" in err and "succeeded" in err
    job = service.store.get(job_id)
    assert job.status == "succeeded" and job.step == 12


@pytest.mark.timeout(60)
def test_submit_follow_of_a_failing_job_exits_1(service, capsys):
    service.resume_dispatching()
    code, out, _ = shardgrad(capsys, "submit", service.spec_file(name="boom"), "--follow")
    assert code == 1
    assert "boom  failed  (attempts 1)" in out and "error: diverged at step 1" in out


@pytest.mark.timeout(60)
def test_cancel_a_running_job_and_resume_it(service, capsys):
    service.dispatcher._train = fake_train(steps=10_000, pause=0.01)
    service.resume_dispatching()
    job_id = submitted_id(shardgrad(capsys, "submit", service.spec_file())[1])
    events = service.client().events(job_id)
    assert next(kind for kind, data in events if data.get("status") == "running")
    assert shardgrad(capsys, "cancel", job_id)[:2] == (0, f"{job_id}: cancelling\n")
    assert next(data for kind, data in events if kind == "end")["status"] == "cancelled"
    assert shardgrad(capsys, "resume", job_id)[:2] == (0, f"{job_id}: queued\n")


def checkpointed_job(service, capsys, command: str):
    """A submitted job: `command` is refused before its first checkpoint, which is then
    written (the model as built, step 5). Returns the job's id and the model."""
    job_id = submitted_id(shardgrad(capsys, "submit", service.spec_file())[1])
    code, _, err = shardgrad(capsys, command, job_id, "--input", "0.1,0.2")
    assert code == 1 and "409 Conflict" in err and "no checkpoint yet" in err
    model = build_model(TrainingSpec.model_validate(spec()))
    out_dir = service.tmp_path / "jobs" / job_id
    save_checkpoint(out_dir, 5, model.state_dict(), {"state": {}}, {"step": 5})
    return job_id, model


def test_predict(service, capsys):
    job_id, model = checkpointed_job(service, capsys, "predict")
    code, out, _ = shardgrad(capsys, "predict", job_id, "--input", "0.1,0.2", "--input=-1,0.5")
    assert code == 0
    rows = np.array([[float(v) for v in line.split(",")] for line in out.splitlines()])
    from core import Tensor, no_grad

    with no_grad():
        expected = model(Tensor(np.array([[0.1, 0.2], [-1.0, 0.5]]))).data
    np.testing.assert_allclose(rows, expected, rtol=1e-5)  # printed with 6 digits

    code, _, err = shardgrad(capsys, "predict", job_id, "--input", "0.1")
    assert (
        code == 1 and "422" in err and "inputs.0: row 0 has 1 values but the model takes 2" in err
    )
    code, _, err = shardgrad(capsys, "predict", job_id, "--input", "a,b")
    assert code == 1 and "--input must be comma-separated numbers" in err


def test_explain_and_graph(service, capsys):
    job_id, _ = checkpointed_job(service, capsys, "explain")
    # A value that starts with a minus follows its option after a space, too.
    rows = ["--input", "-1,0.5", "--input", "0.3,-0.2", "--baseline", "-.5,0"]
    argv = ["explain", job_id, *rows, "--method", "integrated_gradients"]
    code, out, err = shardgrad(capsys, *argv, "--json")
    assert code == 0, err
    body = {"inputs": [[-1, 0.5], [0.3, -0.2]], "baseline": [-0.5, 0]}
    body["method"] = "integrated_gradients"
    result = service.http.post(f"/jobs/{job_id}/explain", json=body).json()
    assert json.loads(out) == result

    code, out, _ = shardgrad(capsys, *argv)
    assert code == 0
    title, *lines = out.splitlines()
    assert title == f"{job_id}: integrated_gradients from checkpoint step-5"
    scale = np.abs(result["attributions"]).max()
    for i, (outputs, attributions, gap) in enumerate(
        zip(result["outputs"], result["attributions"], result["completeness_gap"], strict=True)
    ):
        head, *bars, tail = lines[4 * i : 4 * i + 4]
        target = int(np.argmax(outputs))
        assert head.startswith(f"row {i}  outputs [{outputs[0]:.6g}, {outputs[1]:.6g}]")
        assert head.endswith(f"target {target} (predicted) = {outputs[target]:.6g}")
        for k, (line, a) in enumerate(zip(bars, attributions, strict=True)):
            label, value, chart = line.split()
            assert (label, value) == (f"x{k}", f"{a:+.4g}")
            assert set(chart) <= set("█▏▎▍▌▋▊▉") and abs(len(chart) - 30 * abs(a) / scale) <= 1
        assert tail == f"  completeness gap {gap:+.3g}"
    assert "█" * 30 in out and len(lines) == 8

    code, out, _ = shardgrad(capsys, "explain", job_id, "--input", "0.1,0.2", "--target", "1")
    assert code == 0 and "target 1 = " in out and "completeness gap" not in out
    code, _, err = shardgrad(capsys, "explain", job_id, "--input", "0.1,0.2", "--target", "2")
    assert code == 1 and "422" in err and "target: target 2 is out of range" in err
    assert shardgrad(capsys, "predict", job_id, "--input", "-1,0.5")[0] == 0
    for command, flag, row, value in [  # refused before any request, without a traceback
        ("explain", "--input", 1, "nan,1"),
        ("explain", "--baseline", 0, "inf,0"),
        ("predict", "--input", 1, "1e400,2"),
    ]:
        argv = [command, job_id, "--input", "0.1,0.2", flag, value]
        code, _, err = shardgrad(capsys, *argv)
        assert code == 1 and err == f"error: {flag} row {row} is not all finite numbers: {value}\n"

    code, out, _ = shardgrad(capsys, "graph", job_id)
    graph = json.loads(out)
    assert code == 0 and graph["nodes"][graph["root"]]["operation"] == "cross_entropy"
    code, out, _ = shardgrad(capsys, "graph", job_id, "--format", "dot")
    assert code == 0 and out.startswith("digraph") and out.count(" -> ") == 7


def test_errors_are_readable(service, capsys):
    code, _, err = shardgrad(capsys, "status", "nope")
    assert code == 1 and err == "error: 404 Not Found:\nno job 'nope'\n"

    bad = service.spec_file(name="bad", optimizer={"type": "sgd", "lr": -1})
    code, _, err = shardgrad(capsys, "submit", bad)
    assert code == 1 and err.startswith("error: 422 Unprocessable")
    assert "optimizer.sgd.lr: Input should be greater than 0" in err

    files = service.spec_file(name="files", data={"type": "file", "path": "/etc/passwd.csv"})
    code, _, err = shardgrad(capsys, "submit", files)
    assert code == 1 and "file datasets are disabled on this server" in err

    code, _, err = shardgrad(capsys, "submit", str(service.tmp_path / "missing.json"))
    assert code == 1 and err.startswith("error: cannot read")


def test_every_client_command_prints_one_json_document(service, capsys):
    def answer(*argv) -> dict:
        code, out, err = shardgrad(capsys, *argv, "--json")
        assert code == 0, err
        return json.loads(out)

    job = answer("submit", service.spec_file())
    assert job["status"] == "queued" and job["pending_reason"]
    job_id = job["id"]
    assert answer("status", job_id) == service.http.get(f"/jobs/{job_id}").json()
    page = answer("jobs", "--limit", "1")
    assert [j["id"] for j in page["items"]] == [job_id] and page["next_cursor"] is None
    assert answer("cancel", job_id)["status"] == "cancelled"
    assert answer("resume", job_id)["status"] == "queued"
    checkpoint = {"state": {}}, {"step": 5}
    model = build_model(TrainingSpec.model_validate(spec()))
    save_checkpoint(service.tmp_path / "jobs" / job_id, 5, model.state_dict(), *checkpoint)
    body = {"inputs": [[-1.0, 0.5]]}
    expected = service.http.post(f"/jobs/{job_id}/predict", json=body).json()
    assert answer("predict", job_id, "--input", "-1,0.5") == expected
    graph = answer("graph", job_id, "--format", "dot")  # --json wins: one JSON document
    assert graph == service.http.get(f"/jobs/{job_id}/graph").json()
    assert answer("schema") == TrainingSpec.model_json_schema()


def test_negative_rows_are_values_in_any_position():
    argv = ["explain", "j", "--input", "-1,0.5", "--baseline", "-.5,0", "--target", "-1"]
    assert cli.join_negative_rows(argv) == [
        *["explain", "j", "--input=-1,0.5", "--baseline=-.5,0", "--target", "-1"]
    ]
    args = cli.build_parser().parse_args(cli.join_negative_rows(argv))
    assert (args.input, args.baseline, args.target) == (["-1,0.5"], ["-.5,0"], -1)


# -- submit --follow over a stream that drops ----------------------------------------------------


def sse(kind: str, data: dict, event_id: int) -> bytes:
    return f"event: {kind}\nid: {event_id}\ndata: {json.dumps(data)}\n\n".encode()


def job_json(status: str, step: int) -> dict:
    progress = {"step": step, "total_steps": 12, "epoch": step // 6, "eta_s": None}
    job = {"id": "j1", "name": "moons", "status": status, "attempts": 1, "progress": progress}
    return job | {"metrics": {"train_loss": 1 / (step + 1)}, "queue_position": None}


def stream_events(status: str, step: int, last_id: int) -> list[bytes]:
    """What the service sends on each connection: status and progress afresh, the metric
    points after `last_id` (each event's id is the step of the last point sent so far)."""
    job = job_json(status, step)
    progress = {k: job[k] for k in ("status", "progress", "metrics")}
    points = [{"step": s, "train_loss": 1 / s} for s in range(max(last_id, 0) + 1, step + 1)]
    return [
        sse("status", job, last_id),
        sse("progress", progress, last_id),
        sse("metrics", {"job_id": "j1", "points": points}, step),
    ]


class Stream(httpx.SyncByteStream):
    """A response body of `chunks`, then `error` raised (a dropped connection) if given."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None):
        self.chunks, self.error = chunks, error

    def __iter__(self):
        yield from self.chunks
        if self.error is not None:
            raise self.error


class DroppingService:
    """POST /jobs, GET /jobs/j1, and j1's event stream, one scripted answer per connection:
    each either a list of events and how it ends, or an exception (refused)."""

    def __init__(self, connections: list):
        self.connections = connections
        self.last_event_ids: list[str | None] = []
        self.delays: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        if path == "/jobs":
            return httpx.Response(201, json=job_json("queued", 0))
        if path == "/jobs/j1":
            return httpx.Response(200, json=job_json("succeeded", 12) | {"events": []})
        self.last_event_ids.append(request.headers.get("Last-Event-ID"))
        answer = self.connections[len(self.last_event_ids) - 1]
        if isinstance(answer, Exception):
            raise answer
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, stream=Stream(*answer))

    def client(self, url=None) -> Client:
        client = Client("http://testserver")
        client.http = httpx.Client(
            base_url="http://testserver/api/v1", transport=httpx.MockTransport(self)
        )
        client.reconnect = Reconnect(sleep=self.delays.append)
        return client


def test_submit_follow_resumes_a_dropped_stream_after_the_last_event_id(
    monkeypatch, tmp_path, capsys
):
    end = [sse("end", {"job_id": "j1", "status": "succeeded"}, 12)]
    served = DroppingService(
        [
            (stream_events("running", 3, -1), httpx.RemoteProtocolError("peer closed")),
            (stream_events("running", 8, 3), None),  # ends without an `end` event
            httpx.ConnectError("connection refused"),  # the service is restarting
            (stream_events("running", 10, 8), httpx.ReadError("connection reset")),
            (stream_events("succeeded", 12, 10) + end, None),
        ]
    )
    monkeypatch.setattr(cli, "Client", served.client)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec()))
    code, out, err = shardgrad(capsys, "submit", str(spec_file), "--follow")
    assert code == 0, err
    assert served.last_event_ids == [None, "3", "8", "8", "10"]
    # Backoff doubles over tries in a row without an event, and starts again after one.
    assert served.delays == [0.5, 0.5, 1.0, 0.5]
    assert "j1  moons  succeeded  (attempts 1)" in out and "12/12" in err


def test_submit_follow_gives_up_after_bounded_reconnects(monkeypatch, tmp_path, capsys):
    first = (stream_events("running", 3, -1), httpx.ReadError("connection reset"))
    served = DroppingService([first] + [httpx.ConnectError("connection refused")] * 5)
    monkeypatch.setattr(cli, "Client", served.client)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec()))
    code, out, err = shardgrad(capsys, "submit", str(spec_file), "--follow")
    assert code == 1 and out.startswith("submitted j1 (moons): queued")
    assert served.last_event_ids == [None, "3", "3", "3", "3", "3"]
    assert served.delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert err.splitlines()[-1] == (
        "error: lost the event stream from http://testserver: connection refused "
        "(gave up after 5 reconnects without an event)"
    )


def test_unreachable_service(monkeypatch, capsys):
    monkeypatch.delenv("SHARDGRAD_URL", raising=False)
    code, _, err = shardgrad(capsys, "jobs", "--url", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach the service at http://127.0.0.1:9" in err
