"""Generation from a trained transformer and the exact-match metric (issue 15): the metric on
each evaluation, in the history and the service's metric points; the generate route and
`Job.generate`. One tiny addition model, trained in-process once for the module."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.fakes import make_client, submit
from workers.spec import TrainingSpec
from workers.trainer import Trainer

TINY_LM = {
    "type": "transformer",
    "vocab_size": 13,
    "context": 9,
    "d_model": 8,
    "heads": 2,
    "layers": 1,
    "dim_feedforward": 16,
    "dropout": 0.0,
}
ADDITION = {"type": "builtin", "name": "addition", "n_digits": 2, "n_samples": 60}


def lm_spec(**overrides) -> dict:
    return {
        "name": "adder",
        "model": TINY_LM,
        "data": ADDITION,
        "loss": "cross_entropy",
        "optimizer": {"type": "adam", "lr": 0.02},
        "epochs": 2,
        "batch_size": 18,
        "validation_fraction": 0.2,
        "workers": 0,
        "keep_best": {"metric": "val_exact_match"},
        **overrides,
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The service on a store with one addition job, whose run (in-process, 6 steps) wrote
    its checkpoints into the job's directory; and the run's events and summary."""
    tmp_path = tmp_path_factory.mktemp("generate")
    client, store, _ = make_client(tmp_path)
    job_id = submit(client, **lm_spec())["id"]
    events = []
    spec = TrainingSpec.model_validate(lm_spec())
    summary = Trainer(spec, tmp_path / "jobs" / job_id, callback=events.append).run()
    assert summary["status"] == "succeeded", summary
    return client, store, job_id, events


# -- the metric ---------------------------------------------------------------------------


def test_each_evaluation_scores_exact_match_on_the_event_and_in_the_history(served):
    _, _, job_id, events = served
    evaluated = [e for e in events if e["type"] == "step" and "val_loss" in e]
    assert [e["step"] for e in evaluated] == [3, 6]
    assert all(0.0 <= e["val_exact_match"] <= 1.0 for e in evaluated)
    steps = [e for e in events if e["type"] == "step" and "val_loss" not in e]
    assert steps and all("val_exact_match" not in e for e in steps)


def test_the_best_checkpoint_may_be_chosen_by_exact_match(served, tmp_path):
    from workers import checkpoint

    client, _, job_id, events = served
    best = checkpoint.read_best(client.app.state.settings.jobs_dir / job_id)
    assert (best["metric"], best["mode"]) == ("val_exact_match", "max")


def test_exact_match_is_refused_for_data_other_than_a_builtin_task():
    obj = lm_spec(
        model={"type": "mlp", "sizes": [2, 4, 2]},
        data={"type": "builtin", "name": "moons"},
        early_stopping={"metric": "val_exact_match", "patience": 2},
    )
    from workers.data import check_data

    with pytest.raises(ValidationError) as err:
        check_data(TrainingSpec.model_validate(obj))
    found = [(e["loc"], e["msg"]) for e in err.value.errors()]
    assert [loc for loc, _ in found] == [("early_stopping", "metric"), ("keep_best", "metric")]
    assert all("val_exact_match scores the builtin tasks" in msg for _, msg in found)


def test_the_service_stores_exact_match_on_its_metric_points(tmp_path):
    from service.dispatcher import POINT_KEYS

    client, store, _ = make_client(tmp_path)
    job_id = submit(client, **lm_spec())["id"]
    assert "val_exact_match" in POINT_KEYS  # what the dispatcher copies from a StepEvent
    store.claim("fake", lambda job: job.id == job_id or False)
    point = {"step": 3, "epoch": 0, "val_loss": 0.5, "val_exact_match": 0.25}
    store.progress(job_id, "fake", {"step": 3}, point)
    (stored,) = client.get(f"/api/v1/jobs/{job_id}/metrics").json()["points"]
    assert stored["val_exact_match"] == 0.25
