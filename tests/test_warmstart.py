"""Warm start (`init_from`, issue 17): a fine-tune starts from a finished run's checkpoint,
its spec is pinned to that checkpoint's weights, it resumes from its own checkpoints
bit-identically, and a model of other shapes is refused naming the parameter. In-process
runs (`workers: 0`) of the small moons spec; no Ray."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from tests.fakes import make_client, spec, submit
from tests.helpers import final_params, make_spec
from workers import checkpoint as ckpt
from workers import cli as train_cli
from workers.config import WorkerSettings
from workers.spec import TrainingSpec
from workers.trainer import Trainer, train
from workers.warmstart import InitFromError, pin

ADAM = {"type": "adam", "lr": 0.05}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished in-process Adam run: its directory and its newest checkpoint."""
    out = tmp_path_factory.mktemp("source")
    assert train(make_spec(workers=0, optimizer=ADAM), out)["status"] == "succeeded"
    return out, ckpt.load_latest(out)


def fine_tune(source_dir, **init):
    """The same model with a 10x smaller lr, from `source_dir`, pinned."""
    init_from = {"path": str(source_dir), **init}
    s = make_spec(workers=0, optimizer={"type": "adam", "lr": 0.005}, init_from=init_from)
    return pin(s, WorkerSettings())


def arrays_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_first_step_starts_from_the_source_checkpoint(source, tmp_path):
    src, latest = source
    s = fine_tune(src, load_optimizer=True)
    assert s.init_from.checkpoint == latest.path.name  # pinned: the step, and its weights
    assert s.init_from.sha256 == ckpt.checkpoint_info(latest.path).sha256
    seen = {}

    def at_start(event):
        if event["type"] == "started":
            seen["model"] = trainer.model.state_dict()
            seen["opt"] = trainer.opt.state_dict()

    trainer = Trainer(s, tmp_path / "tuned", callback=at_start)
    assert trainer.run()["status"] == "succeeded"
    assert arrays_equal(seen["model"], latest.model_state)
    mine, theirs = seen["opt"]["state"], latest.optimizer_state["state"]
    assert all(arrays_equal(mine[i], theirs[i]) for i in theirs)  # moments and step counts
    assert seen["opt"]["param_groups"][0]["lr"] == 0.005  # the fine-tune's own lr
    assert not arrays_equal(final_params(tmp_path / "tuned"), latest.model_state)


def test_the_spec_hash_holds_the_source_weights(source):
    src, _ = source
    pinned = fine_tune(src)
    other = pinned.model_copy(update={"init_from": pinned.init_from.model_copy()})
    other.init_from.sha256 = "0" * 64
    assert pinned.spec_hash() != other.spec_hash()
    moved = pinned.model_copy(update={"init_from": pinned.init_from.model_copy()})
    moved.init_from.path = "/elsewhere/same/weights"
    assert pinned.spec_hash() == moved.spec_hash()  # where they lie is not their math
    plain = make_spec(workers=0, optimizer={"type": "adam", "lr": 0.005})
    assert plain.spec_hash() != pinned.spec_hash()


def test_a_warm_started_run_resumes_bit_identical(source, tmp_path):
    src, _ = source
    s = fine_tune(src)
    whole = train(s, tmp_path / "whole")
    stop = threading.Event()

    def stop_at_4(event):
        if event["type"] == "step" and event["step"] == 4:
            stop.set()

    first = Trainer(s, tmp_path / "split", callback=stop_at_4, stop_event=stop).run()
    assert first["status"] == "cancelled"
    second = train(s, tmp_path / "split")
    assert second["resumed_from_step"] == 4
    assert arrays_equal(final_params(tmp_path / "split"), final_params(tmp_path / "whole"))
    assert second["final_loss"] == whole["final_loss"]


def test_pin_refuses_what_does_not_fit(source, tmp_path):
    src, _ = source
    wider = make_spec(
        workers=0,
        model={"type": "mlp", "sizes": [2, 16, 2], "activation": "tanh"},
        init_from={"path": str(src)},
    )
    with pytest.raises(InitFromError, match=r"layers.0.weight has shape \[16, 2\].*\[8, 2\]"):
        pin(wider, WorkerSettings())
    with pytest.raises(InitFromError, match="step-999"):
        fine_tune(src, checkpoint="step-999")
    sgd = {"type": "sgd", "lr": 0.1, "momentum": 0.9}
    with pytest.raises(InitFromError, match="another kind"):
        init = {"path": str(src), "load_optimizer": True}
        pin(make_spec(workers=0, optimizer=sgd, init_from=init), WorkerSettings())
    with pytest.raises(InitFromError, match="not those pinned"):
        fine_tune(src, sha256="0" * 64)
    with pytest.raises(InitFromError, match="no directory"):
        fine_tune(tmp_path / "nothing")


def test_service_resolves_job_ids_and_refuses_other_shapes(source, tmp_path):
    src, latest = source
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    saved = ckpt.save_checkpoint(
        tmp_path / "jobs" / job_id, 18, latest.model_state, latest.optimizer_state, latest.state
    )
    tuned = submit(client, init_from={"job": job_id, "checkpoint": "latest"})
    assert tuned["spec"]["init_from"]["checkpoint"] == "step-18"
    assert tuned["spec"]["init_from"]["sha256"] == ckpt.checkpoint_info(saved).sha256
    # As the dispatcher runs it: the job id found under the service's jobs directory.
    accepted = TrainingSpec.model_validate(tuned["spec"] | {"workers": 0})
    stop, settings = threading.Event(), WorkerSettings(jobs_dir=tmp_path / "jobs")
    stop.set()  # stops before the first step, with a checkpoint of the weights it starts from
    Trainer(accepted, tmp_path / "tuned", stop_event=stop, settings=settings).run()
    assert arrays_equal(final_params(tmp_path / "tuned"), latest.model_state)
    wider = spec(
        model={"type": "mlp", "sizes": [2, 16, 2], "activation": "tanh"},
        init_from={"job": job_id},
    )
    r = client.post("/api/v1/jobs", json=wider)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "init_from"]
    assert "layers.0.weight" in error["msg"] and "[16, 2]" in error["msg"]
    assert "[8, 2]" in error["msg"]
    for init, field in (({"job": "nope"}, "job"), ({"path": str(src)}, "path")):
        r = client.post("/api/v1/jobs", json=spec(init_from=init))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == [
            "body",
            "init_from",
            field,
        ], r.text


def test_shardgrad_train_takes_a_path_and_refuses_a_job(source, tmp_path, capsys):
    src, latest = source
    spec_file = tmp_path / "tune.json"
    tune = make_spec(workers=0, epochs=1, init_from={"path": str(src)}).model_dump(mode="json")
    spec_file.write_text(json.dumps(tune))
    out = tmp_path / "out"
    assert train_cli.main(["train", str(spec_file), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "succeeded"
    state = ckpt.load_latest(out).state
    pinned = TrainingSpec.model_validate(tune).model_copy()
    assert state["spec_hash"] == pin(pinned, WorkerSettings()).spec_hash()
    spec_file.write_text(json.dumps(tune | {"init_from": {"job": "abc"}}))
    assert train_cli.main(["train", str(spec_file), "--out", str(tmp_path / "x")]) == 2
    assert "init_from.job" in capsys.readouterr().err
