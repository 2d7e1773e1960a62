"""Helpers every route module shares: calling a service as the request's principal."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from flowmesh.gateway import keys


async def call(request: web.Request, subject: str, body: BaseModel | dict[str, Any] | None = None) -> Any:
    """Call a service operation on behalf of the request's verified principal."""
    principal = request[keys.PRINCIPAL]
    return await request.app[keys.RPC].call(
        subject,
        body,
        tenant=principal.tenant,
        role=principal.role,
        sub=principal.sub,
        traceparent=request[keys.TRACEPARENT],
    )


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response of already-serialised contract data."""
    try:
        body = orjson.dumps(data)
    except orjson.JSONEncodeError:  # what only the standard encoder writes (an integer beyond 64 bits)
        body = json.dumps(data, separators=(",", ":")).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def absolute_url(request: web.Request, trigger: dict[str, Any]) -> dict[str, Any]:
    """Make a trigger's webhook path a full URL: the configured public URL, else this request's origin."""
    path = trigger.get("url")
    if path:
        base = request.app[keys.SETTINGS].public_url or f"{request.scheme}://{request.host}"
        trigger["url"] = base.rstrip("/") + path
    return trigger
