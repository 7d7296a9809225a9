"""The coordinator: one per running job. It runs the step loop and owns what the run reports.

Each step reads like the single-process loop it is equivalent to: take the global batch,
add the workers' gradient sums of their pieces in rank order, average, check, step the
optimizer (with the step's lr, after clipping), report, checkpoint now and then, evaluate
at the end of each epoch (or every `eval_every` steps), keep the best checkpoint and stop
early when the spec asks. See
docs/architecture.md for why this makes the result independent of the number of workers.
Every `health_every` steps the run also measures training health (workers/health.py).

A run has three parts: prepare (resume point, data, model, workers), the step loop, and
finish (final evaluation, summary, last checkpoint). How steps are taken is a single
object, the step strategy: `ReplicatedStep` (replicas on the workers, the default),
`GatherStep` (the parameters in the coordinator, the workers' sums gathered), or
`LocalStep` (`workers: 0`), and `HeadStart` (the workers' pieces on the coordinator while
the workers start, then one of the first two: workers/headstart.py). The loop asks it for
a block of steps, up to where it next reads the model, and gets each step's loss, gradient
norm and health statistics.
`workers: "auto"` chooses the count when the run starts (choose.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray

from workers import checkpoint as ckpt
from workers.best import best_evaluation, stops
from workers.choose import WorkerChoice, choose_workers, measure_gradient
from workers.cluster import ensure_ray, free_cpus
from workers.config import WorkerSettings
from workers.data import PreparedData
from workers.events import (
    Callback,
    CheckpointEvent,
    RunSummary,
    StartedEvent,
    Status,
    StepEvent,
    WorkerFailureEvent,
    WorkersJoinedEvent,
    run_summary,
)
from workers.exchange import add_in_rank_order, flatten
from workers.generate import val_exact_match
from workers.headstart import HeadStart
from workers.health import HealthMonitor, advice_for, snapshot, step_stats
from workers.joblog import JobLog
from workers.malloc import reuse_freed_memory
from workers.model import (
    Diverged,
    Recipe,
    TrainingError,
    average_and_step,
    blas_limit,
    blas_threads,
    build_model,
    build_optimizer,
    build_recipe,
    evaluate,
    grad_sum,
    lm_logits,
    worker_config,
)
from workers.pool import ClusterTooSmall, OnPool, Stopped, WorkerFailure, WorkerPool
from workers.replicated import ReplicatedStep
from workers.sampler import Schedule, split_batch
from workers.spec import TrainingSpec, scores_exact_match
from workers.warmstart import InitFromError, warm_start

__all__ = ["Diverged", "SpecMismatch", "Trainer", "TrainingError", "run_summary", "train"]
log = logging.getLogger(__name__)


class SpecMismatch(TrainingError):
    pass


# ---------------------------------------------------------------- the step strategy


class _CoordinatorStep:
    """A step strategy whose parameters live in the coordinator: one step at a time.

    The interface every strategy has (ReplicatedStep too): `advance(end, fetch, verify,
    checked)` runs the steps from the strategy's step up to `end` and returns each one's
    (rows, mean loss, gradient norm, health statistics or None); the 1-based steps in
    `checked` get their `health.layer_stats`. On a diverging step it raises Diverged with the
    weights unchanged and each parameter's `.grad` that step's averaged gradient (a last
    health check reads them). `block` is the most steps one call should run; with `fetch`,
    or after `sync()`, the coordinator's model and optimizer are current.
    """

    block = 1

    def __init__(self, model, opt, schedule: Schedule, step: int, X: np.ndarray, recipe: Recipe):
        self.model, self.params, self.opt = model, model.parameters(), opt
        self.schedule, self.step, self.X, self.recipe = schedule, step, X, recipe

    def advance(self, end: int, fetch=True, verify=False, checked=()) -> list[tuple]:
        done = []
        while self.step < end:
            idx = self.schedule.batch(self.step)
            before = snapshot(self.model, self.X[idx]) if self.step + 1 in checked else None
            n, grads, loss_sum = self._grad_sum(self.step, idx)
            loss, norm = average_and_step(
                self.params, self.opt, grads, n, loss_sum, self.step, self.recipe
            )
            stats = step_stats(self.model, before) if before is not None else None
            done.append((n, loss, norm, stats))
            self.step += 1
        return done

    def sync(self) -> None:
        pass  # always current


class GatherStep(OnPool, _CoordinatorStep):
    """The pool's workers return the gradient sums of their rank-order pieces of the global
    batch, the pool adds them in rank order, and the coordinator averages, checks and steps."""

    def __init__(self, pool: WorkerPool, model, opt, schedule: Schedule, step: int, X, recipe):
        super().__init__(model, opt, schedule, step, X, recipe)
        self.pool = pool

    def adopt(self, model, opt, step: int) -> None:
        """Step the coordinator's `model` and `opt`, which are at `step` (a head start's)."""
        self.model, self.params, self.opt, self.step = model, model.parameters(), opt, step

    def _grad_sum(self, step: int, idx: np.ndarray):
        epoch = self.schedule.epoch_of(step)  # keys the dropout masks
        pieces = [(epoch, piece) for piece in split_batch(idx, self.pool.n)]
        grads, n, loss_sum = self.pool.grads([p.data for p in self.params], pieces)
        return n, grads, loss_sum

    def close(self) -> None:
        self.pool.shutdown()


class LocalStep(_CoordinatorStep):
    """`workers: 0`: the step in the coordinator's own process, no Ray. The gradient sum of
    the whole global batch as one piece, by the function a worker uses (`grad_sum`), under
    a worker's BLAS threads, then the same averaging and step: bit-identical to 1 worker.

    With `pieces` > 1 (a head start, workers/headstart.py) it computes the sums of the
    rank-order pieces of `pieces` workers in turn and adds them as the workers' exchange
    does: bit-identical to those workers' step."""

    node_ids: list[str] = []
    exchange = None

    def __init__(
        self,
        model,
        opt,
        schedule,
        step,
        loss,
        data: PreparedData,
        threads,
        failures,
        recipe,
        pieces: int = 1,
    ):
        super().__init__(model, opt, schedule, step, data.X, recipe)
        self.loss, self.y, self.threads, self.pieces = loss, data.y, threads, pieces
        self.failures = failures  # from before a resume; no worker can fail here
        self.shapes = [p.shape for p in self.params]

    def _grad_sum(self, step: int, idx: np.ndarray):
        with blas_limit(self.threads):
            epoch = self.schedule.epoch_of(step)
            if self.pieces == 1:
                X, y = self.X[idx], self.y[idx]
                grads, loss_sum = grad_sum(self.model, self.loss, X, y, idx, epoch, self.params)
                return len(idx), grads, loss_sum
            sums = []
            for piece in split_batch(idx, self.pieces):  # as each worker computes its own
                X, y = self.X[piece], self.y[piece]
                grads, loss_sum = grad_sum(self.model, self.loss, X, y, piece, epoch, self.params)
                sums.append((flatten(grads), len(piece), loss_sum))
        grads, n, loss_sum = add_in_rank_order(sums, self.shapes)
        return n, grads, loss_sum

    def close(self) -> None:
        self.sync()

    # The workers' BLAS threads are held from step to step (setting them costs as much as a
    # tiny model's forward pass; `_grad_sum`'s own limit then changes nothing) and lifted
    # whenever the coordinator reads the model (`fetch`: an evaluation, a checkpoint, the
    # end), on an error, at `sync` and at `close`.
    _limit: contextlib.ExitStack | None = None

    def advance(self, end: int, fetch=True, verify=False, checked=()) -> list[tuple]:
        if self._limit is None:
            self._limit = contextlib.ExitStack()
            self._limit.enter_context(blas_limit(self.threads))
        try:
            done = super().advance(end, fetch, verify, checked)
        except BaseException:
            self.sync()
            raise
        if fetch:
            self.sync()
        return done

    def sync(self) -> None:
        """Lift the BLAS limit: the coordinator computes with its own threads."""
        limit, self._limit = self._limit, None
        if limit is not None:
            limit.close()


# ---------------------------------------------------------------- the coordinator


class Trainer:
    def __init__(
        self,
        spec: TrainingSpec,
        out_dir: str | Path,
        *,
        workers: int | str | None = None,
        callback: Callback | None = None,
        stop_event: threading.Event | None = None,
        abandon_event: threading.Event | None = None,
        settings: WorkerSettings | None = None,
        max_cpus: float | None = None,
        measure: Callable[[TrainingSpec, PreparedData], float] | None = None,
    ):
        """`workers`: instead of the spec's (a count, or "auto").
        `stop_event`: stop after the current step with a checkpoint ("cancelled").
        `abandon_event` (set with stop_event): stop without writing anything more, because
        the job may no longer be ours (the service lost its lease; another process may be
        resuming it from the same directory). `settings`: the cluster to attach to and the
        exchange's knobs (default: from the environment). `max_cpus`: the CPUs an auto run
        may use (default: the cluster's free CPUs). `measure`: seconds of the in-process
        gradient compute of one global batch, for auto (default: measured)."""
        self.spec = spec
        self.out = Path(out_dir)
        self.n_workers: int | str = spec.workers if workers is None else workers
        self.workers_reason: str | None = None  # why this count, once it is known
        self.max_cpus = max_cpus
        self.measure = measure or measure_gradient
        self.callback: Callback = callback or (lambda event: None)
        self.stop_event = stop_event or threading.Event()
        self.abandon_event = abandon_event or threading.Event()
        self.settings = settings or WorkerSettings()
        # The run's state, each part set once as it becomes known; what a failure did not
        # let the run get to stays None, and the summary says so.
        self.start = time.perf_counter()
        self.step = 0
        self.resumed_from: int | None = None
        self.schedule: Schedule | None = None
        self.pool: WorkerPool | None = None
        self.health: HealthMonitor | None = None
        self.history: list[dict] = []  # per epoch: step, epoch, train and val metrics
        self.data: PreparedData | None = None
        self.model = self.opt = None
        self.recipe: Recipe | None = None  # the lr of each step, and clipping
        self.stopped_early = False
        # The step strategy, once chosen.
        self.descend: ReplicatedStep | GatherStep | LocalStep | HeadStart | None = None

    def run(self) -> RunSummary:
        """Train to the end (or until stopped); failures come back as status 'failed'."""
        self.start = time.perf_counter()
        try:
            latest = self._resume_point()
            if latest is not None and latest.state.get("finished"):
                return latest.state["summary"]
            self._prepare(latest)
            self._start_workers(latest.state if latest else {})
            try:
                stopped = self._train()
            finally:
                self.descend.close()
            return stopped or self._finish()
        except Stopped as err:  # while workers started: the run resumes from its newest checkpoint
            return self._summary("cancelled", checkpoint=self._newest_checkpoint(), error=str(err))
        except (TrainingError, WorkerFailure, ClusterTooSmall, InitFromError) as err:
            log.error("failed at step %d: %s", self.step, err, exc_info=err)
            return self.failed(str(err))
        except ray.exceptions.RayTaskError as err:  # a worker's own exception (a bug, not Ray)
            log.error("failed at step %d: a worker raised", self.step, exc_info=err)  # its trace
            cause = err.cause if isinstance(err.cause, BaseException) else err
            return self.failed(f"a worker raised {type(cause).__name__}: {cause}"[:2000])

    # -- prepare ---------------------------------------------------------------

    def _resume_point(self) -> ckpt.Checkpoint | None:
        """The newest good checkpoint under the run directory; SpecMismatch if another
        spec's."""
        latest = ckpt.load_latest(self.out)
        if latest is not None and latest.state.get("spec_hash") != self.spec.spec_hash():
            raise SpecMismatch(
                f"{self.out} holds checkpoints of a different spec "
                f"(hash {latest.state.get('spec_hash', '?')[:12]}, this spec "
                f"{self.spec.spec_hash()[:12]}); refusing to mix runs. Use another --out."
            )
        return latest

    def _prepare(self, latest: ckpt.Checkpoint | None) -> None:
        """Data, schedule, model, optimizer and health record: fresh, or as `latest` left them."""
        spec = self.spec
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = PreparedData(spec, self.settings)
        self.schedule = Schedule(len(self.data.X), spec.batch_size, spec.epochs, spec.seed)
        self.model = build_model(spec)
        self.opt = build_optimizer(spec, self.model.parameters())
        self.recipe = build_recipe(spec, self.schedule.total_steps)
        state = latest.state if latest is not None else {}
        if latest is not None:
            self.model.load_state_dict(latest.model_state)
            self.opt.load_state_dict(latest.optimizer_state)
            self.step = self.resumed_from = latest.step
            self.history = state.get("metrics", [])
        elif spec.init_from is not None:  # a warm start: the source's weights, not random ones
            warm_start(spec, self.settings, self.model, self.opt)
        advice = advice_for(spec, self.schedule.total_steps)
        self.health = HealthMonitor(self.model, spec.health_every, state.get("health"), advice)

    def _start_workers(self, state: dict) -> None:
        """The step strategy: in-process, or the workers (on the cluster in `settings`, or
        an embedded Ray) and their exchange. `state`: the checkpoint's, when resuming."""
        failures = state.get("worker_failures", 0)
        if self.settings.reuse_freed_memory:  # this process computes too (workers/malloc.py)
            reuse_freed_memory()
        choice = self._worker_count(state)
        self.n_workers, self.workers_reason = choice.workers, choice.reason
        if self.n_workers == 0:
            self.descend = self._local(failures)
            return
        ensure_ray(self.settings)
        if self.settings.head_start:
            self.descend = self._head_start(failures)
            return
        self.descend = self._on_workers(self.model, self.opt, self.step, failures, self.stop_event)
        self.pool = self.descend.pool

    def _local(self, failures: int, pieces: int = 1) -> LocalStep:
        """The step in this process: the whole batch, or the pieces of `pieces` workers."""
        spec, threads = self.spec, blas_threads(self.spec.cpus_per_worker)
        return LocalStep(
            self.model, self.opt, self.schedule, self.step, spec.loss, self.data, threads,
            failures, self.recipe, pieces=pieces,
        )  # fmt: skip

    def _head_start(self, failures: int) -> HeadStart:
        """The coordinator steps as the workers would while they start (workers/headstart.py);
        the workers start from a copy of its state, since it goes on stepping meanwhile."""
        spec, step = self.spec, self.step
        twin = build_model(spec)
        twin.load_state_dict(self.model.state_dict())
        twin_opt = build_optimizer(spec, twin.parameters())
        twin_opt.load_state_dict(self.opt.state_dict())
        local = self._local(failures, pieces=self.n_workers)
        start = lambda cancel: self._on_workers(twin, twin_opt, step, failures, cancel)  # noqa: E731
        return HeadStart(local, start, self._workers_joined, self.stop_event)

    def _on_workers(self, model, opt, step: int, failures: int, stop: threading.Event):
        """The step strategy on a new pool of workers, from `model` and `opt` at `step`, with
        the run's worker `failures` so far. `stop` ends the workers' start (Stopped)."""
        spec = self.spec
        pool = WorkerPool(
            self.n_workers,
            spec.cpus_per_worker,
            worker_config(spec),
            ray.put((self.data.X, self.data.y)),
            max_failures=spec.max_failures,
            failures=failures,
            on_failure=self._worker_failed,
            exchange=spec.exchange,
            settings=self.settings,
            stop=stop,
        )
        schedule, X, recipe = self.schedule, self.data.X, self.recipe
        if pool.kind != "replicated":
            return GatherStep(pool, model, opt, schedule, step, X, recipe)
        try:  # its fall back to tasks steps the coordinator's own model
            gather = lambda at: GatherStep(pool, self.model, self.opt, schedule, at, X, recipe)  # noqa: E731
            return ReplicatedStep(pool, model, opt, spec, step, gather, span=self._span())
        except BaseException:
            pool.shutdown()
            raise

    def _workers_joined(self, strategy, step: int) -> None:
        """After a head start: the workers' `strategy` takes the coordinator's model and
        optimizer at `step` from here on."""
        strategy.adopt(self.model, self.opt, step)
        strategy.pool.stop = self.stop_event
        self.pool = strategy.pool
        self.callback(
            WorkersJoinedEvent(
                type="workers_joined",
                step=step,
                worker_nodes=strategy.node_ids,
                exchange=strategy.exchange,
            )
        )

    def _worker_count(self, state: dict) -> WorkerChoice:
        """The count the spec (or the caller) states, else the one auto chooses. A resumed
        auto run keeps the count it chose before, while it fits, so that it resumes
        bit-identical."""
        if self.n_workers != "auto":
            return WorkerChoice(self.n_workers, "set by the spec")
        before = state.get("workers")
        if before == 0 or (
            before is not None and self.spec.reserved_cpus(before) <= self._free_cpus() + 1e-9
        ):
            return WorkerChoice(before, f"kept from the checkpoint at step {state['step']}")
        return choose_workers(
            self.spec,
            self.settings,
            measure=lambda: self.measure(self.spec, self.data),
            free_cpus=self._free_cpus,
        )

    def _free_cpus(self) -> float:
        """The CPUs an auto run may use: the caller's cap, else the cluster's free CPUs."""
        if self.max_cpus is not None:
            return self.max_cpus
        ensure_ray(self.settings)
        return free_cpus()[1]

    def _worker_failed(self, rank: int, reason: str, nodes: list[str]) -> None:
        log.warning("worker %d failed at step %d: %s", rank, self.step, reason)
        self.callback(
            WorkerFailureEvent(type="worker_failure", rank=rank, reason=reason, worker_nodes=nodes)
        )

    # -- the steps -------------------------------------------------------------

    def _train(self) -> RunSummary | None:
        """Step to the end of the schedule or an early stop (None), or until stopped (the
        summary)."""
        schedule, health = self.schedule, self.health
        self._started()
        while self.step < schedule.total_steps:
            if self.stop_event.is_set():
                return self._stopped()
            began = time.perf_counter()
            done = self._descend()  # averaged, checked, stepped: one step or a block
            seconds = (time.perf_counter() - began) / len(done)
            for rows, loss, grad_norm, stats in done:
                self.step += 1
                if stats is not None:
                    self.callback(health.record(self.step, stats))
                point = self._step_event(rows, loss, grad_norm, seconds)
                if self._evaluates(self.step):
                    self._validate(point)
                self.callback(point)
                if self._checkpoint_due(self.step) and self.step < schedule.total_steps:
                    self.save()
                if "val_loss" in point and self._after_evaluation():
                    return None
        return None

    def _descend(self) -> list[tuple]:
        """The step strategy's steps, up to where the coordinator next reads the model (an
        evaluation, a checkpoint, the end) or the strategy's block length. If a step
        diverges, a last health check says where."""
        last = min(self.schedule.total_steps, self.step + self.descend.block)
        end = next(s for s in range(self.step + 1, last + 1) if self._needs_model(s) or s == last)
        checked = self.health.due_steps(self.step, end)
        try:
            return self.descend.advance(
                end, self._needs_model(end), self._checkpoint_due(end), checked
            )
        except Diverged:
            # Not stepped: the weights are still those the gradients were taken at.
            X = self.data.X[self.schedule.batch(self.step)]
            self.callback(self.health.check(self.step + 1, self.health.before_step(X)))
            raise

    def _span(self) -> int:
        """The most steps between two reads of the model (a block's natural length)."""
        every = self.spec.checkpoint_every
        return min(self._eval_every(), every) if len(self.data.X_val) > 0 else every

    def _checkpoint_due(self, step: int) -> bool:
        return step % self.spec.checkpoint_every == 0 or step == self.schedule.total_steps

    def _eval_every(self) -> int:
        return self.spec.eval_every or self.schedule.steps_per_epoch

    def _evaluates(self, step: int) -> bool:
        """Whether the run evaluates after `step`: every `eval_every` steps and at the end."""
        due = step % self._eval_every() == 0 or step == self.schedule.total_steps
        return due and len(self.data.X_val) > 0

    def _needs_model(self, step: int) -> bool:
        """Whether the coordinator reads the model after `step`: evaluation, checkpoint, end."""
        return self._evaluates(step) or self._checkpoint_due(step)

    def _started(self) -> None:
        total, nodes = self.schedule.total_steps, self.descend.node_ids
        workers = f"{self.n_workers} workers ({self.workers_reason})" if self.n_workers else ""
        where = f"{workers} on nodes {', '.join(n[:8] for n in nodes)}" if nodes else "in-process"
        log.info("training from step %d of %d, %s", self.step, total, where)
        self.callback(
            StartedEvent(
                type="started",
                total_steps=self.schedule.total_steps,
                step=self.step,
                resumed_from_step=self.resumed_from,
                worker_nodes=self.descend.node_ids,
                exchange=self.descend.exchange,
                workers=self.n_workers,
                workers_reason=self.workers_reason,
            )
        )

    def _step_event(self, rows: int, loss: float, grad_norm: float, seconds: float) -> StepEvent:
        return StepEvent(
            type="step",
            step=self.step,
            total_steps=self.schedule.total_steps,
            epoch=self.schedule.epoch_of(self.step - 1),
            train_loss=loss,
            grad_norm=grad_norm,
            lr=self.recipe.schedule.lr_at(self.step - 1),
            samples_per_s=rows / seconds if seconds > 0 else None,
        )

    def _validate(self, point: StepEvent) -> None:
        """At an evaluation step: the validation metrics, on the step's event and in the
        history."""
        data = self.data
        val = evaluate(self.model, self.spec.loss, data.X_val, data.y_val, data.classify)
        metrics = {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        if scores_exact_match(self.spec):  # greedy answers to the validation questions
            exact = val_exact_match(lm_logits(self.model), data.info, data.X_val)
            metrics["val_exact_match"] = exact
        point.update(metrics)
        self.history.append({k: point[k] for k in ("step", "epoch", "train_loss")} | metrics)

    def _after_evaluation(self) -> bool:
        """Keep a new best checkpoint (the end of the run keeps its own in `_finish`);
        whether early stopping ends the run here."""
        es = self.spec.early_stopping
        self.stopped_early = es is not None and stops(self.history, es)
        ends = self.stopped_early or self.step == self.schedule.total_steps
        new_best = not ends and self._best_step() == self.step
        if new_best and (self._checkpoint_due(self.step) or self.save() is not None):
            self._keep_best()
        return self.stopped_early

    def _best_step(self) -> int | None:
        """The step of the best evaluation by keep_best (early_stopping's by default)."""
        keep = self.spec.keep_best
        best = best_evaluation(self.history, keep)[0] if keep is not None else None
        return None if best is None else best["step"]

    def _keep_best(self) -> None:
        """best.json names the checkpoint of the current step, the best evaluation."""
        if self.abandon_event.is_set():
            return
        keep, entry = self.spec.keep_best, self.history[-1]
        best = {"step": self.step, "checkpoint": f"step-{self.step}", "metric": keep.metric}
        ckpt.write_best(self.out, best | {"mode": keep.mode, "value": entry[keep.metric]})
        ckpt.prune_checkpoints(self.out, self.spec.keep_checkpoints)

    def save(self, **extra) -> Path | None:
        """Checkpoint the current step, with `extra` in its state; nothing (None) once the
        run is abandoned, since the directory may no longer be ours to write."""
        if self.abandon_event.is_set():
            return None
        self.descend.sync()
        model_state = self.model.state_dict()
        # A finite gradient can still overflow the weights (float32, a huge lr). Checked
        # here rather than every step: no per-step cost, and never a non-finite checkpoint.
        if not all(np.isfinite(a).all() for a in model_state.values()):
            raise Diverged(f"diverged at step {self.step} (parameters not finite)")
        state = {
            "step": self.step,
            "epoch": self.step // self.schedule.steps_per_epoch,
            "spec_hash": self.spec.spec_hash(),
            "metrics": self.history,
            "worker_failures": self.descend.failures,
            "workers": self.n_workers,  # an auto run resumes with the count it chose
            "health": self.health.state(),
            **self._replicas(),
            **extra,
        }
        path = ckpt.save_checkpoint(
            self.out,
            self.step,
            model_state,
            self.opt.state_dict(),
            state,
            keep=self.spec.keep_checkpoints,
        )
        self.callback(CheckpointEvent(type="checkpoint", step=self.step, path=str(path)))
        return path

    def _replicas(self) -> dict:
        """For a replicated run: every replica's parameter hash at this step, as checked."""
        hashes = getattr(self.descend, "replica_hashes", None)
        return {"replica_sha256": list(hashes)} if hashes else {}

    # -- finish ----------------------------------------------------------------

    def _stopped(self) -> RunSummary:
        """Stopped before the end: a checkpoint to resume from, unless abandoned."""
        if self.save() is not None:
            return self._evaluated("cancelled", f"stopped at step {self.step}; checkpoint written")
        return self._evaluated("cancelled", f"abandoned at step {self.step}; nothing written")

    def _finish(self) -> RunSummary:
        """The end of the schedule: the summary, also kept in the last checkpoint (so that
        rerunning a finished run answers with it at once)."""
        summary = self._evaluated("succeeded")
        saved = self.save(finished=True, summary=summary)
        if saved is not None and summary["best_step"] == self.step:
            self._keep_best()
        return summary

    def failed(self, error: str) -> RunSummary:
        """The summary of a run that stopped with `error`. Nothing is evaluated (the weights
        may not be finite); `checkpoint` is the newest good one to resume from, if any."""
        return self._summary("failed", checkpoint=self._newest_checkpoint(), error=error)

    def _newest_checkpoint(self) -> str | None:
        """The newest verified checkpoint of this spec under the run directory, or None."""
        good = ckpt.list_checkpoints(self.out)
        if not good:
            return None
        try:
            state = ckpt.load_checkpoint(good[-1].path).state
        except ckpt.CheckpointError:  # changed since it was listed
            return None
        # After a SpecMismatch the directory holds another spec's checkpoints: not ours.
        return str(good[-1].path) if state.get("spec_hash") == self.spec.spec_hash() else None

    def _evaluated(self, status: Status, error: str | None = None) -> RunSummary:
        """The summary with the model's final losses and accuracy."""
        self.descend.sync()
        data, loss = self.data, self.spec.loss
        train = evaluate(self.model, loss, data.X, data.y, data.classify)
        val = evaluate(self.model, loss, data.X_val, data.y_val, data.classify)
        return self._summary(
            status,
            final_loss=train["loss"],
            val_loss=val["loss"],
            val_accuracy=val["accuracy"],
            checkpoint=str(ckpt.checkpoint_dir(self.out, f"step-{self.step}")),
            error=error,
        )

    def _summary(self, status: Status, **results) -> RunSummary:
        """`run_summary` from what the run got to (no schedule or step strategy if it failed
        early)."""
        schedule, descend, health = self.schedule, self.descend, self.health
        return run_summary(
            status,
            self.step,
            epochs=self.step // schedule.steps_per_epoch if schedule is not None else 0,
            worker_nodes=descend.node_ids if descend is not None else [],
            exchange=descend.exchange if descend is not None else None,
            workers=self.n_workers if isinstance(self.n_workers, int) else None,
            workers_reason=self.workers_reason,
            elapsed_s=round(time.perf_counter() - self.start, 3),
            worker_failures=descend.failures if descend is not None else 0,
            resumed_from_step=self.resumed_from,
            health=health.summary() if health is not None else None,
            stopped_early=self.stopped_early,
            best_step=self._best_step(),
            **results,
        )


def train(spec: TrainingSpec, out_dir: str | Path, **kwargs) -> RunSummary:
    """Run a spec to the end and return its summary (status 'failed' with 'error' on failure),
    with what it logs in its own log under `out_dir` (workers/joblog.py)."""
    settings = kwargs["settings"] = kwargs.get("settings") or WorkerSettings()
    with JobLog(out_dir, settings.log_max_bytes, settings.log_backups):
        log.info("run %r (spec %s) in %s", spec.name, spec.spec_hash()[:12], out_dir)
        summary = Trainer(spec, out_dir, **kwargs).run()
        results = {k: summary.get(k) for k in ("final_loss", "val_loss", "val_accuracy")}
        ended = ", ".join(f"{k} {v}" for k, v in results.items() if v is not None)
        ended = summary.get("error") or ended
        log.info("%s at step %s: %s", summary["status"], summary["steps"], ended)
        return summary
