"""The Python client (`from shardgrad import Client`) against a live `shardgrad serve`."""

from __future__ import annotations

import json

import httpx
import pytest
from safetensors.numpy import load_file

from service import schemas, sweep_schemas
from shardgrad import Client, ClientError, Job, Sweep
from tests.helpers import Server, require, small_moons
from workers.checkpoint import checkpoint_dir, load_checkpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("client") / "data").start().wait_ready()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def trained(client) -> Job:
    """One small in-process job, trained once, read by the tests below."""
    return client.submit(small_moons(workers=0, name="client-test")).wait(timeout=120)


def test_submit_wait_and_read_a_job(client, trained, tmp_path):
    assert trained.status == "succeeded" and isinstance(trained.info, schemas.Job)
    total = trained.info.progress.total_steps
    assert trained.info.progress.step == total == 9  # 160 rows, batch 64, 3 epochs
    points = trained.metrics()
    assert [p.step for p in points] == list(range(1, total + 1))
    assert all(isinstance(p, schemas.MetricPoint) for p in points)
    assert points[-1].val_accuracy is not None
    assert client.job(trained.id).info == trained.info

    pd = require("pandas")
    frame = points.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == list(range(1, total + 1))
    assert frame["train_loss"].iloc[-1] == points[-1].train_loss

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(small_moons(workers=0, epochs=1, name="from-a-file")))
    assert client.submit(path).wait(timeout=120).status == "succeeded"


def test_predict_explain_download(server, client, trained, tmp_path):
    rows = [[0.5, -0.2], [-1.0, 0.3]]
    predicted = trained.predict(rows)
    assert isinstance(predicted, schemas.PredictResponse) and len(predicted.outputs) == 2
    explained = trained.explain(rows, method="integrated_gradients", steps=16)
    assert explained.outputs == predicted.outputs and len(explained.attributions[0]) == 2

    newest = trained.checkpoints()[-1]
    saved = trained.download(checkpoint=newest.name, path=tmp_path)
    assert saved == tmp_path / f"{trained.id}-{newest.name}-model.safetensors"
    run_dir = server.data_dir / "jobs" / trained.id
    weights = load_checkpoint(checkpoint_dir(run_dir, newest.name)).model_state
    assert load_file(saved).keys() == weights.keys()
    assert trained.download(newest.name, path=tmp_path / "w.st") == tmp_path / "w.st"

    with pytest.raises(ClientError) as err:
        trained.download("step-999", path=tmp_path)
    assert err.value.status_code == 404


def test_a_sweep_from_the_client(client):
    body = {
        "name": "client-sweep",
        "base": small_moons(workers=0, epochs=1, eval_every=2),
        "parameters": {"optimizer.lr": {"values": [0.05, 0.5]}},
        "trials": 2,
        "sampler": {"type": "grid", "seed": 0},
        "pruner": {"type": "none"},
    }
    sweep = client.sweep(body)
    assert isinstance(sweep, Sweep) and isinstance(sweep.info, sweep_schemas.Sweep)
    assert sweep.wait(timeout=180) is sweep and sweep.status == "finished"
    trials = sweep.trials()
    assert [t.state for t in trials] == ["succeeded", "succeeded"]
    assert sorted(t.params["optimizer.lr"] for t in trials) == [0.05, 0.5]
    best = sweep.best()
    assert best.value == min(t.value for t in trials) and best.best_step is not None
    job = sweep.best_job()
    assert job.info.tags == {"sweep": sweep.id, "trial": str(best.number)}
    assert job.info.spec["optimizer"]["lr"] == best.params["optimizer.lr"]
    assert {j.id for j in client.jobs(sweep=sweep.id)} == {t.job_id for t in trials}
    assert sweep.id in [s.id for s in client.sweeps()]

    body["parameters"] = {"optimizer.lrr": {"values": [0.1]}}
    with pytest.raises(ClientError) as err:
        client.sweep(body)
    assert err.value.status_code == 422
    assert err.value.errors[0]["loc"] == ("parameters", "optimizer.lrr")


def test_the_jobs_log(client, trained):
    text = trained.logs()
    assert "INFO workers.trainer: training from step 0 of 9, in-process" in text
    assert list(client.follow_logs(trained.id)) == text.splitlines()


def test_wait_times_out_cancel_stops(client):
    job = client.submit(small_moons(workers=0, epochs=10_000, name="long"))
    with pytest.raises(TimeoutError):
        job.wait(timeout=1.0)
    assert job.cancel().status in ("cancelling", "cancelled")
    assert job.wait(timeout=120).status == "cancelled"
    assert "stopped at step" in job.info.error
    newest = client.jobs(limit=1)
    assert [j.id for j in newest] == [job.id] and newest[0].info.status == "cancelled"


def test_errors_carry_the_fields(client):
    with pytest.raises(ClientError) as err:
        client.submit(small_moons(optimizer={"type": "sgd", "lr": -1}, epochs=0))
    assert err.value.status_code == 422
    locs = {e["loc"]: e["msg"] for e in err.value.errors}
    assert locs[("optimizer", "sgd", "lr")] == "Input should be greater than 0"
    assert locs[("epochs",)] == "Input should be greater than or equal to 1"
    with pytest.raises(ClientError) as err:
        client.job("nope")
    assert (err.value.status_code, err.value.errors) == (404, [])


def test_jobs_passes_filters_and_follows_pages():
    asked = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.params)
        page = int(request.url.params.get("cursor", "0"))
        more = page < 2
        return httpx.Response(
            200, json={"items": [], "next_cursor": str(page + 1) if more else None}
        )

    c = Client("http://testserver", token="secret")
    assert c.http.headers["Authorization"] == "Bearer secret"
    c.http = httpx.Client(
        base_url="http://testserver/api/v1", transport=httpx.MockTransport(answer)
    )
    assert c.jobs(tag={"team": "a", "sweep": "s1"}, sort="-val_accuracy", name="moons") == []
    assert len(asked) == 3 and [p.get("cursor") for p in asked] == [None, "1", "2"]
    assert asked[0].get_list("tag") == ["team:a", "sweep:s1"]
    assert (asked[0]["sort"], asked[0]["name"], asked[0]["limit"]) == (
        "-val_accuracy",
        "moons",
        "50",
    )
    assert "status" not in asked[0]
