"""Every training guarantee on a small transformer with dropout on (issue 15 §4): the result
does not depend on the worker count, a kill -9 resumes bit-identically, a killed worker is
replaced bit-identically, and health is measured per sub-layer on every path."""

import os
import signal

import numpy as np
import pytest

from tests.helpers import (
    REPO,
    assert_close,
    assert_identical,
    example_spec,
    final_params,
    kill_9_at_checkpoint,
    reference_loop,
)
from workers import replicated
from workers.data import check_data
from workers.generate import generate
from workers.model import build_model, lm_logits
from workers.sequences import decode, encode
from workers.spec import TrainingSpec
from workers.trainer import Trainer

# "123=321." (reverse, 3 digits): 80 samples, 64 for training, 4 steps per epoch, 12 steps.
SMALL_LM = {
    "name": "lm",
    "model": {
        "type": "transformer",
        "vocab_size": 13,
        "context": 7,
        "d_model": 8,
        "heads": 2,
        "layers": 2,
        "dim_feedforward": 16,
        "dropout": 0.2,
    },
    "data": {"type": "builtin", "name": "reverse", "n_digits": 3, "n_samples": 80},
    "loss": "cross_entropy",
    "dtype": "float64",
    "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.01},
    "epochs": 3,
    "batch_size": 16,
    "cpus_per_worker": 0.5,
    "checkpoint_every": 4,
    "health_every": 5,
}
BLOCK = ["self_attn", "self_attn.out_proj", "linear1", "linear2", "norm1", "norm2"]
LAYERS = [f"blocks.{i}.{k}" for i in range(2) for k in BLOCK] + ["norm", "head"]


def lm_spec(**overrides) -> TrainingSpec:
    return TrainingSpec.model_validate({**SMALL_LM, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(workers): that run's events and final parameters, each run once per module."""
    done = {}

    def run(workers: int):
        if workers not in done:
            out, events = tmp_path_factory.mktemp(f"workers{workers}"), []
            summary = Trainer(lm_spec(workers=workers), out, callback=events.append).run()
            assert summary["status"] == "succeeded" and summary["steps"] == 12
            assert summary["workers"] == workers
            done[workers] = events, final_params(out)
        return done[workers]

    return run


def test_in_process_is_the_reference_loop_and_dropout_matters(runs, tmp_path):
    assert_close(runs(0)[1], reference_loop(lm_spec(workers=0)), atol=1e-12)
    no_dropout = lm_spec(workers=0, model={**SMALL_LM["model"], "dropout": 0.0})
    assert Trainer(no_dropout, tmp_path).run()["status"] == "succeeded"
    assert not np.allclose(final_params(tmp_path)["head.weight"], runs(0)[1]["head.weight"])


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parameters_do_not_depend_on_worker_count(runs, workers):
    assert_close(runs(workers)[1], runs(0)[1])


@pytest.mark.usefixtures("ray_session")
def test_worker_killed_mid_run_is_replaced_bit_identically(runs, tmp_path, monkeypatch):
    def kill_one(event):
        if event["type"] == "step" and event["step"] == 6:
            os.kill(trainer.pool.worker_pids()[1], signal.SIGKILL)

    # As if a step took longer than a block's 0.1 s: a graph of 1 stage, not 4 (the steps
    # between checkpoints), and 1-step blocks. Neither changes the result.
    monkeypatch.setattr(replicated, "BLOCK_S", 1e-9)
    trainer = Trainer(lm_spec(workers=2), tmp_path, callback=kill_one)
    summary = trainer.run()
    assert summary["status"] == "succeeded" and summary["worker_failures"] == 1
    assert trainer.descend.stages == 1
    assert_identical(final_params(tmp_path), runs(2)[1])


def test_kill_9_then_resume_is_bit_identical(runs, tmp_path):
    spec = lm_spec(workers=0)
    kill_9_at_checkpoint(spec, tmp_path, step=8)
    summary = Trainer(spec, tmp_path).run()
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] == 8
    assert_identical(final_params(tmp_path), runs(0)[1])


# ---------------------------------------------------------------- health


def health_checks(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "health"]


def test_health_checks_cover_every_sub_layer_in_process(runs):
    checks = health_checks(runs(0)[0])
    assert [c["step"] for c in checks] == [1, 5, 10]
    for check in checks:
        assert [s["layer"] for s in check["layers"]] == ["tok_emb", "pos_emb", *LAYERS]
        for s in check["layers"]:
            assert s["grad_norm"] > 0 and s["weight_norm"] > 0 and 0 < s["update_ratio"] < 1
            assert s["dead_fraction"] is None  # gelu, not relu


@pytest.mark.usefixtures("ray_session")
def test_health_checks_of_replicas_are_those_of_the_in_process_run(runs):
    expected, got = health_checks(runs(0)[0]), health_checks(runs(2)[0])
    assert [c["step"] for c in got] == [c["step"] for c in expected]
    for a, b in zip(got, expected, strict=True):
        assert [s["layer"] for s in a["layers"]] == [s["layer"] for s in b["layers"]]
        for sa, sb in zip(a["layers"], b["layers"], strict=True):
            for key in ("grad_norm", "weight_norm", "update_ratio"):
                assert sa[key] == pytest.approx(sb[key], rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- the text example


def test_the_text_example_trains_on_its_text_file_and_generates(tmp_path):
    path = REPO / example_spec("text-lm")["data"]["path"]  # the README runs from the repo
    data = {"type": "file", "path": str(path)}
    # 291 windows of 17 characters, 262 for training: 3 steps of 128
    spec = example_spec("text-lm", data=data, batch_size=128, epochs=1)
    spec["optimizer"]["schedule"]["warmup_steps"] = 1
    spec = TrainingSpec.model_validate(spec)
    info = check_data(spec)  # the model's vocabulary is the text's
    assert spec.model.vocab_size == len(info.vocab) and info.n_samples == 291
    summary = Trainer(spec, tmp_path).run()
    assert summary["status"] == "succeeded" and summary["steps"] == 3
    model = build_model(spec)
    model.load_state_dict(final_params(tmp_path))
    out = generate(lm_logits(model), encode("the miller ", info.vocab), 20, spec.model.context)
    assert len(decode(out.tokens, info.vocab)) == 20
