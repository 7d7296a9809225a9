"""The most 2-worker scaling this machine allows the transformer, with no Ray in the way.

    python benchmarks/scaling_ceiling.py [--rounds 4] [--steps 30]

1. Two busy cores: a float32 matrix product (1024x128 @ 128x512, 1 BLAS thread) in one
   process, then in two processes at once. On a machine whose cores slow each other down
   (shared caches and memory, SMT siblings, a lower clock with every core busy) two at
   once take longer each; that loss comes off any 2-worker scaling.
2. Lockstep: the gradient sum of `sync_step.py`'s transformer (d_model 128, 4 heads, ff
   512, 2 layers, context 64, float32) by the function the workers use (`grad_sum`), as 1
   process x 32 rows, then 2 processes x 16 rows that wait for each other at a barrier
   every step, as synchronous SGD's workers do. Each process has 1 BLAS thread, a core of
   its own, and the allocator setting of a worker (workers/malloc.py). A step is the
   slower process's time. The ratio of the two medians is what 2 workers could reach with
   a free exchange and optimizer step; `sync_step.py --scaling transformer` measures
   what they do reach.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup(core: int | None):
    """In a fresh process: numpy at 1 BLAS thread, pinned to `core`, a worker's allocator."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from workers.malloc import reuse_freed_memory

    threadpool_limits(1)  # after numpy's import, so that its BLAS is found
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    reuse_freed_memory()
    return np


def _gemm(core, steps: int, barrier, out) -> None:
    np = _setup(core)
    rng = np.random.default_rng(core or 0)
    a = rng.random((1024, 128), dtype=np.float32)
    b = rng.random((128, 512), dtype=np.float32)
    times = []
    barrier.wait()
    for _ in range(steps):
        began = time.perf_counter()
        for _ in range(20):
            a @ b
        times.append(time.perf_counter() - began)
    out.put(times)


def _grad(core, steps: int, barrier, out, rows: int) -> None:
    np = _setup(core)
    sys.path.insert(0, str(ROOT))
    from benchmarks.sync_step import TRANSFORMER  # the same model as the scaling run
    from workers.model import build_model, grad_sum
    from workers.spec import TrainingSpec

    spec = TrainingSpec.model_validate(
        {
            "name": "ceiling",
            "model": TRANSFORMER,
            "data": {"type": "builtin", "name": "addition"},  # the spec needs one; unused
            "loss": "cross_entropy",
            "optimizer": {"type": "adamw", "lr": 1e-3},
            "epochs": 1,
            "batch_size": 32,
            "dtype": "float32",
        }
    )
    model = build_model(spec)
    params = model.parameters()
    tokens = np.random.default_rng(0).integers(0, 64, (rows, 65))
    times = []
    for _ in range(steps):
        barrier.wait()  # synchronous SGD: every step starts when the slower one is done
        began = time.perf_counter()
        grad_sum(model, "cross_entropy", tokens, None, np.arange(rows), 0, params)
        times.append(time.perf_counter() - began)
    out.put(times)


def _run(target, procs: int, steps: int, *args) -> list[float]:
    """Per step, the slowest process's seconds (the first 3 steps left out: warm-up)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pins = cores[:procs] if procs <= len(cores) else [None] * procs
    workers = [ctx.Process(target=target, args=(core, steps, barrier, out, *args)) for core in pins]
    for w in workers:
        w.start()
    results = [out.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    return [max(r[i] for r in results) for i in range(3, steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    gemm: dict[int, list[float]] = {1: [], 2: []}
    lockstep: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for procs in (1, 2) if r % 2 == 0 else (2, 1):
            gemm[procs].append(statistics.median(_run(_gemm, procs, args.steps)))
            rows = 32 // procs
            lockstep[procs].append(statistics.median(_run(_grad, procs, args.steps, rows)))
    one, two = statistics.median(gemm[1]), statistics.median(gemm[2])
    print(f"two busy cores: 20 products take {one * 1e3:.1f} ms alone, {two * 1e3:.1f} ms")
    print(f"  each with both cores busy: {two / one:.2f}x (median of {args.rounds} rounds)")
    ratios = [a / b for a, b in zip(lockstep[1], lockstep[2], strict=True)]
    one, two = statistics.median(lockstep[1]), statistics.median(lockstep[2])
    print(f"lockstep transformer: 1 x 32 rows {one * 1e3:.1f} ms, 2 x 16 rows {two * 1e3:.1f} ms")
    print(
        f"  ceiling of 2 workers / 1 worker: {statistics.median(ratios):.2f} "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
