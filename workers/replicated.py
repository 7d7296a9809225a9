"""The replicated step: every worker holds a replica of the parameters and the optimizer
state (workers/replica.py), and the coordinator leaves the step's critical path.

Per step, worker *i* computes the gradient sum of its rank-order piece of the global batch
(the same split as the gather step), the workers pass their sums to each other over a
compiled graph's channels (`exchange.ReplicatedGraph`), and every worker adds the N sums in
rank order, divides by the batch size and steps its optimizer with `average_and_step`, the
coordinator's own arithmetic. Same inputs, same operations, same order: the replicas stay
bit-identical to each other and to what the gather step computes in the coordinator.

The coordinator starts a block of steps with one graph execution and gets back each step's
sample count, loss and gradient norm from rank 0. When it needs the model (checkpoint,
health and evaluation steps, the end, a stop) the block ends there and rank 0 also returns
its parameters, optimizer state and last averaged gradient ("fetch"); at checkpoints every
replica returns a hash of its parameters, and the coordinator checks they agree ("verify").

A dead worker is replaced and given the state of a surviving replica (the one that got
furthest); the steps it had not reached are recomputed. If no worker survives, every
replacement gets the coordinator's last fetched state (at least as new as the newest
checkpoint) and the steps since are recomputed. The result is bit-identical either way.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import ray
from ray.exceptions import RayActorError

from workers.exchange import (
    ExchangeBroken,
    ReplicatedGraph,
    WorkersDied,
    dead_ranks,
    flatten,
    unflatten,
)
from workers.model import Diverged, TrainingError
from workers.pool import OnPool, check_stop

log = logging.getLogger(__name__)

BLOCK_S = 0.1  # the graph's length, by the pace of a gradient sum: its stages' worth of steps
STOP_S = 0.5  # a block's most: a stop waits for at most about this long
NAP = 0.75  # the part of a block's expected time the coordinator sleeps before it waits
GRAPH_BYTES = 2**26  # the channel memory a graph may take: its stages x workers x a sum


class ReplicatedStep(OnPool):
    """The step strategy over replicas (see the module's docstring).

    `advance(end, fetch, verify, checked)` runs the steps from the coordinator's step up to
    `end` and returns their (rows, loss, gradient norm, health statistics); with `fetch` the
    coordinator's model and optimizer are the replicas' afterwards. It may return fewer
    steps than asked when a step diverged; the next call raises Diverged with the
    coordinator's model at that step.
    """

    def __init__(self, pool, model, opt, spec, step: int, gather_step, span: int):
        """`gather_step(step)`: the strategy to fall back to; `span`: the most steps between
        two reads of the model, the length of a graph that has no stage to spare."""
        self.pool, self.model, self.opt, self.spec = pool, model, opt, spec
        self.params = model.parameters()
        self.shapes = [p.shape for p in self.params]
        self.step = step  # the step the replicas are at (each has done `step` steps)
        self.synced = step  # the step the coordinator's model and optimizer are at
        self.diverged: str | None = None
        self.replica_hashes: list[str] = []  # every replica's, at step `verified`
        self.verified = -1
        self.restores: list[tuple[int | None, int]] = []  # (source rank or None, step)
        self.step_s = 0.0  # the latest block's time per step
        self.fastest_s = 0.0  # the fastest block's time per step, the first left out (0: none)
        self._blocks = 0
        self.graph: ReplicatedGraph | None = None
        self.gather = None  # after a fall back to tasks: the gather step over the same pool
        self._make_gather = gather_step
        self.sum_bytes = sum(int(np.prod(s)) for s in self.shapes) * np.dtype(spec.dtype).itemsize
        while True:  # every worker gets the coordinator's state; a dead one is replaced
            try:
                self._seed(range(pool.n), self._own_state())
                pace = self._get(pool.actors[0].replica_pace.remote(BLOCK_S))
                break
            except WorkersDied as err:
                for rank, cause in err.causes.items():
                    pool.replace(rank, cause)
        # As many stages as a block of BLOCK_S has steps, by the pace of rank 0's gradient
        # sum: a block shorter than the graph still passes None through every stage it
        # does not need, a channel hop between the workers each (about 0.6 ms on 2 cores:
        # a 16-stage graph would add 9 ms to each 1-step block of a 70 ms step).
        fit = GRAPH_BYTES // (pool.n * max(self.sum_bytes, 1))
        paced = int(BLOCK_S / pace) if pace > 0 else span
        self.stages = int(np.clip(min(fit, span, paced), 1, pool.settings.replicated_stages))
        check_stop(pool.stop)  # before the graph's compilation, which cannot be cut short
        self._open()

    def adopt(self, model, opt, step: int) -> None:
        """Carry on from the coordinator's `model` and `opt` at `step` (a head start's,
        workers/headstart.py): every replica gets that state, and fetches write into them."""
        self.model, self.opt, self.params = model, opt, model.parameters()
        self.step = self.synced = step
        if self.gather is not None:  # it fell back to tasks as it started
            self.gather.adopt(model, opt, step)
            return
        while True:
            try:
                self._seed(range(self.pool.n), self._own_state())
                break
            except WorkersDied as err:  # the graph went with them: replace, seed, compile
                self._close_graph()
                for rank, cause in err.causes.items():
                    self.pool.replace(rank, cause)
        self._open()

    @property
    def block(self) -> int:
        """The most steps one call should run: the graph's stages, unless they take longer
        than STOP_S (a stop waits for no more than that). A shorter block still passes
        None through the stages it does not need, a channel hop between the workers each,
        so blocks fill the graph (the graph's length was chosen by the pace)."""
        if self.gather is not None:
            return 1
        fits = int(STOP_S / self.step_s) if self.step_s > 0 else self.stages
        return max(1, min(self.stages, fits))

    # -- the steps
    def advance(self, end: int, fetch: bool, verify: bool = False, checked=()) -> list[tuple]:
        if self.diverged is not None:
            raise Diverged(self.diverged)
        if self.gather is not None:
            return self.gather.advance(end, fetch, verify, checked)
        first, results = self.step, []
        while (
            self.step < end
            or (fetch and self.synced != self.step)
            or (verify and self.verified != self.step)
        ):
            began = time.perf_counter()
            # The coordinator sleeps through most of the block instead of spinning on the
            # channel read, which would take CPU from the workers (docs/performance.md).
            # By the fastest block so far: a slow one must not make the coordinator oversleep.
            steps = max(0, min(end, self.step + self.stages) - self.step)
            nap = NAP * self.fastest_s * steps
            try:
                outs = self.graph((end, fetch, verify, tuple(checked)), nap)
            except WorkersDied as err:
                results += self._recover(err.causes)
                if self.gather is not None:  # the new graph did not compile: tasks from here
                    more = self.gather.advance(end, fetch, verify, checked)
                    return self._kept(first, results) + more
                continue
            except ExchangeBroken as err:
                results += self._fall_back(err)
                more = self.gather.advance(end, fetch, verify, checked)
                return self._kept(first, results) + more
            done = self._take(outs, verify)
            results += done
            if done:  # the latest block's pace (the first one's includes the graph's warm-up)
                self.step_s = (time.perf_counter() - began) / len(done)
                self._blocks += 1
                if self._blocks > 1:  # the first includes the graph's warm-up
                    self.fastest_s = min(self.fastest_s or self.step_s, self.step_s)
            if self.diverged is not None:
                break
        kept = self._kept(first, results)
        if self.diverged is not None and not kept:
            raise Diverged(self.diverged)
        return kept

    def sync(self) -> None:
        """The coordinator's model and optimizer are the replicas', and the replicas are
        checked to agree (before any checkpoint, say a stop's)."""
        if self.gather is None:
            self.advance(self.step, fetch=True, verify=True)

    def _kept(self, first: int, results: list) -> list:
        """Drop the steps before `first`: recomputed after a restore, already reported."""
        return results[len(results) - (self.step - first) :] if self.step > first else []

    def _take(self, outs: list[dict], verify: bool) -> list[tuple]:
        rank0 = outs[0]
        if verify:
            hashes = [o["sha256"] for o in outs]
            if len(set(hashes)) != 1:
                raise TrainingError(
                    f"the replicas differ at step {rank0['step']} (parameter hashes "
                    f"{', '.join(h[:12] for h in hashes)}); this is a bug, please report it"
                )
            self.replica_hashes, self.verified = hashes, rank0["step"]
        self.step = rank0["step"]
        if "state" in rank0:
            self._sync(rank0["state"])
        self.diverged = rank0["diverged"]
        return [tuple(r) for r in rank0["results"]]

    def _sync(self, state: dict) -> None:
        """Copy a replica's state into the coordinator's model and optimizer."""
        for p, a in zip(self.params, unflatten(state["params"], self.shapes), strict=True):
            p.data = np.array(a)
        if state["grads"] is not None:
            for p, g in zip(self.params, unflatten(state["grads"], self.shapes), strict=True):
                p.grad = np.array(g)
        self.opt.load_state_dict(state["optimizer"])  # copies every array
        self.synced = self.step = int(state["step"])

    def _own_state(self) -> dict:
        return {
            "step": self.synced,
            "params": flatten([p.data for p in self.params]),
            "optimizer": self.opt.state_dict(),
        }

    # -- workers
    def _get(self, refs):
        """ray.get of calls to the workers; WorkersDied names the dead ones."""
        try:
            return ray.get(refs)
        except RayActorError:
            actors = self.pool.actors
            raise WorkersDied(dict.fromkeys(dead_ranks(actors), "RayActorError")) from None

    def _seed(self, ranks, state: dict) -> None:
        """Give the workers of `ranks` a replica with `state`."""
        actors, n, ref = self.pool.actors, self.pool.n, ray.put(state)
        self._get([actors[r].replicate.remote(self.spec, r, n, ref) for r in ranks])

    def _open(self) -> None:
        """Compile the graph over the current actors (replacing any that die meanwhile)."""
        while self.graph is None:
            try:
                self.graph = ReplicatedGraph(
                    self.pool.actors, self.stages, self.pool.settings, self.sum_bytes
                )
            except WorkersDied as err:
                self._recover(err.causes)
            except ExchangeBroken as err:
                self._fall_back(err)
                return

    def _close_graph(self) -> None:
        graph, self.graph = self.graph, None
        if graph is not None:
            graph.close()

    def _recover(self, causes: dict[int, str]) -> list[tuple]:
        """Replace the dead workers; give every replica the furthest survivor's state.
        Returns the steps the survivor had done in the failed block (kept by the caller)."""
        self._close_graph()
        lost: set[int] = set()
        while True:
            for rank, cause in causes.items():
                self.pool.replace(rank, cause)  # WorkerFailure past max_failures
            lost |= set(causes)
            survivors = [r for r in range(self.pool.n) if r not in lost]
            try:
                source, state, results = self._furthest(survivors)
                self._seed([r for r in range(self.pool.n) if r != source], state)
                break
            except WorkersDied as err:  # another died meanwhile
                causes = err.causes
        self.restores.append((source, int(state["step"])))
        where = f"worker {source}'s replica" if source is not None else "the coordinator's copy"
        log.warning("workers restored from %s at step %d", where, state["step"])
        self.step = int(state["step"])
        if source is None:
            self.synced = self.step
        self._open()
        return results

    def _furthest(self, survivors: list[int]):
        """(rank, state, its steps of the failed block) of the survivor that got furthest;
        (None, the coordinator's state, []) if none survived."""
        actors = self.pool.actors
        steps = self._get([actors[r].replica_at.remote() for r in survivors])
        if not survivors:
            return None, self._own_state(), []
        source = survivors[int(np.argmax(steps))]
        state, results = self._get(actors[source].replica_state.remote())
        return source, state, [tuple(r) for r in results]

    def _fall_back(self, err: ExchangeBroken) -> list[tuple]:
        """The transport failed with every worker alive: take rank 0's state into the
        coordinator and go on with the gather step over tasks."""
        self._close_graph()
        log.warning("%s; falling back to the tasks exchange", err)
        state, results = ray.get(self.pool.actors[0].replica_state.remote())
        self.step = int(state["step"])
        self._sync(state)
        self.pool.fall_back(str(err))
        self.gather = self._make_gather(self.step)
        return [tuple(r) for r in results]

    def close(self) -> None:
        self._close_graph()
        self.pool.shutdown()
