"""A job's own log, under its run directory: what is logged while the job runs (its
coordinator's `workers.*` loggers and anything else logged in the job's context), lines
written on a worker's behalf (`JobLog.write`, tagged with rank and node), and the traceback
of a failure. `logs/job.log`, rotated past `log_max_bytes` into job.log.1 ... job.log.N
(`log_backups`), so a job's log never takes more than (N + 1) x the cap.

Several jobs run in threads of one service process, and a handler on a logger sees every
thread's records; each JobLog keeps only the records logged in its own context (a context
variable set in the thread that runs the job), so logs of jobs never mix.

Every record starts with its UTC time, fixed width (`2026-01-02T03:04:05.678901Z`), so that
text order is time order and `since` is a string comparison; lines that do not start with
one (a traceback's) belong to the record above them.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path

LOG_DIR, LOG_NAME = "logs", "job.log"
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z ")
STAMP_WIDTH = 28  # the stamp and its space

_current: contextvars.ContextVar[JobLog | None] = contextvars.ContextVar("job_log", default=None)
log = logging.getLogger(__name__)


def stamp(at: datetime) -> str:
    """`at` as a record's time: UTC, microseconds, "Z"; a naive time is taken as UTC."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Format(logging.Formatter):
    def formatTime(self, record, datefmt=None) -> str:  # noqa: N802 (logging's name)
        return stamp(datetime.fromtimestamp(record.created, UTC))


FORMAT = _Format("%(asctime)s %(levelname)s %(name)s: %(message)s")


def log_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / LOG_DIR / LOG_NAME


class JobLog:
    """While entered (in the thread that runs the job), the job's records go to its log; an
    exception that leaves the block is logged with its traceback on the way out."""

    def __init__(self, out_dir: str | Path, max_bytes: int, backups: int):
        path = log_path(out_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self.handler.setFormatter(FORMAT)
        self.handler.addFilter(lambda record: _current.get() is self)
        self._token: contextvars.Token | None = None
        self.closed = False

    def __enter__(self) -> JobLog:
        self._token = _current.set(self)
        workers = logging.getLogger("workers")
        if workers.getEffectiveLevel() > logging.INFO:  # a job's log keeps its INFO lines
            workers.setLevel(logging.INFO)
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, kind, err, tb) -> None:
        try:
            if err is not None:
                log.error("the run ended with %s: %s", kind.__name__, err, exc_info=err)
        finally:
            logging.getLogger().removeHandler(self.handler)
            self.handler.acquire()
            try:  # a worker's line that comes later is dropped, not written to a reopened file
                self.closed = True
                self.handler.close()
            finally:
                self.handler.release()
            _current.reset(self._token)

    def write(self, source: str, lines: Iterable[str], level: int = logging.INFO) -> None:
        """Lines that were not logged here (a worker's stdout or stderr), each one a record
        of `source` ("worker 1 on node 5f2c... stderr")."""
        self.handler.acquire()  # from any thread: past the filter that keeps other jobs out
        try:
            for line in lines if not self.closed else ():
                record = logging.LogRecord(source, level, "", 0, line.rstrip("\n"), None, None)
                self.handler.emit(record)
        finally:
            self.handler.release()


def current() -> JobLog | None:
    """The JobLog of the job running in this context, if any."""
    return _current.get()


# -- reading -------------------------------------------------------------------------------------


def records(text: str) -> list[str]:
    """The records of a log's text, each with its continuation lines and its newline."""
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        if _STAMP.match(line) or not out:
            out.append(line)
        else:
            out[-1] += line
    return out


def read(out_dir: str | Path, since: str = "") -> list[str]:
    """The records of a job's log, oldest first (the rotated files, then the current one),
    those stamped after `since` (a `stamp`) when given."""
    path = log_path(out_dir)
    return after(_records_of([*_rotated(path), path]), since)


def after(recs: list[str], since: str) -> list[str]:
    return [r for r in recs if r[: STAMP_WIDTH - 1] > since] if since else recs


def _rotated(path: Path) -> list[Path]:
    """The rotated files, oldest (job.log.N) first."""
    return sorted(path.parent.glob(LOG_NAME + ".*"), key=_rotation, reverse=True)


def _records_of(files: list[Path]) -> list[str]:
    out: list[str] = []
    for f in files:
        try:
            out += records(f.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:  # not written yet, or rotated away since it was listed
            continue
    return out


def _rotation(path: Path) -> int:
    suffix = path.name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


@dataclass
class Tail:
    """New records of a job's log as it grows (`poll`), past a rotation too: while the file
    is the one read so far (same inode, not shorter), the whole lines after the last read;
    otherwise the rotated files and the new one again, after the last record's time."""

    out_dir: Path
    since: str = ""
    _inode: int | None = None
    _offset: int = 0

    def poll(self) -> list[str]:
        path = log_path(self.out_dir)
        try:
            inode, size = (st := path.stat()).st_ino, st.st_size
        except FileNotFoundError:
            return []
        older: list[str] = []
        fresh = inode != self._inode or size < self._offset
        if fresh:
            older, self._inode, self._offset = _records_of(_rotated(path)), inode, 0
        with open(path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        cut = chunk.rfind(b"\n") + 1  # a record still being written waits for its end
        self._offset += cut
        new = older + records(chunk[:cut].decode("utf-8", errors="replace"))
        new = after(new, self.since) if fresh else new
        self.since = last_stamp(new) or self.since
        return new

    def lines(self) -> list[str]:
        return [line for record in self.poll() for line in record.splitlines()]


def last_stamp(recs: list[str]) -> str:
    """The time of the newest stamped record in `recs`, or ""."""
    for r in reversed(recs):
        if _STAMP.match(r):
            return r[: STAMP_WIDTH - 1]
    return ""
