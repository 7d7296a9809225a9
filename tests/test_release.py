"""Resources always come back: after a job fails in any phase, and when it is stopped while
its workers are placed, start or are replaced, Ray's free CPUs (what GET /cluster reports
as `cpus_free`) return to the whole cluster and no placement group is left."""

import os
import signal
import threading

import numpy as np
import pytest
import ray
from ray.util import placement_group_table
from ray.util.placement_group import placement_group, remove_placement_group

from tests.helpers import make_spec, wait_for
from workers import checkpoint as ckpt
from workers.config import WorkerSettings
from workers.model import worker_config
from workers.pool import WorkerFailure, WorkerPool
from workers.spec import TrainingSpec
from workers.trainer import Trainer

pytestmark = pytest.mark.usefixtures("ray_session")


def cpus_free() -> float:
    return ray.available_resources().get("CPU", 0.0)


def live_groups() -> list[str]:
    return [g["state"] for g in placement_group_table().values() if g["state"] != "REMOVED"]


def released(total: float) -> bool:
    return cpus_free() == total and not live_groups()


@pytest.fixture
def total():
    """The cluster's CPUs, all free before the test; the test must leave them so."""
    cpus = ray.cluster_resources()["CPU"]
    wait_for(lambda: released(cpus))
    return cpus


def sine_file(path, scale: float = 1.0) -> str:
    rng = np.random.default_rng(0)
    X = rng.uniform(-3, 3, (200, 1))
    np.savez(path, X=X * scale, y=np.sin(X))
    return str(path)


def regression(**overrides) -> TrainingSpec:
    return make_spec(
        model={"type": "mlp", "sizes": [1, 16, 1], "activation": "relu"},
        loss="mse",
        optimizer={"type": "sgd", "lr": 0.01},
        **overrides,
    )


def test_a_job_failing_as_it_loads_its_data_holds_nothing(tmp_path, total):
    spec = regression(data={"type": "file", "path": sine_file(tmp_path / "d.npz")})
    (tmp_path / "d.npz").unlink()  # gone between validation and the run
    with pytest.raises(FileNotFoundError):
        Trainer(spec, tmp_path / "run").run()
    wait_for(lambda: released(total))


def test_a_job_whose_workers_cannot_be_placed_fails_and_releases_its_group(tmp_path, total):
    spec = make_spec(workers=3, cpus_per_worker=1.0)  # 3 CPUs on a 2-CPU cluster
    summary = Trainer(spec, tmp_path, settings=WorkerSettings(placement_timeout_s=0.5)).run()
    assert summary["status"] == "failed"
    assert "could not place 3 workers x 1 CPU within 0.5s" in summary["error"]
    wait_for(lambda: released(total))


def _poisoned():
    raise RuntimeError("poisoned rows")


class Poison:
    """Rows that cannot be read back: a worker's constructor fails as it receives them."""

    def __reduce__(self):
        return _poisoned, ()


def test_a_worker_that_fails_to_start_fails_the_pool_at_once(total):
    # Starting another worker would fail alike: no retry for the placement timeout (10 min).
    data = ray.put((Poison(), None))
    settings = WorkerSettings(placement_timeout_s=600)
    with pytest.raises(
        WorkerFailure, match="worker . could not start: RuntimeError: poisoned rows$"
    ):
        WorkerPool(2, 0.5, worker_config(make_spec()), data, max_failures=5, settings=settings)
    wait_for(lambda: released(total))


def test_a_job_diverging_at_its_first_step_releases_its_workers(tmp_path, total):
    data = {"type": "file", "path": sine_file(tmp_path / "d.npz", scale=1e200)}
    summary = Trainer(regression(data=data), tmp_path / "run").run()
    assert summary["status"] == "failed"
    assert summary["error"].startswith("diverged at step 1 ")
    wait_for(lambda: released(total))


def test_a_job_failing_mid_run_releases_its_workers(tmp_path, total):
    def kill_one(event):
        if event["type"] == "step" and event["step"] == 7:
            os.kill(trainer.pool.worker_pids()[0], signal.SIGKILL)

    trainer = Trainer(make_spec(max_failures=0), tmp_path, callback=kill_one)
    summary = trainer.run()
    assert summary["status"] == "failed"
    assert "exceed max_failures=0" in summary["error"]
    assert summary["checkpoint"] == str(ckpt.list_checkpoints(tmp_path)[-1].path)
    wait_for(lambda: released(total))


def test_a_stop_while_the_workers_wait_for_cpus_cancels_at_once(tmp_path, total):
    hog = placement_group([{"CPU": total}])  # another user holds every CPU
    ray.get(hog.ready())
    stop, result = threading.Event(), {}

    def run():
        result.update(Trainer(make_spec(), tmp_path, stop_event=stop).run())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: "PENDING" in live_groups())  # the job's group, waiting for CPUs
        stop.set()
        thread.join(timeout=60)
    finally:
        remove_placement_group(hog)
    assert not thread.is_alive()
    assert result["status"] == "cancelled"
    assert result["error"] == "stopped while the workers were starting"
    assert result["checkpoint"] is None and result["steps"] == 0
    wait_for(lambda: released(total))


def test_a_stop_while_a_worker_is_replaced_cancels_from_the_last_checkpoint(tmp_path, total):
    stop = threading.Event()

    # Step 6 ends epoch 1: its block fetched the model but did not verify the replicas
    # (no checkpoint is due), so the stop's checkpoint must run the graph and so replace
    # the killed worker first.
    def kill_and_stop(event):
        if event["type"] == "step" and event["step"] == 6:
            os.kill(trainer.pool.worker_pids()[1], signal.SIGKILL)
            stop.set()

    trainer = Trainer(make_spec(), tmp_path, callback=kill_and_stop, stop_event=stop)
    summary = trainer.run()
    assert summary["status"] == "cancelled"
    assert summary["error"] == "stopped while the workers were starting"
    # No checkpoint at the stop: a worker was missing; the run resumes from its newest.
    assert summary["checkpoint"] == str(ckpt.list_checkpoints(tmp_path)[-1].path)
    wait_for(lambda: released(total))
