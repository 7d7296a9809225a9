import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from workers import checkpoint as ckpt
from workers.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    NoCheckpoint,
    UnknownCheckpoint,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    load_model_state,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def model(seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(4, 3))
    w0[0, 0], w0[0, 1] = -0.0, np.nan  # bit patterns that == would not catch
    return {
        "layers.0.weight": w0,
        "layers.0.bias": rng.normal(size=4),
        "layers.1.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "layers.1.bias": np.zeros(3, dtype=np.float32),
        "layers.10.weight": rng.normal(size=(3, 2)).T,  # a non-contiguous view
    }


def sgd(params):
    return {
        "state": {i: {"momentum_buffer": p * 0.5} for i, p in enumerate(params.values())},
        "param_groups": [
            {
                "lr": np.float64(0.1),
                "momentum": 0.9,
                "dampening": 0,
                "weight_decay": 0.0,
                "nesterov": False,
                "params": list(range(len(params))),
            }
        ],
    }


def adam(params):
    return {
        "state": {
            i: {"step": np.int64(7), "exp_avg": p * 0.1, "exp_avg_sq": p * p}
            for i, p in enumerate(params.values())
        },
        "param_groups": [
            {
                "lr": 1e-3 / 3,
                "betas": (0.9, np.float32(0.999)),
                "eps": 1e-8,
                "amsgrad": np.bool_(False),
                "params": list(range(len(params))),
            }
        ],
    }


def save(out, step, seed=0, keep=3, opt=sgd):
    params = model(seed)
    state = {"step": step, "epoch": 1, "spec_hash": "abc", "metrics": [{"loss": 0.5}]}
    return save_checkpoint(out, step, params, opt(params), state, keep=keep)


def assert_arrays_identical(got, want):
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert got[key].tobytes() == np.ascontiguousarray(want[key]).tobytes(), key


def test_round_trip_sgd_is_bit_identical(tmp_path):
    params = model()
    opt = sgd(params)
    state = {"step": 5, "epoch": 2, "spec_hash": "f00", "metrics": {"loss": [1.0, 0.1 + 0.2]}}
    path = save_checkpoint(tmp_path, 5, params, opt, state)
    loaded = load_checkpoint(path)

    assert loaded.path == path and loaded.step == 5 and loaded.state == state
    assert_arrays_identical(loaded.model_state, params)
    assert list(loaded.optimizer_state["state"]) == [0, 1, 2, 3, 4]  # int keys, in order
    for i, entry in loaded.optimizer_state["state"].items():
        assert_arrays_identical(entry, opt["state"][i])
    group = loaded.optimizer_state["param_groups"][0]
    assert group == opt["param_groups"][0]
    assert type(group["lr"]) is float and type(group["nesterov"]) is bool
    assert all(a.flags.writeable for a in loaded.model_state.values())


def test_round_trip_adam_scalars_become_exact_python_numbers(tmp_path):
    params = model()
    opt = adam(params)
    loaded = load_checkpoint(save_checkpoint(tmp_path, 1, params, opt, {"step": 1}))

    entry = loaded.optimizer_state["state"][3]
    assert list(entry) == ["step", "exp_avg", "exp_avg_sq"]
    assert entry["step"] == 7 and type(entry["step"]) is int
    assert_arrays_identical(
        {k: entry[k] for k in ("exp_avg", "exp_avg_sq")},
        {k: opt["state"][3][k] for k in ("exp_avg", "exp_avg_sq")},
    )
    group = loaded.optimizer_state["param_groups"][0]
    assert group["lr"] == 1e-3 / 3
    assert group["betas"] == [0.9, float(np.float32(0.999))]  # tuples come back as lists
    assert group["amsgrad"] is False


def test_layout_and_manifest(tmp_path):
    path = save(tmp_path, 12)
    assert path == tmp_path / "checkpoints" / "step-12"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-12"]
    names = ["manifest.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    assert sorted(os.listdir(path)) == names

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["step"] == 12
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset().total_seconds() == 0
    assert sorted(manifest["files"]) == sorted(set(names) - {"manifest.json"})
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    assert set(load_file(path / "model.safetensors")) == set(model())
    opt_keys = {f"state.{i}.momentum_buffer" for i in range(5)}
    assert set(load_file(path / "optimizer.safetensors")) == opt_keys
    assert json.loads((path / "state.json").read_text())["spec_hash"] == "abc"

    [info] = list_checkpoints(tmp_path)
    assert (info.name, info.step, info.path) == ("step-12", 12, path)
    assert info.created_at == manifest["created_at"]
    assert info.size_bytes == sum(e["size"] for e in manifest["files"].values())
    assert info.sha256 == manifest["files"]["model.safetensors"]["sha256"]
    assert_arrays_identical(load_model_state(path), model())


def test_steps_sort_numerically(tmp_path):
    for step in (2, 10, 9):
        save(tmp_path, step, keep=None)
    assert [i.step for i in list_checkpoints(tmp_path)] == [2, 9, 10]
    assert load_latest(tmp_path).step == 10


def flip_bytes(path):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


def remove_manifest(path):
    (path / "manifest.json").unlink()


def truncate(path):
    f = path / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:40])


def garble_manifest(path):
    (path / "manifest.json").write_text('{"files": ')


@pytest.mark.parametrize("corrupt", [flip_bytes, remove_manifest, truncate, garble_manifest])
def test_corrupt_newest_falls_back_to_previous(tmp_path, corrupt, caplog):
    save(tmp_path, 1, seed=1)
    save(tmp_path, 2, seed=2)
    corrupt(tmp_path / "checkpoints" / "step-2")

    with pytest.warns(CheckpointWarning, match="step-2"):
        latest = load_latest(tmp_path)
    assert latest.step == 1
    assert_arrays_identical(latest.model_state, model(1))
    assert "step-2" in caplog.text
    assert [i.step for i in list_checkpoints(tmp_path)] == [1]
    with pytest.raises(CheckpointError, match="step-2"):
        load_checkpoint(tmp_path / "checkpoints" / "step-2")
    with pytest.raises(CheckpointError):
        verify_checkpoint(tmp_path / "checkpoints" / "step-2")


def test_load_model_state_checks_the_hash(tmp_path):
    path = save(tmp_path, 1)
    flip_bytes(path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_model_state(path)


def test_nothing_to_load(tmp_path):
    assert load_latest(tmp_path) is None
    assert list_checkpoints(tmp_path) == []
    remove_manifest(save(tmp_path, 1))
    with pytest.warns(CheckpointWarning):
        assert load_latest(tmp_path) is None


def test_error_mid_write_leaves_nothing_behind(tmp_path, monkeypatch):
    save(tmp_path, 1)
    real = ckpt._write_safetensors

    def fail_on_optimizer(path, tensors, metadata):
        if path.name == "optimizer.safetensors":
            raise OSError("disk full")
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "_write_safetensors", fail_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1"]


def test_crash_mid_write_is_ignored_then_cleaned(tmp_path):
    save(tmp_path, 1)
    # A real crash: the process dies right after writing the model file, no cleanup runs.
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import tests.test_checkpoint as t
        from workers import checkpoint as ckpt
        real = ckpt._write_safetensors
        def die_after_model(path, tensors, metadata):
            real(path, tensors, metadata)
            os._exit(3)
        ckpt._write_safetensors = die_after_model
        t.save({str(tmp_path)!r}, 2)
    """)
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == 3
    [tmp] = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert os.listdir(tmp) == ["model.safetensors"]

    assert load_latest(tmp_path).step == 1
    assert [i.name for i in list_checkpoints(tmp_path)] == ["step-1"]
    (tmp_path / "checkpoints" / ".old-step-1-dead").mkdir()  # a crash mid-replace

    save(tmp_path, 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1", "step-2"]


def test_keep_prunes_to_newest_good(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-4", "step-5"]


def test_a_save_hashes_only_the_checkpoints_it_may_keep(tmp_path, monkeypatch):
    for step in range(1, 6):
        save(tmp_path, step, keep=None)
    hashed = []
    verify = ckpt.verify_checkpoint
    monkeypatch.setattr(ckpt, "verify_checkpoint", lambda path: hashed.append(path) or verify(path))
    save(tmp_path, 6, keep=2)  # step-6 was just written; step-4 and older go unhashed
    assert [path.name for path in hashed] == ["step-5"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-5", "step-6"]


def test_prune_never_deletes_newest_good(tmp_path):
    for step in (3, 4):
        save(tmp_path, step, keep=None)
    flip_bytes(tmp_path / "checkpoints" / "step-4")
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-3", "step-4"]
    with pytest.warns(CheckpointWarning, match="step-4"):
        assert load_latest(tmp_path).step == 3


def test_resumed_save_keeps_itself_over_a_corrupt_newer_one(tmp_path):
    for step in (1, 2, 5):
        save(tmp_path, step, keep=None)
    flip_bytes(tmp_path / "checkpoints" / "step-2")  # bad and old: may go
    remove_manifest(tmp_path / "checkpoints" / "step-5")  # bad and newest: left alone
    save(tmp_path, 3, keep=1)  # recomputed after resuming from step 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-3", "step-5"]
    with pytest.warns(CheckpointWarning, match="step-5"):
        assert load_latest(tmp_path).step == 3


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 3, seed=1)
    path = save(tmp_path, 3, seed=2, opt=adam)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-3"]
    loaded = load_checkpoint(path)
    assert_arrays_identical(loaded.model_state, model(2))
    assert loaded.optimizer_state["state"][0]["step"] == 7


def test_save_rejects_bad_input(tmp_path):
    params = model()
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, params, sgd(params), {})
    with pytest.raises(ValueError, match="state"):
        save_checkpoint(tmp_path, 2, params, sgd(params), {"step": 1})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 2, params, sgd(params), {}, keep=0)
    with pytest.raises(TypeError, match="int"):
        save_checkpoint(tmp_path, 2, params, {"state": {"w": {}}, "param_groups": []}, {})
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint(tmp_path, 2, params, {"state": {}, "param_groups": [params]}, {})
    assert list_checkpoints(tmp_path) == []
    assert os.listdir(tmp_path / "checkpoints") == []


@pytest.mark.parametrize(
    "name", ["../x", "step-1/../../etc", "foo", "step-", "step-1\n", "step-1/", "", "step-١"]
)
def test_checkpoint_dir_rejects_bad_names(tmp_path, name):
    with pytest.raises(ValueError):
        checkpoint_dir(tmp_path, name)


def test_checkpoint_dir(tmp_path):
    assert checkpoint_dir(tmp_path, "step-12") == tmp_path / "checkpoints" / "step-12"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-9").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        checkpoint_dir(tmp_path, "step-9")


def test_copied_directory_with_wrong_step_is_rejected(tmp_path):
    shutil.copytree(save(tmp_path, 1), tmp_path / "checkpoints" / "step-2")
    with pytest.raises(CheckpointError, match="manifest is for step 1"):
        load_checkpoint(tmp_path / "checkpoints" / "step-2")


def write_best(out, step):
    best = {"step": step, "checkpoint": f"step-{step}", "metric": "val_loss", "mode": "min"}
    (Path(out) / "best.json").write_text(json.dumps(best | {"value": 0.1}))


def test_resolve_checkpoint_best_latest_and_steps(tmp_path):
    with pytest.raises(NoCheckpoint):
        resolve_checkpoint(tmp_path, None)
    for step in (1, 2, 3):
        save(tmp_path, step)
    root = tmp_path / "checkpoints"
    assert resolve_checkpoint(tmp_path, None) == root / "step-3"  # no best kept: latest
    with pytest.raises(UnknownCheckpoint, match="keeps none"):
        resolve_checkpoint(tmp_path, "best")
    write_best(tmp_path, 2)
    assert resolve_checkpoint(tmp_path, None) == root / "step-2"
    assert resolve_checkpoint(tmp_path, "best") == root / "step-2"
    assert resolve_checkpoint(tmp_path, "latest") == root / "step-3"
    assert resolve_checkpoint(tmp_path, "step-1") == root / "step-1"
    with pytest.raises(UnknownCheckpoint, match="'step-7'"):
        resolve_checkpoint(tmp_path, "step-7")
    for bad in ("step-01", "newest", "step-1/../step-2", ""):
        with pytest.raises(ValueError, match="best"):
            resolve_checkpoint(tmp_path, bad)


def test_resolve_checkpoint_skips_what_does_not_verify(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    write_best(tmp_path, 1)
    (tmp_path / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"rot")
    (tmp_path / "checkpoints" / "step-2" / "state.json").write_bytes(b"rot")
    with pytest.raises(UnknownCheckpoint, match="best checkpoint is not usable"):
        resolve_checkpoint(tmp_path, "best")
    with pytest.raises(NoCheckpoint):  # no best that verifies, and no latest either
        resolve_checkpoint(tmp_path, None)
    save(tmp_path, 3)
    assert resolve_checkpoint(tmp_path, None).name == "step-3"
    with pytest.raises(UnknownCheckpoint):
        resolve_checkpoint(tmp_path, "step-2")
