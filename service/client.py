"""A small HTTP client for the CLI: $SHARDGRAD_URL, $SHARDGRAD_API_TOKEN, readable errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


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
    """(event, data) from the lines of a text/event-stream; comments (keep-alives) skipped."""
    event, data = "message", []
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("SHARDGRAD_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("SHARDGRAD_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=timeout)

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
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ClientError(f"{r.status_code} {r.reason_phrase}:\n{format_detail(detail)}")
        return r

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) from a job's SSE stream until it ends."""
        try:
            with self.http.stream("GET", f"/jobs/{job_id}/events", timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ClientError(f"{r.status_code}: {format_detail(r.json().get('detail'))}")
                yield from sse_events(r.iter_lines())
        except httpx.TransportError as err:
            raise ClientError(f"lost the event stream from {self.url}: {err}") from None
