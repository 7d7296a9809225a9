"""The Python client of the service (`from shardgrad import Client`), which the CLI is built on.

`Client(url, token)` talks to /api/v1 ($SHARDGRAD_URL, $SHARDGRAD_API_TOKEN by default);
`client.submit(spec)` answers a `Job`, a handle whose methods follow, query and control the
job; `client.sweep(spec)` a `Sweep`, likewise. Answers are the API's own Pydantic models
(service/schemas.py, service/sweep_schemas.py); a status >= 400 is a ClientError whose
`.errors` hold a 422's field locations.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from httpx_sse import ServerSentEvent, SSEError, connect_sse

from service import schemas, sweep_schemas

DEFAULT_URL = "http://127.0.0.1:8000"
# The service sends a keep-alive every 15 s: a stream silent this long has dropped.
STREAM_READ_TIMEOUT_S = 60.0


class ClientError(Exception):
    """What went wrong, ready to print. From an answer >= 400: its `status_code`, and for a
    422 `errors`, one {"loc": (field, path, ...), "msg": ...} per invalid field, `loc`
    inside what was sent (the leading "body"/"query"/"path" dropped, as the CLI prints)."""

    def __init__(self, message: str, status_code: int | None = None, errors=()):
        super().__init__(message)
        self.status_code = status_code
        self.errors: list[dict] = list(errors)


def format_detail(detail) -> str:
    """FastAPI's 422 detail as `loc: msg` lines (the leading "body"/"query" dropped)."""
    if not isinstance(detail, list):
        return str(detail)
    lines = []
    for err in field_errors(detail):
        where = ".".join(map(str, err["loc"]))
        lines.append(f"{where}: {err['msg']}" if where else str(err["msg"]))
    return "\n".join(lines)


def field_errors(detail) -> list[dict]:
    """{"loc", "msg"} of each error in a 422's detail, the loc without its leading part."""
    if not isinstance(detail, list):
        return []
    out = []
    for err in detail:
        loc = tuple(err.get("loc", []))
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[1:]
        out.append({"loc": loc, "msg": err.get("msg")})
    return out


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) from lines of a text/event-stream that a test already reads (comments,
    i.e. keep-alives, skipped)."""
    for sse in sse_messages(lines):
        if sse is not None:
            yield sse.event, sse.json()


def sse_messages(lines: Iterable[str]) -> Iterator[ServerSentEvent | None]:
    """The events of a text/event-stream's lines, and None at each comment (a keep-alive),
    so that a reader can look at its clock while a stream is quiet."""
    event, data, last_id = "", [], ""
    for line in lines:
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if not line and data:
            yield ServerSentEvent(event=event or "message", data="\n".join(data), id=last_id)
            event, data = "", []
        elif not field and line:
            yield None
        elif field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            last_id = value


@dataclass
class Reconnect:
    """How a dropped event stream is resumed: up to `attempts` tries in a row that bring no
    event, waiting `backoff_s`, doubled after each such try, at most `max_backoff_s`."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    sleep: Callable[[float], None] = time.sleep

    def wait(self, failures: int) -> None:
        self.sleep(min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s))


class Client:
    """The service at `url` (default $SHARDGRAD_URL, else 127.0.0.1:8000), with `token`
    (default $SHARDGRAD_API_TOKEN). Usable as a context manager (closes its connections)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("SHARDGRAD_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("SHARDGRAD_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=timeout)
        self.timeout = timeout
        self.reconnect = Reconnect()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, spec: dict | str | Path) -> Job:
        """Queue a training spec: a dict, or the path of a JSON file."""
        return Job(self, self.request("POST", "/jobs", json=_load(spec)))

    def job(self, job_id: str) -> Job:
        return Job(self, self.request("GET", f"/jobs/{job_id}"))

    def job_page(self, cursor: str | None = None, **filters) -> schemas.JobPage:
        """One page of GET /jobs, newest first (or as `sort` says): `filters` are its query
        parameters (status, tag, name, sweep, sort, limit); None ones are left out."""
        params = {k: v for k, v in filters.items() if v is not None}
        if cursor:
            params["cursor"] = cursor
        return schemas.JobPage.model_validate(self.request("GET", "/jobs", params=params))

    def jobs(
        self,
        *,
        status: str | None = None,
        tag: str | dict | list[str] | None = None,
        name: str | None = None,
        sort: str | None = None,
        sweep: str | None = None,
        limit: int | None = 50,
    ) -> list[Job]:
        """Up to `limit` jobs (None: all), following the pages. `tag`: "k:v", a list of
        them, or a dict {k: v} (every one must match); `sort`: "created", "-val_accuracy"..."""
        if isinstance(tag, dict):
            tag = [f"{k}:{v}" for k, v in tag.items()]
        filters = {"status": status, "tag": tag, "name": name, "sort": sort, "sweep": sweep}
        out: list[Job] = []
        cursor = None
        while limit is None or len(out) < limit:
            size = MAX_PAGE if limit is None else min(MAX_PAGE, limit - len(out))
            page = self.job_page(cursor, limit=size, **filters)
            out += [Job(self, j.model_dump(mode="json"), j) for j in page.items]
            cursor = page.next_cursor
            if not cursor:
                break
        return out

    def compare(self, ids: Iterable[str | Job], points: int | None = None) -> schemas.Comparison:
        """2 to 10 jobs side by side: the spec fields that differ (`differs`, each job's
        `values` there), final metrics and curves of at most `points` points (default 500)."""
        params = {"ids": ",".join(i.id if isinstance(i, Job) else i for i in ids)}
        if points is not None:
            params["points"] = points
        return schemas.Comparison.model_validate(self.request("GET", "/compare", params=params))

    # -- logs -----------------------------------------------------------------------------

    def logs(self, job_id: str, since: str | None = None) -> str:
        """The job's log as text: every record, or those after `since` (an ISO time)."""
        params = {"since": since} if since else {}
        return self.send("GET", f"/jobs/{job_id}/logs", params=params).text

    def follow_logs(self, job_id: str, since: str | None = None) -> Iterator[str]:
        """The job's log lines as they are written, until the job has ended."""
        params = {"follow": "true"} | ({"since": since} if since else {})
        for sse in self.stream(f"/jobs/{job_id}/logs", params):
            if sse.event == "end":
                return
            yield from sse.json()["lines"]

    # -- transport ------------------------------------------------------------------------

    # -- sweeps ----------------------------------------------------------------------------

    def sweep(self, spec: dict | str | Path) -> Sweep:
        """Start a sweep (docs/api.md#sweeps): a dict, or the path of a JSON file."""
        return Sweep(self, self.request("POST", "/sweeps", json=_load(spec)))

    def get_sweep(self, sweep_id: str) -> Sweep:
        return Sweep(self, self.request("GET", f"/sweeps/{sweep_id}"))

    def sweeps(
        self, status: str | None = None, limit: int = 50
    ) -> list[sweep_schemas.SweepSummary]:
        """The newest `limit` sweeps (at most 500), without their trials."""
        params = {"limit": limit} | ({"status": status} if status else {})
        page = sweep_schemas.SweepPage.model_validate(self.request("GET", "/sweeps", params=params))
        return page.items

    def request(self, method: str, path: str, **kw):
        """The JSON answer of a request; a ClientError for a status >= 400."""
        return self.send(method, path, **kw).json()

    def send(self, method: str, path: str, **kw) -> httpx.Response:
        """The response, for answers that are not JSON; a ClientError for a status >= 400."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as err:
            raise self._unreachable(err) from None
        return _checked(r)

    def _unreachable(self, err: Exception) -> ClientError:
        return ClientError(
            f"cannot reach the service at {self.url} ({err}); is `shardgrad serve` running?"
        )

    def events(self, job_id: str, deadline: float | None = None) -> Iterator[tuple[str, dict]]:
        """(event, data) from a job's SSE stream until its `end` event (see `stream`)."""
        for sse in self.stream(f"/jobs/{job_id}/events", deadline=deadline):
            yield sse.event, sse.json()
            if sse.event == "end":
                return

    def stream(
        self, path: str, params: dict | None = None, deadline: float | None = None
    ) -> Iterator[ServerSentEvent]:
        """The events of an SSE stream until its `end` event.

        A stream that drops (a transport error, or its end before `end`) is requested again
        with `Last-Event-ID`, the id of the last event seen (on a job's stream the step of
        the last metric point sent, so only newer points come again). After
        `self.reconnect.attempts` tries in a row without an event, a ClientError. Past
        `deadline` (time.monotonic()), a TimeoutError, noticed at the next event or
        keep-alive (the service sends one every 15 s)."""
        last_id, failures = "", 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                for sse in self._connection(path, params, headers, deadline):
                    failures, last_id = 0, sse.id or last_id
                    yield sse
                    if sse.event == "end":
                        return
                why = "it ended before the job did"
            except (httpx.TransportError, SSEError) as err:
                why = str(err) or type(err).__name__
            _check_deadline(deadline)
            failures += 1
            if failures > self.reconnect.attempts:
                raise ClientError(
                    f"lost the event stream from {self.url}: {why} "
                    f"(gave up after {self.reconnect.attempts} reconnects without an event)"
                )
            self.reconnect.wait(failures)

    def _connection(self, path, params, headers, deadline) -> Iterator[ServerSentEvent]:
        """The events of one connection to a stream, the deadline checked at every line."""
        read = STREAM_READ_TIMEOUT_S
        if deadline is not None:
            read = max(0.01, min(read, deadline - time.monotonic()))
        timeout = httpx.Timeout(self.timeout, read=read)
        kw = {"params": params, "headers": headers, "timeout": timeout}
        with connect_sse(self.http, "GET", path, **kw) as source:
            _checked(source.response)
            if "text/event-stream" not in source.response.headers.get("content-type", ""):
                raise SSEError("the answer is not an event stream")
            for sse in sse_messages(source.response.iter_lines()):
                _check_deadline(deadline)
                if sse is not None:
                    yield sse


MAX_PAGE = 500  # GET /jobs's largest page


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError("the job did not end in time")


def _checked(r: httpx.Response) -> httpx.Response:
    """`r`, or a ClientError with the service's readable detail for a status >= 400."""
    if r.status_code < 400:
        return r
    r.read()
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    raise ClientError(
        f"{r.status_code} {r.reason_phrase}:\n{format_detail(detail)}",
        r.status_code,
        field_errors(detail) if r.status_code == 422 else (),
    )


# -- a job --------------------------------------------------------------------------------------


class Points(list):
    """A job's metric points (schemas.MetricPoint), oldest first."""

    def to_pandas(self):
        """The points as a pandas DataFrame indexed by step (pandas must be installed)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Points.to_pandas() needs pandas: pip install pandas") from None
        rows = [p.model_dump(exclude={"layers", "warnings"}) for p in self]
        columns = [f for f in schemas.MetricPoint.model_fields if f not in ("layers", "warnings")]
        return pd.DataFrame(rows, columns=columns).set_index("step")


class Job:
    """A job on the service: the answer that last described it (`data`, as sent; `info`,
    the same as a schemas.Job) and what can be done with it. `job.info.metrics` holds the
    latest value of each metric, `job.metrics()` every point."""

    def __init__(self, client: Client, data: dict, info: schemas.Job | None = None):
        self.client, self.data, self._info = client, data, info
        self.id: str = data["id"]

    @classmethod
    def of(cls, client: Client, job_id: str) -> Job:
        """A handle on the job `job_id`, without reading it (a call on it says if it exists)."""
        return cls(client, {"id": job_id})

    @property
    def info(self) -> schemas.Job:
        """The job as last read, typed (parsed when first asked for)."""
        if self._info is None:
            self._info = schemas.Job.model_validate(self.data)
        return self._info

    @property
    def status(self) -> str:
        return self.data.get("status", "unknown")

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.data.get('name')!r} {self.status}>"

    def _read(self, data: dict) -> Job:
        self.data, self._info = data, None
        return self

    def refresh(self) -> Job:
        return self._read(self.client.request("GET", f"/jobs/{self.id}"))

    def wait(self, timeout: float | None = None) -> Job:
        """Follow the job's event stream (reconnecting if it drops) until the job has ended,
        then read it: this handle, refreshed. A TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event, _ in self.client.events(self.id, deadline):
            if event == "end":
                break
        return self.refresh()

    def metrics(self) -> Points:
        """Every metric point, oldest first, read a page at a time."""
        points, cursor = Points(), None
        while True:
            params = {"cursor": cursor} if cursor is not None else {}
            page = self.client.request("GET", f"/jobs/{self.id}/metrics", params=params)
            page = schemas.Metrics.model_validate(page)
            points += page.points
            cursor = page.next_cursor
            if cursor is None:
                return points

    def checkpoints(self) -> list[schemas.CheckpointOut]:
        answer = self.client.request("GET", f"/jobs/{self.id}/checkpoints")
        return [schemas.CheckpointOut.model_validate(c) for c in answer]

    def predict(self, rows, checkpoint: str | None = None) -> schemas.PredictResponse:
        """The model's outputs for `rows` (a list of rows of floats)."""
        body = _with_checkpoint({"inputs": rows}, checkpoint)
        answer = self.client.request("POST", f"/jobs/{self.id}/predict", json=body)
        return schemas.PredictResponse.model_validate(answer)

    def generate(
        self,
        prompt: str,
        max_tokens: int = 8,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        checkpoint: str | None = None,
    ) -> schemas.GenerateResponse:
        """The prompt's continuation by a transformer job (temperature 0: greedy)."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
        body = _with_checkpoint(body | {"top_k": top_k, "seed": seed}, checkpoint)
        answer = self.client.request("POST", f"/jobs/{self.id}/generate", json=body)
        return schemas.GenerateResponse.model_validate(answer)

    def explain(
        self,
        rows,
        method: str = "gradient",
        target: int | None = None,
        baseline=None,
        steps: int = 64,
        checkpoint: str | None = None,
    ) -> schemas.ExplainResponse:
        """Attributions of an output (`target`, default the predicted class) to the inputs."""
        body = {"inputs": rows, "method": method, "target": target, "steps": steps}
        if baseline is not None:
            body["baseline"] = baseline
        body = _with_checkpoint(body, checkpoint)
        answer = self.client.request("POST", f"/jobs/{self.id}/explain", json=body)
        return schemas.ExplainResponse.model_validate(answer)

    def download(self, checkpoint: str = "best", path: str | Path | None = None) -> Path:
        """A checkpoint's model weights (safetensors) saved at `path` (a file, or a
        directory for the service's file name; default the current directory)."""
        url = f"/jobs/{self.id}/checkpoints/{checkpoint}/model.safetensors"
        target = Path(path) if path is not None else Path.cwd()
        try:
            with self.client.http.stream("GET", url) as r:
                _checked(r)
                if target.is_dir():
                    name = _filename(r) or f"{self.id}-{checkpoint}-model.safetensors"
                    target = target / name
                with open(target, "wb") as out:
                    for chunk in r.iter_bytes():
                        out.write(chunk)
        except httpx.TransportError as err:
            raise self.client._unreachable(err) from None
        return target

    def cancel(self) -> Job:
        """Cancel: at once if queued, else after the current step with a checkpoint."""
        return self._read(self.client.request("POST", f"/jobs/{self.id}/cancel"))

    def resume(self) -> Job:
        return self._read(self.client.request("POST", f"/jobs/{self.id}/resume"))

    def logs(self, since: str | None = None) -> str:
        return self.client.logs(self.id, since)


class Sweep:
    """A sweep on the service: the answer that last described it (`data`; `info`, the same
    as a sweep_schemas.Sweep) and what can be done with it."""

    def __init__(self, client: Client, data: dict):
        self.client = client
        self._read(data)

    def _read(self, data: dict) -> Sweep:
        self.data = data
        self.info = sweep_schemas.Sweep.model_validate(data)
        self.id: str = self.info.id
        return self

    @property
    def status(self) -> str:
        return self.info.status

    def __repr__(self) -> str:
        return f"<Sweep {self.id} {self.info.name!r} {self.status}>"

    def refresh(self) -> Sweep:
        return self._read(self.client.request("GET", f"/sweeps/{self.id}"))

    def events(self, deadline: float | None = None) -> Iterator[sweep_schemas.Sweep]:
        """The sweep each time it or a trial changed, until it has ended (reconnecting if
        the stream drops)."""
        for sse in self.client.stream(f"/sweeps/{self.id}/events", deadline=deadline):
            if sse.event == "end":
                return
            if sse.event == "sweep":
                yield self._read(sse.json()).info

    def wait(self, timeout: float | None = None) -> Sweep:
        """Follow the sweep until it finished or was cancelled; this handle, refreshed. A
        TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in self.events(deadline):
            pass
        return self.refresh()

    def cancel(self) -> Sweep:
        """Ask no more trials; cancel the queued and running ones."""
        return self._read(self.client.request("POST", f"/sweeps/{self.id}/cancel"))

    def trials(self) -> list[sweep_schemas.SweepTrial]:
        """Every trial asked so far, by number (as last read: refresh() reads again)."""
        return self.info.trials

    def best(self) -> sweep_schemas.SweepTrial | None:
        """The best finished trial by the sweep's metric and mode (as last read)."""
        return self.info.best

    def best_job(self) -> Job | None:
        """The best trial's job, read now."""
        best = self.info.best
        return self.client.job(best.job_id) if best and best.job_id else None


def _load(spec: dict | str | Path) -> dict:
    """A request body: the dict, or the JSON file at the path."""
    if isinstance(spec, dict):
        return spec
    try:
        return json.loads(Path(spec).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ClientError(f"cannot read {spec}: {err}") from None


def _with_checkpoint(body: dict, checkpoint: str | None) -> dict:
    return body | {"checkpoint": checkpoint} if checkpoint is not None else body


def _filename(r: httpx.Response) -> str:
    """The file name in a Content-Disposition header, or ""."""
    disposition = r.headers.get("content-disposition", "")
    _, _, name = disposition.partition("filename=")
    return name.strip('"; ')
