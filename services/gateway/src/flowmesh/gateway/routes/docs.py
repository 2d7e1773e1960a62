"""``/openapi.json`` and ``/docs``: the API's description and a docs page, both public and served locally.

The docs page is Swagger UI from the ``swagger-ui-py`` wheel (its static files only; none of its
framework glue), so the page works without reaching any CDN.
"""

from __future__ import annotations

import importlib.util
import json
import weakref
from pathlib import Path
from typing import Final

from aiohttp import web

from flowmesh.contracts.errors import NotFound
from flowmesh.gateway import keys
from flowmesh.gateway.openapi.document import build_openapi
from flowmesh.gateway.openapi.operation import Operation, Raw, Undocumented

routes = web.RouteTableDef()

ASSETS: Final = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-16x16.png", "favicon-32x32.png"})
"""The only files of the Swagger UI distribution the page uses (the wheel also ships an editor)."""

_documents: weakref.WeakKeyDictionary[web.Application, bytes] = weakref.WeakKeyDictionary()

# Relative URLs, so the page also works behind a proxy that mounts the gateway under a prefix.
PAGE: Final = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Flowmesh API</title>
  <link rel="stylesheet" href="docs/static/swagger-ui.css">
  <link rel="icon" type="image/png" sizes="32x32" href="docs/static/favicon-32x32.png">
  <link rel="icon" type="image/png" sizes="16x16" href="docs/static/favicon-16x16.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
    });
  </script>
</body>
</html>
"""


def static_dir() -> Path:
    """Where the installed ``swagger-ui-py`` keeps Swagger UI's files (found without importing it)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@routes.get("/openapi.json")
@Operation(
    "openapi",
    "This document",
    tag="operations",
    responses={200: Raw({"application/json": {"type": "object"}})},
    public=True,
    calls_service=False,
)
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this gateway (built once per application)."""
    body = _documents.get(request.app)
    if body is None:
        document = build_openapi(request.app)
        settings = request.app.get(keys.SETTINGS)
        if settings is not None and settings.metrics_placement != "public":
            document["paths"].pop("/metrics", None)  # not an operation of the public API here
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        _documents[request.app] = body
    return web.Response(body=body, content_type="application/json")


@routes.get("/docs")
@Operation(
    "docs",
    "Interactive documentation of this API (Swagger UI, served locally)",
    tag="operations",
    responses={200: Raw({"text/html": {"type": "string"}})},
    public=True,
    calls_service=False,
)
async def docs(_: web.Request) -> web.Response:
    """Swagger UI over ``/openapi.json``."""
    return web.Response(text=PAGE, content_type="text/html")


@routes.get("/docs/static/{name}")
@Undocumented("the docs page's own assets (Swagger UI's script, style and icons)")
async def docs_asset(request: web.Request) -> web.FileResponse:
    """One of the docs page's assets."""
    name = request.match_info["name"]
    if name not in ASSETS:
        raise NotFound(f"no docs asset {name}")
    return web.FileResponse(static_dir() / name, headers={"Cache-Control": "public, max-age=86400"})
