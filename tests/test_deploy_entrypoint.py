"""deploy/docker-entrypoint.sh with a fake `ray`, `python` and `shardgrad` on PATH: it waits
for the Ray head (bounded, with a clear message), refuses placeholders, and runs KubeRay's
generated `ray start` under its own checks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parent.parent / "deploy" / "docker-entrypoint.sh"
TOKEN = "0123456789abcdef" * 4
HEAD = "shardgrad-ray-head-svc:6379"

# Logs every call; `ray health-check` and `python` fail while $FAKE_DIR/<name>-fails holds a
# positive count (one less each call) or "never".
FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_DIR/calls"
case "$(basename "$0") $1" in
"ray health-check" | "python -c")
    counter="$FAKE_DIR/$(basename "$0")-fails"
    left=$(cat "$counter" 2>/dev/null || echo 0)
    [ "$left" = never ] && exit 1
    if [ "$left" -gt 0 ]; then
        echo $((left - 1)) > "$counter"
        exit 1
    fi
    ;;
esac
exit 0
"""


def run(tmp_path: Path, role: str, fails: dict[str, str] | None = None, **env: str):
    """The entry point in `role` with fakes first on PATH; returns (process, calls)."""
    fake_dir = tmp_path / "fakes"
    fake_dir.mkdir(parents=True, exist_ok=True)
    for name in ("ray", "python", "shardgrad"):
        path = fake_dir / name
        path.write_text(FAKE)
        path.chmod(0o755)
    for name, count in (fails or {}).items():
        (fake_dir / f"{name}-fails").write_text(count)
    base = {
        "PATH": f"{fake_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_DIR": str(fake_dir),
        "RAY_ADDRESS": HEAD,
        "RAY_AUTH_TOKEN": TOKEN,
        "SHARDGRAD_WAIT_TIMEOUT_S": "60",
        "SHARDGRAD_WAIT_INTERVAL_S": "0.05",
    }
    proc = subprocess.run(
        ["sh", str(ENTRYPOINT), role],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = fake_dir / "calls"
    return proc, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("role", ["api", "ray-worker"])
def test_waits_for_the_head_then_starts(tmp_path, role):
    proc, calls = run(tmp_path, role, {"ray": "3"}, RAY_OBJECT_STORE_MEMORY="805306368")
    assert proc.returncode == 0, proc.stderr
    assert f"waiting for the Ray head at {HEAD}" in proc.stderr
    check = f"ray health-check --address {HEAD}"
    assert calls[:4] == [check] * 4  # three failures, then the head answers
    start = calls[4]
    assert start.startswith("ray start ") and f"--address={HEAD}" in start.split(), calls
    assert "--object-store-memory=805306368" in start
    if role == "api":
        assert "--num-cpus=0" in start
        assert calls[5:] == ["shardgrad serve --host 0.0.0.0 --port 8000"]
    else:
        assert "--block" in start and len(calls) == 5


def test_gives_up_on_a_head_that_never_answers(tmp_path):
    proc, calls = run(tmp_path, "api", {"ray": "never"}, SHARDGRAD_WAIT_TIMEOUT_S="1")
    assert proc.returncode == 69
    assert f"the Ray head at {HEAD} did not answer within 1 s" in proc.stderr
    assert "SHARDGRAD_WAIT_TIMEOUT_S" in proc.stderr
    assert calls and set(calls) == {f"ray health-check --address {HEAD}"}  # no ray start


def test_api_waits_for_postgres_after_the_head(tmp_path):
    url = f"postgresql+psycopg://shardgrad:{TOKEN}@shardgrad-postgres:5432/shardgrad"
    proc, calls = run(tmp_path, "api", {"python": "2"}, SHARDGRAD_DATABASE_URL=url)
    assert proc.returncode == 0, proc.stderr
    assert "waiting for the database" in proc.stderr
    kinds = [call.split(" ")[0] + " " + call.split(" ")[1] for call in calls]
    assert kinds == ["ray health-check"] + ["python -c"] * 3 + ["ray start", "shardgrad serve"]


PLACEHOLDER_URL = "postgresql+psycopg://shardgrad:{}@shardgrad-postgres:5432/shardgrad"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RAY_AUTH_TOKEN": ""}, "no RAY_AUTH_TOKEN"),
        ({"RAY_AUTH_TOKEN": "change-me-ray-token"}, "change-me placeholder tokens"),
        ({"SHARDGRAD_API_TOKEN": "change-me-api-token"}, "change-me placeholder tokens"),
        ({"SHARDGRAD_DATABASE_URL": PLACEHOLDER_URL.format("change-me")}, "DATABASE_URL"),
        ({"SHARDGRAD_DATABASE_URL": PLACEHOLDER_URL.format("<password>")}, "DATABASE_URL"),
        # The password's Secret key is missing: Kubernetes leaves the reference as is.
        (
            {"SHARDGRAD_DATABASE_URL": PLACEHOLDER_URL.format("$(SHARDGRAD_DATABASE_PASSWORD)")},
            "DATABASE_URL",
        ),
        ({"RAY_ADDRESS": ""}, "set RAY_ADDRESS"),
    ],
)
def test_refuses_placeholders_before_touching_ray(tmp_path, env, message):
    proc, calls = run(tmp_path, "api", **env)
    assert proc.returncode == 64
    assert message in proc.stderr
    assert calls == []


def test_kuberay_role_runs_the_generated_command_after_the_checks(tmp_path):
    generated = "ray start --head --block --num-cpus=0 --dashboard-host=0.0.0.0"
    proc, calls = run(tmp_path, "kuberay", KUBERAY_GEN_RAY_START_CMD=generated, RAY_NUM_CPUS="2")
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"{generated} --num-cpus=2"]  # Ray takes the last --num-cpus

    placeholder = {"RAY_AUTH_TOKEN": "change-me-ray-token"}
    proc, calls = run(
        tmp_path / "again", "kuberay", KUBERAY_GEN_RAY_START_CMD=generated, **placeholder
    )
    assert proc.returncode == 64 and calls == []


def test_kuberay_role_needs_the_overwrite_annotation(tmp_path):
    proc, calls = run(tmp_path, "kuberay")
    assert proc.returncode == 64
    assert "ray.io/overwrite-container-cmd" in proc.stderr
    assert calls == []


def test_other_commands_run_as_is(tmp_path):
    proc, calls = run(tmp_path, "shardgrad", RAY_AUTH_TOKEN="")
    assert proc.returncode == 0
    assert calls == ["shardgrad "]
