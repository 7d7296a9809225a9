"""shardgrad against Ray Train's TorchTrainer (PyTorch DDP over gloo), side by side.

    python benchmarks/vs_raytrain.py [--quick]          # needs the `bench` extra

Both run on one local Ray (num_cpus=2) in this process, 2 workers x 1 CPU, on two
workloads, each for 200 steps (50 with --quick):

  mlp784  MLP 784-256-256-10 relu, random data, global batch 256, float32, cross-entropy, SGD
  moons   MLP 2-16-16-2 tanh, two moons, global batch 64, float32, cross-entropy, SGD momentum

shardgrad runs the real Trainer (spec -> placement group -> workers -> coordinator),
once with each step exchange (`replicated`, the default, the `compiled` gather and
`tasks`). Ray Train runs
`TorchTrainer.fit()` with a train loop as lean as we could make it: tensors
materialized before the first step, each rank slicing its half of the global batch
by index (no DataLoader), one thread per worker, DDP allreduce in backward. Each side
runs as it would by default: shardgrad's compiled-graph workers pin themselves to free
cores (see workers/exchange.py), Ray Train's workers are not pinned.

A step is timed the same way on both sides: the wall time from the end of the step after a
short warm-up to the end of the last step, over the steps between (shardgrad: the
Trainer's step events; Ray Train: rank 0, after `optimizer.step()`, so DDP's allreduce is
included). We report the median over rounds (3, or 1 with --quick), and
ratio = ours / theirs (< 1: shardgrad is faster). Time to first step counts from the
call (Trainer.run / TorchTrainer.fit) to the end of the first step; the wall time is
the whole call for all steps, start-up and shutdown included.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.sync_step import steady_step  # noqa: E402
from workers.config import WorkerSettings
from workers.datasets import load_dataset
from workers.spec import BuiltinData, TrainingSpec
from workers.trainer import Trainer

WARMUP = 5  # steps left out of the step time (first touches, cold caches)
SIDES = {
    "replicated": "shardgrad",
    "compiled": "shardgrad gather",
    "tasks": "shardgrad tasks",
    "ray-train": "Ray Train DDP",
}
TARGET = 0.5  # ours / theirs, on the default exchange (issue 13)


WORKLOADS = {
    "mlp784": dict(
        sizes=[784, 256, 256, 10], activation="relu", batch=256, rows=256 * 50, lr=0.01, momentum=0
    ),
    "moons": dict(
        sizes=[2, 16, 16, 2], activation="tanh", batch=64, rows=64 * 50, lr=0.1, momentum=0.9
    ),
}


def dataset(name: str, tmp: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """The spec's data section and the same rows as arrays (for the PyTorch side)."""
    w = WORKLOADS[name]
    if name == "moons":
        data = {"type": "builtin", "name": "moons", "n_samples": w["rows"], "noise": 0.1}
        ds = load_dataset(BuiltinData.model_validate(data), seed=0)
        return data, ds.X.astype(np.float32), ds.y.astype(np.int64)
    rng = np.random.default_rng(0)
    X = rng.random((w["rows"], w["sizes"][0]), dtype=np.float32)
    y = rng.integers(0, w["sizes"][-1], w["rows"])
    path = tmp / f"{name}.npz"
    np.savez(path, X=X, y=y)
    return {"type": "file", "path": str(path)}, X, y


def spec(name: str, data: dict, epochs: int, exchange: str) -> dict:
    w = WORKLOADS[name]
    return {
        "name": f"bench-{name}",
        "model": {"type": "mlp", "sizes": w["sizes"], "activation": w["activation"]},
        "data": data,
        "loss": "cross_entropy",
        "optimizer": {"type": "sgd", "lr": w["lr"], "momentum": w["momentum"]},
        "epochs": epochs,
        "batch_size": w["batch"],
        "workers": 2,
        "cpus_per_worker": 1,
        "dtype": "float32",
        "validation_fraction": 0.0,
        "checkpoint_every": 10**6,
        "exchange": exchange,
    }


def run_ours(name: str, data: dict, steps: int, exchange: str, out: Path) -> dict:
    epochs = steps // 50  # 50 steps per epoch: rows = 50 global batches
    trainer_spec = TrainingSpec.model_validate(spec(name, data, epochs, exchange))
    stamps: list[tuple[int, float]] = []
    start = time.perf_counter()
    trainer = Trainer(
        trainer_spec,
        out,
        callback=lambda e: e["type"] == "step" and stamps.append((e["step"], time.perf_counter())),
        settings=WorkerSettings(head_start=False),  # every step on the workers, as DDP's
    )
    summary = trainer.run()
    wall = time.perf_counter() - start
    assert summary["status"] == "succeeded", summary
    assert trainer.pool.kind == exchange, trainer.pool.fallback_reason
    return {
        "step": steady_step(stamps, WARMUP),
        "first": stamps[0][1] - start,
        "wall": wall,
        "steps": len(stamps),
    }


def torch_loop(config: dict) -> None:
    """Ray Train's side: one DDP rank, pre-materialized tensors, index slicing."""
    import tempfile
    import time

    import torch
    from ray import train
    from ray.train.torch import prepare_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank, world = train.get_context().get_world_rank(), train.get_context().get_world_size()
    X = torch.from_numpy(config["X"])
    y = torch.from_numpy(config["y"])
    sizes, act = config["sizes"], {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}
    layers = []
    for n_in, n_out in pairwise(sizes):
        layers += [torch.nn.Linear(n_in, n_out), act[config["activation"]]()]
    model = prepare_model(torch.nn.Sequential(*layers[:-1]))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    loss_fn = torch.nn.CrossEntropyLoss()
    batch, n = config["batch"], len(X)
    g = torch.Generator().manual_seed(0)
    stamps, perm = [], torch.randperm(n, generator=g)
    for step in range(config["steps"]):
        pos = (step * batch) % n
        if pos == 0 and step:
            perm = torch.randperm(n, generator=g)
        idx = perm[pos : pos + batch]
        piece = idx[rank * batch // world : (rank + 1) * batch // world]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X[piece]), y[piece]).backward()  # DDP allreduces the gradients here
        opt.step()
        stamps.append(time.time())
    # Ray Train keeps the metrics that come with a checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory() as empty:
        if rank == 0:
            train.report({"stamps": stamps}, checkpoint=train.Checkpoint.from_directory(empty))
        else:
            train.report({})


def run_theirs(name: str, X: np.ndarray, y: np.ndarray, steps: int, out: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    w = WORKLOADS[name]
    config = {**w, "X": X, "y": y, "steps": steps}
    trainer = TorchTrainer(
        torch_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-{name}-{time.time_ns()}", storage_path=str(out)),
    )
    start_wall, start = time.time(), time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    if result.error:
        raise result.error
    stamps = result.metrics["stamps"]
    return {
        "step": steady_step(list(enumerate(stamps, start=1)), WARMUP),
        "first": stamps[0] - start_wall,
        "wall": wall,
        "steps": len(stamps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 steps, 1 round (~1 minute)")
    args = parser.parse_args()
    steps, rounds = (50, 1) if args.quick else (200, 3)
    print("$", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    tmp = Path(tempfile.mkdtemp(prefix="sg-vs-raytrain-"))
    runs = {}
    for name in WORKLOADS:
        data, X, y = dataset(name, tmp)
        for r in range(rounds):  # interleaved, so drifting machine load hits both sides alike
            for side in SIDES:
                out = tmp / f"{name}-{side}-{r}"
                if side == "ray-train":
                    res = run_theirs(name, X, y, steps, out)
                else:
                    res = run_ours(name, data, steps, side, out)
                runs.setdefault((name, side), []).append(res)
                print(
                    f"  {name:7s} {side:9s} round {r + 1}: step {res['step'] * 1e3:6.2f} ms, "
                    f"first step {res['first']:5.1f} s, wall {res['wall']:5.1f} s "
                    f"({res['steps']} steps)",
                    flush=True,
                )
    print(f"\nmedian over {rounds} round(s), {steps} steps each, 2 workers x 1 CPU:")
    print("workload  side              step ms   ours/theirs   first step s   wall s")
    med = {key: medians(results) for key, results in runs.items()}
    for name in WORKLOADS:
        theirs = med[(name, "ray-train")]["step"]
        for side, label in SIDES.items():
            m = med[(name, side)]
            ratio = f"{m['step'] / theirs:11.2f}" if side != "ray-train" else " " * 11
            print(
                f"{name:9s} {label:16s} {m['step'] * 1e3:8.2f}   {ratio}   {m['first']:12.1f}"
                f"   {m['wall']:6.1f}"
            )
    for name in WORKLOADS:
        ratio = med[(name, "replicated")]["step"] / med[(name, "ray-train")]["step"]
        pairs = zip(runs[(name, "replicated")], runs[(name, "ray-train")], strict=True)
        per_round = [ours["step"] / theirs["step"] for ours, theirs in pairs]
        print(
            f"{name}: ratio ours/theirs = {ratio:.2f} (rounds {min(per_round):.2f}-"
            f"{max(per_round):.2f}; target <= {TARGET}) {'ok' if ratio <= TARGET else 'MISSED'}"
        )


def medians(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


if __name__ == "__main__":
    main()
