"""`shardgrad train` as a user runs it: JSON summary, resume after kill -9, spec errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from workers import checkpoint as ckpt
from workers import trainer as trainer_module
from workers.cli import main as cli_main
from workers.cli import run_dir_name
from workers.events import run_summary
from workers.render import print_summary
from workers.trainer import Trainer

from .helpers import kill_9_after_a_checkpoint, make_spec

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(params=["replicated", "tasks"])
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
    killed_at = kill_9_after_a_checkpoint(proc, out)
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
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"stdout: {stdout[-2000:]}\nstderr: {stderr[-4000:]}"
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "failed" and "interrupted at step" in summary["error"]
    assert ckpt.load_latest(out).step == summary["steps"] > 0


def test_ctrl_c_of_an_in_process_run_checkpoints_and_exits_130(tmp_path):
    """workers: 0, with a Ray address that answers nothing: any start of Ray would fail."""
    spec_file = write_spec(tmp_path / "spec.json", make_spec(epochs=2000, checkpoint_every=20))
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    proc = cli("train", spec_file, "--out", out, "--json", "--workers", "0", env=env)
    deadline = time.time() + 120
    while ckpt.load_latest(out) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "failed" and "interrupted at step" in summary["error"]
    assert (summary["workers"], summary["worker_nodes"], summary["exchange"]) == (0, [], None)
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


# -- failures keep the --json contract (issue #3) ------------------------------------------------

CONTRACT_KEYS = {
    "status",
    "steps",
    "epochs",
    "final_loss",
    "val_loss",
    "val_accuracy",
    "checkpoint",
    "worker_nodes",
    "exchange",
    "workers",
    "workers_reason",
    "elapsed_s",
    "worker_failures",
    "resumed_from_step",
    "health",
}


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_failed_summary(summary: dict) -> None:
    assert set(summary) >= CONTRACT_KEYS | {"error"}
    assert summary["status"] == "failed" and summary["error"]
    assert type(summary["steps"]) is int and type(summary["epochs"]) is int
    assert summary["checkpoint"] is None or Path(summary["checkpoint"]).is_dir()
    assert isinstance(summary["worker_nodes"], list)
    assert type(summary["worker_failures"]) is int
    assert isinstance(summary["elapsed_s"], int | float)
    # Nothing is evaluated after a failure: the weights may not be finite.
    assert summary["final_loss"] is summary["val_loss"] is summary["val_accuracy"] is None


def assert_no_non_finite_checkpoint(out) -> None:
    for path in (out / "checkpoints").glob("step-*"):
        checkpoint = ckpt.load_checkpoint(path)
        assert all(np.isfinite(a).all() for a in checkpoint.model_state.values()), path


def failed_run(tmp_path, spec, ray_address) -> tuple[dict, Path]:
    """`shardgrad train --json` of a spec that must fail: its summary (checked against the
    contract) and its run directory, where no checkpoint may hold a non-finite value."""
    spec_file = write_spec(tmp_path / "spec.json", spec)
    out = tmp_path / "run"
    proc = cli("train", spec_file, "--out", out, "--json", "--ray-address", ray_address)
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    summary = last_json_line(stdout)
    assert_failed_summary(summary)
    assert_no_non_finite_checkpoint(out)
    return summary, out


def test_divergence_json_summary_keeps_the_contract(tmp_path, ray_address):
    spec = make_spec(
        model={"type": "mlp", "sizes": [2, 16, 1], "activation": "relu"},
        loss="mse",
        optimizer={"type": "sgd", "lr": 50.0},
        epochs=5,
        checkpoint_every=2,
    )
    summary, out = failed_run(tmp_path, spec, ray_address)
    steps = summary["steps"]
    assert summary["error"] in {f"diverged at step {steps + 1} (loss={x})" for x in ("nan", "inf")}
    assert summary["epochs"] == steps // 6  # 6 steps per epoch
    assert summary["resumed_from_step"] is None and len(summary["worker_nodes"]) == 1
    good = ckpt.list_checkpoints(out)
    assert good and summary["checkpoint"] == str(good[-1].path)  # the newest good one


def test_spec_mismatch_summary_points_at_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    other = make_spec(optimizer={"type": "sgd", "lr": 0.5})
    ckpt.save_checkpoint(out, 5, {"w": np.zeros(2)}, {}, {"spec_hash": other.spec_hash()})
    summary = Trainer(make_spec(), out).run()
    assert_failed_summary(summary)
    assert "different spec" in summary["error"]
    assert (summary["steps"], summary["epochs"], summary["checkpoint"]) == (0, 0, None)


def test_parameters_overflowing_to_inf_are_never_checkpointed(tmp_path, ray_address):
    # Step 1's loss and gradient are finite, but lr * gradient overflows float32.
    spec = make_spec(
        model={"type": "mlp", "sizes": [2, 8, 1], "activation": "tanh", "bias_init": 10.0},
        loss="mse",
        dtype="float32",
        optimizer={"type": "sgd", "lr": 1e38},
        checkpoint_every=1,
    )
    summary, out = failed_run(tmp_path, spec, ray_address)
    assert summary["error"] == "diverged at step 1 (parameters not finite)"
    assert (summary["steps"], summary["epochs"], summary["checkpoint"]) == (1, 0, None)
    assert ckpt.list_checkpoints(out) == []


def bad_spec_file(tmp_path):
    bad = json.loads(make_spec().model_dump_json())
    bad["model"]["sizes"][0] = 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    return path


def broken_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    return path


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (
            lambda tmp: [bad_spec_file(tmp)],
            "model.sizes[0] is 3 but dataset 'moons' has 2 features",
        ),
        (
            lambda tmp: [tmp / "missing.json"],
            "cannot read spec",
        ),
        (
            lambda tmp: [broken_json_file(tmp)],
            "Invalid JSON",
        ),
        (
            lambda tmp: [write_spec(tmp / "spec.json", make_spec()), "--workers", "-1"],
            'invalid --workers -1:\n  workers must be a whole number >= 0 or "auto", not "-1"',
        ),
        (
            lambda tmp: [write_spec(tmp / "spec.json", make_spec()), "--workers", "two"],
            'invalid --workers two:\n  workers must be a whole number >= 0 or "auto", not "two"',
        ),
    ],
    ids=["invalid-spec", "missing-file", "invalid-json", "workers-negative", "workers-not-int"],
)
def test_usage_errors_end_with_a_json_summary(tmp_path, make_args, message):
    proc = cli("train", *make_args(tmp_path), "--json", env={**os.environ, "RAY_ADDRESS": ""})
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert message in err and "pydantic" not in err  # readable, no raw ValidationError text
    summary = last_json_line(stdout)
    assert_failed_summary(summary)
    assert summary["error"] == err.strip().removeprefix("error: ")
    assert (summary["steps"], summary["epochs"], summary["checkpoint"]) == (0, 0, None)
    assert (summary["worker_nodes"], summary["worker_failures"]) == ([], 0)
    assert summary["resumed_from_step"] is None


def test_an_unexpected_exception_ends_with_a_json_summary(tmp_path, monkeypatch, capsys):
    def crash(self):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(Trainer, "_prepare", lambda self, latest: crash(self))
    spec_file = write_spec(tmp_path / "spec.json", make_spec())
    code = cli_main(["train", str(spec_file), "--out", str(tmp_path / "run"), "--json"])
    stdout, err = capsys.readouterr()
    assert code == 1
    summary = last_json_line(stdout)
    assert_failed_summary(summary)
    assert summary["error"] == "unexpected RuntimeError: boom (traceback on stderr)"
    assert "Traceback (most recent call last)" in err and "second line" in err


def refuse_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("this run must not use Ray")

    monkeypatch.setattr(trainer_module, "ensure_ray", refuse)
    monkeypatch.setattr(trainer_module, "WorkerPool", refuse)


@pytest.mark.parametrize("workers", ["0", "auto"])
def test_an_in_process_train_never_starts_ray(tmp_path, monkeypatch, capsys, workers):
    refuse_ray(monkeypatch)
    # auto, with a gradient far cheaper than any exchange (the measurement stubbed)
    monkeypatch.setattr(trainer_module, "measure_gradient", lambda spec, data: 1e-6)
    spec_file = write_spec(tmp_path / "spec.json", make_spec(epochs=1))
    args = ["train", str(spec_file), "--out", str(tmp_path / "run"), "--workers", workers]
    assert cli_main([*args, "--json"]) == 0
    summary = last_json_line(capsys.readouterr().out)
    assert set(summary) >= CONTRACT_KEYS and summary["status"] == "succeeded"
    assert (summary["workers"], summary["exchange"], summary["worker_nodes"]) == (0, None, [])
    reason = "set by the spec" if workers == "0" else "chose in-process: gradient compute 0.001 ms"
    assert summary["workers_reason"].startswith(reason)


def test_the_human_summary_has_no_python_reprs(capsys):
    node = "923f0b055e3924a4b5f86841508294ed10991777284642033fc8848d"
    summary = run_summary(
        "succeeded",
        650,
        epochs=50,
        final_loss=0.004185232700495081,
        val_accuracy=0.995,
        worker_nodes=[node, "0" * 56],
        elapsed_s=16.0123,
        health={"checked_steps": 66, "last_step": 650, "warnings": []},
    )
    print_summary(summary)
    pairs = (line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    lines = {key.strip(): value for key, value in pairs}
    assert lines["final_loss"] == "0.004185" and lines["val_accuracy"] == "0.995"
    assert lines["val_loss"] == lines["checkpoint"] == lines["resumed_from_step"] == "-"
    assert lines["worker_nodes"] == "923f0b05, 00000000" and lines["elapsed_s"] == "16.0 s"
    assert lines["health"] == "66 checks; warnings: none"
    assert not any(word in line for line in lines.values() for word in ("None", "[", "'"))


# -- the default --out -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("moons", "moons"),
        ("moons v2 (lr=0.1)", "moons-v2-lr-0.1-"),
        ("../../etc", "-..-etc"),
        ("..", "run"),
        ("/", "-"),
        (".hidden", "hidden"),
        ("a/b\\c\x00d", "a-b-c-d"),
        ("ünïcode", "-n-code"),
    ],
)
def test_run_dir_name_is_one_safe_directory(tmp_path, name, expected):
    assert run_dir_name(name) == expected
    runs = tmp_path / "runs"
    assert (runs / run_dir_name(name)).resolve().parent == runs.resolve()


def test_default_out_of_an_unsafe_name_stays_under_runs(tmp_path, ray_address):
    spec_file = write_spec(tmp_path / "spec.json", make_spec(name="../../escape", epochs=1))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = cli("train", spec_file, "--json", "--ray-address", ray_address, cwd=cwd)
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    checkpoint = (cwd / last_json_line(stdout)["checkpoint"]).resolve()
    assert checkpoint.is_relative_to((cwd / "runs" / "-..-escape").resolve())
    assert [p.name for p in cwd.iterdir()] == ["runs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "spec.json"]
