"""A small HTTP client for the CLI: $SHARDGRAD_URL, $SHARDGRAD_API_TOKEN, readable errors."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import httpx
from httpx_sse import SSEError, connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
# The service sends a keep-alive every 15 s: a stream silent this long has dropped.
STREAM_READ_TIMEOUT_S = 60.0


class ClientError(Exception):
    """What went wrong, ready to print."""


def format_detail(detail) -> str:
    """FastAPI's 422 detail as `loc: msg` lines (the leading "body"/"query" dropped)."""
    if not isinstance(detail, list):
        return str(detail)
    lines = []
    for err in detail:
        loc = [str(p) for p in err.get("loc", [])]
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[1:]
        where = ".".join(loc)
        lines.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "\n".join(lines)


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) from lines of a text/event-stream that a test already reads (comments,
    i.e. keep-alives, skipped). The client itself reads streams with httpx-sse."""
    event, data = "message", []
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


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
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("SHARDGRAD_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("SHARDGRAD_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=timeout)
        self.stream_timeout = httpx.Timeout(timeout, read=STREAM_READ_TIMEOUT_S)
        self.reconnect = Reconnect()

    def request(self, method: str, path: str, **kw):
        """The JSON answer of a request; a ClientError for a status >= 400."""
        return self.send(method, path, **kw).json()

    def send(self, method: str, path: str, **kw) -> httpx.Response:
        """The response, for answers that are not JSON; a ClientError for a status >= 400."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as err:
            raise ClientError(
                f"cannot reach the service at {self.url} ({err}); is `shardgrad serve` running?"
            ) from None
        return _checked(r)

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) from a job's SSE stream until its `end` event.

        A stream that drops (a transport error, or its end before `end`) is requested again
        with `Last-Event-ID`, the id of the last event seen: the step of the last metric point
        sent, so only newer points come again (status and progress always do). After
        `self.reconnect.attempts` tries in a row without an event, a ClientError."""
        last_id, failures = "", 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                path = f"/jobs/{job_id}/events"
                kw = {"headers": headers, "timeout": self.stream_timeout}
                with connect_sse(self.http, "GET", path, **kw) as source:
                    _checked(source.response)
                    for sse in source.iter_sse():
                        failures, last_id = 0, sse.id or last_id
                        yield sse.event, sse.json()
                        if sse.event == "end":
                            return
                why = "it ended before the job did"
            except (httpx.TransportError, SSEError) as err:
                why = str(err) or type(err).__name__
            failures += 1
            if failures > self.reconnect.attempts:
                raise ClientError(
                    f"lost the event stream from {self.url}: {why} "
                    f"(gave up after {self.reconnect.attempts} reconnects without an event)"
                )
            self.reconnect.wait(failures)


def _checked(r: httpx.Response) -> httpx.Response:
    """`r`, or a ClientError with the service's readable detail for a status >= 400."""
    if r.status_code < 400:
        return r
    r.read()
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    raise ClientError(f"{r.status_code} {r.reason_phrase}:\n{format_detail(detail)}")
