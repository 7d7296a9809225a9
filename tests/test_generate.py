"""Generation from a trained transformer and the exact-match metric (issue 15): the metric on
each evaluation, in the history and the service's metric points; the generate route and
`Job.generate`. One tiny addition model, trained in-process once for the module."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tests.fakes import locs, make_client, submit
from workers.catalogue import DIGITS_VOCAB as DIGITS
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


# -- the route, the client and the CLI ----------------------------------------------------


def post(client, job_id, **body):
    return client.post(f"/api/v1/jobs/{job_id}/generate", json={"prompt": "12+34=", **body})


def answer(client, job_id, **body) -> dict:
    r = post(client, job_id, **body)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_generation_is_the_engines_on_the_chosen_checkpoint(served):
    from workers.checkpoint import load_model_state, resolve_checkpoint
    from workers.generate import generate
    from workers.model import build_model, lm_logits
    from workers.sequences import decode, encode

    client, _, job_id, _ = served
    got = answer(client, job_id, max_tokens=5)
    run_dir = client.app.state.settings.jobs_dir / job_id
    assert got["checkpoint"] == resolve_checkpoint(run_dir, None).name  # the best
    model = build_model(TrainingSpec.model_validate(lm_spec()))
    model.load_state_dict(load_model_state(resolve_checkpoint(run_dir, "best")))
    tokens, logprobs = generate(lm_logits(model), encode("12+34=", DIGITS), 5, context=9)
    assert got["tokens"] == tokens.tolist() and got["text"] == decode(tokens, DIGITS)
    assert got["logprobs"] == pytest.approx(logprobs.tolist(), abs=1e-12)
    assert all(lp <= 0 for lp in got["logprobs"])


def test_sampling_is_reproducible_from_the_seed(served):
    client, _, job_id, _ = served
    hot = {"max_tokens": 24, "temperature": 5.0}
    first = [answer(client, job_id, seed=s, **hot)["tokens"] for s in range(3)]
    assert first == [answer(client, job_id, seed=s, **hot)["tokens"] for s in range(3)]
    assert len({tuple(t) for t in first}) > 1  # the seed is what chooses
    greedy = answer(client, job_id, max_tokens=6)["tokens"]
    assert answer(client, job_id, max_tokens=6, temperature=2.0, top_k=1)["tokens"] == greedy


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"prompt": "12x4="}, ("body", "prompt", 2)),
        ({"max_tokens": 0}, ("body", "max_tokens")),
        ({"max_tokens": 257}, ("body", "max_tokens")),
        ({"temperature": -1}, ("body", "temperature")),
        ({"top_k": 0}, ("body", "top_k")),
        ({"prompt": ""}, ("body", "prompt")),
    ],
)
def test_bad_requests_get_a_422_naming_the_field(served, body, loc):
    client, _, job_id, _ = served
    r = post(client, job_id, **body)
    assert locs(r) == [loc]
    if loc[-1] == 2:
        assert "'x' at position 2 is not in the vocabulary" in r.json()["detail"][0]["msg"]


def test_a_job_without_checkpoint_is_a_409_and_one_not_a_transformer_a_422(served):
    client, _, _, _ = served
    waiting = submit(client, **lm_spec(name="waiting"))["id"]
    r = post(client, waiting)
    assert r.status_code == 409 and "checkpoint" in r.json()["detail"]
    moons = submit(client)["id"]
    r = post(client, moons)
    assert locs(r) == [("path", "job_id")] and "needs a transformer" in r.text


def test_the_client_and_the_cli_print_the_completion(served, capsys, monkeypatch):
    from fastapi.testclient import TestClient

    from service import cli
    from service.client import Client, Job

    client, _, job_id, _ = served
    api = Client("http://testserver")
    api.http = TestClient(client.app, base_url="http://testserver/api/v1")
    expected = answer(client, job_id, max_tokens=4, temperature=1.0, seed=7)
    got = Job.of(api, job_id).generate("12+34=", max_tokens=4, temperature=1.0, seed=7)
    assert got.model_dump() == expected

    monkeypatch.setattr(cli, "Client", lambda url=None: api)
    argv = ["generate", job_id, "--prompt", "12+34=", "--max-tokens", "4"]
    assert cli.main([*argv, "--temperature", "1", "--seed", "7"]) == 0
    assert capsys.readouterr().out == expected["text"] + "\n"
    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == answer(client, job_id, max_tokens=4)


# -- the example ----------------------------------------------------------------------------

# examples/addition-transformer.json reaches val_exact_match >= 0.95 on the 2-digit sums in
# 25 epochs (0.956; about 2.5 min, the README gives its wall time). The suite runs the same
# recipe for FAST_EPOCHS epochs (its cosine schedule shorter) against a lower bar: it
# scored 0.34 when measured, from 0.007 after the first epoch.
FAST_EPOCHS, FAST_BAR = 10, 0.25


@pytest.mark.slow
def test_the_addition_example_learns_to_add(tmp_path):
    from tests.helpers import example_spec

    spec = TrainingSpec.model_validate(example_spec("addition-transformer", epochs=FAST_EPOCHS))
    assert spec.workers == 0 and spec.data.n_samples == 5050  # in-process, every pair
    scores = []
    record = lambda e: "val_exact_match" in e and scores.append(e["val_exact_match"])  # noqa: E731
    summary = Trainer(spec, tmp_path, callback=record).run()
    assert summary["status"] == "succeeded" and len(scores) == FAST_EPOCHS
    assert scores[-1] >= FAST_BAR
