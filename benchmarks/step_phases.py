"""Where a replicated step's time goes, per worker: timers around the replica's gradient sum
and its step, Ray's channel writes and reads and serialization, and the coordinator's CPU.

    python benchmarks/step_phases.py [--workload mlp784] [--steps 200] [--rounds 2]

Runs the Trainer on 2 workers (replicated), the workloads of `vs_raytrain.py`. The timers
are put into every worker process by a `worker_process_setup_hook` (`setup` below), which
wraps the methods in place; each worker writes its totals to a file at the end of every
block. Per step: `grad` (the gradient sum of the worker's piece), `apply` (the rank-order
add and the optimizer step), `between` (from the end of one replica call to the start of
the next: the channel write, the reads and the wait for the peer), then Ray's own parts
of that, and the stage calls that passed None (a block shorter than the graph).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(tempfile.gettempdir()) / "shardgrad-step-phases"


def setup() -> None:
    """In each worker process: wrap the replica's and Ray's channel methods with timers."""
    import ray._private.serialization as serialization
    from ray.experimental.channel import shared_memory_channel as shm

    import workers.replica as replica

    totals: dict = {"nones": 0}
    last_end: list[float | None] = [None]

    def timed(cls, name, key, between=False):
        inner = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            began = time.perf_counter()
            if between and last_end[0] is not None:
                totals["between"] = totals.get("between", 0.0) + began - last_end[0]
            if between and name != "start" and args[0][0] is None:
                totals["nones"] += 1
            out = inner(self, *args, **kwargs)
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - began
            if between:
                last_end[0] = None if name == "finish" else time.perf_counter()
            if name == "finish":
                (OUT / f"{os.getpid()}.json").write_text(json.dumps(totals))
            return out

        setattr(cls, name, wrapper)

    timed(replica.Replica, "_grad_sum", "grad")
    timed(replica.Replica, "_apply", "apply")
    for name in ("start", "step_once", "finish"):
        timed(replica.Replica, name, f"call {name}", between=True)
    timed(shm.Channel, "write", "channel write")
    timed(shm.Channel, "read", "channel read")
    timed(serialization.SerializationContext, "serialize", "serialize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="mlp784", choices=["mlp784", "moons"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import ray

    from benchmarks.sync_step import steady_step
    from benchmarks.vs_raytrain import WARMUP, dataset, spec
    from workers.spec import TrainingSpec
    from workers.trainer import Trainer

    OUT.mkdir(exist_ok=True)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={
            "worker_process_setup_hook": "benchmarks.step_phases.setup",
            "env_vars": {"PYTHONPATH": path},
        },
    )
    tmp = Path(tempfile.mkdtemp(prefix="sg-phases-"))
    data, _, _ = dataset(args.workload, tmp)
    for r in range(args.rounds):
        for old in glob.glob(str(OUT / "*.json")):
            os.remove(old)
        trainer_spec = TrainingSpec.model_validate(
            spec(args.workload, data, args.steps // 50, "replicated")
        )
        stamps: list[tuple[int, float]] = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        trainer = Trainer(
            trainer_spec,
            tmp / f"r{r}",
            callback=lambda e, stamps=stamps: (
                e["type"] == "step" and stamps.append((e["step"], time.perf_counter()))
            ),
        )
        trainer.run()
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(
            f"round {r + 1}: {steady_step(stamps, WARMUP) * 1e3:.2f} ms a step; "
            f"the coordinator's CPU {cpu:.2f} s (start-up included)"
        )
        n = len(stamps)
        for f in sorted(glob.glob(str(OUT / "*.json"))):
            totals = json.loads(Path(f).read_text())
            nones = totals.pop("nones")
            parts = ", ".join(
                f"{k} {v / n * 1e3:.2f}" for k, v in totals.items() if not k.startswith("call")
            )
            print(f"  worker pid {Path(f).stem}, ms per step: {parts}; None stages {nones}")


if __name__ == "__main__":
    main()
