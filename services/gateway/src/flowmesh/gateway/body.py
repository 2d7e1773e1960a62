"""Reading request bodies and queries into contract models, strictly (DESIGN §3, §6)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from flowmesh.contracts.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from flowmesh.contracts.strict import field_errors, parse_strict
from flowmesh.gateway import keys

M = TypeVar("M", bound=BaseModel)


async def read_json(request: web.Request) -> Any:
    """The JSON body; an empty body reads as ``{}``.

    Any content type is read as JSON (``curl -d`` sends a form type by default); a body that is not
    JSON is a 400, or a 415 when it did not claim to be JSON.

    Raises:
        PayloadTooLarge: over the configured limit.
        UnsupportedMediaType: not JSON, and not sent as JSON.
        BadRequest: sent as JSON but not valid JSON.
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
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise UnsupportedMediaType(f"send a JSON body with Content-Type: application/json (got {ctype})") from exc
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc


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
