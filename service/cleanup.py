"""Deleting finished jobs and uploads, and the garbage collection of old jobs.

The store removes a job's rows in one transaction that checks the job is still finished
(service/store.py JobStore.delete); its files go after that commit: the job's directory
(checkpoints, logs) and the upload it trained on when no other job names that upload. An
upload is refused while a queued or running job trains on it; a finished job that named
it stays, and a resume of that job then fails saying the upload is gone."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from datetime import timedelta
from pathlib import Path

from service.store import Conflict, JobStore, uses_upload, utcnow
from service.tables import ACTIVE, QUEUED, TERMINAL, JobRow
from workers.datasets import delete_uploaded, get_uploaded

GC_BATCH = 200  # jobs one gc request deletes at most; the caller asks again for more


def delete_job(store: JobStore, jobs_dir: Path, uploads_dir: Path, job_id: str) -> JobRow:
    """Delete a finished job: rows, then files. JobNotFound, or Conflict if not finished."""
    job = store.delete(job_id)
    shutil.rmtree(jobs_dir / job.id, ignore_errors=True)
    dataset_id = uses_upload(job.spec)
    if dataset_id is not None and not store.dataset_users(dataset_id):
        delete_uploaded(dataset_id, uploads_dir)
    return job


def delete_dataset(store: JobStore, uploads_dir: Path, dataset_id: str) -> None:
    """FileNotFoundError if there is no such upload; Conflict while a job waits or runs on it."""
    get_uploaded(dataset_id, uploads_dir)
    if users := store.dataset_users(dataset_id, {QUEUED, *ACTIVE}):
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise Conflict(f"dataset {dataset_id} is used by queued or running jobs: {shown}")
    delete_uploaded(dataset_id, uploads_dir)


def collect(
    store: JobStore,
    jobs_dir: Path,
    uploads_dir: Path,
    *,
    older_than_s: float,
    statuses: Collection[str] = TERMINAL,
    dry_run: bool = False,
) -> tuple[list[str], bool]:
    """Delete up to GC_BATCH finished jobs in `statuses` that ended over `older_than_s` ago,
    oldest first (none if `dry_run`); their ids, and whether more remain."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    ids = store.finished_before(cutoff, statuses, GC_BATCH + 1)
    ids, more = ids[:GC_BATCH], len(ids) > GC_BATCH
    if dry_run:
        return ids, more
    deleted = []
    for job_id in ids:
        try:
            deleted.append(delete_job(store, jobs_dir, uploads_dir, job_id).id)
        except (Conflict, LookupError):  # resumed or deleted meanwhile: not garbage now
            continue
    return deleted, more
