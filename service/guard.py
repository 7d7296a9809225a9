"""Browser-facing guards: which Host names the service answers, and which Origins may change
state.

Without an API token, anything that can reach the port can use the API; a loopback bind is
what keeps strangers out. Two browser tricks get around a loopback bind, and these stop them:
- DNS rebinding: a page on attacker.example re-points its name at 127.0.0.1 and reads our
  answers as its own origin. Its requests carry `Host: attacker.example`, so without a token
  only loopback Host names (and SHARDGRAD_ALLOWED_HOSTS) are answered (Starlette's
  TrustedHostMiddleware).
- Cross-site requests (CSRF): any page may POST to http://127.0.0.1:8000 (a form, or a
  fetch whose answer it cannot read). The browser says where it comes from in `Origin`; a
  state-changing request from another origin is refused, token or not.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "*.localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def answered_hosts(token: str | None, allowed: list[str]) -> list[str]:
    """The Host names answered: any with a token (it is what keeps strangers out), else the
    loopback names and the allowed ones."""
    return ["*"] if token else [*LOOPBACK_HOSTS, *allowed]


def host_guard(app: ASGIApp, token: str | None, allowed: list[str]) -> ASGIApp:
    return TrustedHostMiddleware(app, allowed_hosts=answered_hosts(token, allowed))


class SameOrigin:
    """403 for a state-changing request whose `Origin` is not the service's own."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not _same_host(origin, headers.get("host", "")):
                return await _refuse(send, origin)
        await self.app(scope, receive, send)


def _same_host(origin: str, host: str) -> bool:
    """Origin `scheme://host[:port]` names the host:port the request was sent to. The scheme
    is not compared: behind a TLS-terminating proxy the page is https, the request http."""
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "null" (a sandboxed page) and garbage: not us
        return False
    return bool(netloc) and netloc.lower() == host.lower()


async def _refuse(send: Send, origin: str) -> None:
    detail = f"cross-site request refused: Origin {origin!r} is not this service"
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})
