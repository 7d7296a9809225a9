"""Request body limits, counted as the body streams in (chunked bodies included).

A pure ASGI middleware wraps `receive`: once a request has sent more bytes than its
route allows, `receive` raises a 413 HTTPException. FastAPI re-raises HTTPExceptions
that come out of body parsing, so the client gets the usual `{"detail": ...}` 413.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, upload_path: str):
        self.app = app
        self.upload_path = upload_path

    def limit(self, scope: Scope) -> int:
        settings = scope["app"].state.settings
        if scope["method"] == "POST" and scope["path"].rstrip("/") == self.upload_path:
            return settings.max_upload_bytes
        return settings.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reject(send, limit)  # refuse before reading a byte
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:  # raised where no exception handler turned it into a response
            if started:
                raise
            await _reject(send, limit)


async def _reject(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body is larger than {limit} bytes"}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
