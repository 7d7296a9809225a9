"""`shardgrad train` as a user runs it: JSON summary, resume after kill -9, spec errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from workers import checkpoint as ckpt
from workers.trainer import Trainer

from .test_distributed import make_spec

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(params=["compiled", "tasks"])
def exchange_env(request):
    """The CLI's environment, choosing the step exchange (see workers/exchange.py)."""
    return {**os.environ, "SHARDGRAD_EXCHANGE": request.param}


def cli(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def ray_address(ray_session):
    return ray_session.get_runtime_context().gcs_address


def write_spec(path, spec):
    path.write_text(spec.model_dump_json())
    return path


def test_train_json_summary_is_the_last_stdout_line(tmp_path, ray_address):
    spec_file = write_spec(tmp_path / "spec.json", make_spec(epochs=2))
    proc = cli(
        "train", spec_file, "--out", tmp_path / "run", "--json", "--ray-address", ray_address
    )
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "falling back" not in err  # the compiled graph served every step
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    assert summary["steps"] == 12 and summary["epochs"] == 2
    assert summary["resumed_from_step"] is None and summary["worker_failures"] == 0
    assert 0 <= summary["val_accuracy"] <= 1 and summary["final_loss"] > 0
    assert summary["checkpoint"].endswith("step-12") and len(summary["worker_nodes"]) == 1
    # Rerunning a finished --out answers at once with the same summary.
    proc = cli(
        "train", spec_file, "--out", tmp_path / "run", "--json", "--ray-address", ray_address
    )
    again, _ = proc.communicate(timeout=180)
    assert json.loads(again.strip().splitlines()[-1]) == summary


def test_kill_9_of_the_run_then_rerun_is_bit_identical(tmp_path, ray_address, exchange_env):
    spec = make_spec(epochs=40, checkpoint_every=10)
    spec_file = write_spec(tmp_path / "spec.json", spec)
    out = tmp_path / "run"
    args = ("train", spec_file, "--out", out, "--json", "--ray-address", ray_address)
    proc = cli(*args, env=exchange_env)
    deadline = time.time() + 120
    while not ckpt.list_checkpoints(out) and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.list_checkpoints(out), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = ckpt.load_latest(out).step
    assert killed_at < 240

    proc = cli(*args, env=exchange_env)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] >= killed_at

    reference = tmp_path / "reference"
    Trainer(spec, reference).run()
    expected = ckpt.load_latest(reference).model_state
    got = ckpt.load_latest(out).model_state
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_ctrl_c_checkpoints_and_exits_130(tmp_path, ray_address, exchange_env):
    spec_file = write_spec(tmp_path / "spec.json", make_spec(epochs=2000, checkpoint_every=20))
    out = tmp_path / "run"
    args = ("train", spec_file, "--out", out, "--json", "--ray-address", ray_address)
    proc = cli(*args, env=exchange_env)
    deadline = time.time() + 120
    # Interrupt mid-training, however loaded the machine: after the first checkpoint.
    while ckpt.load_latest(out) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "failed" and "interrupted at step" in summary["error"]
    assert ckpt.load_latest(out).step == summary["steps"] > 0


def test_invalid_spec_names_the_field(tmp_path):
    bad = json.loads(make_spec().model_dump_json())
    bad["model"]["sizes"][0] = 3
    spec_file = tmp_path / "bad.json"
    spec_file.write_text(json.dumps(bad))
    proc = cli("train", spec_file, env={**os.environ, "RAY_ADDRESS": ""})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "model.sizes[0] is 3 but dataset 'moons' has 2 features" in err


def test_schema_command_prints_the_json_schema():
    proc = cli("schema")
    out, _ = proc.communicate(timeout=60)
    schema = json.loads(out)
    assert {"model", "data", "optimizer", "batch_size"} <= set(schema["properties"])
