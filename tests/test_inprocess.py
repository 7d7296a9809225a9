"""`workers: 0` (the step in the coordinator's process) and `workers: "auto"` (choose.py)."""

import numpy as np
import pytest

from tests.helpers import final_params, make_spec
from workers import checkpoint as ckpt
from workers import trainer as trainer_module
from workers.choose import choose_workers
from workers.config import WorkerSettings
from workers.trainer import Trainer

SGD = {"type": "sgd", "lr": 0.1, "momentum": 0.9}
ADAM = {"type": "adam", "lr": 0.01}


def no_ray(monkeypatch):
    """Make any start of Ray, a worker pool or a placement group fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("an in-process run must not use Ray")

    monkeypatch.setattr(trainer_module, "ensure_ray", refuse)
    monkeypatch.setattr(trainer_module, "WorkerPool", refuse)


def recorded(spec, out, **kwargs):
    """Run; the summary and every event but `started` (which names the workers)."""
    events = []
    summary = Trainer(spec, out, callback=events.append, **kwargs).run()
    return summary, events


def identical(a, b) -> bool:
    """Equal bit for bit, through nested dicts and lists of arrays."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def same_run(a_out, a, b_out, b):
    """Bit-identical parameters, optimizer state, metrics and events."""
    pa, pb = final_params(a_out), final_params(b_out)
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert identical(
        ckpt.load_latest(a_out).optimizer_state, ckpt.load_latest(b_out).optimizer_state
    )
    keys = ("steps", "final_loss", "val_loss", "val_accuracy", "health")
    assert {k: a[0][k] for k in keys} == {k: b[0][k] for k in keys}
    steps = [[e for e in run[1] if e["type"] in ("step", "health")] for run in (a, b)]
    for ea, eb in zip(*steps, strict=True):
        assert {k: v for k, v in ea.items() if k != "samples_per_s"} == {
            k: v for k, v in eb.items() if k != "samples_per_s"
        }


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(
    ("dtype", "optimizer"), [("float64", SGD), ("float32", SGD), ("float64", ADAM)]
)
def test_workers_0_is_bit_identical_to_1(tmp_path, monkeypatch, dtype, optimizer):
    spec = {"dtype": dtype, "optimizer": optimizer, "health_every": 4}
    one = recorded(make_spec(workers=1, **spec), tmp_path / "one")
    with monkeypatch.context() as m:
        no_ray(m)
        zero = recorded(make_spec(workers=0, **spec), tmp_path / "zero")
    assert zero[0]["status"] == one[0]["status"] == "succeeded"
    assert (zero[0]["workers"], zero[0]["exchange"], zero[0]["worker_nodes"]) == (0, None, [])
    started = zero[1][0]
    assert (started["type"], started["workers"], started["workers_reason"]) == (
        "started",
        0,
        "set by the spec",
    )
    same_run(tmp_path / "zero", zero, tmp_path / "one", one)


@pytest.mark.usefixtures("ray_session")
def test_workers_0_stops_at_a_checkpoint_and_resumes_bit_identical_to_1(tmp_path, monkeypatch):
    one = recorded(make_spec(workers=1, optimizer=ADAM), tmp_path / "one")
    no_ray(monkeypatch)
    spec, out = make_spec(workers=0, optimizer=ADAM), tmp_path / "zero"
    stop = trainer_module.threading.Event()

    def stop_at_7(event):
        if event["type"] == "step" and event["step"] == 7:
            stop.set()

    first = Trainer(spec, out, callback=stop_at_7, stop_event=stop).run()
    assert first["status"] == "cancelled" and ckpt.load_latest(out).step == 7
    second = recorded(spec, out)
    assert second[0]["resumed_from_step"] == 7
    pa, pb = final_params(out), final_params(tmp_path / "one")
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert second[0]["final_loss"] == one[0]["final_loss"]


def test_workers_0_diverges_with_the_same_message_and_no_nan_checkpoint(tmp_path, monkeypatch):
    no_ray(monkeypatch)
    spec = make_spec(
        workers=0,
        model={"type": "mlp", "sizes": [1, 32, 1], "activation": "relu"},
        data={"type": "builtin", "name": "sine", "n_samples": 200, "noise": 0.1},
        loss="mse",
        optimizer={"type": "sgd", "lr": 50},
        checkpoint_every=1,
        max_failures=0,  # irrelevant in-process
    )
    summary = Trainer(spec, tmp_path).run()
    assert summary["status"] == "failed" and summary["error"].startswith("diverged at step ")
    for info in ckpt.list_checkpoints(tmp_path):
        state = ckpt.load_checkpoint(info.path).model_state
        assert all(np.isfinite(v).all() for v in state.values())


# ---------------------------------------------------------------- auto, measurement stubbed


def choose(spec, compute_s, free=8.0, exchange="replicated", **settings):
    asked = []

    def free_cpus():
        asked.append(True)
        return free

    choice = choose_workers(
        spec, WorkerSettings(exchange=exchange, **settings), lambda: compute_s, free_cpus
    )
    return choice, asked


def test_auto_picks_in_process_for_a_tiny_model_without_asking_the_cluster():
    choice, asked = choose(make_spec(workers="auto"), compute_s=50e-6)
    assert choice.workers == 0 and not asked
    assert choice.reason.startswith("chose in-process: gradient compute 0.05 ms per step")
    assert choice.reason.endswith("no count of workers could beat it; the cluster was not asked")


def test_auto_picks_several_workers_for_a_compute_heavy_model():
    choice, asked = choose(make_spec(workers="auto", cpus_per_worker=1), compute_s=0.2, free=4)
    assert choice.workers == 4 and asked == [True]
    assert "at most 4 workers (4 free CPUs)" in choice.reason


def test_auto_is_capped_by_free_cpus_and_by_batch_size():
    spec = make_spec(workers="auto", cpus_per_worker=0.5)
    assert choose(spec, compute_s=1.0, free=1.6)[0].workers == 3  # floor(1.6 / 0.5)
    spec = make_spec(workers="auto", cpus_per_worker=1, batch_size=2)
    choice = choose(spec, compute_s=1.0, free=16)[0]
    assert choice.workers == 2 and "(batch_size 2)" in choice.reason
    # the service's worker limit caps it too (a 0.0001-CPU worker must not make 20,000)
    spec = make_spec(workers="auto", cpus_per_worker=0.0001)
    choice = choose(spec, compute_s=10.0, free=2, max_workers=8)[0]
    assert choice.workers == 8 and "(SHARDGRAD_MAX_WORKERS=8)" in choice.reason
    # no CPU free: in-process (the coordinator's own reservation computes)
    assert choose(make_spec(workers="auto"), compute_s=1.0, free=0.2)[0].workers == 0


def test_auto_weighs_the_exchange_kind_and_bandwidth():
    spec = make_spec(workers="auto", cpus_per_worker=1)
    # 3 ms of compute: 1 worker costs more than it saves, 2 save 0.5 ms with a 1 ms exchange
    assert choose(spec, compute_s=3e-3, free=2, exchange="compiled")[0].workers == 2
    slow = {"exchange": "compiled", "auto_compiled_step_s": 2e-3}
    assert choose(spec, compute_s=3e-3, free=2, **slow)[0].workers == 0
    # the replicated step's fixed cost is its own setting
    assert choose(spec, compute_s=3e-3, free=2)[0].workers == 2
    assert choose(spec, compute_s=3e-3, free=2, auto_replicated_step_s=2e-3)[0].workers == 0
    assert "replicated exchange estimated" in choose(spec, compute_s=3e-3, free=2)[0].reason


@pytest.mark.usefixtures("ray_session")
def test_an_auto_run_matches_a_fixed_count_within_1e9_and_reports_its_choice(tmp_path):
    reference = Trainer(make_spec(workers=1), tmp_path / "one").run()
    summary, events = recorded(
        make_spec(workers="auto"), tmp_path / "auto", max_cpus=1.0, measure=lambda spec, d: 1.0
    )
    assert summary["status"] == "succeeded" and summary["workers"] == 2  # 1 CPU / 0.5
    assert summary["workers_reason"].startswith("chose 2 workers: gradient compute 1000 ms")
    assert (events[0]["workers"], events[0]["workers_reason"]) == (2, summary["workers_reason"])
    got, expected = final_params(tmp_path / "auto"), final_params(tmp_path / "one")
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-9)
    assert reference["workers_reason"] == "set by the spec"


def test_an_auto_run_resumes_with_the_count_it_chose(tmp_path, monkeypatch):
    no_ray(monkeypatch)
    spec, stop = make_spec(workers="auto"), trainer_module.threading.Event()

    def stop_at_3(event):
        if event["type"] == "step" and event["step"] == 3:
            stop.set()

    tiny = lambda spec, data: 1e-6  # noqa: E731
    first = Trainer(spec, tmp_path, callback=stop_at_3, stop_event=stop, measure=tiny).run()
    assert first["status"] == "cancelled" and first["workers"] == 0
    heavy = lambda spec, data: 1.0  # noqa: E731  (would choose workers, were it asked)
    second = Trainer(spec, tmp_path, measure=heavy).run()
    assert second["status"] == "succeeded" and second["workers"] == 0
    assert second["workers_reason"] == "kept from the checkpoint at step 3"


def test_workers_0_steps_at_a_workers_blas_threads_and_gives_the_process_its_own_back(
    tmp_path, monkeypatch
):
    """The limit is held between steps, lifted at each evaluation and at the end, and
    also when the run ends with an error (here a callback's)."""
    from threadpoolctl import ThreadpoolController, threadpool_limits

    no_ray(monkeypatch)
    libs = ThreadpoolController().lib_controllers

    def threads():
        return [lib.num_threads for lib in libs]

    seen = {"step": [], "evaluation": []}

    def on_event(event):
        if event["type"] == "step":
            seen["evaluation" if "val_loss" in event else "step"].append(threads())
            if event["step"] == 9 and "raise" in seen:
                raise RuntimeError("a callback's bug")

    # evaluations every epoch (6 steps) and no checkpoint before the end: the model is read
    # after steps 6 and 12 only
    spec = make_spec(workers=0, cpus_per_worker=1, epochs=2, checkpoint_every=10**6)
    with threadpool_limits(2):  # the process's own: more than a worker's one
        own = threads()
        assert Trainer(spec, tmp_path / "a", callback=on_event).run()["status"] == "succeeded"
        assert threads() == own
        seen["raise"] = True
        with pytest.raises(RuntimeError, match="a callback's bug"):
            Trainer(spec, tmp_path / "b", callback=on_event).run()
        assert threads() == own
    assert seen["step"] and all(t == [1] * len(own) for t in seen["step"])
    assert seen["evaluation"] and all(t == own for t in seen["evaluation"])
