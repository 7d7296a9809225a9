"""The head start: a run on workers takes its first steps on the coordinator while its
workers start.

Starting a pool takes seconds: worker processes, the data, the replicas and the compiled
graph's compilation. Meanwhile the coordinator computes each step itself the way the
workers would: the gradient sum of every worker's rank-order piece of the global batch in
turn, by the function a worker uses (`grad_sum`, under a worker's BLAS threads), the
pieces' sums added in rank order (`add_in_rank_order`), then `average_and_step`. Those are
the workers' operations in the workers' order, so each step is bit-identical to the step
the workers would have taken, and the step at which they take over changes nothing in the
result: a run is bit-identical whether its workers were ready at once or late.

The workers take over at the first step after they are ready: the strategy built on them
(the replicated step, or the gather over a pool) adopts the coordinator's model and
optimizer as they are then, and the replicas are seeded with that state, as at any start.
The coordinator computes on its own process's cores, so the head start ends early for a
model whose step on the coordinator takes more than `HEAD_START_STEP_S`: the run then
waits for its workers, as it did before.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

HEAD_START_STEP_S = 0.25  # a slower step on the coordinator waits for the workers instead
POLL_S = 0.1  # how often a wait for the workers looks at the run's stop request


class HeadStart:
    """A step strategy (see workers/trainer.py) that starts as `local`, a coordinator
    strategy over the workers' pieces, while `start(cancel)` builds the workers' strategy
    in a thread: it returns that strategy or raises what the run fails with, and its
    `cancel` is set when the run ends first (the workers stop starting). When the strategy
    takes over, `on_ready(strategy, step)` hands it the coordinator's model and optimizer
    at `step` (its `adopt`). `stop`: the run's stop request, which ends a wait for the
    workers (the run then stops as usual)."""

    max_steps: int | None = None  # the most steps before waiting for the workers (tests)

    def __init__(
        self,
        local,
        start: Callable[[threading.Event], object],
        on_ready: Callable[[object, int], None],
        stop: threading.Event,
    ):
        self.local, self.on_ready, self.stop = local, on_ready, stop
        self.inner = None  # the workers' strategy, once it has taken over
        self.cancel = threading.Event()
        self._built = None
        self._error: BaseException | None = None
        context = contextvars.copy_context()  # the job's log (workers/joblog.py) goes along
        self._thread = threading.Thread(
            target=context.run, args=(self._build, start), name="head-start", daemon=True
        )
        self._thread.start()

    def _build(self, start) -> None:
        try:
            self._built = start(self.cancel)
        except BaseException as err:  # raised in the run's thread at its next step
            self._error = err

    # -- the strategy's interface
    @property
    def block(self) -> int:
        return self.inner.block if self.inner is not None else self.local.block

    def advance(self, end: int, fetch=True, verify=False, checked=()) -> list[tuple]:
        if self.inner is None and not self._thread.is_alive():
            self._take_over()
        if self.inner is not None:
            return self.inner.advance(end, fetch, verify, checked)
        began = time.perf_counter()
        done = self.local.advance(end, fetch, verify, checked)
        slow = time.perf_counter() - began > HEAD_START_STEP_S * max(len(done), 1)
        if slow or (self.max_steps is not None and self.local.step >= self.max_steps):
            self._wait()
        return done

    def _wait(self) -> None:
        """Wait for the workers (until the run is asked to stop): they take over at the
        next step, or the run fails there with what their start raised."""
        log.info("step %d on the coordinator; waiting for the workers", self.local.step)
        while self._thread.is_alive() and not self.stop.is_set():
            self._thread.join(POLL_S)

    def _take_over(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self.local.sync()  # the coordinator gets its own BLAS threads back
        step, built = self.local.step, self._built
        self.on_ready(built, step)  # it adopts the coordinator's state (or raises)
        self.inner, self._built = built, None
        log.info("the workers took over at step %d", step)

    def sync(self) -> None:
        (self.inner or self.local).sync()

    def close(self) -> None:
        """Stop the workers starting (or close the strategy on them)."""
        self.cancel.set()
        self.local.close()
        self._thread.join()
        for strategy in (self.inner, self._built):
            if strategy is not None:
                strategy.close()

    # -- what the run reports
    @property
    def node_ids(self) -> list[str]:
        return self.inner.node_ids if self.inner is not None else []

    @property
    def exchange(self) -> str | None:
        return self.inner.exchange if self.inner is not None else None

    @property
    def failures(self) -> int:
        return self.inner.failures if self.inner is not None else self.local.failures

    @property
    def replica_hashes(self) -> list[str]:
        return getattr(self.inner, "replica_hashes", [])
