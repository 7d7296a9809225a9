"""deploy/local-cluster.sh: a real multi-node Ray cluster on this host.

`local_cluster` (fixture) / `local_cluster_up` (context manager) start a real
cluster with `deploy/local-cluster.sh up N` in a unique state dir, yield a
`LocalCluster` handle (address, driver env, node status, node kill) and always
run `down` afterwards. Job-level tests (tests/test_deploy_jobs.py: a training
job spread over nodes, stopping a worker node mid-job) build on them. Drivers run
as subprocesses (`LocalCluster.run`, `run_driver`, `start_driver`, `driver_env`):
the pytest process may already hold an in-process Ray of its own.
"""

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

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "local-cluster.sh"
RAY_BIN = Path(os.environ.get("RAY_BIN") or Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


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


def _proc_start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def marked_processes(cluster_id: str) -> list[int]:
    """Live processes that inherited this cluster's marker from `ray start`."""
    needle = f"SHARDGRAD_LOCAL_CLUSTER={cluster_id}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                env = b"\0" + Path(f"/proc/{entry}/environ").read_bytes()
                if b"\0" + needle in env and _proc_start_time(int(entry)) is not None:
                    found.append(int(entry))
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


SPREAD_DRIVER = """
    import json, ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(log_to_driver=False)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    pg = placement_group([{"CPU": 0.5}] * 3, strategy="SPREAD")
    ray.get(pg.ready(), timeout=60)

    @ray.remote(num_cpus=0.5)
    class Probe:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    actors = [
        Probe.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        ).remote()
        for i in range(3)
    ]
    print(json.dumps({"alive": alive, "actor_nodes": ray.get([a.node.remote() for a in actors])}))
"""

TOKEN_DRIVER = """
    import os
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError
    try:
        nodes = GcsClient(address=os.environ["RAY_ADDRESS"]).get_all_node_info(timeout=5)
    except AuthenticationError as err:
        print("REJECTED", err)
    except Exception as err:  # anything else (a timeout, no cluster) proves nothing
        print("FAILED", type(err).__name__, err)
    else:
        print("ACCEPTED", len(nodes))
"""


@pytest.mark.slow
def test_local_cluster_lifecycle(local_cluster: LocalCluster):
    c = local_cluster
    state = c.state()
    cluster_id = state["cluster_id"]
    assert f"RAY_ADDRESS={c.address}" in c.up_output
    assert Path(c.token_path).stat().st_mode & 0o077 == 0, "token must be private"

    # status: three alive nodes, one head, distinct raylets.
    status = c.status()
    assert status["alive"] == 3 and status["gcs_reachable"]
    assert [n["role"] for n in status["nodes"]] == ["head", "worker", "worker"]
    assert len({n["raylet_pid"] for n in status["nodes"]}) == 3
    human = c.script("status")
    assert human.returncode == 0 and "3/3 nodes alive" in human.stdout
    env = c.script("env")
    assert f"export RAY_ADDRESS={c.address}" in env.stdout
    assert "export RAY_AUTH_MODE=token" in env.stdout

    # A driver with the cluster's token sees 3 nodes and spreads actors over them.
    proc = c.run_driver(SPREAD_DRIVER)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    node_ids = {n["node_id"] for n in status["nodes"]}
    assert set(report["alive"]) == node_ids
    assert set(report["actor_nodes"]) <= node_ids
    assert len(set(report["actor_nodes"])) >= 2

    # Token auth is on: the cluster's token connects, a wrong one fails authentication.
    fast = {"RAY_py_gcs_connect_timeout_s": "5"}
    proc = c.run_driver(TOKEN_DRIVER, timeout=60, **fast)
    assert proc.stdout.split() == ["ACCEPTED", "3"], proc.stdout + proc.stderr
    wrong = {"RAY_AUTH_TOKEN": "0" * 64, "RAY_AUTH_TOKEN_PATH": ""}
    proc = c.run_driver(TOKEN_DRIVER, timeout=60, **wrong, **fast)
    assert proc.stdout.startswith("REJECTED "), proc.stdout + proc.stderr
    assert "Authentication token is missing or incorrect" in proc.stdout

    # Killing one worker node's raylet makes that node dead; the others live on.
    killed = c.stop_node(2)
    status = c.wait_for_states({0: "ALIVE", 1: "ALIVE", 2: "DEAD"}, timeout=45)
    assert status["alive"] == 2
    assert not status["nodes"][2]["raylet_running"]
    assert c.script("status").returncode == 1

    # down stops everything this cluster started, and nothing else.
    recorded = {p["pid"]: p["start_time"] for p in c.state()["processes"]}
    assert killed in recorded and len(recorded) >= 9  # gcs, raylets, agents, monitors...
    down = c.script("down")
    assert down.returncode == 0, down.stderr
    still = [pid for pid, start in recorded.items() if _proc_start_time(pid) == start]
    assert still == [], f"processes left running: {still}"
    assert marked_processes(cluster_id) == []
    assert not Path(state["temp_dir"]).exists()
    assert c.script("status").returncode == 3
    assert Path(c.token_path).exists(), "the token survives `down` for the next `up`"


def test_cli_without_cluster(tmp_path):
    state_dir = tmp_path / "none"
    assert run_script(state_dir, "down").returncode == 0
    status = run_script(state_dir, "status", "--json")
    assert status.returncode == 3 and json.loads(status.stdout)["running"] is False
    assert run_script(state_dir, "env").returncode == 3
    bad = run_script(state_dir, "up", "0")
    assert bad.returncode == 2 and "at least 1" in bad.stderr
    bad = run_script(state_dir, "up", "2", "--cpus-per-node", "0")
    assert bad.returncode == 2 and "--cpus-per-node" in bad.stderr


def _load_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "deploy/local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_split_and_port_allocation(monkeypatch):
    lc = _load_module()
    assert lc.cpu_shares(3, 4) == [4, 4, 4]
    monkeypatch.setattr(lc.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert lc.cpu_shares(3, None) == [3, 3, 2]
    monkeypatch.setattr(lc.os, "sched_getaffinity", lambda pid: {0, 1})
    assert lc.cpu_shares(3, None) == [1, 1, 1]  # never fractional, never zero

    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not lc.port_is_free(port)
        with pytest.raises(lc.ClusterError, match="in use"):
            lc.allocate_ports(2, port)
        head, nodes = lc.allocate_ports(2, None)
    ports = list(head.values()) + [p for node in nodes for p in node.values()]
    assert len(ports) == len(set(ports)) == 3 + 2 * 6
    assert port not in ports
