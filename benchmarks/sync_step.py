"""The synchronous data-parallel step: its cost on a tiny model, and 2-worker scaling.

    python benchmarks/sync_step.py [--quick] [--rounds N]

1. Tiny model (MLP 2-16-16-2 on moons, global batch 64, float64): the time per step of the
   whole Trainer (events, health checks and evaluations included), in-process and with 2
   workers on each exchange. A step's time is the run's steady-state wall time over its
   steps (from the 20th step's event to the last): the replicated step reports its steps in
   blocks, so the gap between two step events means nothing on its own. Median over rounds,
   the modes alternating. Targets (issue 13): <= 0.3 ms with 2 workers, <= 0.15 ms
   in-process. Also shown: a bare Ray round trip with the parameters' payload, for scale.
2. Scaling: MLP 784-512-512-10 on random data, global batch 4096, float32, 1 CPU per
   worker; throughput with 2 workers over 1 worker, on the default exchange. Target >= 1.85.
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


def steady_step(stamps: list[tuple[int, float]], warmup: int) -> float:
    """Seconds per step in the steady state, from `(step, time)` of each step event.

    The replicated step reports its steps in bursts, one burst per block, all at about the
    same time; so the span starts at the end of the burst that holds step `warmup`, and
    counts only the steps after it (a gap of 50 us or more ends a burst)."""
    i = next(k for k, (step, _) in enumerate(stamps) if step >= warmup)
    while i + 1 < len(stamps) and stamps[i + 1][1] - stamps[i][1] < 5e-5:
        i += 1
    (first, began), (last, ended) = stamps[i], stamps[-1]
    return (ended - began) / (last - first)


def step_time(spec: TrainingSpec, out: Path, warmup: int = 20, **kwargs) -> float:
    """Seconds per step of a run in its steady state (after the `warmup`th step)."""
    stamps: list[tuple[int, float]] = []

    def on_event(event):
        if event["type"] == "step":
            stamps.append((event["step"], time.perf_counter()))

    summary = Trainer(spec, out, callback=on_event, **kwargs).run()
    assert summary["status"] == "succeeded", summary
    return steady_step(stamps, warmup)


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


def small_spec(epochs: int, workers: int = 2, exchange: str = "auto") -> TrainingSpec:
    return TrainingSpec.model_validate(
        {
            "name": "overhead",
            "model": {"type": "mlp", "sizes": [2, 16, 16, 2], "activation": "tanh"},
            "data": {"type": "builtin", "name": "moons", "n_samples": 1000, "noise": 0.1},
            "loss": "cross_entropy",
            "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
            "epochs": epochs,
            "batch_size": 64,
            "workers": workers,
            "cpus_per_worker": 1,
            "checkpoint_every": 10**6,
            "exchange": exchange,
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
            "health_every": 10**6,
            "workers": workers,
            "cpus_per_worker": 1,
            "dtype": "float32",
            "validation_fraction": 0.0,
            "checkpoint_every": 10**6,
        }
    )


TINY_MODES = {  # label -> (workers, exchange)
    "in-process": (0, "auto"),
    "2 workers, replicated": (2, "replicated"),
    "2 workers, compiled gather": (2, "compiled"),
    "2 workers, tasks": (2, "tasks"),
}


def tiny(tmp: Path, rounds: int, epochs: int) -> None:
    times: dict[str, list[float]] = {label: [] for label in TINY_MODES}
    for r in range(rounds):
        for label, (workers, exchange) in TINY_MODES.items():
            spec = small_spec(epochs, workers, exchange)
            times[label].append(step_time(spec, tmp / f"tiny-{r}-{workers}-{exchange}"))
    from workers.model import build_model

    spec = small_spec(epochs)
    params = [p.data for p in build_model(spec).parameters()]
    bare = statistics.median(bare_round_trip(params, spec.batch_size, 200))
    targets = {"in-process": 0.15e-3, "2 workers, replicated": 0.3e-3}
    print(f"tiny model 2-16-16-2, batch 64: seconds per step, median of {rounds} round(s)")
    for label, values in times.items():
        median = statistics.median(values)
        target, verdict = targets.get(label), ""
        if target is not None:
            ok = "ok" if median <= target else "MISSED"
            verdict = f" (target <= {target * 1e3:.2f} ms: {ok})"
        print(
            f"  {label:28s} {median * 1e3:7.3f} ms  (rounds {min(values) * 1e3:.3f}-"
            f"{max(values) * 1e3:.3f}){verdict}"
        )
    print(
        f"  {'bare Ray round trip':28s} {bare * 1e3:7.3f} ms  (2 actors, the parameters' payload)"
    )


def scaling(tmp: Path, rounds: int, steps: int) -> None:
    rng = np.random.default_rng(0)
    data = tmp / "random.npz"
    np.savez(data, X=rng.random((4096, 784)), y=rng.integers(0, 10, 4096))
    per_step: dict[int, list[float]] = {1: [], 2: []}
    for r in range(rounds):
        for workers in (1, 2) if r % 2 == 0 else (2, 1):
            spec = heavy_spec(data, workers, steps)
            per_step[workers].append(step_time(spec, tmp / f"heavy-{r}-{workers}", warmup=4))
    ratios = [one / two for one, two in zip(per_step[1], per_step[2], strict=True)]
    for workers, values in per_step.items():
        median = statistics.median(values)
        print(
            f"scaling: {workers} worker(s): {4096 / median:.0f} samples/s "
            f"(median step {median * 1e3:.1f} ms)"
        )
    print(
        f"scaling: 2 workers / 1 worker = {statistics.median(ratios):.2f} "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f}; target >= 1.85)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    tiny(tmp, rounds, epochs=20 if args.quick else 80)
    scaling(tmp, rounds, steps=12 if args.quick else 40)


if __name__ == "__main__":
    main()
