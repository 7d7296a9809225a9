"""Issue 16 item 8, and the cap on event streams: an empty token is a start-up error, the
schema declares the bearer scheme where it applies, without a token only loopback Host names
are answered, cross-site requests cannot change state, and streams past the cap get a 503."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.config import Settings
from tests.fakes import make_client, submit
from tests.helpers import REPO, wait_for

TOKEN = "s3cret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


# -- the token ---------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_token_is_a_settings_error(tmp_path, empty):
    with pytest.raises(ValidationError, match="set a token or unset the variable"):
        Settings(data_dir=tmp_path, api_token=empty)


def test_serve_refuses_to_start_with_an_empty_token(tmp_path):
    env = {"PYTHONPATH": str(REPO), "SHARDGRAD_API_TOKEN": "", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "service", "serve", "--data-dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "error: SHARDGRAD_API_TOKEN is empty: set a token or unset the variable"
    )


def test_deploy_env_example_does_not_hand_out_an_empty_token():
    lines = (REPO / "deploy" / "env.example").read_text().splitlines()
    assert not [line for line in lines if line.strip() == "SHARDGRAD_API_TOKEN="]


# -- the OpenAPI document --------------------------------------------------------------------


def operations(schema: dict):
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def test_with_a_token_the_api_routes_declare_the_bearer_scheme_and_their_401(tmp_path):
    client, _, _ = make_client(tmp_path, api_token=TOKEN)
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "SHARDGRAD_API_TOKEN, when it is set",
    }
    api = [(p, m, op) for p, m, op in operations(schema) if p.startswith("/api/v1/")]
    assert len(api) > 10
    for path, method, op in api:
        assert op["security"] == [{"HTTPBearer": []}], (method, path)
        assert "401" in op["responses"], (method, path)
        names = [p["name"].lower() for p in op.get("parameters", [])]
        assert "authorization" not in names, (method, path)  # a scheme, not a header parameter
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_without_a_token_the_schema_claims_no_security(tmp_path):
    client, _, _ = make_client(tmp_path)
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    for path, method, op in operations(schema):
        assert "security" not in op and "401" not in op["responses"], (method, path)
    events = schema["paths"]["/api/v1/events"]["get"]
    assert "token" not in [p["name"] for p in events.get("parameters", [])]


# -- Host names (DNS rebinding) ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8000", "[::1]:8000", "app.localhost"])
def test_without_a_token_loopback_hosts_are_answered(tmp_path, host):
    client, _, _ = make_client(tmp_path, allowed_hosts=[])
    assert client.get("/api/v1/jobs", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "10.0.0.5"])
def test_without_a_token_other_hosts_are_refused(tmp_path, host):
    client, _, _ = make_client(tmp_path, allowed_hosts=[])
    r = client.get("/api/v1/jobs", headers={"Host": host})
    assert r.status_code == 400 and r.text == "Invalid host header"
    assert client.get("/healthz", headers={"Host": host}).status_code == 400


def test_allowed_hosts_come_from_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_ALLOWED_HOSTS", "shardgrad.lan, *.corp.example")
    settings = Settings(data_dir=tmp_path)
    assert settings.allowed_hosts == ["shardgrad.lan", "*.corp.example"]
    client, _, _ = make_client(tmp_path, allowed_hosts=settings.allowed_hosts)
    for host in ("shardgrad.lan:8000", "gpu1.corp.example", "localhost"):
        assert client.get("/api/v1/jobs", headers={"Host": host}).status_code == 200, host
    assert client.get("/api/v1/jobs", headers={"Host": "other.lan"}).status_code == 400


def test_with_a_token_any_host_is_answered(tmp_path):
    client, _, _ = make_client(tmp_path, api_token=TOKEN, allowed_hosts=[])
    r = client.get("/api/v1/jobs", headers={"Host": "shardgrad.example.com", **BEARER})
    assert r.status_code == 200


# -- Origin (CSRF) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin", ["http://attacker.example", "null", "http://localhost:9999", "not a url"]
)
def test_a_cross_site_request_cannot_change_state(tmp_path, origin):
    client, store, _ = make_client(tmp_path)
    job_id = submit(client)["id"]  # no Origin: curl, the CLI
    local = {"Host": "localhost:8000", "Origin": origin}
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=local)
    assert r.status_code == 403 and "cross-site request refused" in r.json()["detail"]
    assert store.get(job_id).status == "queued"
    r = client.post("/api/v1/jobs", json={}, headers=local)
    assert r.status_code == 403
    assert client.get(f"/api/v1/jobs/{job_id}", headers=local).status_code == 200  # reads: CORS


def test_the_dashboards_own_origin_may_change_state(tmp_path):
    client, store, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    same = {"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"}
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=same).status_code == 200
    assert store.get(job_id).status == "cancelled"


def test_a_token_does_not_make_a_cross_site_request_acceptable(tmp_path):
    client, _, _ = make_client(tmp_path, api_token=TOKEN)
    r = client.post("/api/v1/jobs", json={}, headers={"Origin": "https://x.example", **BEARER})
    assert r.status_code == 403


# -- the cap on event streams ----------------------------------------------------------------


def test_event_streams_past_the_cap_get_503_with_retry_after(tmp_path):
    client, store, _ = make_client(
        tmp_path, store_url=f"sqlite:///{tmp_path / 'jobs.db'}", max_sse_connections=1
    )
    slots = client.app.state.streams
    job_id = submit(client)["id"]
    client.post(f"/api/v1/jobs/{job_id}/cancel")  # a job stream ends by itself
    with client.stream("GET", "/api/v1/events") as held:
        assert held.status_code == 200 and slots.open == 1
        for path in ("/api/v1/events", f"/api/v1/jobs/{job_id}/events"):
            r = client.get(path)
            assert r.status_code == 503 and r.headers["Retry-After"] == "5", path
            assert "SHARDGRAD_MAX_SSE_CONNECTIONS" in r.json()["detail"]
    wait_for(lambda: slots.open == 0, timeout=30)  # the closed stream gave its slot back
    assert client.get(f"/api/v1/jobs/{job_id}/events").status_code == 200
    assert slots.open == 0


def test_a_refused_stream_request_holds_no_slot(tmp_path):
    client, _, _ = make_client(tmp_path, max_sse_connections=1)
    slots = client.app.state.streams
    assert client.get("/api/v1/jobs/nope/events").status_code == 404
    job_id = submit(client)["id"]
    r = client.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
    assert r.status_code == 422
    assert slots.open == 0
