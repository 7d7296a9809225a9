"""Hostile and careless input (issue 16): every request bounded, never a 500.

Sections: admission limits and error echoes; dataset uploads (bombs, lying headers);
predict and explain costs; the event loop under the worst body."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.fakes import locs, make_client, spec

JOBS = "/api/v1/jobs"


@pytest.fixture
def client(tmp_path, monkeypatch):
    """The app with a fake dispatcher; a server error is answered (500), not raised."""
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    app = make_client(tmp_path)[0].app
    return TestClient(app, raise_server_exceptions=False)


def post_raw(client, url: str, body: str | bytes):
    """`body` exactly as given (json= would refuse a lone surrogate or re-encode numbers)."""
    return client.post(url, content=body, headers={"content-type": "application/json"})


def errors_of(r) -> list[dict]:
    assert r.status_code == 422, r.text
    return r.json()["detail"]


def message(r, loc: tuple) -> str:
    return next(e["msg"] for e in errors_of(r) if tuple(e["loc"]) == loc)


# -- abuse-input: the table, admission limits and error echoes --------------------


def test_a_lone_surrogate_is_422_and_escaped_in_the_echo(client):
    body = json.dumps(spec(name="\ud800"))  # json.dumps writes it as the escape \\ud800
    r = post_raw(client, JOBS, body)
    (error,) = errors_of(r)
    assert tuple(error["loc"]) == ("body", "name") and error["input"] == "\\ud800"


def test_integers_beyond_64_bits_are_422(client):
    body = json.dumps(spec(workers=10**309, batch_size=10**309))
    r = post_raw(client, JOBS, body)
    assert {("body", "workers"), ("body", "batch_size")} <= set(map(tuple, locs(r)))
    assert len(r.content) < 4000  # the 310-digit inputs are echoed cut short


def test_floats_beyond_float64_are_422(client):
    body = json.dumps(spec()).replace('"lr": 0.1', '"lr": 1e400')
    assert '"lr": 1e400' in body
    assert ("body", "optimizer", "sgd", "lr") in locs(post_raw(client, JOBS, body))
    body = json.dumps(spec()).replace('"lr": 0.1', f'"lr": {10**400}')
    assert ("body", "optimizer", "sgd", "lr") in locs(post_raw(client, JOBS, body))


def test_a_cursor_beyond_64_bits_is_422(client):
    r = client.get(JOBS, params={"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OTk"})
    assert locs(r) == [("query", "cursor")]
    assert client.get(JOBS, params={"cursor": "LTE"}).status_code == 422  # "-1"


def test_a_megabyte_of_layer_widths_is_refused_briefly(client):
    body = spec(model={"type": "mlp", "sizes": [0] * 400_000})
    r = client.post(JOBS, json=body)
    assert locs(r) == [("body", "model", "mlp", "sizes")]
    assert "at most 1000" in r.text and len(r.content) < 2000


def test_the_error_list_is_capped_with_a_count_of_the_rest(client):
    body = spec() | {f"extra_{i}": i for i in range(100)}
    detail = errors_of(client.post(JOBS, json=body))
    assert len(detail) == 21
    assert detail[-1]["type"] == "too_many_errors" and "80 more errors" in detail[-1]["msg"]


def test_echoed_inputs_are_cut_short(client):
    r = client.post(JOBS, json=spec(name="x" * 100_000))
    (error,) = errors_of(r)
    assert error["input"].startswith("xxx") and "99920 more characters" in error["input"]
    r = post_raw(client, JOBS, json.dumps([list(range(1000))] * 100))
    assert len(r.content) < 2000


def test_a_process_bomb_of_workers_is_refused_by_the_workers_limit(client):
    r = client.post(JOBS, json=spec(workers=5000, cpus_per_worker=0.0002, batch_size=5000))
    assert "SHARDGRAD_MAX_WORKERS" in message(r, ("body", "workers"))
    assert "5,000, over the limit of 64" in message(r, ("body", "workers"))


def test_cpus_per_worker_is_in_rays_steps_of_a_ten_thousandth(client):
    r = client.post(JOBS, json=spec(cpus_per_worker=0.00015))
    assert "multiple of 0.0001" in message(r, ("body", "cpus_per_worker"))
    assert locs(client.post(JOBS, json=spec(cpus_per_worker=0.00001))) == [
        ("body", "cpus_per_worker")
    ]
    assert client.post(JOBS, json=spec(cpus_per_worker=0.0003)).status_code == 201


def test_a_7_gb_model_is_refused_by_the_parameter_and_memory_limits(client):
    r = client.post(JOBS, json=spec(model={"type": "mlp", "sizes": [2, 30000, 30000, 2]}))
    msgs = [e["msg"] for e in errors_of(r)]
    assert any("900,180,002" in m and "SHARDGRAD_MAX_MODEL_PARAMS" in m for m in msgs)
    assert any("SHARDGRAD_MAX_JOB_MEMORY_BYTES" in m for m in msgs)


def test_the_memory_limit_counts_parameters_optimizer_state_and_data(tmp_path):
    client = make_client(tmp_path, max_job_memory_bytes=100_000)[0]
    sgd = spec(model={"type": "mlp", "sizes": [2, 8, 2]})
    assert client.post(JOBS, json=sgd).status_code == 201
    big = spec(model={"type": "mlp", "sizes": [2, 512, 2]})  # 2,562 parameters
    r = client.post(JOBS, json=big)
    assert "SHARDGRAD_MAX_JOB_MEMORY_BYTES" in message(r, ("body", "model", "mlp", "sizes"))


@pytest.mark.parametrize("priority", [2**63 - 1, 1001, -1001])
def test_priority_is_in_minus_1000_to_1000(client, priority):
    assert locs(client.post(JOBS, json=spec(priority=priority))) == [("body", "priority")]


def test_total_steps_and_kept_checkpoints_are_limited(tmp_path):
    client = make_client(tmp_path, max_total_steps=100, max_keep_checkpoints=5)[0]
    r = client.post(JOBS, json=spec(epochs=10**18, keep_checkpoints=6))
    assert "SHARDGRAD_MAX_TOTAL_STEPS" in message(r, ("body", "epochs"))
    assert "SHARDGRAD_MAX_KEEP_CHECKPOINTS" in message(r, ("body", "keep_checkpoints"))
    assert client.post(JOBS, json=spec(epochs=12, keep_checkpoints=5)).status_code == 201


def test_a_builtin_dataset_is_held_to_the_values_limit(tmp_path):
    client = make_client(tmp_path, max_dataset_values=1000)[0]
    r = client.post(JOBS, json=spec(data={"type": "builtin", "name": "moons", "n_samples": 400}))
    assert "SHARDGRAD_MAX_DATASET_VALUES" in message(r, ("body", "data", "builtin", "n_samples"))
