"""The synchronous data-parallel step: its cost on a tiny model, and 2-worker scaling.

    python benchmarks/sync_step.py [--quick] [--rounds N]

1. Tiny model (MLP 2-16-16-2 on moons, global batch 64, float64): the time per step of the
   whole Trainer (events, health checks and evaluations included), in-process and with 2
   workers on each exchange. A step's time is the run's steady-state wall time over its
   steps (from the 20th step's event to the last): the replicated step reports its steps in
   blocks, so the gap between two step events means nothing on its own. Median over rounds,
   the modes alternating. Targets (issue 13): <= 0.3 ms with 2 workers, <= 0.15 ms
   in-process. Also shown: a bare Ray round trip with the parameters' payload, for scale.
2. Scaling: throughput with 2 workers over 1 worker (1 CPU each), on the default exchange,
   for three compute-heavy models in float32 (`--scaling mlp,cnn,transformer`):
   - mlp: MLP 784-512-512-10 on random data, global batch 4096. Target >= 1.85 (issue 13).
   - cnn: issue 14's CNN (conv 1->16 3x3 pad 1, relu, pool 2, conv 16->32, relu, pool 2,
     flatten, linear 10) on random 1x28x28 images, global batch 512. Target >= 1.8.
   - transformer: issue 15's model (d_model 128, 4 heads, ff 512, 2 layers, context 64,
     vocabulary 64) on an uploaded random text of 64 symbols, global batch 32. Target >= 1.8.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from workers.config import WorkerSettings
from workers.datasets import save_uploaded
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


def heavy_spec(data: dict, model: dict, batch: int, workers: int, steps: int) -> TrainingSpec:
    return TrainingSpec.model_validate(
        {
            "name": "scaling",
            "model": model,
            "data": data,
            "loss": "cross_entropy",
            "optimizer": {"type": "sgd", "lr": 0.01},
            "epochs": steps,  # one step an epoch: the data is one global batch
            "batch_size": batch,
            "health_every": 10**6,
            "workers": workers,
            "cpus_per_worker": 1,
            "dtype": "float32",
            "validation_fraction": 0.0,
            "checkpoint_every": 10**6,
        }
    )


CNN = {
    "type": "sequential",
    "input_shape": [1, 28, 28],
    "layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ],
}
TRANSFORMER = {
    "type": "transformer",
    "vocab_size": 64,
    "context": 64,
    "d_model": 128,
    "heads": 4,
    "layers": 2,
    "dim_feedforward": 512,
}


def workloads(tmp: Path) -> dict[str, tuple[dict, dict, int, float]]:
    """name -> (data, model, global batch, target) of the scaling runs; the text is an
    upload in `tmp` (WorkerSettings.datasets_dir)."""
    rng = np.random.default_rng(0)
    flat, images = tmp / "random.npz", tmp / "images.npz"
    np.savez(flat, X=rng.random((4096, 784)), y=rng.integers(0, 10, 4096))
    np.savez(images, X=rng.random((512, 1, 28, 28)), y=rng.integers(0, 10, 512))
    mlp = {"type": "mlp", "sizes": [784, 512, 512, 10], "activation": "relu"}
    symbols = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;"))
    text = "".join(rng.choice(symbols[:64], 32 * 64 + 1))  # 32 windows of context + 1
    upload = save_uploaded(text.encode(), "random.txt", tmp)
    return {
        "mlp": ({"type": "file", "path": str(flat)}, mlp, 4096, 1.85),
        "cnn": ({"type": "file", "path": str(images)}, CNN, 512, 1.8),
        "transformer": ({"type": "dataset", "id": upload.id}, TRANSFORMER, 32, 1.8),
    }


# The steps measured are the workers': no head start (workers/headstart.py), in which the
# coordinator takes the first steps while the workers start.
WORKERS_FROM_THE_START = WorkerSettings(head_start=False)
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
            out = tmp / f"tiny-{r}-{workers}-{exchange}"
            times[label].append(step_time(spec, out, settings=WORKERS_FROM_THE_START))
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


def scaling(tmp: Path, rounds: int, steps: int, names: list[str]) -> None:
    chosen = workloads(tmp)
    for name in names:
        data, model, batch, target = chosen[name]
        per_step: dict[int, list[float]] = {1: [], 2: []}
        for r in range(rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                spec = heavy_spec(data, model, batch, workers, steps)
                out = tmp / f"{name}-{r}-{workers}"
                settings = WorkerSettings(datasets_dir=tmp, head_start=False)
                per_step[workers].append(step_time(spec, out, warmup=20, settings=settings))
        ratios = [one / two for one, two in zip(per_step[1], per_step[2], strict=True)]
        for workers, values in per_step.items():
            median = statistics.median(values)
            print(
                f"scaling {name}: {workers} worker(s): {batch / median:.0f} samples/s "
                f"(median step {median * 1e3:.1f} ms)"
            )
        ratio = statistics.median(ratios)
        print(
            f"scaling {name}: 2 workers / 1 worker = {ratio:.2f} (rounds {min(ratios):.2f}-"
            f"{max(ratios):.2f}; target >= {target}: {'ok' if ratio >= target else 'MISSED'})"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--scaling", default="mlp,cnn,transformer", help="workloads, or none")
    parser.add_argument("--no-tiny", action="store_true", help="only the scaling runs")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    if not args.no_tiny:
        tiny(tmp, rounds, epochs=20 if args.quick else 80)
    names = [n for n in args.scaling.split(",") if n and n != "none"]
    scaling(tmp, rounds, steps=40 if args.quick else 60, names=names)  # > the first block


if __name__ == "__main__":
    main()
