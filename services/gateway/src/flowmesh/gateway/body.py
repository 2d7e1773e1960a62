"""Reading request bodies and queries into contract models, strictly.

Unknown fields and loose types are refused, not ignored: a typo is an error the client sees.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from flowmesh.contracts.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from flowmesh.contracts.models import FieldError
from flowmesh.contracts.strict import accepted_keys, field_errors, json_pointer, parse_strict
from flowmesh.gateway import keys

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH: Final = 64
"""Deepest nesting of a JSON body; deeper would exhaust recursive parsers and encoders further on."""
MESSAGE_HEADROOM: Final = 64 * 1024
"""Room left in a NATS message for what travels with a run input (the request, the run record)."""
# PostgreSQL jsonb holds neither NUL nor a lone UTF-16 surrogate (JSON's "\ud800"; pairs arrive combined)
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")
_UNSTORABLE_MESSAGE: Final = (
    "holds a NUL character (\\u0000) or an unpaired surrogate (\\ud800-\\udfff), which cannot be stored"
)
MIN_INT: Final = -(2**63)
MAX_INT: Final = 2**63 - 1
"""JSON integers are kept exact within 64 bits (signed); beyond, the services' JSON codec reads floats."""
_CONSTANTS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def parse_constant(name: str) -> float:
    """Python's reading of ``NaN``/``Infinity`` (not JSON), kept so that the check can say where they are."""
    return _CONSTANTS[name]


def number_problem(value: Any) -> str | None:
    """Why a parsed JSON number cannot be taken (None: it can, or it is no number).

    Only finite numbers are JSON (``NaN``, ``Infinity`` and ``1e309``, which overflows to infinity,
    would be stored as ``null``), and integers must fit in 64 bits to stay exact on every wire.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number (NaN, Infinity and numbers beyond 1.8e308 are not JSON numbers)"
    if isinstance(value, int) and not isinstance(value, bool) and not MIN_INT <= value <= MAX_INT:
        return f"is an integer outside the 64-bit range ({MIN_INT} to {MAX_INT}); send it as a string"
    return None


async def read_json(request: web.Request) -> Any:
    """The JSON body; an empty body reads as ``{}``.

    Any content type is read as JSON (``curl -d`` sends a form type by default); a body that is not
    JSON is a 400, or a 415 when it did not claim to be JSON.

    Raises:
        PayloadTooLarge: over the configured limit.
        UnsupportedMediaType: not JSON, and not sent as JSON.
        BadRequest: sent as JSON but not valid JSON.
        InvalidInput: nested deeper than :data:`MAX_DEPTH`, a string holding NUL or a lone surrogate, or a
            number that is not finite or an integer beyond 64 bits (:func:`number_problem`).
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
        doc = json.loads(raw, parse_constant=parse_constant)
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
    """Refuse JSON that cannot be stored exactly or would be too deep to handle, instead of failing later as a 500."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(doc, ())]
    while stack:
        item, loc = stack.pop()
        if isinstance(item, str):
            _check_text(item, loc)
        elif (problem := number_problem(item)) is not None:
            raise InvalidInput(
                f"{json_pointer(loc) or '/'} {problem}", errors=[FieldError(path=json_pointer(loc), message=problem)]
            )
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
        raise InvalidInput(
            f"{json_pointer(loc) or '/'} {_UNSTORABLE_MESSAGE}",
            errors=[FieldError(path=json_pointer(loc), message=_UNSTORABLE_MESSAGE)],
        )


def _too_deep(loc: tuple[str | int, ...]) -> InvalidInput:
    message = f"nested deeper than {MAX_DEPTH} levels"
    return InvalidInput(f"the body is {message}", errors=[FieldError(path=json_pointer(loc), message=message)])


@web.middleware
async def storable_path(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (422) a path parameter holding NUL or a lone surrogate (query parameters: :func:`read_query`).

    PostgreSQL text refuses ``\\u0000``: an id such as ``/admin/tenants/a%00b/plan`` would otherwise
    reach a service's SQL and fail there as a 500.
    """
    errors = [
        FieldError(path=f"/{to_camel(name)}", message=_UNSTORABLE_MESSAGE)
        for name, value in request.match_info.items()
        if _UNSTORABLE.search(value)
    ]
    if errors:
        raise InvalidInput(f"{errors[0].path} {_UNSTORABLE_MESSAGE}", errors=errors)
    return await handler(request)


async def read_body(request: web.Request, model: type[M]) -> M:
    """The body as ``model``: a JSON object with no unknown top-level fields."""
    return parse_strict(model, await read_json(request))


def read_query(request: web.Request, model: type[M], **path: str) -> M:
    """Query parameters (plus path parameters) as ``model``; unknown parameters are ignored.

    Raises:
        InvalidInput: a parameter is not valid for ``model``, or holds NUL or a lone surrogate.
    """
    unstorable = [
        FieldError(path=json_pointer(("query", name)), message=_UNSTORABLE_MESSAGE)
        for name, value in request.query.items()
        if _UNSTORABLE.search(value) and (name in path or name in accepted_keys(model))
    ]
    if unstorable:
        raise InvalidInput(f"{unstorable[0].path} {_UNSTORABLE_MESSAGE}", errors=unstorable)
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
