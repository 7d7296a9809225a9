"""What the test modules share: optional dependencies, and the specs of examples/*.json.

Test modules import from here (or use conftest's fixtures), never from each other."""

from __future__ import annotations

import os
import time

import pytest


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
