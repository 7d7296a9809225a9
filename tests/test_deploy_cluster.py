"""deploy/local-cluster.sh: a real multi-node Ray cluster on this host.

`local_cluster` (fixture) / `local_cluster_up` (context manager), in tests/cluster.py, start a real
cluster with `deploy/local-cluster.sh up N` in a unique state dir, yield a
`LocalCluster` handle (address, driver env, node status, node kill) and always
run `down` afterwards. Job-level tests (tests/test_deploy_jobs.py: a training
job spread over nodes, stopping a worker node mid-job) build on them. Drivers run
as subprocesses (`LocalCluster.run`, `run_driver`, `start_driver`, `driver_env`):
the pytest process may already hold an in-process Ray of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import cluster
from tests.cluster import (
    SCRIPT,
    LocalCluster,
    marked_processes,
    run_script,
    still_running,
)
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

local_cluster = cluster.local_cluster  # the fixture (tests/cluster.py), for this module

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
    still = [pid for pid, start in recorded.items() if still_running(pid, start)]
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


def _script_copy(tmp_path: Path) -> Path:
    """deploy/local-cluster.sh in a repo of its own: no .venv beside it, and a local_cluster.py
    that records how the script ran it instead of starting anything."""
    deploy = tmp_path / "repo" / "deploy"
    deploy.mkdir(parents=True)
    script = deploy / "local-cluster.sh"
    script.write_text(SCRIPT.read_text())
    script.chmod(0o755)
    (deploy / "local_cluster.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'ray_bin': os.environ['RAY_BIN'],"
        " 'python': sys.executable}))\n"
    )
    return script


def _fake_ray(path: Path) -> Path:
    """A `ray` whose shebang names this interpreter (which can import ray), no python beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nraise SystemExit('not the real ray')\n")
    path.chmod(0o755)
    return path


def _run_copy(script: Path, path: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_BIN", "VENV")}
    env["PATH"] = path
    return subprocess.run(
        [str(script), "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )


def test_script_finds_ray_on_path_without_a_venv(tmp_path):
    script = _script_copy(tmp_path)
    system = "/usr/bin:/bin"
    if shutil.which("ray", path=system):
        pytest.skip("a ray executable is installed system-wide")

    missing = _run_copy(script, system)
    assert missing.returncode == 2 and "ray executable not found" in missing.stderr

    on_path = _fake_ray(tmp_path / "bin" / "ray")
    ran = _run_copy(script, f"{on_path.parent}:{system}")
    assert ran.returncode == 0, ran.stderr
    record = json.loads(ran.stdout)
    assert record["argv"] == ["status", "--json"]
    assert record["ray_bin"] == str(on_path)
    assert Path(record["python"]).samefile(sys.executable)

    in_venv = _fake_ray(script.parent.parent / ".venv" / "bin" / "ray")
    ran = _run_copy(script, f"{on_path.parent}:{system}")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["ray_bin"] == str(in_venv), "the repo's .venv comes first"
