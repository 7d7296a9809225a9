"""What a stage of the replicated graph costs when a block does not need it.

    python benchmarks/graph_stages.py [--executions 60]

A block shorter than the replicated graph still passes None through every stage it does
not need (exchange.ReplicatedGraph): a channel hop between the workers each. This runs a
graph of the same shape over 2 actors that do nothing, with 16 stages and with 1, and
prints the median time of an execution of each and their difference per stage.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
from ray.dag import InputNode, MultiOutputNode


@ray.remote(num_cpus=0.5)
class Idle:
    def start(self, command):
        return None

    def step_once(self, *sums):
        return None

    def finish(self, *sums):
        return 0


def graph(actors: list, stages: int):
    with InputNode() as inp:  # as exchange.ReplicatedGraph wires it
        sums = [a.start.bind(inp) for a in actors]
        for _ in range(stages - 1):
            sums = [a.step_once.bind(*sums) for a in actors]
        dag = MultiOutputNode([a.finish.bind(*sums) for a in actors])
    return dag.experimental_compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--executions", type=int, default=60)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actors = [Idle.remote() for _ in range(2)]
    medians = {}
    for stages in (16, 1):
        compiled = graph(actors, stages)
        for _ in range(5):  # warm-up
            ray.get(compiled.execute(0))
        times = []
        for _ in range(args.executions):
            began = time.perf_counter()
            ray.get(compiled.execute(0))
            times.append(time.perf_counter() - began)
        compiled.teardown()
        medians[stages] = statistics.median(times)
        print(f"{stages:2d} stages: {medians[stages] * 1e3:.2f} ms an execution (median)")
    per_stage = (medians[16] - medians[1]) / 15
    print(f"a stage a block does not need: {per_stage * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
