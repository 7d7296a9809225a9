"""What the test modules share: optional dependencies, and the specs of examples/*.json.

Test modules import from here (or use conftest's fixtures), never from each other."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# -- specs -----------------------------------------------------------------------------------


def example_spec(example: str, /, **overrides) -> dict:
    """examples/<example>.json as a dict, with top-level fields replaced by `overrides`."""
    spec = json.loads((EXAMPLES / f"{example}.json").read_text())
    spec.update(copy.deepcopy(overrides))
    return spec


def small_moons(**overrides) -> dict:
    """examples/moons.json made small for tests: 200 samples (160 for training), a
    [2, 8, 2] tanh MLP, 3 epochs, 2 workers of half a CPU, a checkpoint every 5 steps."""
    small = {
        "model": {"type": "mlp", "sizes": [2, 8, 2], "activation": "tanh"},
        "data": {"type": "builtin", "name": "moons", "n_samples": 200, "noise": 0.1},
        "epochs": 3,
        "cpus_per_worker": 0.5,
        "checkpoint_every": 5,
    }
    return example_spec("moons", **{**small, **overrides})


def make_spec(**overrides):
    """The distributed tests' TrainingSpec: the small moons run named "t", global batch 30
    (160 training rows: 6 steps per epoch, the last one 10 rows)."""
    from workers.spec import TrainingSpec

    return TrainingSpec.model_validate(small_moons(**{"name": "t", "batch_size": 30, **overrides}))


def final_params(out) -> dict:
    """The model parameters of a run's newest checkpoint."""
    from workers import checkpoint

    return checkpoint.load_latest(out).model_state


# -- optional dependencies ---------------------------------------------------------------------


def under_ci() -> bool:
    return os.environ.get("CI") == "true"


def require(module: str):
    """importorskip, except under CI=true, where a missing dependency is a failure."""
    if under_ci():
        return __import__(module)
    return pytest.importorskip(module)


def unavailable(reason: str):
    """Skip, except under CI=true, where a missing dependency is a failure (as `require`)."""
    if under_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


# -- time ----------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll until `predicate()` holds. `timeout` bounds a stuck test; it is not a deadline
    that the behaviour under test must meet (a loaded machine may be slow)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


class FakeClock:
    """A stand-in for a module's `time`: monotonic() reads a clock the test moves by hand
    (`clock.now += s`); everything else (sleep) is the real one. Patch it in with
    monkeypatch.setattr("service.dispatcher.time", FakeClock())."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)
