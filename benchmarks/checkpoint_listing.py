"""GET /api/v1/jobs/{id}/checkpoints with 1,000 kept checkpoints: the target is under 100 ms.

    python benchmarks/checkpoint_listing.py [--checkpoints 1000] [--params 10000] [--rounds 20]

Writes `--checkpoints` checkpoints of a `--params`-parameter model (float64, with Adam state)
into a temp dir, dates their files a minute back (a checkpoint is remembered as verified
only once it has settled, see workers/checkpoint.py), and times the route in the app
(TestClient, an in-memory store): the first listing after a start (every file hashed) and
then `--rounds` listings (a stat per file, the manifest read), p50 and max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.api.deps import get_dispatcher, get_store  # noqa: E402
from service.config import Settings  # noqa: E402
from service.main import create_app  # noqa: E402
from service.store import JobStore  # noqa: E402
from workers import checkpoint as ckpt  # noqa: E402


def write(out: Path, count: int, params: int) -> int:
    model = {"w": np.random.default_rng(0).standard_normal(params)}
    optimizer = {"state": {0: {"m": model["w"], "v": model["w"], "t": 1}}, "param_groups": []}
    old = time.time_ns() - 60 * 10**9
    size = 0
    for step in range(1, count + 1):
        path = ckpt.save_checkpoint(out, step, model, optimizer, {"step": step}, keep=None)
        for file in path.iterdir():
            os.utime(file, ns=(old, old))
            size += file.stat().st_size
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardgrad-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp), paused=True)
        app = create_app(settings, start=False)
        store = JobStore("sqlite://")
        app.dependency_overrides[get_store] = lambda: store
        app.dependency_overrides[get_dispatcher] = lambda: None
        job = store.create({}, name="bench", priority=0, cpus=0.0)
        size = write(settings.jobs_dir / job.id, args.checkpoints, args.params)
        print(f"{args.checkpoints} checkpoints, {size / 2**20:.0f} MiB on disk")

        from fastapi.testclient import TestClient

        client = TestClient(app, base_url="http://localhost")
        url = f"/api/v1/jobs/{job.id}/checkpoints"
        ckpt._SETTLED.clear()
        began = time.perf_counter()
        assert len(client.get(url).json()) == args.checkpoints
        cold = time.perf_counter() - began
        times = []
        for _ in range(args.rounds):
            began = time.perf_counter()
            r = client.get(url)
            times.append(time.perf_counter() - began)
            assert r.status_code == 200 and len(r.json()) == args.checkpoints
        print(f"first listing (every file hashed): {cold * 1e3:8.1f} ms")
        p50, worst = statistics.median(times) * 1e3, max(times) * 1e3
        print(f"then ({args.rounds} rounds):          p50 {p50:6.1f} ms, max {worst:6.1f} ms")


if __name__ == "__main__":
    main()
