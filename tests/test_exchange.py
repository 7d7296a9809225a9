"""The step exchange (workers/exchange.py): choice, fallback, failure detection, teardown."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import ray
from ray.exceptions import RayChannelError

from workers import checkpoint as ckpt
from workers import exchange as ex
from workers import replicated
from workers.config import WorkerSettings
from workers.replica import pack, unpack
from workers.replicated import ReplicatedStep
from workers.trainer import Trainer

from .helpers import final_params, make_spec, require, unavailable

pytestmark = pytest.mark.usefixtures("ray_session")
ENV = "SHARDGRAD_EXCHANGE"  # read by WorkerSettings.exchange


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A plain 2-worker run on the compiled graph that the other runs must match bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    trainer = Trainer(make_spec(epochs=2, exchange="compiled"), out)
    assert trainer.run()["status"] == "succeeded"
    return final_params(out)


@pytest.fixture
def graphs(monkeypatch):
    """Every compiled graph opened during the test (of either graph exchange)."""
    opened = []
    init = ex.Graph.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self.graph)

    monkeypatch.setattr(ex.Graph, "__init__", record)
    return opened


# The exchanges that run a compiled graph: the replicated step (the default) and the gather.
GRAPH_KINDS = pytest.mark.parametrize("kind", ["replicated", "compiled"])
# An execution in the middle of a 12-step run: the gather runs a step per execution, the
# replicated step a block of steps (up to a checkpoint or an epoch's end).
MID_RUN = {"compiled": 5, "replicated": 3}


# ---------------------------------------------------------------- choosing


def test_the_spec_chooses_and_the_environment_decides_auto(monkeypatch, caplog):
    monkeypatch.delenv(ENV, raising=False)
    assert ex.resolve("auto", WorkerSettings()) == "replicated"
    assert ex.resolve(None, WorkerSettings()) == "replicated"
    monkeypatch.setenv(ENV, "tasks")
    settings = WorkerSettings()
    assert (ex.resolve("auto", settings), ex.resolve("compiled", settings)) == ("tasks", "compiled")
    monkeypatch.setenv(ENV, "compiled")
    assert ex.resolve("auto", WorkerSettings()) == "compiled"
    monkeypatch.setenv(ENV, "carrier-pigeon")
    with caplog.at_level(logging.WARNING, logger="workers.config"):
        assert ex.resolve("auto", WorkerSettings()) == "replicated"
    assert "carrier-pigeon" in caplog.text


def test_auto_uses_tasks_from_a_ray_client(monkeypatch):
    from ray.util.client import ray as client

    monkeypatch.setattr(client, "is_connected", lambda: True)
    assert ex.resolve("auto", WorkerSettings(exchange="auto")) == "tasks"


def test_exchange_is_an_execution_field():
    spec = make_spec()
    assert spec.exchange == "auto"
    assert make_spec(exchange="tasks").spec_hash() == spec.spec_hash()
    with pytest.raises(ValueError, match="exchange"):
        make_spec(exchange="mpi")


def test_flat_vectors_round_trip_as_views():
    arrays = [np.arange(6.0).reshape(2, 3), np.arange(3.0), np.ones((1, 1))]
    flat = ex.flatten(arrays)
    assert flat.shape == (10,)
    back = ex.unflatten(flat, [a.shape for a in arrays])
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=True))
    assert all(np.shares_memory(b, flat) for b in back)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_gradient_sum_crosses_as_bytes_and_comes_back_exactly(dtype):
    """The replicated step's message: the sum's bits, its row count and its loss sum."""
    flat = np.random.default_rng(0).standard_normal(1000).astype(dtype)
    msg = pack(flat, 37, 0.1 + 0.2)
    assert isinstance(msg, bytes)
    back, rows, loss_sum = unpack(msg, np.dtype(dtype))
    assert back.dtype == flat.dtype and back.tobytes() == flat.tobytes()
    assert (rows, loss_sum) == (37, 0.1 + 0.2)


def test_a_block_fills_the_graph_unless_a_stop_would_wait_too_long():
    """A block shorter than the graph passes None through the stages it does not need (a
    hop each), so blocks run every stage while that stays within STOP_S."""
    step = ReplicatedStep.__new__(ReplicatedStep)  # the block's rule only, no pool
    step.gather, step.stages = None, 16
    step.step_s = 0.0  # no block yet
    assert step.block == 16
    step.step_s = 0.012  # mlp784's step on 2 workers: 16 steps take 0.19 s
    assert step.block == 16
    step.step_s = replicated.STOP_S / 4
    assert step.block == 4
    step.step_s = 10.0
    assert step.block == 1


def cores_pinned_by_others() -> set[int]:
    """Our cores that another (user-space) process is pinned to, read with psutil: the
    rule claim_cores applies, from a second source."""
    psutil = require("psutil")
    allowed, taken = os.sched_getaffinity(0), set()
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or not proc.cmdline():  # kernel threads: per core
                continue
            mask = set(proc.cpu_affinity())
        except psutil.Error:  # gone, or not ours to see
            continue
        if not allowed <= mask:
            taken |= mask & allowed
    return taken


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_workers_pin_themselves_to_distinct_free_cores():
    """Each claim takes cores no other pinned process holds, or none at all."""
    free = os.sched_getaffinity(0) - cores_pinned_by_others()
    if not free:  # every claim would be [], and the test would prove nothing
        unavailable("no free core: other processes on this machine are pinned to all of them")
    code = (
        "import json, sys; from workers.exchange import claim_cores; "
        "print(json.dumps(claim_cores(1)), flush=True); sys.stdin.read()"
    )
    procs, claims = [], []
    try:
        for _ in range(len(os.sched_getaffinity(0)) + 1):  # one more than there are cores
            proc = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            procs.append(proc)
            claims.append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs:
            proc.communicate("", timeout=30)
    held = [core for claim in claims for core in claim]
    assert len(claims[0]) == 1 and claims[0][0] in free  # a free core is claimed
    assert len(held) == len(set(held))  # nobody shares a core
    assert set(held) == free  # every free core, and only those, once
    assert all(len(claim) in (0, 1) for claim in claims)
    assert claims[-1] == []  # once every core is taken, the next one stays unpinned


# ---------------------------------------------------------------- same result either way


@pytest.mark.parametrize("workers", [2, 3])
def test_every_exchange_trains_bit_identical_parameters(tmp_path, workers):
    spec = dict(
        optimizer={"type": "adam", "lr": 0.01},
        dtype="float32",
        workers=workers,
        epochs=2,
    )
    for kind in ("replicated", "compiled", "tasks"):
        trainer = Trainer(make_spec(**spec, exchange=kind), tmp_path / kind)
        assert trainer.run()["status"] == "succeeded"
        assert trainer.pool.kind == kind
    assert same(final_params(tmp_path / "compiled"), final_params(tmp_path / "tasks"))
    assert same(final_params(tmp_path / "replicated"), final_params(tmp_path / "tasks"))


# ---------------------------------------------------------------- falling back


@GRAPH_KINDS
def test_a_graph_that_cannot_compile_falls_back_to_tasks(
    tmp_path, monkeypatch, caplog, reference, kind
):
    from ray.dag import DAGNode

    def refuse(self, **kwargs):
        raise RuntimeError("no compiled graphs on this cluster")

    monkeypatch.setattr(DAGNode, "experimental_compile", refuse)
    trainer = Trainer(make_spec(epochs=2, exchange=kind), tmp_path)
    with caplog.at_level(logging.WARNING, logger="workers"):
        summary = trainer.run()
    assert summary["status"] == "succeeded" and summary["worker_failures"] == 0
    assert trainer.pool.kind == "tasks"
    assert "could not compile" in trainer.pool.fallback_reason
    assert "no compiled graphs on this cluster" in caplog.text
    assert "falling back to the tasks exchange" in caplog.text
    assert same(final_params(tmp_path), reference)


def replace_an_execution(monkeypatch, step, nth: int) -> None:
    """The `nth` execute of the compiled graphs calls `step()` instead and returns what it
    returns (or raises what it raises): a transport fault with every worker alive."""
    init = ex.Graph.__init__
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        execute = self.graph.execute

        def execute_or_replace(*inputs):
            calls["n"] += 1
            return step() if calls["n"] == nth else execute(*inputs)

        self.graph.execute = execute_or_replace

    monkeypatch.setattr(ex.Graph, "__init__", patched)


def assert_fell_back_to_tasks(trainer, summary, graphs, reference, reason: str) -> None:
    """No worker failure, the job on tasks for `reason` (a regex), no lost step."""
    assert summary["status"] == "succeeded" and summary["worker_failures"] == 0
    assert trainer.pool.kind == "tasks"
    assert re.search(reason, trainer.pool.fallback_reason), trainer.pool.fallback_reason
    assert all(g.is_teardown for g in graphs)
    assert same(final_params(trainer.out), reference)


@GRAPH_KINDS
def test_a_broken_channel_mid_run_falls_back_and_recomputes_the_step(
    tmp_path, monkeypatch, graphs, reference, kind
):
    """A transport failure with every worker alive: not a worker failure, and no lost step."""

    def broken():
        raise RayChannelError("simulated: channel closed")

    replace_an_execution(monkeypatch, broken, MID_RUN[kind])
    trainer = Trainer(make_spec(epochs=2, exchange=kind), tmp_path)
    summary = trainer.run()
    assert_fell_back_to_tasks(trainer, summary, graphs, reference, "simulated: channel closed")


@ray.remote(num_cpus=0)
def _never_answers() -> None:
    time.sleep(3600)


@GRAPH_KINDS
def test_a_stuck_step_falls_back_instead_of_hanging(tmp_path, monkeypatch, graphs, reference, kind):
    """Every worker alive, no answer: past the step timeout (or 50 times the slowest step)
    the graph is torn down and the step recomputed on tasks."""
    stuck = []
    never = lambda: stuck.append(_never_answers.remote()) or stuck[-1]  # noqa: E731
    replace_an_execution(monkeypatch, never, MID_RUN[kind])
    settings = WorkerSettings(step_timeout_s=1.5)
    trainer = Trainer(make_spec(epochs=2, exchange=kind), tmp_path, settings=settings)
    try:
        summary = trainer.run()
    finally:
        for ref in stuck:
            ray.cancel(ref, force=True)
    assert stuck, "no execution was replaced"
    assert_fell_back_to_tasks(
        trainer, summary, graphs, reference, r"step gave no answer in [\d.]+s"
    )


# ---------------------------------------------------------------- worker death


@GRAPH_KINDS
def test_a_worker_killed_during_a_step_is_detected_fast_and_replaced(tmp_path, kind):
    """Kill from another thread, so the kill lands while the workers compute a step."""
    spec = make_spec(
        model={"type": "mlp", "sizes": [2, 256, 256, 2], "activation": "tanh"},
        data={"type": "builtin", "name": "moons", "n_samples": 3000, "noise": 0.1},
        batch_size=1200,
        epochs=10,
        checkpoint_every=1000,
        exchange=kind,
    )
    expected = tmp_path / "uninterrupted"
    assert Trainer(spec, expected).run()["status"] == "succeeded"

    events = {}

    def on_event(event):
        if event["type"] == "step" and event["step"] == 3:
            pid = trainer.pool.worker_pids()[1]
            timer = threading.Timer(0.02, kill, args=(pid,))
            timer.start()
        elif event["type"] == "worker_failure":
            events["detected"] = time.monotonic()

    def kill(pid):
        events["killed"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    trainer = Trainer(spec, tmp_path / "killed", callback=on_event)
    summary = trainer.run()
    assert summary["status"] == "succeeded" and summary["worker_failures"] == 1
    assert trainer.pool.kind == kind  # recompiled over the replacement, not fallen back
    assert events["detected"] - events["killed"] < 10  # Ray reports the death; no timeout
    assert same(final_params(tmp_path / "killed"), final_params(expected))
    if kind == "replicated":  # the replacement got the surviving replica's state
        assert [source for source, _ in trainer.descend.restores] == [0]


# ---------------------------------------------------------------- the replicas


def test_the_replicas_are_bit_identical_at_every_checkpoint(tmp_path):
    """Every checkpoint records each replica's parameter hash, checked equal by the
    coordinator; here they are checked again, against the checkpoint's own parameters."""
    import hashlib

    spec = make_spec(epochs=3, workers=3, checkpoint_every=4, keep_checkpoints=10)
    trainer = Trainer(spec, tmp_path)
    assert trainer.run()["status"] == "succeeded" and trainer.pool.kind == "replicated"
    kept = ckpt.list_checkpoints(tmp_path)
    assert [c.step for c in kept] == [4, 8, 12, 16, 18]
    for c in kept:
        loaded = ckpt.load_checkpoint(c.path)
        digest = hashlib.sha256()
        for name, _ in trainer.model.named_parameters():
            digest.update(np.ascontiguousarray(loaded.model_state[name]).tobytes())
        assert loaded.state["replica_sha256"] == [digest.hexdigest()] * 3, c.step


def test_replicas_that_disagree_fail_the_run(tmp_path, monkeypatch):
    """The check can fail: a replica whose hash differs at a checkpoint fails the run."""
    call = ex.ReplicatedGraph.__call__

    def rank_1_differs(self, command, *rest):
        outs = call(self, command, *rest)
        if command[2]:  # verify
            outs[1] = {**outs[1], "sha256": "0" * 64}
        return outs

    monkeypatch.setattr(ex.ReplicatedGraph, "__call__", rank_1_differs)
    summary = Trainer(make_spec(epochs=2, checkpoint_every=4), tmp_path).run()
    assert summary["status"] == "failed"
    assert "the replicas differ at step 4" in summary["error"]
    assert ckpt.list_checkpoints(tmp_path) == []


def test_every_worker_dying_restores_from_the_coordinators_copy(tmp_path, reference):
    """No replica survives: the replacements start from the coordinator's newest copy and
    the steps since are recomputed, bit-identical."""

    def kill_all(event):
        if event["type"] == "step" and event["step"] == 8 and not killed:
            pids = trainer.pool.worker_pids()
            killed.extend(pids)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

    killed: list[int] = []
    trainer = Trainer(make_spec(epochs=2), tmp_path, callback=kill_all)
    summary = trainer.run()
    assert summary["status"] == "succeeded" and summary["worker_failures"] == 2
    assert [source for source, _ in trainer.descend.restores] == [None]
    assert same(final_params(tmp_path), reference)


def test_a_replacement_whose_graph_cannot_compile_goes_on_over_tasks(
    tmp_path, monkeypatch, reference
):
    """A worker dies, and the graph over its replacement will not compile: the run goes on
    over the tasks exchange from the restored replicas, bit-identical."""
    from ray.dag import DAGNode

    def refuse(self, **kwargs):
        raise RuntimeError("no compiled graph over the replacement")

    def kill_one(event):
        if event["type"] == "step" and event["step"] == 8 and not killed:
            monkeypatch.setattr(DAGNode, "experimental_compile", refuse)
            killed.append(trainer.pool.worker_pids()[1])
            os.kill(killed[0], signal.SIGKILL)

    killed: list[int] = []
    trainer = Trainer(make_spec(epochs=2), tmp_path, callback=kill_one)
    summary = trainer.run()
    assert summary["status"] == "succeeded" and summary["worker_failures"] == 1
    assert trainer.pool.kind == "tasks"
    assert "no compiled graph over the replacement" in trainer.pool.fallback_reason
    assert same(final_params(tmp_path), reference)


def test_a_worker_death_leaves_a_clean_exit(tmp_path, ray_session):
    """After a graph failed, the process still exits cleanly (no crash in Ray at exit)."""
    script = textwrap.dedent(
        f"""
        import os, signal, ray
        from tests.helpers import make_spec
        from workers.trainer import Trainer

        ray.init(address={ray_session.get_runtime_context().gcs_address!r}, log_to_driver=False)

        def kill_one(event):
            if event["type"] == "step" and event["step"] == 2:
                os.kill(trainer.pool.worker_pids()[1], signal.SIGKILL)

        trainer = Trainer(make_spec(epochs=1, exchange="compiled"), {str(tmp_path)!r},
                          callback=kill_one)
        summary = trainer.run()
        assert summary["status"] == "succeeded" and summary["worker_failures"] == 1, summary
        ray.shutdown()
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- teardown


@GRAPH_KINDS
@pytest.mark.parametrize("ending", ["succeeded", "cancelled", "diverged", "too many failures"])
def test_the_graph_is_torn_down_however_the_run_ends(tmp_path, graphs, ending, kind):
    overrides = {"epochs": 1, "exchange": kind}
    if ending == "diverged":
        overrides |= {
            "model": {"type": "mlp", "sizes": [1, 32, 1], "activation": "relu"},
            "data": {"type": "builtin", "name": "sine", "n_samples": 200, "noise": 0.1},
            "loss": "mse",
            "optimizer": {"type": "sgd", "lr": 50},
            "epochs": 3,
        }
    if ending == "too many failures":
        overrides["max_failures"] = 0

    steps = []

    def on_event(event):
        if event["type"] != "step":
            return
        steps.append(event["step"])
        if event["step"] != 2:
            return
        if ending == "cancelled":
            trainer.stop_event.set()
        elif ending == "too many failures":
            os.kill(trainer.pool.worker_pids()[0], signal.SIGKILL)

    trainer = Trainer(make_spec(**overrides), tmp_path, callback=on_event)
    summary = trainer.run()
    expected_status = {"succeeded": "succeeded", "cancelled": "cancelled"}.get(ending, "failed")
    assert summary["status"] == expected_status
    if ending == "cancelled":  # at the step where the stop landed (the end of a block)
        assert ckpt.load_latest(tmp_path).step == steps[-1] >= 2
    assert graphs and all(g.is_teardown for g in graphs)
    assert trainer.pool.exchange is None
    assert ray.util.placement_group_table(trainer.pool.pg)["state"] == "REMOVED"
