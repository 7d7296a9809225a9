"""The allocator setting of the processes that train (workers/malloc.py): freed memory is
reused by the next step instead of being faulted back in from the kernel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from tests.helpers import make_spec
from workers import malloc
from workers.config import WorkerSettings
from workers.model import worker_config
from workers.pool import WorkerPool

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(not malloc.GLIBC, reason="glibc only")

# A step's pattern: 64 MiB of arrays alive at once, then freed; the page faults of rounds
# 2-4 (round 1 takes the memory from the kernel either way).
ROUNDS = """
import resource, sys
import numpy as np
from workers.malloc import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(2**19) for _ in range(16)]
    del arrays
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, max(faults[1:]))
"""


def later_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return out[0], int(out[1])


@glibc
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = later_faults("reuse")
    assert applied == "True"
    assert faults < 200  # against thousands with glibc's defaults (below)


@glibc
def test_glibcs_defaults_fault_the_memory_back_in_every_round():
    # What the setting saves: without it, every round takes its pages from the kernel again.
    applied, faults = later_faults("default")
    assert applied == "None"
    assert faults > 4000


def worker_applied(pool: WorkerPool) -> list:
    def read(_worker):
        from workers import malloc as in_worker

        return in_worker._applied

    return ray.get([a.__ray_call__.remote(read) for a in pool.actors])


@glibc
@pytest.mark.parametrize("reuse", [True, False])
def test_workers_follow_the_setting(ray_session, reuse):
    rng = np.random.default_rng(0)
    data = ray.put((rng.normal(size=(8, 2)), rng.integers(0, 2, 8)))
    settings = WorkerSettings(reuse_freed_memory=reuse)
    pool = WorkerPool(1, 0.5, worker_config(make_spec()), data, max_failures=0, settings=settings)
    try:
        assert worker_applied(pool) == [True if reuse else None]
    finally:
        pool.shutdown()
