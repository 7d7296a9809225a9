"""The coordinator: one per running job. It owns the parameters and the step loop.

Each step reads like the single-process loop it is equivalent to: take the
global batch, ask the workers for gradient sums of their pieces, add them in
rank order, divide by the batch size, step the optimizer, checkpoint now and
then. See docs/architecture.md for why this makes the result independent of the
number of workers. Every `health_every` steps the coordinator also measures training
health (workers/health.py) from what it already holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray

from workers import checkpoint as ckpt
from workers.cluster import ensure_ray
from workers.config import WorkerSettings
from workers.data import PreparedData
from workers.health import HealthMonitor
from workers.model import build_model, build_optimizer, evaluate
from workers.pool import ClusterTooSmall, WorkerFailure, WorkerPool
from workers.sampler import Schedule, split_batch
from workers.spec import TrainingSpec

log = logging.getLogger(__name__)

Callback = Callable[[dict], None]


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is what the user sees."""


class Diverged(TrainingError):
    pass


class SpecMismatch(TrainingError):
    pass


class Trainer:
    def __init__(
        self,
        spec: TrainingSpec,
        out_dir: str | Path,
        *,
        workers: int | None = None,
        callback: Callback | None = None,
        stop_event: threading.Event | None = None,
        abandon_event: threading.Event | None = None,
        settings: WorkerSettings | None = None,
    ):
        """`stop_event`: stop after the current step with a checkpoint ("cancelled").
        `abandon_event` (set with stop_event): stop without writing anything more, because
        the job may no longer be ours (the service lost its lease; another process may be
        resuming it from the same directory). `settings`: the cluster to attach to and the
        exchange's knobs (default: from the environment)."""
        self.spec = spec
        self.out = Path(out_dir)
        self.n_workers = workers or spec.workers
        self.callback = callback or (lambda event: None)
        self.stop_event = stop_event or threading.Event()
        self.abandon_event = abandon_event or threading.Event()
        self.settings = settings or WorkerSettings()

    # -- the run ---------------------------------------------------------------

    def run(self) -> dict:
        """Train to the end (or until stopped); failures come back as status 'failed'."""
        self.start = time.perf_counter()
        self.step, self.pool, self.health = 0, None, None
        self.schedule, self.resumed_from = None, None  # known once the spec is checked
        try:
            return self._run()
        except (TrainingError, WorkerFailure, ClusterTooSmall) as err:
            return self.failed(str(err))

    def failed(self, error: str) -> dict:
        """The summary of a run that stopped with `error`. Nothing is evaluated (the weights
        may not be finite); `checkpoint` is the newest good one to resume from, if any."""
        return self._report(
            "failed",
            self.step,
            self.schedule,
            self.pool,
            self.start,
            self.resumed_from,
            checkpoint=self._newest_checkpoint(),
            error=error,
        )

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

    def _report(self, status, step, schedule, pool, start, resumed_from, **results) -> dict:
        """`run_summary` from what the trainer knows; `schedule` and `pool` may be None."""
        return run_summary(
            status,
            step,
            epochs=step // schedule.steps_per_epoch if schedule is not None else 0,
            worker_nodes=list(pool.node_ids) if pool is not None else [],
            exchange=pool.kind if pool is not None else None,
            elapsed_s=round(time.perf_counter() - start, 3),
            worker_failures=pool.failures if pool is not None else 0,
            resumed_from_step=resumed_from,
            health=self.health.summary() if self.health is not None else None,
            **results,
        )

    def _run(self) -> dict:
        start = self.start
        spec = self.spec
        latest = ckpt.load_latest(self.out)
        if latest is not None:
            if latest.state.get("spec_hash") != spec.spec_hash():
                raise SpecMismatch(
                    f"{self.out} holds checkpoints of a different spec "
                    f"(hash {latest.state.get('spec_hash', '?')[:12]}, this spec "
                    f"{spec.spec_hash()[:12]}); refusing to mix runs. Use another --out."
                )
            if latest.state.get("finished"):
                return latest.state["summary"]
        self.out.mkdir(parents=True, exist_ok=True)

        data = PreparedData(spec)
        schedule = Schedule(len(data.X), spec.batch_size, spec.epochs, spec.seed)
        model = build_model(spec)
        params = model.parameters()
        opt = build_optimizer(spec, params)
        step, failures, history = 0, 0, []
        if latest is not None:
            model.load_state_dict(latest.model_state)
            opt.load_state_dict(latest.optimizer_state)
            step = self.step = latest.step
            failures = latest.state.get("worker_failures", 0)
            history = latest.state.get("metrics", [])
        resumed_from = step if latest is not None else None
        self.schedule, self.resumed_from = schedule, resumed_from  # for failed()
        health = self.health = HealthMonitor(
            model, spec.health_every, latest.state.get("health") if latest else None
        )

        ensure_ray(self.settings)
        data_ref = ray.put((data.X, data.y))
        pool = WorkerPool(
            self.n_workers,
            spec.cpus_per_worker,
            {
                "sizes": spec.model.sizes,
                "activation": spec.model.activation,
                "dtype": spec.dtype,
                "loss": spec.loss,
            },
            data_ref,
            max_failures=spec.max_failures,
            failures=failures,
            on_failure=lambda rank, reason, nodes: self.callback(
                {"type": "worker_failure", "rank": rank, "reason": reason, "worker_nodes": nodes}
            ),
            exchange=spec.exchange,
            settings=self.settings,
        )
        self.pool = pool

        def save(at_step: int, **extra) -> Path | None:
            if self.abandon_event.is_set():  # no longer ours to write
                return None
            model_state = model.state_dict()
            # A finite gradient can still overflow the weights (float32, a huge lr). Checked
            # here rather than every step: no per-step cost, and never a non-finite checkpoint.
            if not all(np.isfinite(a).all() for a in model_state.values()):
                raise Diverged(f"diverged at step {at_step} (parameters not finite)")
            state = {
                "step": at_step,
                "epoch": at_step // schedule.steps_per_epoch,
                "spec_hash": spec.spec_hash(),
                "metrics": history,
                "worker_failures": pool.failures,
                "health": health.state(),
                **extra,
            }
            path = ckpt.save_checkpoint(
                self.out,
                at_step,
                model_state,
                opt.state_dict(),
                state,
                keep=spec.keep_checkpoints,
            )
            self.callback({"type": "checkpoint", "step": at_step, "path": str(path)})
            return path

        self.callback(
            {
                "type": "started",
                "total_steps": schedule.total_steps,
                "step": step,
                "resumed_from_step": resumed_from,
                "worker_nodes": list(pool.node_ids),
                "exchange": pool.exchange.name,
            }
        )
        try:
            while step < schedule.total_steps:
                if self.stop_event.is_set():
                    written = save(step) is not None
                    return self._summary(
                        "cancelled",
                        step,
                        schedule,
                        model,
                        data,
                        pool,
                        start,
                        resumed_from,
                        error=f"stopped at step {step}; checkpoint written"
                        if written
                        else f"abandoned at step {step}; nothing written",
                    )
                t0 = time.perf_counter()
                idx = schedule.batch(step)
                sums = pool.grads([p.data for p in params], split_batch(idx, self.n_workers))
                before = health.before_step(data.X[idx]) if health.due(step + 1) else None
                try:
                    loss, grad_norm = self._apply(*sums, params, opt, step)
                except Diverged:
                    # Not stepped: the weights are still those the gradients were taken at.
                    self.callback(health.check(step + 1, before or health.before_step(data.X[idx])))
                    raise
                step = self.step = step + 1
                if before is not None:
                    self.callback(health.check(step, before))
                dt = time.perf_counter() - t0
                epoch_done = step % schedule.steps_per_epoch == 0
                point = {
                    "type": "step",
                    "step": step,
                    "total_steps": schedule.total_steps,
                    "epoch": schedule.epoch_of(step - 1),
                    "train_loss": loss,
                    "grad_norm": grad_norm,
                    "samples_per_s": len(idx) / dt if dt > 0 else None,
                }
                if epoch_done:
                    val = evaluate(model, spec.loss, data.X_val, data.y_val, data.classify)
                    point.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                    history.append(
                        {k: point[k] for k in ("step", "epoch", "train_loss")}
                        | {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
                    )
                self.callback(point)
                if step % spec.checkpoint_every == 0 and step < schedule.total_steps:
                    save(step)
        finally:
            pool.shutdown()
            del data_ref

        summary = self._summary("succeeded", step, schedule, model, data, pool, start, resumed_from)
        save(step, finished=True, summary=summary)
        return summary

    def _apply(self, grads, n, loss_sum, params, opt, step: int) -> tuple[float, float]:
        """Average the batch's gradient sums (added in rank order), check, step the optimizer."""
        loss = loss_sum / n
        sq = 0.0
        for p, g in zip(params, grads, strict=True):
            g /= n
            p.grad = g
            sq += float(np.vdot(g, g))
        grad_norm = float(np.sqrt(sq))
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise Diverged(f"diverged at step {step + 1} (loss={loss:g})")
        opt.step()
        return loss, grad_norm

    def _summary(self, status, step, schedule, model, data, pool, start, resumed_from, error=None):
        train = evaluate(model, self.spec.loss, data.X, data.y, data.classify)
        val = evaluate(model, self.spec.loss, data.X_val, data.y_val, data.classify)
        return self._report(
            status,
            step,
            schedule,
            pool,
            start,
            resumed_from,
            final_loss=train["loss"],
            val_loss=val["loss"],
            val_accuracy=val["accuracy"],
            checkpoint=str(ckpt.checkpoint_dir(self.out, f"step-{step}")),
            error=error,
        )


def run_summary(
    status: str,
    steps: int,
    *,
    epochs: int = 0,
    final_loss: float | None = None,
    val_loss: float | None = None,
    val_accuracy: float | None = None,
    checkpoint: str | None = None,
    worker_nodes: list[str] | None = None,
    exchange: str | None = None,
    elapsed_s: float = 0.0,
    worker_failures: int = 0,
    resumed_from_step: int | None = None,
    health: dict | None = None,
    error: str | None = None,
) -> dict:
    """A run's summary, as `train` returns it and `shardgrad train --json` prints it, with
    every key of that contract; what a run never got to is None, 0 or []. `health` and
    `error` are only present when given."""
    summary = {
        "status": status,
        "steps": steps,
        "epochs": epochs,
        "final_loss": final_loss,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "checkpoint": checkpoint,
        "worker_nodes": list(worker_nodes or []),
        "exchange": exchange,
        "elapsed_s": elapsed_s,
        "worker_failures": worker_failures,
        "resumed_from_step": resumed_from_step,
    }
    if health is not None:
        summary["health"] = health
    if error is not None:
        summary["error"] = error
    return summary


def train(spec: TrainingSpec, out_dir: str | Path, **kwargs) -> dict:
    """Run a spec to the end and return its summary (status 'failed' with 'error' on failure)."""
    return Trainer(spec, out_dir, **kwargs).run()
