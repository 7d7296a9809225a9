"""Sweeps: Optuna studies whose trials are ordinary jobs.

Optuna decides (ask-and-tell, its samplers and pruners); the study lives in Optuna's RDB
storage on the service's own database. A trial is a job tagged `sweep: <id>`, `trial: <n>`
(the job row and its tags are one transaction), so the job list is the trial<->job map.

The driver runs on the dispatcher's thread, once per tick, before the dispatcher claims:
for each active sweep it
1. tells Optuna how each trial whose job ended went (succeeded: its best metric value;
   pruned, or cancelled after reports: PRUNED; otherwise FAIL);
2. queues the job of each trial that Optuna has running but no job has (asked, then the
   service died before the job was written): so a restart asks nothing twice;
3. asks new trials while fewer than `parallel` are queued or running, until `trials`;
4. ends the sweep once every trial was asked and told.
Reports come on the job's own thread, from the Trainer's evaluation steps (`report`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import optuna
from sqlalchemy import select, text, update

from service.config import Settings
from service.schemas import utc
from service.search_space import (
    best_report,
    decode,
    grid_size,
    optuna_storage,
    pruner,
    sampler,
    suggest,
    trial_spec,
)
from service.store import Conflict, JobStore, utcnow
from service.sweep_schemas import Sweep, SweepCreate, SweepSummary, SweepTrial
from service.tables import (
    ACTIVE,
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    SUCCEEDED,
    SWEEP_ACTIVE,
    JobRow,
    SweepRow,
    TagRow,
)

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)
TrialState = optuna.trial.TrialState
RESCAN_S = 5.0  # the longest a tick goes without looking at the active sweeps
NO_JOB_STATE = {
    TrialState.RUNNING: "pending",
    TrialState.COMPLETE: SUCCEEDED,
    TrialState.PRUNED: CANCELLED,
    TrialState.FAIL: FAILED,
    TrialState.WAITING: "pending",
}
SWEEP_LOCK = 0x7377656570  # "sweep": PostgreSQL's advisory lock of the driving tick


class SweepNotFound(LookupError):
    pass


# -- the driver ---------------------------------------------------------------------------------


class Sweeps:
    """Sweep rows in the store's database, their Optuna studies, and the driving tick."""

    def __init__(self, store: JobStore, settings: Settings):
        self.store, self.settings = store, settings
        self.url = store.engine.url.render_as_string(hide_password=False)  # Optuna's too
        self._storage: optuna.storages.RDBStorage | None = None
        self._studies: dict[str, tuple[optuna.Study, SweepCreate]] = {}
        self._trial_ids: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        # Set when a sweep may have work: created, cancelled, one of its trials ended (the
        # dispatcher sets it), and at start (recovery). Otherwise a tick looks every
        # RESCAN_S (a trial cancelled through the jobs API, another process's changes).
        self.due = threading.Event()
        self.due.set()
        self._scanned = 0.0

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        with self._lock:
            if self._storage is None:
                self._storage = optuna_storage(self.url)
            return self._storage

    def study(self, row: SweepRow) -> tuple[optuna.Study, SweepCreate]:
        with self._lock:
            if row.id in self._studies:
                return self._studies[row.id]
        spec = SweepCreate.model_validate(row.spec)  # stored validated: no data check needed
        storage = self.storage
        study = optuna.create_study(
            storage=storage,
            study_name=row.study,
            direction="minimize" if spec.mode == "min" else "maximize",
            load_if_exists=True,
        )
        asked = len(study.get_trials(deepcopy=False))
        study.sampler, study.pruner = sampler(spec, asked), pruner(spec)
        with self._lock:
            return self._studies.setdefault(row.id, (study, spec))

    # -- rows ---------------------------------------------------------------------------

    def create(self, spec: SweepCreate) -> SweepRow:
        now = utcnow()
        sweep_id = uuid.uuid4().hex[:12]
        row = SweepRow(
            id=sweep_id,
            name=spec.name,
            status="running",
            priority=spec.base.priority,
            spec=spec.model_dump(mode="json"),
            study=f"shardgrad-sweep-{sweep_id}",
            created_at=now,
            updated_at=now,
        )
        with self.store._tx() as s:
            s.add(row)
        self.due.set()
        return row

    def get(self, sweep_id: str) -> SweepRow:
        with self.store._read() as s:
            row = s.scalar(select(SweepRow).where(SweepRow.id == sweep_id))
        if row is None:
            raise SweepNotFound(sweep_id)
        return row

    def list(self, status: str | None, limit: int, before: int | None) -> list[SweepRow]:
        stmt = select(SweepRow).order_by(SweepRow.seq.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(SweepRow.status == status)
        if before is not None:
            stmt = stmt.where(SweepRow.seq < before)
        with self.store._read() as s:
            return list(s.scalars(stmt))

    def _move(self, sweep_id: str, frm: tuple[str, ...], to: str, error=None) -> bool:
        now = utcnow()
        values = {"status": to, "updated_at": now}
        if to not in SWEEP_ACTIVE:
            values |= {"finished_at": now, "error": error}
        stmt = update(SweepRow).where(SweepRow.id == sweep_id, SweepRow.status.in_(frm))
        with self.store._tx() as s:
            return s.execute(stmt.values(**values)).rowcount == 1

    def trial_jobs(self, sweep_id: str) -> dict[int, JobRow]:
        """The sweep's jobs by trial number."""
        sweep_tag = select(TagRow.job_id).where(TagRow.key == "sweep", TagRow.value == sweep_id)
        stmt = (
            select(TagRow.value, JobRow)
            .join(JobRow, JobRow.id == TagRow.job_id)
            .where(TagRow.key == "trial", TagRow.job_id.in_(sweep_tag))
        )
        with self.store._read() as s:
            return {int(n): job for n, job in s.execute(stmt) if n.isdigit()}

    # -- reading ------------------------------------------------------------------------

    def present(self, row: SweepRow, *, trials: bool = True) -> Sweep | SweepSummary:
        study, spec = self.study(row)
        jobs = self.trial_jobs(row.id)
        out = [self._trial(t, jobs.get(t.number), spec) for t in study.get_trials(deepcopy=False)]
        done = [t for t in out if t.value is not None]
        best = (min if spec.mode == "min" else max)(done, key=lambda t: t.value) if done else None
        counts = collections.Counter("pruned" if t.pruned else t.state for t in out)
        summary = dict(
            id=row.id,
            name=row.name,
            status=row.status,
            priority=row.priority,
            metric=spec.metric,
            mode=spec.mode,
            created_at=utc(row.created_at),
            updated_at=utc(row.updated_at),
            finished_at=utc(row.finished_at),
            error=row.error,
            counts=dict(counts),
            best=best,
        )
        if not trials:
            return SweepSummary(**summary)
        return Sweep(**summary, spec=spec, trials=out)

    def _trial(self, t: optuna.trial.FrozenTrial, job: JobRow | None, spec) -> SweepTrial:
        best_value, best_step = best_report(t, spec.mode)
        if job is not None:
            state, error = job.status, job.error
        else:  # asked, not queued yet; or never a job (invalid); or its job was deleted
            state, error = NO_JOB_STATE[t.state], t.user_attrs.get("error")
        params = {k: decode(v, spec.parameters.get(k)) for k, v in t.params.items()}
        return SweepTrial(
            number=t.number,
            job_id=job.id if job is not None else None,
            state=state,
            params=params,
            pruned=bool(job is not None and (job.summary or {}).get("pruned")),
            value=t.value if t.state == TrialState.COMPLETE else None,
            best_value=best_value,
            best_step=best_step,
            step=max(t.intermediate_values, default=None),
            error=error,
        )

    # -- reports (a job's thread) ----------------------------------------------------------

    def report(self, sweep_id: str, number: int, event: dict) -> bool:
        """Report a trial's evaluation step (a Trainer step event that carries the sweep's
        metric) to Optuna; True when its pruner says stop."""
        try:
            if sweep_id not in self._studies:
                self.study(self.get(sweep_id))
            study, spec = self._studies[sweep_id]
            value = event.get(spec.metric)
            if value is None:  # not an evaluation step
                return False
            key = (sweep_id, number)
            if key not in self._trial_ids:
                study_id = self.storage.get_study_id_from_name(study.study_name)
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
                self._trial_ids[key] = trial_id
            trial_id = self._trial_ids[key]
            trial = optuna.trial.Trial(study, trial_id)
            # A resumed run evaluates again the steps after its checkpoint: Optuna keeps the
            # first report of a step (and would warn of the second).
            if event["step"] not in self.storage.get_trial(trial_id).intermediate_values:
                trial.report(float(value), event["step"])
            return trial.should_prune()
        except Exception:  # a told trial (its sweep was cancelled), a store hiccup
            log.exception("sweep %s trial %s: could not report", sweep_id, number)
            return False

    # -- the tick (the dispatcher's thread) ---------------------------------------------------

    def tick(self) -> None:
        if not self.due.is_set() and time.monotonic() - self._scanned < RESCAN_S:
            return
        self.due.clear()  # before reading: a trial that ends meanwhile sets it again
        self._scanned = time.monotonic()
        with self._driving() as mine:
            if not mine:  # another service process drives them now
                self.due.set()
                return
            with self.store._read() as s:
                stmt = select(SweepRow).where(SweepRow.status.in_(SWEEP_ACTIVE))
                active = list(s.scalars(stmt))
            for row in active:
                try:
                    self._drive(row)
                except Exception:  # one sweep's trouble stops neither the others nor the jobs
                    log.exception("sweep %s: tick failed", row.id)

    @contextlib.contextmanager
    def _driving(self) -> Iterator[bool]:
        """Whether this process may drive the sweeps now: on PostgreSQL one process at a
        time (a transaction-scoped advisory lock), so two never ask for the same sweep;
        SQLite has one service process."""
        if self.store.dialect != "postgresql":
            yield True
            return
        with self.store.engine.connect() as conn, conn.begin():
            yield conn.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SWEEP_LOCK})

    def _drive(self, row: SweepRow) -> None:
        study, spec = self.study(row)
        jobs = self.trial_jobs(row.id)
        trials = study.get_trials(deepcopy=False)
        running = 0  # trials queued or running
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            job = jobs.get(t.number)
            if job is None:  # asked, and the service stopped before its job was written
                if row.status == "running":
                    running += self._queue(row, study, spec, t.number, t.params)
                else:
                    self._fail(study, t.number, "the sweep was cancelled before it was queued")
            elif job.status in (QUEUED, *ACTIVE):
                running += 1
                if row.status == "cancelling" and job.status != CANCELLING:
                    self._cancel_job(job.id)  # one the cancel request did not see
            else:
                self._tell(study, spec, t, job)
        asked = len(trials)
        want = min(spec.trials, grid_size(spec)) if spec.sampler.type == "grid" else spec.trials
        while row.status == "running" and running < spec.parallel and asked < want:
            trial = study.ask()
            params = {path: suggest(trial, path, d) for path, d in spec.parameters.items()}
            running += self._queue(row, study, spec, trial.number, params, decoded=True)
            asked += 1
        if running == 0 and (asked >= want or row.status == "cancelling"):
            # Every trial was told: on this tick, or (a failed one) as it was asked.
            end = "finished" if row.status == "running" else CANCELLED
            self._move(row.id, SWEEP_ACTIVE, end)

    def _queue(self, row, study, spec: SweepCreate, number: int, params, decoded=False) -> int:
        """Queue trial `number`'s job (1), or fail the trial if its spec does not validate (0)."""
        from service.api.routes.jobs import validate_spec  # the route's checks, no HTTP

        if not decoded:
            params = {k: decode(v, spec.parameters.get(k)) for k, v in params.items()}
        body = trial_spec(spec, row.spec["base"], number, params)
        body["tags"] = {"sweep": row.id, "trial": str(number)}
        try:
            job = validate_spec(body, self.settings)
        except Exception as err:
            self._fail(study, number, _reason(err))
            return 0
        self.store.create(
            job.model_dump(mode="json", exclude={"tags"}),
            name=job.name,
            priority=row.priority,
            cpus=job.reserved_cpus(),
            tags=job.tags,
        )
        return 1

    def _fail(self, study: optuna.Study, number: int, error: str) -> None:
        study_id = self.storage.get_study_id_from_name(study.study_name)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        self.storage.set_trial_user_attr(trial_id, "error", error[:1000])
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    def _tell(self, study, spec: SweepCreate, t: optuna.trial.FrozenTrial, job: JobRow) -> None:
        best, _ = best_report(t, spec.mode)
        if job.status == SUCCEEDED:
            value = best if best is not None else (job.metrics or {}).get(spec.metric)
            if value is None:
                self._fail(study, t.number, f"the job reported no {spec.metric}")
            else:
                study.tell(t.number, float(value), skip_if_finished=True)
        elif job.status == CANCELLED and t.intermediate_values:
            study.tell(t.number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    def _cancel_job(self, job_id: str) -> None:
        # A running one: the dispatcher stops it on its next tick (store.owned). One that
        # ended meanwhile (Conflict): the next tick tells how.
        with contextlib.suppress(Conflict):
            self.store.cancel(job_id)

    # -- control --------------------------------------------------------------------------

    def cancel(self, sweep_id: str) -> list[str]:
        """Ask no more trials; the ids of its queued and running jobs (for the caller to
        cancel). False-y when the sweep has ended already."""
        if not self._move(sweep_id, ("running",), "cancelling"):
            return []
        self.due.set()
        jobs = self.trial_jobs(sweep_id).values()
        return [job.id for job in jobs if job.status in (QUEUED, *ACTIVE)]


def _reason(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors())
    return f"{type(err).__name__}: {err}"
