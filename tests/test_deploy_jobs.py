"""Training jobs on a real 3-node local cluster (deploy/local-cluster.sh up 3).

- test_train_cli_spreads_workers_and_checkpoints_exactly: `shardgrad train --ray-address`
  puts a 3-worker job on >= 2 of the cluster's nodes, on the replicated exchange, and
  its final checkpoint equals an in-process single-machine run bit for bit.
- test_service_on_the_cluster_reports_worker_nodes: `shardgrad serve` attached to the
  cluster runs a submitted 3-worker job; GET /jobs/{id} lists >= 2 of the cluster's
  nodes, and the checkpoint it serves equals the single-machine run bit for bit.
- test_losing_a_worker_node_mid_job[auto|tasks]: kill -9 of the raylet of a node that
  hosts one of a running job's workers; the job replaces the worker, finishes
  `succeeded` with worker_failures >= 1, on the exchange it started with (auto: the
  replicated step, restored from a surviving replica, no fallback), and ends bit-identical
  to the uninterrupted run.

Checkpoints are correct wherever the workers sit because the coordinator (the driver:
`shardgrad train` or `shardgrad serve`) writes every one of them: workers on other nodes
only send gradient sums (and, on the replicated step, rank 0's state at checkpoints) to it
(deploy/README.md, "Checkpoints and state").

All tests share one module-scoped cluster. The node-loss tests come last: each kills a
worker node for good (a node cannot be restarted), so after them only the head is left.
Workers take 0.25 CPU so that all 3 still fit there.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from tests.cluster import LocalCluster, local_cluster_up, marked_processes
from tests.helpers import Server, final_params, make_spec, wait_job
from workers import checkpoint as ckpt
from workers.trainer import Trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc"),
]

# 150 epochs of moons at batch 30: 900 small steps (a few seconds). A killed raylet's workers
# may compute for up to a second more before they notice; the job must outlast that.
SPEC = make_spec(workers=3, cpus_per_worker=0.25, epochs=150, checkpoint_every=20)
STEPS = 900

# A coordinator that records some of its events, then its summary, as JSON lines: the test
# sees where its workers run, how far it is, which exchange it uses and what failed.
NODE_LOSS_DRIVER = """
    import json, sys
    from pathlib import Path
    from workers.spec import TrainingSpec
    from workers.trainer import Trainer

    spec_file, out, events_file = sys.argv[1:]
    events = open(events_file, "a", buffering=1)

    def record(event):
        if event["type"] in ("started", "checkpoint", "worker_failure", "summary"):
            events.write(json.dumps(event) + "\\n")

    spec = TrainingSpec.model_validate_json(Path(spec_file).read_text())
    trainer = Trainer(spec, out, callback=record)
    summary = trainer.run()
    record({**summary, "type": "summary", "fallback_reason": trainer.pool.fallback_reason})
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with local_cluster_up(tmp_path_factory.mktemp("cluster"), 3) as c:
        cluster_id = c.state()["cluster_id"]
        yield c
    assert marked_processes(cluster_id) == [], "`down` left processes of the cluster running"


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory) -> dict[str, np.ndarray]:
    """SPEC trained on one machine: the in-process Ray of the test session."""
    out = tmp_path_factory.mktemp("reference")
    assert Trainer(SPEC, out).run()["status"] == "succeeded"
    return final_params(out)


def write_spec(path: Path, **overrides) -> Path:
    path.write_text(SPEC.model_copy(update=overrides).model_dump_json())
    return path


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    return [n for n in cluster.status()["nodes"] if n["state"] == "ALIVE"]


def assert_bit_identical(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key


def test_train_cli_spreads_workers_and_checkpoints_exactly(cluster, tmp_path, reference):
    nodes = {n["node_id"] for n in alive_nodes(cluster)}
    assert len(nodes) == 3
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "service", "train", str(write_spec(tmp_path / "spec.json"))]
    argv += ["--out", str(out), "--ray-address", cluster.address, "--json"]
    proc = cluster.run(argv, timeout=180, RAY_ADDRESS="")  # the flag alone attaches it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "falling back" not in proc.stderr  # the compiled graph served every step
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    assert summary["status"] == "succeeded" and summary["steps"] == STEPS
    assert set(summary["worker_nodes"]) <= nodes
    assert len(set(summary["worker_nodes"])) >= 2
    assert summary["worker_failures"] == 0
    # The coordinator wrote the checkpoints, under --out on its own filesystem.
    final = ckpt.checkpoint_dir(out, f"step-{STEPS}")
    assert Path(summary["checkpoint"]) == final and final.is_dir()
    assert_bit_identical(ckpt.load_checkpoint(final).model_state, reference)


def test_service_on_the_cluster_reports_worker_nodes(cluster, tmp_path, reference):
    nodes = {n["node_id"] for n in alive_nodes(cluster)}
    # SHARDGRAD_RAY_ADDRESS is `serve --ray-address`; the Server helper drops RAY_ADDRESS.
    env = cluster.driver_env(SHARDGRAD_RAY_ADDRESS=cluster.address)
    server = Server(tmp_path / "var", **env).start()
    try:
        server.wait_ready()
        with server.client() as c:
            seen = c.get("/cluster").json()
            assert {n["id"] for n in seen["nodes"] if n["alive"]} == nodes
            assert seen["cpus_total"] == 3.0  # the cluster's, not an embedded Ray's
            r = c.post("/jobs", json=json.loads(SPEC.model_dump_json()))
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            job = wait_job(c, job_id, lambda j: j["status"] in ("succeeded", "failed"), 180)
            assert job["status"] == "succeeded", job["error"]
            assert set(job["worker_nodes"]) <= nodes
            assert len(set(job["worker_nodes"])) >= 2
            name = c.get(f"/jobs/{job_id}/checkpoints").json()[-1]["name"]
            assert name == f"step-{STEPS}"
            served = c.get(f"/jobs/{job_id}/checkpoints/{name}/model.safetensors")
            assert served.status_code == 200
    finally:
        server.stop()
    assert_bit_identical(load(served.content), reference)


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_event(path: Path, kind: str, driver, log: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in read_events(path) if e["type"] == kind]
        if found:
            return found[0]
        assert driver.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {kind} event within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("exchange", ["auto", "tasks"])
def test_losing_a_worker_node_mid_job(cluster, tmp_path, reference, exchange):
    out, events, log = tmp_path / "run", tmp_path / "events.jsonl", tmp_path / "driver.log"
    spec_file = write_spec(tmp_path / "spec.json", exchange=exchange)
    driver = cluster.start_driver(NODE_LOSS_DRIVER, str(spec_file), str(out), str(events), log=log)
    try:
        started = wait_for_event(events, "started", driver, log)
        assert started["exchange"] == ("replicated" if exchange == "auto" else "tasks")
        # A worker node (never the head: the driver's raylet and the GCS live there)
        # that hosts one of this job's workers.
        alive = alive_nodes(cluster)
        victims = [
            n["index"]
            for n in alive
            if n["role"] == "worker" and n["node_id"] in started["worker_nodes"]
        ]
        assert victims, f"no worker node hosts a worker: {started['worker_nodes']}, {alive}"
        wait_for_event(events, "checkpoint", driver, log)  # it has made progress
        cluster.stop_node(victims[0], signal.SIGKILL)
        driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, log.read_text()[-3000:]
    assert cluster.wait_for_states({victims[0]: "DEAD"}, timeout=30)

    history = read_events(events)
    summary = history[-1]
    assert summary["type"] == "summary", log.read_text()[-3000:]
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["steps"] == STEPS
    failures = [e for e in history if e["type"] == "worker_failure"]
    assert failures and summary["worker_failures"] == len(failures) >= 1
    assert summary["fallback_reason"] is None  # a dead node is a dead worker, not a transport fault
    assert summary["exchange"] == started["exchange"]
    # Every node that ran a worker, the dead one and the replacements' included, and the
    # failure events already said so (the service's job status follows them).
    assert set(started["worker_nodes"]) <= set(summary["worker_nodes"])
    assert set(summary["worker_nodes"]) <= {n["node_id"] for n in alive}
    assert failures[-1]["worker_nodes"] == summary["worker_nodes"]
    assert_bit_identical(ckpt.load_latest(out).model_state, reference)
