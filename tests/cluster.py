"""A real multi-node Ray cluster on this host, for the deploy tests: `local_cluster_up`
(context manager) and `local_cluster` (fixture) run `deploy/local-cluster.sh up N` in a
unique state dir, yield a `LocalCluster` handle (address, driver env, node status, node
kill) and always run `down` afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO

SCRIPT = REPO / "deploy" / "local-cluster.sh"
RAY_BIN = Path(os.environ.get("RAY_BIN") or Path(sys.executable).with_name("ray"))


# The GCS declares a silent node dead after 5 missed health checks: 5 s instead of 15 s.
FAST_NODE_FAILURE = {"RAY_health_check_period_ms": "1000"}


def _script_env(state_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(key, None)
    env["SHARDGRAD_CLUSTER_DIR"] = str(state_dir)
    env["RAY_BIN"] = str(RAY_BIN)
    env.update(extra or {})
    return env


def run_script(
    state_dir: Path, *args: str, timeout: float = 150, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """deploy/local-cluster.sh with this state dir; `env` reaches every node of an `up`."""
    return subprocess.run(
        [str(SCRIPT), *args],
        env=_script_env(state_dir, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def still_running(pid: int, start_time: float) -> bool:
    """The process `up` recorded (pid and create time, give or take the boot time's
    second) is alive."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            return abs(proc.create_time() - start_time) < 1.0
    return False


def marked_processes(cluster_id: str) -> list[int]:
    """Live processes that inherited this cluster's marker from `ray start`."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            marked = proc.environ().get("SHARDGRAD_LOCAL_CLUSTER") == cluster_id
            if marked and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


@dataclass
class LocalCluster:
    state_dir: Path
    address: str
    token_path: str
    up_output: str

    def script(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return run_script(self.state_dir, *args, timeout=timeout)

    def state(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())

    def status(self) -> dict:
        proc = self.script("status", "--json", timeout=60)
        assert proc.returncode in (0, 1), proc.stderr
        return json.loads(proc.stdout)

    def driver_env(self, **extra: str) -> dict[str, str]:
        """What a driver (shardgrad train/serve, ray.init) needs to attach."""
        env = dict(os.environ)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(
            RAY_ADDRESS=self.address,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=self.token_path,
        )
        env.update(extra)
        return env

    def run(self, argv: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        """A driver process attached to this cluster, e.g. `shardgrad train ...`."""
        return subprocess.run(
            argv,
            env=self.driver_env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )

    def run_driver(
        self, code: str, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess:
        """Python code as a driver attached to this cluster."""
        return self.run([sys.executable, "-c", textwrap.dedent(code)], timeout, **env)

    def start_driver(self, code: str, *args: str, log: Path, **env: str) -> subprocess.Popen:
        """`run_driver` in the background (stdout and stderr to `log`): kill a node meanwhile."""
        with open(log, "wb") as out:
            return subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code), *args],
                env=self.driver_env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def raylet_pid(self, index: int) -> int:
        return self.state()["nodes"][index]["raylet_pid"]

    def node_id(self, index: int) -> str:
        return self.state()["nodes"][index]["node_id"]

    def stop_node(self, index: int, sig: int = signal.SIGKILL) -> int:
        """Kill one node's raylet (its workers and agents follow). Returns the pid."""
        pid = self.raylet_pid(index)
        os.kill(pid, sig)
        return pid

    def wait_for_states(self, expected: dict[int, str], timeout: float = 60) -> dict:
        """Poll `status --json` until every node index has its expected GCS state."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            states = {n["index"]: n["state"] for n in status["nodes"]}
            if all(states.get(i) == s for i, s in expected.items()):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"node states {states}, wanted {expected}")
            time.sleep(1)


@contextlib.contextmanager
def local_cluster_up(
    state_dir: Path, nodes: int = 3, *args: str, env: dict[str, str] | None = None
) -> Iterator[LocalCluster]:
    """`up N [args]` in `state_dir`; `down` afterwards, whatever happens.

    `env` (default FAST_NODE_FAILURE) is passed to every Ray process of the cluster."""
    if not RAY_BIN.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{RAY_BIN} missing")
        pytest.skip(f"{RAY_BIN} missing")
    try:
        proc = run_script(
            state_dir, "up", str(nodes), *args, env=FAST_NODE_FAILURE if env is None else env
        )
        assert proc.returncode == 0, f"up failed:\n{proc.stdout}\n{proc.stderr}"
        values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        yield LocalCluster(
            state_dir=state_dir,
            address=values["RAY_ADDRESS"],
            token_path=values["RAY_AUTH_TOKEN_PATH"],
            up_output=proc.stdout + proc.stderr,
        )
    finally:
        down = run_script(state_dir, "down", timeout=120)
        assert down.returncode == 0, f"down failed:\n{down.stdout}\n{down.stderr}"


@pytest.fixture
def local_cluster(tmp_path) -> Iterator[LocalCluster]:
    """A fresh 3-node cluster (head + 2 workers) for one test."""
    with local_cluster_up(tmp_path / "cluster", 3) as cluster:
        yield cluster
