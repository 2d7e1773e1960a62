"""Reading request bodies and queries into contract models, strictly.

Unknown fields and loose types are refused, not ignored: a typo is an error the client sees.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from flowmesh.contracts.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from flowmesh.contracts.models import FieldError
from flowmesh.contracts.strict import field_errors, json_pointer, parse_strict
from flowmesh.gateway import keys

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH: Final = 64
"""Deepest nesting of a JSON body; deeper would exhaust recursive parsers and encoders further on."""
MESSAGE_HEADROOM: Final = 64 * 1024
"""Room left in a NATS message for what travels with a run input (the request, the run record)."""
# PostgreSQL jsonb holds neither NUL nor a lone UTF-16 surrogate (JSON's "\ud800"; pairs arrive combined)
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


async def read_json(request: web.Request) -> Any:
    """The JSON body; an empty body reads as ``{}``.

    Any content type is read as JSON (``curl -d`` sends a form type by default); a body that is not
    JSON is a 400, or a 415 when it did not claim to be JSON.

    Raises:
        PayloadTooLarge: over the configured limit.
        UnsupportedMediaType: not JSON, and not sent as JSON.
        BadRequest: sent as JSON but not valid JSON.
        InvalidInput: nested deeper than :data:`MAX_DEPTH`, or a string holding NUL or a lone surrogate.
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(
            f"the body is over the limit of {request.app[keys.SETTINGS].max_body_bytes} bytes"
        ) from exc
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except RecursionError as exc:
        raise _too_deep(()) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise UnsupportedMediaType(f"send a JSON body with Content-Type: application/json (got {ctype})") from exc
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    _check_storable(doc)
    return doc


def _check_storable(doc: Any) -> None:
    """Refuse JSON that cannot be stored or would be too deep to handle, instead of failing later as a 500."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(doc, ())]
    while stack:
        item, loc = stack.pop()
        if isinstance(item, str):
            _check_text(item, loc)
        elif isinstance(item, dict | list):
            if len(loc) >= MAX_DEPTH:
                raise _too_deep(loc)
            if isinstance(item, dict):
                for key, value in item.items():
                    _check_text(key, (*loc, key))
                    stack.append((value, (*loc, key)))
            else:
                stack.extend((value, (*loc, i)) for i, value in enumerate(item))


def _check_text(text: str, loc: tuple[str | int, ...]) -> None:
    if _UNSTORABLE.search(text):
        message = "holds a NUL character (\\u0000) or an unpaired surrogate (\\ud800-\\udfff), which cannot be stored"
        raise InvalidInput(
            f"{json_pointer(loc) or '/'} {message}", errors=[FieldError(path=json_pointer(loc), message=message)]
        )


def _too_deep(loc: tuple[str | int, ...]) -> InvalidInput:
    message = f"nested deeper than {MAX_DEPTH} levels"
    return InvalidInput(f"the body is {message}", errors=[FieldError(path=json_pointer(loc), message=message)])


async def read_body(request: web.Request, model: type[M]) -> M:
    """The body as ``model``: a JSON object with no unknown top-level fields."""
    return parse_strict(model, await read_json(request))


def read_query(request: web.Request, model: type[M], **path: str) -> M:
    """Query parameters (plus path parameters) as ``model``; unknown parameters are ignored."""
    try:
        return model.model_validate({**request.query, **path})
    except ValidationError as exc:
        errors = field_errors(exc)
        for e in errors:
            e.path = "/query" + e.path
        raise InvalidInput("invalid query parameters", errors=errors) from exc


def check_fits(value: Any, limit: int, what: str = "the run input") -> None:
    """Refuse a run input that would not fit in one NATS message with room to spare.

    The run travels to the runner (and back, in its reply) as one message, so the encoded input
    must stay under the server's ``max_payload`` less some headroom, whatever the HTTP limit is.

    Raises:
        PayloadTooLarge: the encoded input is over ``limit`` bytes.
        InvalidInput: a string holds an unpaired UTF-16 surrogate (a lone ``\\ud800`` escape).
    """
    try:
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            "the body holds an unpaired UTF-16 surrogate escape (such as \\ud800), which is not text; remove it",
            errors=[FieldError(path="", message="unpaired surrogate")],
        ) from exc
    if size > limit:
        raise PayloadTooLarge(
            f"{what} is {size} bytes once encoded, over the {limit} bytes a run input may have on this "
            "deployment; send a smaller payload (or a reference to it)"
        )
