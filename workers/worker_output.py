"""Every worker's stdout and stderr, in its job's log.

Ray ships what worker processes write to stdout and stderr to the driver
(`ray.init(log_to_driver=True)`): each node's log monitor reads the workers' output files
and publishes their new lines in batches tagged with the node's IP and the worker's pid,
which arrive on one thread of the driver (workers/ray_private.route_worker_output). A pool
registers each worker it starts, (ip, pid) -> its job's log and "worker <rank> on node
<id>", and each batch lands in that log as records of `worker 1 on node 5f2c1a9e stdout`
(or `stderr`). A batch of a worker not registered yet (printed while it started) is kept a
while (the newest `EARLY` such batches) and written when it is.

A pool's end drains its workers (`JobOutput.drain`): each live worker prints a marker on
both streams, and the pool waits (at most `DRAIN_S`) until both come back. The log monitor
reads each file in order, so by then everything the worker wrote before is in the job's
log. Only then does the pool forget its workers, and the job's log close.

Bounded: the log monitor reads at most 1000 lines per file per round, the job's log keeps
its size cap and rotation, and the lines are written on Ray's log thread, never on the
coordinator's: a worker printing in a loop costs disk within the cap and that thread's
time, not the job's steps.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque

import ray
from ray.exceptions import RayError

from workers.joblog import JobLog
from workers.ray_private import route_worker_output, worker_output_routed

log = logging.getLogger(__name__)

EARLY = 64  # batches of workers not registered (yet) kept for them
DRAIN_S = 5.0  # the longest a pool's end waits for its workers' last lines
MARK = "shardgrad: end of output "  # + a token; a worker prints it at its pool's end

Key = tuple[str, int]  # a worker process: its node's IP and its pid


class _Router:
    """(ip, pid) -> (the job's log, the worker's name); fed by Ray's log thread."""

    def __init__(self):
        self.routes: dict[Key, tuple[JobLog, str]] = {}
        self.early: deque[tuple[Key, bool, list[str]]] = deque(maxlen=EARLY)
        self.marks: set[tuple[Key, bool, str]] = set()  # (worker, is_err, marker line)
        self.changed = threading.Condition()

    def dispatch(self, ip: str, pid: int | str, is_err: bool, lines: list[str]) -> None:
        if not isinstance(pid, int):  # Ray's own processes: the autoscaler's status, ...
            for line in lines if pid == "raylet" else ():  # ... the raylet's errors (OOM kills)
                log.warning("the raylet on %s: %s", ip, line)
            return
        key = (ip, pid)
        with self.changed:  # writes happen under it, so none lands after the route is gone
            if key not in self.routes:
                self.early.append((key, is_err, lines))
                return
            marks = [line for line in lines if line.startswith(MARK)]
            if marks:
                lines = [line for line in lines if not line.startswith(MARK)]
                self.marks.update((key, is_err, m) for m in marks)
                self.changed.notify_all()
            self._write(key, is_err, lines)

    def _write(self, key: Key, is_err: bool, lines: list[str]) -> None:
        job_log, name = self.routes[key]
        job_log.write(f"{name} {'stderr' if is_err else 'stdout'}", lines)

    def add(self, key: Key, job_log: JobLog, name: str) -> None:
        with self.changed:
            self.routes[key] = (job_log, name)
            for early in [e for e in self.early if e[0] == key]:
                self.early.remove(early)
                self._write(key, early[1], early[2])

    def wait(self, marks: set[tuple[Key, bool, str]], deadline: float) -> set:
        """The marks of `marks` not seen by `deadline` (each seen one is forgotten)."""
        with self.changed:
            self.changed.wait_for(lambda: marks <= self.marks, deadline - time.monotonic())
            missing = marks - self.marks
            self.marks -= marks
            return missing

    def remove(self, keys: list[Key]) -> None:
        with self.changed:
            for key in keys:
                self.routes.pop(key, None)


_router = _Router()


def route() -> bool:
    """Send the workers' output that Ray ships to this driver to their jobs' logs, not to
    this process's stdout (after each `ray.init`, which prints it again; idempotent); True
    if Ray ships it here."""
    return route_worker_output(_router.dispatch)


class JobOutput:
    """The output of one pool's workers, into the log of the job that runs in this context
    (none outside a job: `joblog.current()`)."""

    def __init__(self, job_log: JobLog | None):
        self.job_log = job_log
        self.keys: list[Key] = []

    def add(self, rank: int, info: dict) -> None:
        """A started worker: `info` as GradWorker.info returns it (node_id, ip, pid)."""
        if self.job_log is None:
            return
        key = (info["ip"], info["pid"])
        self.keys.append(key)
        _router.add(key, self.job_log, f"worker {rank} on node {info['node_id'][:8]}")

    def drain(self, actors: list) -> None:
        """Wait until what the live `actors` wrote so far is in the log; forget them all."""
        try:
            if self.keys and actors and worker_output_routed():
                self._drain(actors, time.monotonic() + DRAIN_S)
        finally:
            _router.remove(self.keys)

    def _drain(self, actors: list, deadline: float) -> None:
        mark = MARK + uuid.uuid4().hex
        refs = [a.mark_output.remote(mark) for a in actors]
        ray.wait(refs, num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0))
        marks = set()
        for ref in refs:
            try:
                key = tuple(ray.get(ref, timeout=0))
            except RayError:  # dead, or too slow: its lines so far are what it left
                continue
            marks |= {(key, False, mark), (key, True, mark)}
        missing = _router.wait(marks, deadline)
        if missing:
            log.warning("the last output of %d worker streams did not arrive", len(missing))
