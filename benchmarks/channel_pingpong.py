"""A raw worker-to-worker hop on Ray's own transports: two actors, pinned to a core each
as the replicated step's workers are, pass a float32 vector back and forth.

    python benchmarks/channel_pingpong.py [--rounds 3] [--trips 1000]

Two ways, for 1,000 and 270,000 floats (about mlp784's gradient sum):

  channel loop   `ray.experimental.channel.Channel`s between the two actors, and a loop
                 that the actors drive themselves: A writes, B reads and writes back, A
                 reads. The driver only starts the loop and collects the times.
  task hop       `B.echo.remote(A.echo.remote(x))` and `ray.get` (the object store).

A round trip is two hops; we report the median per hop and, for the channel loop, how much
of a hop the write and the read take on the sending and the receiving side. (A compiled
graph's hop is `benchmarks/graph_stages.py`'s business.) Ray's
collective API is not measured: its CPU backend ("gloo") needs torch in this Ray
(`torch_gloo_collective_group`), and pygloo has no release for this Python.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.exchange import claim_cores  # noqa: E402

SIZES = (1_000, 270_000)


@ray.remote(num_cpus=1)
class Peer:
    def pin(self) -> list[int]:
        return claim_cores(1)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def open_out(self, reader, reader_node: str, nbytes: int):
        """The channel this actor writes and `reader` reads."""
        from ray.experimental.channel.shared_memory_channel import Channel

        self.out = Channel(ray.get_runtime_context().current_actor, [(reader, reader_node)], nbytes)
        return self.out

    def take_in(self, channel) -> None:
        self.inp = channel

    def loop(self, first: bool, trips: int, size: int) -> dict:
        """`trips` round trips; the first peer writes first. Per trip: the seconds of its
        write, of its read, and of the whole trip (first peer)."""
        x = np.arange(size, dtype=np.float32)
        self.out.ensure_registered_as_writer()
        self.inp.ensure_registered_as_reader()
        writes, reads, trip = [], [], []
        for _ in range(trips):
            began = time.perf_counter()
            if first:
                self.out.write(x)
                wrote = time.perf_counter()
                y = self.inp.read()
            else:
                y = self.inp.read()
                wrote = time.perf_counter()  # here: the end of the read
                self.out.write(y)
            done = time.perf_counter()
            if first:
                writes.append(wrote - began)
                reads.append(done - wrote)
            else:
                reads.append(wrote - began)
                writes.append(done - wrote)
            trip.append(done - began)
            del y
        return {
            "trip": statistics.median(trip),
            "write": statistics.median(writes),
            "read": statistics.median(reads),
        }

    def echo(self, x):
        return x


def channel_loop(a, b, size: int, trips: int) -> dict:
    nbytes = size * 4 + 2**16
    node_a, node_b = ray.get([a.node.remote(), b.node.remote()])
    ab = ray.get(a.open_out.remote(b, node_b, nbytes))
    ba = ray.get(b.open_out.remote(a, node_a, nbytes))
    ray.get([a.take_in.remote(ba), b.take_in.remote(ab)])
    first, second = ray.get([a.loop.remote(True, trips, size), b.loop.remote(False, trips, size)])
    return {
        "hop": first["trip"] / 2,
        "write": first["write"],
        "read (the wait included)": second["read"],
    }


def task_hop(a, b, size: int, trips: int) -> dict:
    x = np.arange(size, dtype=np.float32)
    times = []
    for _ in range(min(trips, 300)):
        began = time.perf_counter()
        ray.get(b.echo.remote(a.echo.remote(x)))
        times.append(time.perf_counter() - began)
    return {"hop": statistics.median(times) / 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trips", type=int, default=1000)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    results: dict = {}
    for r in range(args.rounds):
        for name, way in (("channel loop", channel_loop), ("task hop", task_hop)):
            for size in SIZES:
                a, b = Peer.remote(), Peer.remote()
                cores = ray.get([a.pin.remote(), b.pin.remote()])
                res = way(a, b, size, args.trips)
                for key, value in res.items():
                    results.setdefault((name, size, key), []).append(value)
                print(
                    f"  round {r + 1} {name:12s} {size:>7,} floats: "
                    + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in res.items())
                    + f" (cores {cores})",
                    flush=True,
                )
                for actor in (a, b):
                    ray.kill(actor)
    print(f"\nmedian over {args.rounds} round(s), {args.trips} round trips each:")
    for (name, size, key), values in results.items():
        print(
            f"{name:12s} {size:>7,} floats  {key:24s} {statistics.median(values) * 1e3:7.3f} ms"
            f"  (rounds {min(values) * 1e3:.3f}-{max(values) * 1e3:.3f})"
        )


if __name__ == "__main__":
    main()
