"""Issue 16 item 9: schemathesis, every check, against a live `shardgrad serve` (paused: jobs
are validated, stored and queued, none runs) in two configurations: with an API token, and
without one. Zero failures, except the ones listed in EXCEPTIONS, each with its reason.

The run is schemathesis' own CLI (`st run`, all phases: coverage, fuzzing, stateful), and
its JSON report is checked here. A failure it finds prints its curl reproduction in the
test's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Server, require, small_moons

pytestmark = pytest.mark.slow

TOKEN = "schemathesis-token"

# (failure code, operation): why it is not a bug. ST202 is "a request valid by the schema
# was rejected": JSON Schema describes each field alone, not rules across fields or what
# only the server knows.
EXCEPTIONS = {
    ("ST202", "POST /api/v1/jobs"): (
        "cross-field rules of the TrainingSpec: model.sizes[0] must equal the dataset's "
        "feature count and the last size its class count, the loss must suit the task, "
        "workers x cpus_per_worker must fit the cluster"
    ),
    ("ST202", "POST /api/v1/sweeps"): (
        "the base TrainingSpec's cross-field rules (as for POST /jobs), checked with every "
        "value a parameter may take; a dotted path must name a field of the base spec; "
        "parallel trials must fit the cluster and SHARDGRAD_MAX_CONCURRENT_JOBS"
    ),
    ("ST202", "POST /api/v1/datasets"): (
        "the file's type comes from its name (.csv or .npz) and its content (a header row, "
        "arrays X and y), which a multipart body's schema cannot express"
    ),
    ("ST202", "POST /api/v1/jobs/{job_id}/predict"): (
        "each row must be as wide as the job's model takes (its model.sizes[0]), and an "
        "image as its input_shape, which the job's spec fixes, not the schema"
    ),
    ("ST202", "POST /api/v1/jobs/{job_id}/explain"): (
        "rows as wide as the job's model takes, a target below its output count, a baseline "
        "as wide as the rows (or one per row), rows x steps x width within the cost cap"
    ),
    ("ST202", "POST /api/v1/jobs/{job_id}/generate"): (
        "only a transformer job generates, and only from characters of its data's "
        "vocabulary, which the job's spec fixes (the job here is an MLP's: a 422)"
    ),
    ("ST202", "POST /api/v1/jobs/{job_id}/attention"): (
        "only a transformer job has attention, over a prompt of its data's vocabulary and "
        "at most its context long, which the job's spec fixes (the job here is an MLP's: a 422)"
    ),
    ("ST202", "GET /api/v1/compare"): (
        "`ids` must name existing jobs, each once (the pattern allows `a,a`), none of them "
        "blank once trimmed"
    ),
    ("ST202", "GET /api/v1/jobs"): (
        "`cursor` is opaque: only the strings the server handed out as next_cursor are "
        "cursors, which no schema can enumerate"
    ),
}

# Not run: the event streams. GET /events lasts as long as the client stays, and a job's (or
# a sweep's) stream as long as the job (queued for ever on a paused server), with a ping
# every 15 s, so no response ever ends to be checked (tests/test_service_api.py and
# tests/test_sweeps.py check their events). A
# job's logs are one of them with follow=true (tests/test_logs.py checks them).
EXCLUDED_PATHS = r"/(events|logs)$"


# The routes under /jobs/{job_id} get a job that exists (queued: the server is paused), else
# they would only ever answer 404.
JOB_ROUTES = (
    r"^/api/v1/jobs/\{job_id\}"
    r"(/(cancel|resume|metrics|checkpoints|predict|explain|generate|attention|graph|filters|samples))?$"
)


def config_file(server: Server, token: str | None, folder: Path) -> Path:
    with server.client(token) as client:
        created = client.post("/jobs", json=small_moons(name="schemathesis"))
        assert created.status_code == 201, created.text
    config = folder / "schemathesis.toml"
    config.write_text(  # a TOML literal string: the regex as it is
        f"[[operations]]\ninclude-path-regex = '{JOB_ROUTES}'\n"
        f'parameters = {{ job_id = "{created.json()["id"]}" }}\n'
    )
    return config


def run_schemathesis(server: Server, report: Path, config: Path, *headers: str) -> dict:
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run"]
    cmd += [f"{server.url}/openapi.json"]
    cmd += ["--checks", "all", "--exclude-path-regex", EXCLUDED_PATHS]
    cmd += ["--max-examples", "15", "--seed", "16", "--workers", "1", "--no-color"]
    cmd += ["--request-timeout", "30", "--generation-database", "none"]
    cmd += ["--report", "json", "--report-json-path", str(report)]
    for header in headers:
        cmd += ["--header", header]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=report.parent)
    print(done.stdout[-20_000:], done.stderr[-5_000:])  # the failures, with curl commands
    assert report.exists(), f"schemathesis wrote no report (exit {done.returncode})"
    return json.loads(report.read_text())


def unexpected(result: dict) -> list[str]:
    found = [
        f"{failure['code']} {failure['title']}: {operation}"
        for failure in result["failures"]
        for operation in failure["operations"]
        if (failure["code"], operation) not in EXCEPTIONS
    ]
    return found + [f"error: {error}" for error in result["errors"]]


@pytest.mark.parametrize("token", [TOKEN, None], ids=["token", "no-token"])
def test_the_live_api_passes_every_schemathesis_check(tmp_path, token):
    require("schemathesis")
    env = {"SHARDGRAD_PAUSED": "true"}
    if token:
        env["SHARDGRAD_API_TOKEN"] = token
    server = Server(tmp_path / "var", **env).start()
    try:
        server.wait_ready()
        headers = [f"Authorization: Bearer {token}"] if token else []
        config = config_file(server, token, tmp_path)
        result = run_schemathesis(server, tmp_path / "report.json", config, *headers)
    finally:
        server.stop()
    assert result["operations"]["tested"] >= 14
    assert result["complete"], result["stop_reason"]
    assert unexpected(result) == []
