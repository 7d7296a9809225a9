"""How a step's gradient sums travel between the workers and the coordinator.

* ``replicated`` (workers/replicated.py): every worker holds a replica of the model and
  optimizer; a compiled graph (`ReplicatedGraph`) carries each worker's gradient sum to
  every worker, block after block of steps, and the coordinator only starts the blocks.

The two gather exchanges carry the same messages: the parameters as one flat vector to
every worker, and back from worker *i*, in rank order, ``(flat gradient sum, sample count,
loss sum)``. Only the transport differs. All three train bit-identical parameters.

* ``compiled``: a Ray Compiled Graph (``ray.dag``) over the pool's actors, compiled once
  per set of actors. A step writes its input once into a shared-memory channel that
  resident loops on the actors read; there is no task submission and no object-store put.
* ``tasks``: ``ray.put`` of the parameters, one actor task per worker, ``ray.get``.
  It works wherever Ray does, and it is the fallback.

``auto`` (the default) means ``replicated`` unless the driver is a Ray Client (compiled
graphs need a real driver); if a graph cannot be compiled or run, the pool falls back to
``tasks`` with a logged reason and the job goes on. The spec's ``exchange`` field chooses;
while it is ``auto``, the run's `WorkerSettings.exchange` (``$SHARDGRAD_EXCHANGE``) may
choose instead.

A compiled graph lives as long as its set of actors. When a worker dies, Ray's graph
monitor tears the graph down and the pending ``ray.get`` raises at once (ActorDiedError,
or a channel error if the death came between steps); the exchange then probes every
actor and reports the dead ranks, and the pool replaces them and compiles a new graph.
An error with every worker alive is the transport's: the pool falls back to tasks. Each
worker of a compiled graph pins itself to a free core (``claim_cores``), because channel
reads busy-wait; `WorkerSettings.pin_workers` (``SHARDGRAD_PIN_WORKERS=0``) turns that off.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
import time
import traceback

import numpy as np
import psutil
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from core.optim import FlatViews, spans
from workers.config import WorkerSettings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0  # how long a live actor may take to answer after a failed step
_compile_lock = threading.Lock()  # the service compiles graphs from several job threads
CORE_LOCK = os.path.join(tempfile.gettempdir(), "shardgrad-cores.lock")  # one per node


class WorkersDied(RuntimeError):
    """Some workers of the step are dead; the pool replaces them and asks again."""

    def __init__(self, causes: dict[int, str]):
        super().__init__(", ".join(f"worker {r} died: {c}" for r, c in causes.items()))
        self.causes = causes  # rank -> the error that showed it, e.g. "ActorDiedError"


class ExchangeBroken(RuntimeError):
    """The transport failed while every worker is alive; the pool falls back to tasks."""


def resolve(setting: str | None, settings: WorkerSettings) -> str:
    """'replicated', 'compiled' or 'tasks': the spec's setting, else `settings.exchange`,
    else auto (replicated, or tasks from a Ray Client)."""
    choice = setting if setting and setting != "auto" else settings.exchange
    if choice == "auto":
        from ray.util.client import ray as client

        return "tasks" if client.is_connected() else "replicated"
    return choice


# ---------------------------------------------------------------- flat vectors


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    """One contiguous vector: one buffer to serialize instead of one per tensor. Arrays that
    are `FlatViews` (the fused kernel's gradients) are one already: their vector, no copy."""
    flat = getattr(arrays, "flat", None)
    return flat if flat is not None else np.concatenate([a.ravel() for a in arrays])


def unflatten(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> FlatViews:
    """Views of `flat` in `shapes` (no copy), which know `flat` (an optimizer steps them as
    one vector)."""
    layout = spans(shapes)
    return FlatViews(flat[: layout[-1][1] if layout else 0], layout)


def add_in_rank_order(sums, shapes) -> tuple[list[np.ndarray], int, float]:
    """(gradient sums as arrays of `shapes`, sample count, loss sum) of the workers'
    `(flat sum, count, loss sum)` in rank order, added in rank order. Every exchange adds
    with this, so all perform the same floating-point operations in the same order. The
    flat sums may be views of channel buffers: the result is a copy of its own."""
    total = sums[0][0].copy()
    for g, _, _ in sums[1:]:
        total += g
    n = sum(count for _, count, _ in sums)
    loss_sum = sum(loss for _, _, loss in sums)
    return unflatten(total, shapes), n, loss_sum


# ---------------------------------------------------------------- the exchanges


def claim_cores(k: int) -> list[int]:
    """Pin this process to `k` cores that no other pinned process on this node holds.

    Compiled-graph channels busy-wait (sched_yield) while they wait for a message. With as
    many workers as cores, the kernel then often stacks two workers on one core while the
    other core serves spinning waiters, and a step takes twice its compute. A core of its
    own per worker prevents that. Cores already pinned by any process are left alone, and
    if there are not `k` free ones the process stays unpinned. Returns the cores (or []).
    """
    if not hasattr(os, "sched_getaffinity"):  # Linux only
        return []
    try:
        return _pin_free_cores(k)
    except OSError as err:
        log.info("workers stay unpinned: %s", err)
        return []


def _pin_free_cores(k: int) -> list[int]:
    allowed = os.sched_getaffinity(0)
    if len(allowed) <= k:
        return []
    with open(CORE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two workers starting at once must not pick alike
        taken = set()
        # Not ours to see, or gone since it was listed: None, and skipped.
        for proc in psutil.process_iter(["cmdline", "cpu_affinity"], ad_value=None):
            cmdline, affinity = proc.info["cmdline"], proc.info["cpu_affinity"]
            if proc.pid == os.getpid() or not cmdline or affinity is None:
                continue  # no command line: a kernel thread, per-core by design
            mask = set(affinity)
            if not allowed <= mask:  # pinned (to some of our cores, or to others)
                taken |= mask & allowed
        free = sorted(allowed - taken)
        if len(free) < k:
            return []
        cores = set(free[:k])
        # Every thread (an affinity is per thread; new ones inherit it).
        for thread in psutil.Process().threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread.id, cores)
    return sorted(cores)


def dead_ranks(actors: list, timeout: float = PROBE_TIMEOUT_S) -> list[int]:
    """Ranks whose actor is dead, or does not answer within `timeout`."""
    probes = [a.info.remote() for a in actors]
    deadline = time.monotonic() + timeout
    dead = []
    for rank, probe in enumerate(probes):
        try:
            ray.get(probe, timeout=max(0.0, deadline - time.monotonic()))
        except (RayActorError, GetTimeoutError):
            dead.append(rank)
    return dead


class TaskExchange:
    name = "tasks"

    def __init__(self, actors: list):
        self.actors = actors

    def __call__(self, flat: np.ndarray, pieces: list[np.ndarray]) -> list[tuple]:
        ref = ray.put(flat)
        futures = [a.grad.remote(ref, p) for a, p in zip(self.actors, pieces, strict=True)]
        results, causes = [], {}
        for rank, future in enumerate(futures):
            try:
                results.append(ray.get(future))
            except RayActorError as err:
                causes[rank] = type(err).__name__
        if causes:
            raise WorkersDied(causes)
        return results

    def close(self) -> None:
        pass


class Graph:
    """A compiled graph over the pool's actors: compiled once, run with a timeout, torn
    down on any failure, which it blames on dead workers (WorkersDied) if there are any,
    else on the transport (ExchangeBroken)."""

    def __init__(self, actors: list, settings: WorkerSettings, buffer_bytes: int):
        from ray.dag import DAGContext

        self.actors, self.graph = actors, None
        self.slowest = 0.0  # seconds, of the executions so far
        # An execution with every worker alive that answers within neither this nor 50 times
        # the slowest so far is stuck in the transport: the job falls back to tasks.
        self.timeout_floor = settings.step_timeout_s
        try:
            if settings.pin_workers:
                ray.get([a.pin.remote() for a in actors])
            dag = self._dag()
            # A channel is sized for its largest regular message, so it is not resized on
            # the fly (a larger one, such as a fetched state, grows it once).
            buffer = max(DAGContext.get_current().buffer_size_bytes, buffer_bytes)
            with _compile_lock:
                self.graph = dag.experimental_compile(_buffer_size_bytes=buffer)
        except Exception as err:
            self._diagnose(err, "could not compile")

    def _dag(self):
        raise NotImplementedError

    def _run(self, *args, nap: float = 0.0) -> list:
        """The graph's results for `args`. `nap`: seconds to sleep before the wait for
        them, since a wait on a channel spins (a caller that knows the pace passes most
        of it)."""
        # A dead actor makes Ray's graph monitor tear the graph down at once, and the get
        # raises ActorDiedError; a slow execution may take many times the slowest so far.
        timeout = max(self.timeout_floor, 50 * self.slowest)
        began = time.monotonic()
        try:
            ref = self.graph.execute(*args)
            time.sleep(min(nap, timeout))
            results = ray.get(ref, timeout=max(0.0, timeout - (time.monotonic() - began)))
        except Exception as err:  # ActorDiedError, channel errors, anything of Ray's
            if isinstance(err, RayTaskError) and not isinstance(err.cause, RayError):
                _forget_frames(err)  # its message keeps the worker's traceback
                raise err from None  # the step's own error (a bug, not the transport)
            what = "step failed"
            if isinstance(err, TimeoutError):  # no worker died, yet no answer: stuck
                what = f"step gave no answer in {timeout:.3g}s"
            self._diagnose(err, what)
        self.slowest = max(self.slowest, time.monotonic() - began)
        # Zero-copy views of the channels' buffers: a worker cannot write its next result
        # while a view of its buffer lives, so the caller must be done with them by then.
        return results

    def _diagnose(self, err: Exception, what: str):
        """Tear down, then blame dead workers if there are any, else the transport."""
        self.close()
        _forget_frames(err)
        dead = dead_ranks(self.actors)
        if dead:
            raise WorkersDied(dict.fromkeys(dead, type(err).__name__)) from None
        first_line = str(err).strip().split("\n", 1)[0][:300]
        raise ExchangeBroken(f"compiled graph {what}: {type(err).__name__}: {first_line}") from None

    def close(self) -> None:
        graph, self.graph = self.graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception:  # a failed teardown must not hide the reason we are here
                log.exception("compiled graph teardown failed")


class CompiledExchange(Graph):
    """The gather step's graph: the parameters and each worker's piece in, every worker's
    (gradient sum, count, loss sum) out."""

    name = "compiled"

    def __init__(self, actors: list, payload_bytes: int, settings: WorkerSettings):
        super().__init__(actors, settings, payload_bytes)

    def _dag(self):
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:  # execute(flat, piece_0, piece_1, ...)
            return MultiOutputNode(
                [a.grad.bind(inp[0], inp[rank + 1]) for rank, a in enumerate(self.actors)]
            )

    def __call__(self, flat: np.ndarray, pieces: list[np.ndarray]) -> list[tuple]:
        return self._run(flat, *pieces)


class ReplicatedGraph(Graph):
    """The replicated step's graph (workers/replicated.py), `stages` steps long: every
    worker's gradient sum of a step goes to every worker, which applies the step and
    computes its sum of the next. In: a block's command (workers/replica.py, `start`); out:
    each replica's report.
    A block shorter than `stages` passes None through the stages it does not need."""

    name = "replicated"

    def __init__(self, actors: list, stages: int, settings: WorkerSettings, sum_bytes: int):
        self.stages = stages
        super().__init__(actors, settings, sum_bytes + 2**16)

    def _dag(self):
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            sums = [a.replica_start.bind(inp) for a in self.actors]
            for _ in range(self.stages - 1):
                sums = [a.replica_step_once.bind(*sums) for a in self.actors]
            return MultiOutputNode([a.replica_finish.bind(*sums) for a in self.actors])

    def __call__(self, command: tuple, nap: float = 0.0) -> list[dict]:
        return self._run(command, nap=nap)


def _forget_frames(err: BaseException | None) -> None:
    """Free the frames an error chain holds. Ray's frames hold the graph in a reference
    cycle; collected after Ray has shut down (say, at interpreter exit) it segfaults."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err.__traceback__ = None
        err = err.__cause__ or err.__context__


def open_exchange(kind: str, actors: list, payload_bytes: int, settings: WorkerSettings):
    """The exchange `kind` over `actors` (WorkersDied / ExchangeBroken if it cannot open)."""
    if kind == "compiled":
        return CompiledExchange(actors, payload_bytes, settings)
    return TaskExchange(actors)
