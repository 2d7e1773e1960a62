"""Strict reading of HTTP bodies: unknown top-level fields are refused (a typo is a 422, not ignored).

Contract models read tolerantly so NATS messages survive rolling upgrades; HTTP input goes through
:func:`parse_strict` instead, which also reports every problem at once as JSON-pointer errors.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from flowmesh.contracts.errors import InvalidInput
from flowmesh.contracts.models.problem import FieldError

M = TypeVar("M", bound=BaseModel)


def json_pointer(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a JSON pointer (RFC 6901)."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in loc)


def field_errors(exc: ValidationError) -> list[FieldError]:
    """A pydantic validation error as ``[{path, message}]``."""
    return [FieldError(path=json_pointer(tuple(e["loc"])), message=e["msg"]) for e in exc.errors()]


def accepted_keys(model: type[BaseModel]) -> set[str]:
    """Every top-level key a model accepts: field names and their aliases."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
    return keys


def parse_strict(model: type[M], data: Any) -> M:
    """Validate an HTTP body: must be an object, no unknown top-level keys, valid fields of the right JSON types.

    Raises:
        InvalidInput: with every problem found, each located by a JSON pointer.
    """
    if not isinstance(data, dict):
        raise InvalidInput(
            "the body must be a JSON object",
            errors=[FieldError(path="", message=f"expected an object, got {type(data).__name__}")],
        )
    allowed = accepted_keys(model)
    errors = [
        FieldError(path=json_pointer((key,)), message=f"unknown field {key!r}") for key in data if key not in allowed
    ]
    try:
        # strict types too: a JSON API takes no "1" for a number and no 0 for a boolean
        parsed = model.model_validate(data, strict=True)
    except ValidationError as exc:
        errors.extend(field_errors(exc))
        parsed = None
    if errors or parsed is None:
        raise InvalidInput(
            "the body is not valid: " + "; ".join(f"{e.path or '/'}: {e.message}" for e in errors[:5]), errors=errors
        )
    return parsed
