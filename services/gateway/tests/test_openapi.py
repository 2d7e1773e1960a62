"""The OpenAPI document: every route documented, every entry a route, the committed file current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from flowmesh.gateway import middleware
from flowmesh.gateway.app import create_app
from flowmesh.gateway.openapi.components import ERRORS, PROBLEM_JSON, REGENERATE
from flowmesh.gateway.openapi.document import IMPLICIT_METHODS, UndocumentedRoute, app_routes, build_openapi, dumps
from flowmesh.gateway.openapi.operation import Operation, Undocumented, documentation_of
from flowmesh.gateway.routes import docs
from flowmesh.gateway.settings import GatewaySettings

COMMITTED = Path(__file__).resolve().parents[3] / "docs" / "api" / "openapi.json"
PUBLIC = {"/api/v1/hooks/{token}", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"}


@pytest.fixture
def app(tmp_path: Path) -> web.Application:
    return create_app(GatewaySettings(env="dev", jwt_secret="t" * 40, data_dir=tmp_path))


@pytest.fixture
def document(app: web.Application) -> dict[str, Any]:
    return build_openapi(app)


def test_every_route_documents_itself_and_the_document_has_each_once(
    app: web.Application, document: dict[str, Any]
) -> None:
    served = {
        (r.method, r.resource.canonical): documentation_of(r.handler)
        for r in app.router.routes()
        if r.resource is not None and r.method not in IMPLICIT_METHODS
    }
    bare = sorted(key for key, doc in served.items() if doc is None)
    assert not bare, f"routes whose handler has no @Operation: {bare}"
    documented = {key for key, doc in served.items() if isinstance(doc, Operation)}
    assert {(r.method, r.path) for r in app_routes(app)} == documented
    assert sum(len(item) for item in document["paths"].values()) == len(documented)


def test_an_undocumented_route_is_refused(app: web.Application) -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/api/v1/secret-door", handler)
    with pytest.raises(UndocumentedRoute, match="POST /api/v1/secret-door"):
        build_openapi(app)


def test_a_route_left_out_says_why_and_is_not_in_the_document(document: dict[str, Any]) -> None:
    reason = documentation_of(docs.docs_asset)
    assert isinstance(reason, Undocumented) and "assets" in reason.reason
    assert not any(path.startswith("/docs/static") for path in document["paths"])


def test_two_routes_with_one_operation_id_are_refused(app: web.Application) -> None:
    @Operation("getRun", "A copy of getRun", tag="runs", responses={200: None})
    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/api/v1/runs-again", handler)
    with pytest.raises(ValueError, match="getRun"):
        build_openapi(app)


def test_the_committed_document_is_current(document: dict[str, Any]) -> None:
    assert COMMITTED.exists(), f"docs/api/openapi.json is missing; generate it with `{REGENERATE}`"
    assert COMMITTED.read_text() == dumps(document), (
        f"docs/api/openapi.json is not current; regenerate it with `{REGENERATE}`"
    )


def test_schemathesis_reads_every_operation(document: dict[str, Any]) -> None:
    loaded = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) == sum(len(item) for item in document["paths"].values())


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(document):
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict), ref


def test_paths_are_full_and_parameters_camel_case(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        assert path.startswith(("/api/v1/", "/ws/")) or path in PUBLIC, path
        for op in item.values():
            names = {p["name"] for p in op.get("parameters", ()) if p.get("in") == "path"}
            assert names == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path
            assert all("_" not in n for n in names), path


def test_errors_are_problems_and_successes_documented(document: dict[str, Any]) -> None:
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for name, response in document["components"]["responses"].items():
        assert response["content"] == {PROBLEM_JSON: problem}, name
    for path, item in document["paths"].items():
        for method, op in item.items():
            statuses = {int(s) for s in op["responses"]}
            assert any(s < 300 for s in statuses), (method, path)
            for status in statuses - {503} if path == "/readyz" else statuses:
                response = op["responses"][str(status)]
                if status >= 400:
                    assert status in ERRORS, (method, path, status)
                    assert "$ref" in response or response["content"] == {PROBLEM_JSON: problem}, (method, path)


def test_security_is_bearer_except_on_public_routes(document: dict[str, Any]) -> None:
    assert document["security"] == [{"bearerAuth": []}]
    assert document["components"]["securitySchemes"]["bearerAuth"]["bearerFormat"] == "JWT"
    for path, item in document["paths"].items():
        for op in item.values():
            if path in PUBLIC:
                assert op["security"] == [], path
            elif path.startswith("/ws/"):
                assert op["security"] == [{"wsTicket": []}], path
            else:
                assert "security" not in op and "401" in op["responses"], path


def test_headers_on_creating_and_conditional_operations(document: dict[str, Any]) -> None:
    paths = document["paths"]

    def params(method: str, path: str) -> set[str]:
        return {p.get("$ref", "").rsplit("/", 1)[-1] for p in paths[path][method].get("parameters", ())}

    assert "IdempotencyKey" in params("post", "/api/v1/flows")
    assert "IdempotencyKey" in params("post", "/api/v1/flows/{flowId}/runs")
    assert "IfMatch" in params("patch", "/api/v1/flows/{flowId}")
    assert "IfMatch" in params("put", "/api/v1/flows/{flowId}")
    created = paths["/api/v1/flows"]["post"]["responses"]["201"]["headers"]
    assert set(created) == {"ETag", "Location"}
    assert "Retry-After" in document["components"]["responses"]["RateLimited"]["headers"]
    list_runs = {p["name"]: p for p in paths["/api/v1/runs"]["get"]["parameters"]}
    assert {"flowId", "status", "since", "until", "page", "pageSize"} <= set(list_runs)
    assert list_runs["pageSize"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}


def test_request_bodies_refuse_unknown_top_level_fields(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in ("FlowCreate", "FlowUpdate", "RunStart", "TriggerCreate", "RunResume", "RunRetry", "FlowExport"):
        assert schemas[name]["additionalProperties"] is False, name
    assert "flowId" in schemas["Run"]["properties"]


async def test_the_docs_routes_serve_the_document_the_page_and_its_assets_only() -> None:
    app = web.Application(middlewares=[middleware.problems])
    app.add_routes(docs.routes)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/openapi.json")
        assert r.status == 200 and r.content_type == "application/json"
        assert json.loads(await r.text()) == build_openapi(app)
        page = await client.get("/docs")
        assert page.status == 200 and page.content_type == "text/html"
        text = await page.text()
        assert "docs/static/swagger-ui-bundle.js" in text and "http" not in text  # nothing from a CDN
        asset = await client.get("/docs/static/swagger-ui-bundle.js")
        assert asset.status == 200 and "SwaggerUIBundle" in await asset.text()
        for name in ("swagger-editor-bundle.js", "..%2Fcore.py", "nope.css"):
            r = await client.get(f"/docs/static/{name}")
            assert r.status == 404 and r.content_type == PROBLEM_JSON, name
