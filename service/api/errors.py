"""422 errors the routes find themselves, in FastAPI's standard shape: each error has the
`loc` of the field, a `msg`, `type` "value_error" and the rejected `input`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

MAX_ERRORS = 20  # a 10,000-row request with every row wrong answers with the first few


def field_error(loc: tuple, msg: str, value: Any) -> RequestValidationError:
    """One field's error: raise field_error(("body", "steps"), "too many", body.steps)."""
    return field_errors([(loc, msg, value)])


def field_errors(errors: Iterable[tuple[tuple, str, Any]]) -> RequestValidationError:
    """Several fields' errors, given as (loc, msg, value); at most MAX_ERRORS of them."""
    detail = [
        {"loc": loc, "msg": msg, "type": "value_error", "input": value}
        for loc, msg, value in errors
    ]
    return RequestValidationError(detail[:MAX_ERRORS])


def body_errors(err: ValidationError) -> RequestValidationError:
    """Pydantic's errors of a model validated by hand from the body, each loc under "body"."""
    errors = err.errors(include_url=False)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])
