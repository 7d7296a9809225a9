"""The building blocks of spec validation: strict models, and errors raised at the field
they blame, with a message that starts with that field's path."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

# Error type of our own checks. Their messages already start with the field path.
SPEC_ERROR = "invalid_spec"


def spec_error(loc: tuple[str | int, ...], message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(SPEC_ERROR, message), loc=loc, input=value)


def raise_errors(title: str, errors: list[InitErrorDetails]) -> None:
    # A ValidationError raised inside a validator keeps each error's loc (relative to the
    # model being validated), unlike a ValueError, which always lands at the model itself.
    if errors:
        raise ValidationError.from_exception_data(title, errors)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
