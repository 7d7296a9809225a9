"""Synchronous data-parallel step: overhead over a bare Ray round trip, and 2-worker scaling.

    python benchmarks/sync_step.py [--quick]

1. Overhead: median step time of 2-worker training of a small MLP, against a
   bare round trip (ray.put of the parameters, one call on each of two actors
   that returns a payload of the same size, ray.get) measured in the same run.
   Target: shardgrad adds at most 50 % (ratio <= 1.5).
2. Scaling: MLP 784-512-512-10 on random data, global batch 4096, float32;
   throughput with 2 workers over 1 worker, 1 CPU each. Target: >= 1.6.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from workers.spec import TrainingSpec
from workers.trainer import Trainer


def step_times(spec: TrainingSpec, out: Path, skip: int = 3) -> list[float]:
    stamps = []
    Trainer(
        spec, out, callback=lambda e: e["type"] == "step" and stamps.append(time.perf_counter())
    ).run()
    return np.diff(stamps[skip:]).tolist()


@ray.remote(num_cpus=1)
class Echo:
    def call(self, params, idx):
        return [np.array(p) for p in params], len(idx), 0.0


def bare_round_trip(params: list[np.ndarray], batch: int, n: int) -> list[float]:
    actors = [Echo.remote() for _ in range(2)]
    ray.get([a.call.remote([], np.arange(1)) for a in actors])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ref = ray.put(params)
        ray.get([a.call.remote(ref, np.arange(batch // 2)) for a in actors])
        times.append(time.perf_counter() - t0)
    for a in actors:
        ray.kill(a)
    return times


def small_spec(epochs: int) -> TrainingSpec:
    return TrainingSpec.model_validate(
        {
            "name": "overhead",
            "model": {"type": "mlp", "sizes": [2, 16, 16, 2], "activation": "tanh"},
            "data": {"type": "builtin", "name": "moons", "n_samples": 1000, "noise": 0.1},
            "loss": "cross_entropy",
            "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
            "epochs": epochs,
            "batch_size": 64,
            "workers": 2,
            "cpus_per_worker": 1,
            "checkpoint_every": 10**6,
        }
    )


def heavy_spec(path: Path, workers: int, steps: int) -> TrainingSpec:
    return TrainingSpec.model_validate(
        {
            "name": "scaling",
            "model": {"type": "mlp", "sizes": [784, 512, 512, 10], "activation": "relu"},
            "data": {"type": "file", "path": str(path)},
            "loss": "cross_entropy",
            "optimizer": {"type": "sgd", "lr": 0.01},
            "epochs": steps,
            "batch_size": 4096,
            "workers": workers,
            "cpus_per_worker": 1,
            "dtype": "float32",
            "validation_fraction": 0.0,
            "checkpoint_every": 10**6,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-"))

    # 1. overhead
    spec = small_spec(epochs=5 if args.quick else 20)
    ours = step_times(spec, tmp / "small")
    from workers.model import build_model

    params = [p.data for p in build_model(spec).parameters()]
    bare = bare_round_trip(params, spec.batch_size, len(ours))
    ours_ms, bare_ms = statistics.median(ours) * 1e3, statistics.median(bare) * 1e3
    print(
        f"overhead: shardgrad step {ours_ms:.2f} ms, bare round trip {bare_ms:.2f} ms, "
        f"ratio={ours_ms / bare_ms:.2f} (target <= 1.5)"
    )

    # 2. scaling
    rng = np.random.default_rng(0)
    data = tmp / "random.npz"
    np.savez(data, X=rng.random((4096, 784)), y=rng.integers(0, 10, 4096))
    steps = 3 if args.quick else 8
    per_step = {}
    for workers in (1, 2):
        times = step_times(heavy_spec(data, workers, steps), tmp / f"heavy{workers}", skip=1)
        per_step[workers] = statistics.median(times)
        print(
            f"scaling: {workers} worker(s): {4096 / per_step[workers]:.0f} samples/s "
            f"(median step {per_step[workers] * 1e3:.0f} ms)"
        )
    print(
        f"scaling: speed-up 2 workers / 1 worker = {per_step[1] / per_step[2]:.2f} (target >= 1.6)"
    )


if __name__ == "__main__":
    main()
