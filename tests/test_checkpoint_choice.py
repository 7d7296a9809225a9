"""Choosing a job's checkpoint (issue 17): predict, explain, graph, downloads and the CLI's
--checkpoint answer from "best", "latest" or "step-N", by default the best when the job
keeps one. Checkpoints are written directly into a submitted job's directory (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load

from core import Tensor, no_grad
from service import cli
from service.client import Client
from tests.fakes import make_client, spec, submit
from workers.checkpoint import save_checkpoint
from workers.model import build_model
from workers.spec import TrainingSpec

ROWS = [[-1.0, 0.5], [1.0, 0.0], [0.5, -0.4]]


@pytest.fixture
def job(tmp_path):
    """A job with checkpoints at steps 1, 2 and 3 (different weights), step 2 the best."""
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    out = tmp_path / "jobs" / job_id
    model = build_model(TrainingSpec.model_validate(spec()))
    for step in (1, 2, 3):
        state = {k: v + step for k, v in model.state_dict().items()}
        save_checkpoint(out, step, state, {"state": {}}, {"step": step})
    best = {"step": 2, "checkpoint": "step-2", "metric": "val_loss", "mode": "min", "value": 0.1}
    (out / "best.json").write_text(json.dumps(best))
    return client, f"/api/v1/jobs/{job_id}", out


def outputs_of(client, url, name: str) -> np.ndarray:
    """The engine's outputs with the weights downloaded from checkpoint `name`."""
    r = client.get(f"{url}/weights", params={"checkpoint": name})
    assert r.status_code == 200, r.text
    model = build_model(TrainingSpec.model_validate(spec()))
    model.load_state_dict(load(r.content))
    with no_grad():
        return model(Tensor(np.array(ROWS))).data


def predict(client, url, **body):
    return client.post(f"{url}/predict", json={"inputs": ROWS, **body})


@pytest.mark.parametrize(
    ("asked", "answered"), [(None, "step-2"), ("best", "step-2"), ("latest", "step-3")]
)
def test_predict_answers_from_the_checkpoint_asked_for(job, asked, answered):
    client, url, _ = job
    r = predict(client, url, **({"checkpoint": asked} if asked else {}))
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"] == answered
    np.testing.assert_array_equal(r.json()["outputs"], outputs_of(client, url, answered))


def test_every_route_takes_the_checkpoint(job):
    client, url, _ = job
    r = client.get(f"{url}/weights")
    assert r.headers["x-checkpoint"] == "step-2" and "step-2" in r.headers["content-disposition"]
    assert r.content == client.get(f"{url}/checkpoints/step-2/model.safetensors").content
    assert client.get(f"{url}/graph").headers["x-checkpoint"] == "step-2"
    assert client.get(f"{url}/graph?checkpoint=step-1").headers["x-checkpoint"] == "step-1"
    r = client.post(f"{url}/explain", json={"inputs": ROWS, "checkpoint": "latest"})
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"] == "step-3"
    assert predict(client, url, checkpoint="step-1").json()["checkpoint"] == "step-1"


def test_without_a_best_the_default_is_the_latest(job):
    client, url, out = job
    (out / "best.json").unlink()
    assert predict(client, url).json()["checkpoint"] == "step-3"
    r = predict(client, url, checkpoint="best")
    assert r.status_code == 404 and "keeps none" in r.json()["detail"]


def test_unknown_and_invalid_checkpoints(job):
    client, url, _ = job
    r = predict(client, url, checkpoint="step-9")
    assert r.status_code == 404 and "'step-9'" in r.json()["detail"]
    assert client.get(f"{url}/graph?checkpoint=step-9").status_code == 404
    assert client.get(f"{url}/weights?checkpoint=step-9").status_code == 404
    for bad in ("newest", "step-02"):
        r = predict(client, url, checkpoint=bad)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "checkpoint"]
        for route in ("graph", "weights"):
            r = client.get(f"{url}/{route}?checkpoint={bad}")
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "checkpoint"]


def test_cli_checkpoint_flag(job, monkeypatch, capsys):
    client, url, _ = job
    job_id = url.rsplit("/", 1)[1]

    def connected(url=None) -> Client:
        c = Client("http://testserver")
        c.http = client
        c.http.base_url = "http://testserver/api/v1"
        return c

    monkeypatch.setattr(cli, "Client", connected)
    rows = [f"--input={','.join(map(str, row))}" for row in ROWS]
    for command in ("predict", "explain"):
        assert cli.main([command, job_id, *rows, "--checkpoint", "step-1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["checkpoint"] == "step-1"
    assert cli.main(["predict", job_id, *rows, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "step-2"
    assert cli.main(["graph", job_id, "--checkpoint", "nope"]) == 1
    assert "checkpoint" in capsys.readouterr().err
