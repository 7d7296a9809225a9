"""The training recipe (issue 17) in a run: the lr schedule, clipping and AdamW; the best
checkpoint and early stopping; and the spec's checks of them. In-process (`workers: 0`);
test_distributed.py checks the recipe does not depend on the workers or the exchange."""

import threading

import numpy as np
import pytest
from pydantic import ValidationError

from core import optim
from tests.fakes import make_client
from tests.fakes import spec as fake_spec
from tests.helpers import RECIPE, final_params, kill_9_at_checkpoint, make_spec, small_moons
from workers import checkpoint as ckpt
from workers.data import with_data
from workers.health import advice_for
from workers.spec import TrainingSpec
from workers.trainer import Trainer

# A run that stops early: its val_loss is best at step 18 of 60, then worse twice.
EARLY = {
    "optimizer": {"type": "sgd", "lr": 0.3, "momentum": 0.9},
    "epochs": 10,
    "eval_every": 3,
    "early_stopping": {"patience": 2},
    "keep_checkpoints": 1,
}


def recorded(spec, out, **kwargs):
    events = []
    return Trainer(spec, out, callback=events.append, **kwargs).run(), events


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    summary, events = recorded(make_spec(workers=0, **RECIPE), out)
    assert summary["status"] == "succeeded" and summary["steps"] == 18
    return events, final_params(out), ckpt.load_latest(out).optimizer_state


def test_every_step_reports_its_scheduled_lr_and_the_norm_before_clipping(uninterrupted):
    steps = [e for e in uninterrupted[0] if e["type"] == "step"]
    schedule = optim.cosine_schedule(0.05, 18, 8, 0.001)
    assert [e["lr"] for e in steps] == [schedule.lr_at(s) for s in range(18)]
    assert steps[0]["lr"] == 0.05 / 8 and max(e["lr"] for e in steps) == steps[8]["lr"]
    assert any(e["grad_norm"] > 0.3 for e in steps)  # the clipping had something to clip


# make_spec's run has 18 steps, a checkpoint every 5; RECIPE's warmup ends at step 8.
@pytest.mark.parametrize("at", [5, 15], ids=["mid-warmup", "mid-cosine"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, uninterrupted, at):
    spec = make_spec(workers=0, **RECIPE)
    kill_9_at_checkpoint(spec, tmp_path, at)
    assert ckpt.load_latest(tmp_path).step == at
    summary, _ = recorded(spec, tmp_path)
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] == at
    params, expected = final_params(tmp_path), uninterrupted[1]
    assert all(np.array_equal(params[k], expected[k]) for k in expected)
    opt = ckpt.load_latest(tmp_path).optimizer_state
    for i, entries in uninterrupted[2]["state"].items():
        assert all(np.array_equal(opt["state"][i][k], v) for k, v in entries.items())


def test_early_stopping_keeps_the_best_and_a_resumed_run_stops_at_the_same_step(tmp_path):
    spec, out = make_spec(workers=0, **EARLY), tmp_path / "run"
    summary, events = recorded(spec, out)
    val = {e["step"]: e["val_loss"] for e in events if "val_loss" in e}
    best = min(val, key=val.get)
    assert summary["status"] == "succeeded" and summary["stopped_early"] is True
    assert summary["best_step"] == best and summary["steps"] == best + 2 * 3 < 60
    assert all(val[s] >= val[best] for s in val if s > best)  # it stopped improving there
    assert ckpt.read_best(out) == {
        "step": best,
        "checkpoint": f"step-{best}",
        "metric": "val_loss",
        "mode": "min",
        "value": val[best],
    }
    # keep_checkpoints 1, and the best beside it
    assert [c.name for c in ckpt.list_checkpoints(out)] == [f"step-{best}", f"step-{best + 6}"]
    assert ckpt.load_checkpoint(ckpt.checkpoint_dir(out, f"step-{best}")).state["step"] == best

    # Stopped right after the best, then resumed: the evaluation history in the checkpoint
    # counts on to the same stop.
    stop, again = threading.Event(), tmp_path / "again"

    def stop_after_best(event):
        if event["type"] == "step" and event["step"] == best + 1:
            stop.set()

    first = Trainer(spec, again, callback=stop_after_best, stop_event=stop).run()
    assert first["status"] == "cancelled" and first["stopped_early"] is False
    second, _ = recorded(spec, again)
    assert second["resumed_from_step"] == best + 1
    assert {k: second[k] for k in ("steps", "stopped_early", "best_step", "val_loss")} == {
        k: summary[k] for k in ("steps", "stopped_early", "best_step", "val_loss")
    }
    assert ckpt.read_best(again) == ckpt.read_best(out)


def test_predict_answers_from_the_best_step_of_an_early_stopped_job(tmp_path):
    """The service's default checkpoint of a job that stopped early is its best step's:
    predict's outputs are the model's with that step's model.safetensors."""
    from core import Tensor, no_grad
    from workers.model import build_model

    client, _, _ = make_client(tmp_path)
    body = small_moons(name="t", batch_size=30, **{**EARLY, "workers": 0})
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id, spec = r.json()["id"], TrainingSpec.model_validate(body)
    summary = Trainer(spec, tmp_path / "jobs" / job_id).run()
    assert summary["stopped_early"] is True and summary["best_step"] < summary["steps"]

    rows = [[-1.0, 0.5], [1.0, 0.0], [0.5, -0.4]]
    r = client.post(f"/api/v1/jobs/{job_id}/predict", json={"inputs": rows})
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"] == f"step-{summary['best_step']}"
    best = ckpt.checkpoint_dir(tmp_path / "jobs" / job_id, f"step-{summary['best_step']}")
    model = build_model(spec)
    model.load_state_dict(ckpt.load_model_state(best))
    with no_grad():
        np.testing.assert_array_equal(r.json()["outputs"], model(Tensor(np.array(rows))).data)


def describe_data(spec: dict):
    return TrainingSpec.model_validate(spec, context=with_data())


def test_the_spec_names_the_recipe_field_at_fault():
    cosine = {"type": "cosine", "warmup_steps": 18}  # the run has 18 steps
    with pytest.raises(ValidationError) as err:
        describe_data(make_spec(optimizer={"type": "adamw", "lr": 0.1, "schedule": cosine}))
    (e,) = err.value.errors()
    assert e["loc"] == ("optimizer", "adamw", "schedule", "cosine", "warmup_steps")
    assert e["msg"].startswith("optimizer.schedule.warmup_steps (18) must be less than")

    sine = {"type": "builtin", "name": "sine", "n_samples": 100}
    regression = {"model": {"type": "mlp", "sizes": [1, 4, 1]}, "data": sine, "loss": "mse"}
    with pytest.raises(ValidationError) as err:
        describe_data(make_spec(**regression, early_stopping={"metric": "val_accuracy"}))
    locs = [e["loc"] for e in err.value.errors()]  # keep_best follows early_stopping
    assert locs == [("early_stopping", "metric"), ("keep_best", "metric")]

    with pytest.raises(ValidationError) as err:
        make_spec(validation_fraction=0, keep_best={"metric": "val_loss"})
    assert err.value.errors()[0]["loc"] == ("keep_best",)
    assert make_spec(early_stopping={"metric": "val_accuracy"}).keep_best.mode == "max"


def test_the_math_fields_of_the_recipe_enter_the_hash_only_when_set():
    plain = make_spec()
    assert (
        make_spec(
            optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": {"type": "constant"}}
        ).spec_hash()
        == plain.spec_hash()
    )
    assert "schedule" not in plain.model_dump()["optimizer"]
    changed = [
        {"grad_clip": {"max_norm": 1.0}},
        {"eval_every": 2},
        {"early_stopping": {}},
        {"optimizer": {"type": "sgd", "lr": 0.1, "schedule": {"type": "step", "step_size": 5}}},
    ]
    hashes = {make_spec(**c).spec_hash() for c in changed} | {plain.spec_hash()}
    assert len(hashes) == len(changed) + 1
    assert make_spec(keep_best={}).spec_hash() == plain.spec_hash()  # which one is kept


def test_each_health_warning_names_the_spec_field_that_addresses_it():
    relu = {"type": "mlp", "sizes": [2, 8, 2], "activation": "relu"}
    plain = advice_for(make_spec(model=relu | {"bias_init": -3.0}), 18)
    assert plain["exploding"] == {
        "field": "grad_clip.max_norm",
        "change": {"grad_clip": {"max_norm": 1.0}},
    }
    assert plain["dead"] == {"field": "model.bias_init", "change": {"model": {"bias_init": 0.0}}}
    assert plain["vanishing"] == {"field": "model.sizes", "change": None}
    clipped = advice_for(make_spec(model=relu, grad_clip={"max_norm": 1.0}), 18)
    warmup = {"type": "cosine", "warmup_steps": 5}
    assert clipped["exploding"]["change"] == {"optimizer": {"schedule": warmup}}
    assert clipped["dead"]["change"] == {"model": {"activation": "tanh"}}
    recipe = advice_for(make_spec(**RECIPE), 18)  # clipped and warmed up already
    assert recipe["exploding"] == {"field": "optimizer.lr", "change": {"optimizer": {"lr": 0.005}}}
    assert recipe["vanishing"]["change"] == {"model": {"activation": "relu"}}  # tanh


def test_the_service_takes_the_recipe_and_names_its_field_in_a_422(tmp_path):
    client, _, _ = make_client(tmp_path, paused=True)
    optimizer = {"type": "adamw", "lr": 0.05, "schedule": {"type": "cosine", "warmup_steps": 10}}
    recipe = {"optimizer": optimizer, "grad_clip": {"max_norm": 1.0}, "early_stopping": {}}
    r = client.post("/api/v1/jobs", json=fake_spec(**recipe))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["keep_best"] == {"metric": "val_loss", "mode": "min"}
    optimizer["schedule"]["warmup_steps"] = 24  # 8 steps per epoch, 3 epochs
    r = client.post("/api/v1/jobs", json=fake_spec(optimizer=optimizer))
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"][-3:] == ["schedule", "cosine", "warmup_steps"]
    assert error["msg"].startswith("optimizer.schedule.warmup_steps (24) must be less")
