"""``/api/v1/secrets``: the tenant's named secrets, stored sealed by the usage service, never shown whole."""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

from flowmesh.contracts.errors import NotFound
from flowmesh.contracts.models.usage import SECRET_NAME, SecretCreate, SecretInfo, SecretList, SecretRef
from flowmesh.contracts.subjects import UsageOp
from flowmesh.gateway.body import read_body
from flowmesh.gateway.openapi.operation import Operation
from flowmesh.gateway.routes.common import call, json_response

routes = web.RouteTableDef()

NAME: Final = re.compile(SECRET_NAME)


@routes.get("/api/v1/secrets")
@Operation("listSecrets", "Stored secrets (never shown whole)", tag="secrets", responses={200: SecretList})
async def list_secrets(request: web.Request) -> web.Response:
    """The tenant's secrets, each shown only by a hint."""
    return json_response(await call(request, UsageOp.SECRETS_LIST))


@routes.post("/api/v1/secrets")
@Operation(
    "putSecret",
    "Store a secret, replacing the value of one of the same name",
    tag="secrets",
    responses={201: SecretInfo},
    notes={
        201: "Stored (encrypted); only `hint` is ever shown: `…` and the last four characters of a value "
        "of 12 characters or more, `…` alone for shorter ones.",
        422: "A name not matching `[A-Za-z_][A-Za-z0-9_]{0,63}`, or a value empty, holding a NUL character "
        "or over 8192 bytes in UTF-8.",
    },
    description="`http` and `llm` steps read it as `{{ secrets.NAME }}`; the value is resolved when the step "
    "executes and every record of the step shows `[secret:NAME]` instead. Replacing a value keeps `createdAt`.",
    body=SecretCreate,
)
async def put_secret(request: web.Request) -> web.Response:
    """Store a secret (replacing the value of one of the same name)."""
    return json_response(await call(request, UsageOp.SECRETS_PUT, await read_body(request, SecretCreate)), status=201)


@routes.delete("/api/v1/secrets/{name}")
@Operation(
    "deleteSecret",
    "Forget a secret",
    tag="secrets",
    responses={204: None},
    notes={404: "No secret of this name is stored."},
    description="Steps that still reference it fail with error type `secret-missing`.",
)
async def delete_secret(request: web.Request) -> web.Response:
    """Forget a secret."""
    name = request.match_info["name"]
    if not NAME.fullmatch(name):
        raise NotFound(f"no secret {name[:64]!r} is stored")
    await call(request, UsageOp.SECRETS_DELETE, SecretRef(name=name))
    return web.Response(status=204)
