"""Data-parallel training on Ray: exactness, resume, worker death, divergence."""

import os
import signal

import numpy as np
import pytest

import core.functional as F
from core import Tensor
from tests.helpers import RECIPE, final_params, make_spec
from workers import checkpoint as ckpt
from workers.data import PreparedData
from workers.model import LOSSES, build_model, build_optimizer
from workers.sampler import Schedule, split_batch
from workers.spec import TrainingSpec
from workers.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("ray_session")

# Every guarantee holds on every exchange (workers/exchange.py). Tests that take the
# `exchange` fixture run on the replicated step (the default); those parametrized over
# BOTH, and the worker-count matrix, run on plain tasks too. All compare bit for bit with
# the uninterrupted run of the third exchange, the compiled gather.
BOTH = pytest.mark.parametrize("exchange", ["replicated", "tasks"], indirect=True)


@pytest.fixture
def exchange(request, monkeypatch):
    kind = getattr(request, "param", "replicated")
    monkeypatch.setenv("SHARDGRAD_EXCHANGE", kind)
    return kind


def run(trainer: Trainer, exchange: str) -> dict:
    """Run, and check that the job stayed on `exchange` (no silent fallback)."""
    summary = trainer.run()
    assert (trainer.pool.kind, trainer.pool.fallback_reason) == (exchange, None)
    return summary


def reference_loop(spec: TrainingSpec) -> dict[str, np.ndarray]:
    """Plain single-process SGD on the same global batches, written with core alone."""
    data = PreparedData(spec)
    schedule = Schedule(len(data.X), spec.batch_size, spec.epochs, spec.seed)
    model = build_model(spec)
    opt = build_optimizer(spec, model.parameters())
    for step in range(schedule.total_steps):
        idx = schedule.batch(step)
        opt.zero_grad()
        LOSSES[spec.loss](model(Tensor(data.X[idx])), data.y[idx]).backward()
        opt.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 2-worker run that resume and worker-death tests must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = Trainer(make_spec(exchange="compiled"), out).run()
    assert summary["status"] == "succeeded"
    return summary, final_params(out)


def test_schedule_splits_global_batch_in_rank_order():
    schedule = Schedule(n_train=160, batch_size=30, epochs=2, seed=3)
    assert schedule.steps_per_epoch == 6 and schedule.total_steps == 12
    epoch0 = np.concatenate([schedule.batch(s) for s in range(6)])
    assert sorted(epoch0.tolist()) == list(range(160))  # each row once per epoch
    assert len(schedule.batch(5)) == 10  # uneven last batch
    assert not np.array_equal(schedule.batch(0), schedule.batch(6))  # new permutation per epoch
    pieces = split_batch(schedule.batch(5), 3)
    assert [len(p) for p in pieces] == [4, 3, 3]
    assert np.array_equal(np.concatenate(pieces), schedule.batch(5))


@pytest.mark.parametrize(
    ("exchange", "workers"),
    [(exchange, workers) for exchange in ("replicated", "tasks") for workers in (1, 2, 3, 4)],
    indirect=["exchange"],
)
def test_parameters_do_not_depend_on_worker_count(tmp_path, exchange, workers, uninterrupted):
    spec = make_spec(workers=workers)
    summary = run(Trainer(spec, tmp_path), exchange)
    assert summary["status"] == "succeeded" and summary["steps"] == 18
    expected = reference_loop(spec)
    got = final_params(tmp_path)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-9)
        np.testing.assert_allclose(got[key], uninterrupted[1][key], rtol=0, atol=1e-9)


@BOTH
def test_mse_and_adam_match_reference(tmp_path, exchange):
    spec = make_spec(
        model={"type": "mlp", "sizes": [1, 8, 1], "activation": "relu"},
        data={"type": "builtin", "name": "sine", "n_samples": 120, "noise": 0.05},
        loss="mse",
        optimizer={"type": "adam", "lr": 0.01, "weight_decay": 0.01},
        workers=3,
        batch_size=16,
    )
    assert run(Trainer(spec, tmp_path), exchange)["status"] == "succeeded"
    expected, got = reference_loop(spec), final_params(tmp_path)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-9)


@BOTH
def test_stop_and_resume_is_bit_identical(tmp_path, exchange, uninterrupted):
    spec = make_spec()
    steps = []

    def stop_at_7(event):
        if event["type"] == "step":
            steps.append(event["step"])
            if event["step"] == 7:
                trainer.stop_event.set()

    trainer = Trainer(spec, tmp_path, callback=stop_at_7)
    first = run(trainer, exchange)
    # The stop lands after the steps in flight (the replicated step runs blocks of steps).
    landed = steps[-1]
    assert 7 <= landed < 18
    assert first["status"] == "cancelled" and first["steps"] == landed
    assert ckpt.load_latest(tmp_path).step == landed

    second = run(Trainer(spec, tmp_path), exchange)
    assert second["status"] == "succeeded" and second["resumed_from_step"] == landed
    expected = uninterrupted[1]
    got = final_params(tmp_path)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)

    again = Trainer(spec, tmp_path).run()  # a finished run answers at once, same summary
    assert again == second


def test_an_abandoned_run_writes_nothing_more_and_resumes_bit_identically(
    tmp_path, exchange, uninterrupted
):
    """The service lost the job's lease: its Trainer stops at once, without the checkpoint
    a stop writes (another process may be writing there); the job resumes from step 5."""

    steps = []

    def abandon_at_7(event):
        if event["type"] == "step":
            steps.append(event["step"])
            if event["step"] == 7:
                trainer.abandon_event.set()
                trainer.stop_event.set()

    trainer = Trainer(make_spec(), tmp_path, callback=abandon_at_7)
    first = run(trainer, exchange)
    assert first["status"] == "cancelled" and 7 <= steps[-1] <= 10  # 10: the block's end
    assert first["error"] == f"abandoned at step {steps[-1]}; nothing written"
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [5]
    second = run(Trainer(make_spec(), tmp_path), exchange)
    assert second["status"] == "succeeded" and second["resumed_from_step"] == 5
    expected = uninterrupted[1]
    assert all(np.array_equal(final_params(tmp_path)[k], expected[k]) for k in expected)


def test_resume_with_other_worker_count_is_close(tmp_path, exchange, uninterrupted):
    def stop_at_4(event):
        if event["type"] == "step" and event["step"] == 4:
            trainer.stop_event.set()

    trainer = Trainer(make_spec(), tmp_path, callback=stop_at_4)
    assert run(trainer, exchange)["status"] == "cancelled"
    assert run(Trainer(make_spec(workers=3), tmp_path), exchange)["status"] == "succeeded"
    for key, value in uninterrupted[1].items():
        np.testing.assert_allclose(final_params(tmp_path)[key], value, rtol=0, atol=1e-9)


def test_a_different_spec_is_refused_in_the_same_out_dir(tmp_path):
    assert Trainer(make_spec(epochs=1), tmp_path).run()["status"] == "succeeded"
    summary = train(make_spec(epochs=1, optimizer={"type": "sgd", "lr": 0.2}), tmp_path)
    assert summary["status"] == "failed"
    assert "different spec" in summary["error"]
    # Execution fields may change between attempts:
    assert train(make_spec(epochs=1, workers=1, name="other"), tmp_path)["status"] == "succeeded"


@BOTH
def test_worker_killed_mid_run_is_replaced_bit_identically(tmp_path, exchange, uninterrupted):
    def kill_one(event):
        if event["type"] == "step" and event["step"] == 4:
            os.kill(trainer.pool.worker_pids()[1], signal.SIGKILL)

    trainer = Trainer(make_spec(), tmp_path, callback=kill_one)
    summary = run(trainer, exchange)
    assert summary["status"] == "succeeded"
    assert summary["worker_failures"] == 1
    expected = uninterrupted[1]
    got = final_params(tmp_path)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """A job with AdamW, a cosine schedule and clipping: in-process, and on 2 workers over
    the compiled gather."""
    outs = [tmp_path_factory.mktemp("recipe0"), tmp_path_factory.mktemp("recipe2")]
    Trainer(make_spec(workers=0, **RECIPE), outs[0]).run()
    Trainer(make_spec(exchange="compiled", **RECIPE), outs[1]).run()
    return [final_params(out) for out in outs]


@pytest.mark.parametrize(
    ("exchange", "workers"),
    [("replicated", 1), ("replicated", 2), ("tasks", 2)],
    indirect=["exchange"],
)
def test_a_recipe_job_does_not_depend_on_workers_or_exchange(
    tmp_path, exchange, workers, recipe_runs
):
    assert run(Trainer(make_spec(workers=workers, **RECIPE), tmp_path), exchange)["steps"] == 18
    got, (in_process, compiled) = final_params(tmp_path), recipe_runs
    same = in_process if workers == 1 else compiled  # bit for bit at the same sum order
    assert all(np.array_equal(got[k], same[k]) for k in same)
    for key in in_process:
        np.testing.assert_allclose(got[key], in_process[key], rtol=0, atol=1e-9)


@BOTH
def test_too_many_worker_failures_fail_the_run(tmp_path, exchange):
    def kill_one(event):
        if event["type"] == "step" and event["step"] == 2:
            os.kill(trainer.pool.worker_pids()[0], signal.SIGKILL)

    trainer = Trainer(make_spec(max_failures=0), tmp_path, callback=kill_one)
    summary = run(trainer, exchange)
    assert summary["status"] == "failed"
    assert "exceed max_failures=0" in summary["error"]


@BOTH
def test_divergence_stops_with_a_clear_message_and_no_nan_checkpoint(tmp_path, exchange):
    spec = make_spec(
        model={"type": "mlp", "sizes": [1, 32, 1], "activation": "relu"},
        data={"type": "builtin", "name": "sine", "n_samples": 200, "noise": 0.1},
        loss="mse",
        optimizer={"type": "sgd", "lr": 50},
        checkpoint_every=1,
    )
    summary = run(Trainer(spec, tmp_path), exchange)
    assert summary["status"] == "failed"
    assert summary["error"].startswith("diverged at step ")
    assert "(loss=" in summary["error"]
    for info in ckpt.list_checkpoints(tmp_path):
        state = ckpt.load_checkpoint(info.path).model_state
        assert all(np.isfinite(v).all() for v in state.values())


def test_cross_entropy_sum_equals_sum_of_pieces():
    """The identity the whole design rests on: sums over pieces add up to the batch sum."""
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(10, 3)), rng.integers(0, 3, size=10)
    whole = F.cross_entropy(Tensor(logits), y, reduction="sum").data
    parts = sum(
        F.cross_entropy(Tensor(logits[s]), y[s], reduction="sum").data
        for s in (slice(0, 4), slice(4, 10))
    )
    assert np.isclose(whole, parts, rtol=0, atol=1e-12)
