"""The head start (workers/headstart.py): a run on workers steps on the coordinator, as its
workers would, while they start, and they take over from there. The result must not depend
on when they do: every run here is bit-identical to the same run without a head start.
(The rest of the suite runs without it, tests/conftest.py: its tests need the workers from
the first step.)"""

import threading

import pytest

from tests.helpers import make_spec
from tests.test_inprocess import recorded, same_run
from workers import headstart
from workers.config import WorkerSettings
from workers.headstart import HeadStart
from workers.pool import Stopped
from workers.trainer import Trainer

pytestmark = pytest.mark.usefixtures("ray_session")
ON, OFF = WorkerSettings(head_start=True), WorkerSettings(head_start=False)
SPEC = {"health_every": 4, "epochs": 2, "optimizer": {"type": "adam", "lr": 0.01}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """`plain(exchange)`: (out dir, (summary, events)) of the run without a head start that
    every run here must reproduce, made once per exchange."""
    runs = {}

    def get(exchange: str):
        if exchange not in runs:
            out = tmp_path_factory.mktemp(f"plain-{exchange}")
            runs[exchange] = out, recorded(make_spec(exchange=exchange, **SPEC), out, settings=OFF)
        return runs[exchange]

    return get


def of_type(events, kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


@pytest.mark.parametrize("exchange", ["replicated", "tasks"])
def test_the_workers_take_over_at_a_step_bit_identical(tmp_path, monkeypatch, plain, exchange):
    spec = make_spec(exchange=exchange, **SPEC)
    plain_out, plain = plain(exchange)
    monkeypatch.setattr(HeadStart, "max_steps", 5)  # then it waits for the workers
    head = recorded(spec, tmp_path / "head", settings=ON)
    assert head[0]["status"] == plain[0]["status"] == "succeeded"
    same_run(tmp_path / "head", head, plain_out, plain)
    started, joined = of_type(head[1], "started")[0], of_type(head[1], "workers_joined")
    assert (started["workers"], started["worker_nodes"], started["exchange"]) == (2, [], None)
    assert [(e["step"], e["exchange"]) for e in joined] == [(5, exchange)]
    assert joined[0]["worker_nodes"] and head[0]["worker_nodes"] == joined[0]["worker_nodes"]
    assert head[0]["exchange"] == exchange
    if exchange == "replicated":  # checkpoints after the take-over checked every replica
        assert len(ckpt_state(tmp_path / "head")["replica_sha256"]) == 2


def ckpt_state(out) -> dict:
    from workers import checkpoint as ckpt

    return ckpt.load_latest(out).state


def test_a_slow_step_on_the_coordinator_waits_for_the_workers(tmp_path, monkeypatch, plain):
    spec = make_spec(exchange="tasks", **SPEC)
    plain_out, plain = plain("tasks")
    monkeypatch.setattr(headstart, "HEAD_START_STEP_S", 0.0)  # every step counts as slow
    head = recorded(spec, tmp_path / "head", settings=ON)
    same_run(tmp_path / "head", head, plain_out, plain)
    assert [e["step"] for e in of_type(head[1], "workers_joined")] == [1]


def never_ready(self, model, opt, step, failures, cancel: threading.Event):
    """Workers that never start: the start waits until the run cancels it."""
    assert cancel.wait(60), "the run ended without cancelling its workers' start"
    raise Stopped("stopped while the workers were starting")


def test_a_run_that_ends_before_its_workers_start(tmp_path, monkeypatch, plain):
    spec = make_spec(exchange="tasks", **SPEC)
    plain_out, plain = plain("tasks")
    monkeypatch.setattr(Trainer, "_on_workers", never_ready)
    head = recorded(spec, tmp_path / "head", settings=ON)
    same_run(tmp_path / "head", head, plain_out, plain)
    assert not of_type(head[1], "workers_joined")
    assert (head[0]["workers"], head[0]["exchange"], head[0]["worker_nodes"]) == (2, None, [])


def test_stopped_in_the_head_start_resumes_bit_identical(tmp_path, monkeypatch, plain):
    spec = make_spec(exchange="tasks", **SPEC)
    plain_out, plain = plain("tasks")
    stop = threading.Event()

    def stop_at_3(event):
        if event["type"] == "step" and event["step"] == 3:
            stop.set()

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_on_workers", never_ready)
        first = Trainer(spec, tmp_path / "head", callback=stop_at_3, stop_event=stop, settings=ON)
        summary = first.run()
    assert (summary["status"], summary["steps"]) == ("cancelled", 3)
    monkeypatch.setattr(HeadStart, "max_steps", 7)
    resumed = recorded(spec, tmp_path / "head", settings=ON)
    assert resumed[0]["resumed_from_step"] == 3
    assert [e["step"] for e in of_type(resumed[1], "workers_joined")] == [7]
    after_3 = [e for e in plain[1] if e["type"] != "step" or e["step"] > 3]
    after_3 = [e for e in after_3 if e["type"] != "health" or e["step"] > 3]
    same_run(tmp_path / "head", resumed, plain_out, (plain[0], after_3))


def test_a_failed_start_fails_the_run_with_its_error(tmp_path, monkeypatch):
    from workers.pool import ClusterTooSmall

    def too_small(self, model, opt, step, failures, cancel):
        raise ClusterTooSmall("could not place 2 workers x 0.5 CPU within 1s")

    monkeypatch.setattr(Trainer, "_on_workers", too_small)
    monkeypatch.setattr(HeadStart, "max_steps", 2)
    summary, events = recorded(make_spec(**SPEC), tmp_path / "run", settings=ON)
    assert summary["status"] == "failed"
    assert summary["error"] == "could not place 2 workers x 0.5 CPU within 1s"
    # at the first step after the start failed: at the latest after step 2 (max_steps)
    assert summary["steps"] <= 2 and not of_type(events, "workers_joined")
