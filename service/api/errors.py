"""422 errors, in FastAPI's standard shape: each error has the `loc` of the field, a `msg`,
a `type` and the rejected `input`.

Whatever a client sends, the answer stays small and encodable: at most MAX_ERRORS errors
(then one that counts the rest), inputs echoed only up to a short length, and strings
that UTF-8 cannot encode (lone surrogates) escaped as `\\ud800`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

MAX_ERRORS = 20  # a 10,000-row request with every row wrong answers with the first few
ECHO_CHARS = 80  # of a string in an echoed input
ECHO_ITEMS = 8  # of a list or an object in an echoed input
ECHO_DEPTH = 3  # levels of nesting in an echoed input
MSG_CHARS = 400  # of a message (ours quote the value they refuse)


def field_error(loc: tuple, msg: str, value: Any) -> RequestValidationError:
    """One field's error: raise field_error(("body", "steps"), "too many", body.steps)."""
    return field_errors([(loc, msg, value)])


def field_errors(errors: Iterable[tuple[tuple, str, Any]]) -> RequestValidationError:
    """Several fields' errors, given as (loc, msg, value); the answer shows MAX_ERRORS."""
    detail = [
        {"loc": loc, "msg": msg, "type": "value_error", "input": value}
        for loc, msg, value in errors
    ]
    return RequestValidationError(detail)


def value_at(value: Any, index: Iterable[int]) -> Any:
    """The part of `value` at `index`: value_at(rows, (2, 1)) is rows[2][1]."""
    for i in index:
        value = value[i]
    return value


def body_errors(err: ValidationError, tagged: bool = False) -> RequestValidationError:
    """Pydantic's errors of a model validated by hand from the body, each loc under "body".
    `tagged`: the model is a tagged union, whose tag pydantic puts first in every loc; it is
    left out, so the loc is the one the chosen member itself gives."""
    errors = err.errors(include_url=False)
    return RequestValidationError(
        [{**e, "loc": ("body", *e["loc"][1 if tagged else 0 :])} for e in errors]
    )


class BoundedErrors(RequestValidationError):
    """Errors bounded already (by `bounded`, in another process), and how many more."""

    def __init__(self, shown: list[dict], more: int):
        super().__init__(shown)
        self.more = more


def bounded(errors: list[dict]) -> tuple[list[dict], int]:
    """The first MAX_ERRORS errors, each with its input echoed briefly; how many more."""
    return [_bounded(e) for e in errors[:MAX_ERRORS]], max(0, len(errors) - MAX_ERRORS)


def bounded_detail(exc: RequestValidationError) -> list[dict]:
    """A 422's errors as the client sees them: bounded, then one error of type
    `too_many_errors` that counts the rest."""
    if isinstance(exc, BoundedErrors):
        shown, more = list(exc.errors()), exc.more
    else:
        shown, more = bounded(list(exc.errors()))
    if more:
        msg = f"{more} more errors not shown (at most {MAX_ERRORS} are listed)"
        shown.append({"loc": [], "msg": msg, "type": "too_many_errors", "input": None})
    return shown


def _bounded(error: dict) -> dict:
    out = {k: echo(v) for k, v in error.items() if k not in ("loc", "msg", "input")}
    out["loc"] = [escape(p) if isinstance(p, str) else p for p in error.get("loc", ())]
    out["msg"] = _clip(str(error.get("msg", "")), MSG_CHARS)
    if "input" in error:
        out["input"] = echo(error["input"])
    return jsonable_encoder(out)


def echo(value: Any, depth: int = 0) -> Any:
    """`value` made short and JSON-safe for an error's `input`: long strings and lists are
    cut with a note of how much was left out; NaN, infinities and huge integers become
    strings; strings UTF-8 cannot encode are escaped."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**64 else _clip(str(value), ECHO_CHARS)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _clip(value, ECHO_CHARS)
    if isinstance(value, bytes):
        return echo(value.decode("utf-8", "backslashreplace"), depth)
    if hasattr(value, "tolist") and hasattr(value, "ndim"):  # a NumPy array or scalar
        return echo(value.tolist(), depth)
    if isinstance(value, dict):
        if depth >= ECHO_DEPTH:
            return f"{{... {len(value)} keys}}"
        items = list(value.items())
        shown = {_clip(str(k), ECHO_CHARS): echo(v, depth + 1) for k, v in items[:ECHO_ITEMS]}
        if len(items) > ECHO_ITEMS:
            shown["..."] = f"{len(items) - ECHO_ITEMS} more keys"
        return shown
    if isinstance(value, list | tuple):
        if depth >= ECHO_DEPTH:
            return f"[... {len(value)} items]"
        shown = [echo(v, depth + 1) for v in value[:ECHO_ITEMS]]
        if len(value) > ECHO_ITEMS:
            shown.append(f"... {len(value) - ECHO_ITEMS} more items")
        return shown
    return echo(str(value), depth)


def escape(text: str) -> str:
    """`text`, with what UTF-8 cannot encode (lone surrogates) written as `\\udXXX`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return escape(text)
    return escape(text[:limit]) + f"... ({len(text) - limit} more characters)"
