"""Every training guarantee on a small CNN with dropout on (tests/helpers.SMALL_CNN): the
result does not depend on the worker count, a kill -9 resumes bit-identically, a killed
worker is replaced bit-identically, and health is measured per conv and linear layer."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import core.functional as F
from core import no_grad
from tests.helpers import (
    assert_close,
    assert_identical,
    example_spec,
    final_params,
    kill_9_after_a_checkpoint,
    reference_loop,
    small_cnn,
)
from workers.data import PreparedData
from workers.health import active_units, layer_stats
from workers.model import build_model
from workers.spec import TrainingSpec
from workers.trainer import Trainer


def cnn_spec(**overrides) -> TrainingSpec:
    return TrainingSpec.model_validate(small_cnn(name="cnn", **overrides))


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The in-process (`workers: 0`) run: its events and final parameters."""
    out, events = tmp_path_factory.mktemp("in_process"), []
    summary = Trainer(cnn_spec(workers=0), out, callback=events.append).run()
    assert summary["status"] == "succeeded" and summary["steps"] == 10
    return events, final_params(out)


def test_in_process_is_the_reference_loop_and_dropout_matters(in_process, tmp_path):
    assert_close(in_process[1], reference_loop(cnn_spec(workers=0)))
    no_dropout = small_cnn()["model"]
    no_dropout["layers"][7]["p"] = 0.0
    spec = cnn_spec(workers=0, model=no_dropout)
    assert Trainer(spec, tmp_path).run()["status"] == "succeeded"
    assert not np.allclose(final_params(tmp_path)["8.weight"], in_process[1]["8.weight"])


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parameters_do_not_depend_on_worker_count(tmp_path, workers, in_process):
    summary = Trainer(cnn_spec(workers=workers), tmp_path).run()
    assert summary["status"] == "succeeded" and summary["workers"] == workers
    assert_close(final_params(tmp_path), in_process[1])


@pytest.mark.usefixtures("ray_session")
def test_worker_killed_mid_run_is_replaced_bit_identically(tmp_path):
    spec = cnn_spec(workers=2)
    assert Trainer(spec, tmp_path / "whole").run()["status"] == "succeeded"

    def kill_one(event):
        if event["type"] == "step" and event["step"] == 4:
            os.kill(trainer.pool.worker_pids()[1], signal.SIGKILL)

    trainer = Trainer(spec, tmp_path / "killed", callback=kill_one)
    summary = trainer.run()
    assert summary["status"] == "succeeded" and summary["worker_failures"] == 1
    assert_identical(final_params(tmp_path / "killed"), final_params(tmp_path / "whole"))


def test_kill_9_of_an_in_process_run_then_rerun_is_bit_identical(tmp_path):
    spec = cnn_spec(workers=0, epochs=40, checkpoint_every=10)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    out = tmp_path / "run"
    args = [sys.executable, "-m", "workers.cli", "train", spec_file, "--out", out, "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = kill_9_after_a_checkpoint(proc, out)
    assert killed_at < 200

    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] >= killed_at
    Trainer(spec, tmp_path / "reference").run()
    assert_identical(final_params(out), final_params(tmp_path / "reference"))


# ---------------------------------------------------------------- health


def test_health_events_cover_each_conv_and_linear_layer(in_process):
    checks = [e for e in in_process[0] if e["type"] == "health"]
    assert [c["step"] for c in checks] == [1, 3, 6, 9]
    for check in checks:
        assert [s["layer"] for s in check["layers"]] == ["0", "3", "8"]
        for s in check["layers"]:
            assert s["grad_norm"] > 0 and s["weight_norm"] > 0 and 0 < s["update_ratio"] < 1
        # layer 0 feeds a relu (dead channels measured); 3 a tanh; 8 is the output
        dead = [s["dead_fraction"] for s in check["layers"]]
        assert 0 <= dead[0] <= 1 and dead[1:] == [None, None]


def test_dead_relu_fraction_is_per_channel():
    spec = cnn_spec()
    model = build_model(spec)
    model[0].bias.data[:] = [-100.0, 0.0, -100.0, 0.0]  # channels 0 and 2 never fire
    X = PreparedData(spec).X[:20]
    masks = active_units(model, X)
    assert [None if m is None else m.tolist() for m in masks] == [
        [False, True, False, True],
        None,
        None,
    ]
    with no_grad():  # the same, from the conv's own output
        conv = F.conv2d(X.reshape(20, 1, 28, 28), model[0].weight, model[0].bias, 2, 0, "relu")
    np.testing.assert_array_equal(masks[0], (conv.data > 0).any(axis=(0, 2, 3)))
    params = [p.data.copy() for p in model.parameters()]
    stats = layer_stats(model, params, params, masks)
    assert [s["dead_fraction"] for s in stats] == [0.5, None, None]


# ---------------------------------------------------------------- the examples


@pytest.mark.slow
@pytest.mark.parametrize(("name", "accuracy"), [("shapes-cnn", 0.95), ("digits-cnn", 0.97)])
def test_the_cnn_examples_reach_their_accuracy(tmp_path, name, accuracy):
    spec = TrainingSpec.model_validate(example_spec(name))
    assert spec.workers == 0  # in-process: seconds, no cluster
    summary = Trainer(spec, tmp_path).run()
    assert summary["status"] == "succeeded" and summary["val_accuracy"] >= accuracy
